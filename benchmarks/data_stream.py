"""Streaming token shards from an object store against reading the same shards from local disk.

Both sides are the loader ``steadytrain train`` builds (``build_datasets``, the sampler with
``sample_order``, ``StepBatches`` with ``step_lookahead``, ``prepare_first_step``), in this one
process, over the same prepared shards and the same sampler plan (seed, windowed shuffle), so
both read exactly the same samples in the same order (checked). The streamed side reads
``s3://`` from a moto server on loopback through the fault proxy of ``tests/s3.py`` (it logs
every request) behind ``ThrottledLink``, which delays each request by ``--latency-ms`` and paces
all responses together at ``--bandwidth-mbps``: loopback alone is unrealistically fast. The
server side runs in its own process so that it does not share the loader's GIL.

A fake step sleeps ``--step-ms`` in place of compute after its micro-batches are read; the
sampler advances as a committed step advances it. Local and streamed runs take turns within
each repetition (the order flips every repetition); every streamed run starts from an empty
cache. Per run: stall fraction (time in ``next_step()`` ÷ step time, first step excluded: it is
the time to first batch), samples/s and MB/s of sample tokens, bytes fetched ÷ bytes of the
shards the run read, peak cache size against ``data.cache_limit_gb`` (sized by the rule of
docs/data.md: ``(2·window + prefetch_shards) × the largest shard``), and the time to first
batch cold (empty cache), after a resume at the position of the run's last step (mid-epoch)
with the cache it left (warm: it holds that step's shards, as a preempted run's cache holds
its current step's) and the same resume with an empty cache.

    .venv/bin/python benchmarks/data_stream.py [--reps 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.s3: the moto server's helpers and the fault proxy

TARGET_STALL_AT_50MS = 0.02  # data wait ÷ step time with a 50 ms step
TARGET_FETCH_RATIO = 1.1  # bytes fetched ÷ bytes consumed, windowed shuffle
BUCKET = "bench-data"
PREFIX = "shards"
RELAY_CHUNK_BYTES = 64 * 1024
PACING_SLACK_S = 0.005


# ---------------------------------------------------------------------------------------------
# The store: moto, the fault proxy (request log), and a latency- and bandwidth-limited link
# ---------------------------------------------------------------------------------------------


class ThrottledLink:
    """A TCP relay to ``upstream_port`` on loopback: the answer to each request waits
    ``latency_s`` before its first byte, and the answers of all connections share one link of
    ``bytes_per_s``.

    A request is what a client sends after the previous answer (HTTP/1.1 without pipelining,
    as botocore speaks it); connection set-up is not delayed.
    """

    def __init__(self, upstream_port: int, *, latency_s: float, bytes_per_s: float) -> None:
        self._upstream_port = upstream_port
        self._latency_s = latency_s
        self._bytes_per_s = bytes_per_s
        self._free_at = 0.0  # when the link has sent everything paced so far
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            upstream = socket.create_connection(("127.0.0.1", self._upstream_port))
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            answered = threading.Event()
            answered.set()
            threading.Thread(target=self._requests, args=(client, upstream, answered)).start()
            threading.Thread(target=self._responses, args=(upstream, client, answered)).start()

    def _requests(self, client: socket.socket, upstream: socket.socket, answered: Any) -> None:
        with _shut_after(upstream):
            while chunk := client.recv(RELAY_CHUNK_BYTES):
                answered.clear()  # a new request: its answer waits for the latency
                upstream.sendall(chunk)

    def _responses(self, upstream: socket.socket, client: socket.socket, answered: Any) -> None:
        with _shut_after(client):
            while chunk := upstream.recv(RELAY_CHUNK_BYTES):
                if not answered.is_set():  # the first bytes of an answer
                    answered.set()
                    time.sleep(self._latency_s)
                self._pace(len(chunk))
                client.sendall(chunk)

    def _pace(self, num_bytes: int) -> None:
        with self._lock:
            now = time.monotonic()
            # Sleeps overshoot: a link idle for less than PACING_SLACK_S keeps its place, so
            # the average rate is the cap rather than below it.
            start = max(now - PACING_SLACK_S, self._free_at)
            self._free_at = start + num_bytes / self._bytes_per_s
            wait = self._free_at - now
        time.sleep(max(0.0, wait))


@contextlib.contextmanager
def _shut_after(sock: socket.socket) -> Iterator[None]:
    """Relay until either side closes, then shut the other side's socket."""
    try:
        with contextlib.suppress(OSError):
            yield
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def serve_store(connection: Any, latency_s: float, bytes_per_s: float) -> None:
    """The store process: moto ← fault proxy ← throttled link; answers request-log queries."""
    import logging

    from moto.server import ThreadedMotoServer

    from tests.s3 import FaultProxy

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    proxy = FaultProxy(f"http://{host}:{port}")
    link = ThrottledLink(
        int(proxy.url.rsplit(":", 1)[1]), latency_s=latency_s, bytes_per_s=bytes_per_s
    )
    connection.send({"direct": f"http://{host}:{port}", "throttled": link.url})
    while (command := connection.recv()) != "stop":
        assert command == "requests"
        connection.send([(r.method, r.path, r.byte_range, r.status) for r in proxy.requests])
        proxy.fail(None)  # relays everything, and starts a new request log
    proxy.close()
    server.stop()


class Store:
    """The store process, seen from the loader's process."""

    def __init__(self, *, latency_s: float, bytes_per_s: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        self._process = context.Process(
            target=serve_store, args=(child, latency_s, bytes_per_s), daemon=True
        )
        self._process.start()
        urls = self._connection.recv()
        self.direct_url, self.throttled_url = urls["direct"], urls["throttled"]

    def take_requests(self) -> list[tuple[str, str, str | None, int]]:
        """The requests the store answered since the last call."""
        self._connection.send("requests")
        return self._connection.recv()

    def stop(self) -> None:
        self._connection.send("stop")
        self._process.join(timeout=30)


# ---------------------------------------------------------------------------------------------
# The corpus, and the loader as the training session builds it
# ---------------------------------------------------------------------------------------------


def make_corpus(work_dir: Path, *, num_shards: int, shard_bytes: int, seed: int) -> Path:
    """Prepared shards of random text (4 documents per shard) in ``work_dir/local``."""
    from steadytrain.data import prepare_shards

    text_dir = work_dir / "text"
    text_dir.mkdir(parents=True)
    generator = np.random.default_rng(seed)
    document_bytes = shard_bytes // 4
    for number in range(num_shards * 4):
        payload = generator.integers(1, 256, size=document_bytes, dtype=np.uint8)
        (text_dir / f"doc-{number:05d}.txt").write_bytes(payload.tobytes())
    index = prepare_shards(
        str(text_dir), work_dir / "local", val_fraction=0.0, shard_tokens=shard_bytes
    )
    shutil.rmtree(text_dir)
    return index.directory


def upload(local_dir: Path, direct_url: str) -> str:
    """Upload the prepared shards straight to moto (not through the link); index last."""
    from tests.s3 import s3fs_for

    fs = s3fs_for(direct_url)
    fs.mkdir(BUCKET)
    for path in [*sorted(local_dir.glob("*.bin")), local_dir / "index.json"]:
        fs.put_file(str(path), f"{BUCKET}/{PREFIX}/{path.name}")
    return f"s3://{BUCKET}/{PREFIX}"


def loader_config(args: argparse.Namespace, *, corpus: str, cache_limit_bytes: int) -> Any:
    from steadytrain.config import Config, DataConfig, TrainConfig

    return Config(
        seed=args.seed,
        data=DataConfig(
            corpus=corpus,
            seq_len=args.seq_len,
            val_fraction=0.0,
            shuffle_window_shards=args.window,
            cache_dir=str(args.work_dir / "cache"),
            cache_limit_gb=cache_limit_bytes / 2**30,
            prefetch_shards=args.prefetch,
        ),
        train=TrainConfig(global_batch_size=args.global_batch, micro_batch_size=args.micro_batch),
    )


class Loader:
    """One rank's loader, built as ``train/session.py`` builds it, at ``position``, for a run
    that ends before step ``end_step`` (``train.max_steps``; None: one that goes on)."""

    def __init__(
        self,
        config: Any,
        *,
        position: dict[str, Any] | None = None,
        end_step: int | None = None,
    ) -> None:
        from steadytrain.config import batch_layout
        from steadytrain.data import (
            GlobalPositionSampler,
            StepBatches,
            build_datasets,
            sample_order,
            step_lookahead,
        )

        layout = batch_layout(config, world_size=1)
        self.datasets = build_datasets(config)
        self.sampler = GlobalPositionSampler(
            num_samples=len(self.datasets.train),
            global_batch_size=layout.global_batch_size,
            seed=config.seed,
            order=sample_order(config.data, self.datasets.train),
        )
        if position is not None:
            self.sampler.load_state_dict(position)
        lookahead = step_lookahead(
            self.datasets,
            self.sampler,
            layout,
            rank=0,
            prefetch_shards=config.data.prefetch_shards,
            end_step=end_step,
        )
        self.batches = StepBatches(
            self.datasets.train,
            self.sampler,
            layout,
            rank=0,
            lookahead=lookahead,
            end_step=end_step,
        )
        self.batches.prepare_first_step()


def first_batch_seconds(config: Any, *, position: dict[str, Any] | None) -> float:
    """From opening the corpus to the first step's micro-batches in hand."""
    started = time.perf_counter()
    loader = Loader(config, position=position)
    loader.batches.next_step()
    seconds = time.perf_counter() - started
    loader.batches.close()
    return seconds


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------


def run_loader(config: Any, *, steps: int, step_s: float) -> dict[str, Any]:
    """``steps`` fake steps from the start of epoch 0; returns what was measured, the position
    reached, that of the last step, and the shards read."""
    started = time.perf_counter()
    loader = Loader(config, end_step=steps)  # as train.max_steps=steps ends a run
    cache, train = loader.datasets.cache, loader.datasets.train
    waits, step_times, peak_cache, read, ids = [], [], 0, set(), hashlib.sha256()
    for step in range(steps):
        step_started = time.perf_counter()
        micro_batches = loader.batches.next_step()
        waited = time.perf_counter() - step_started
        if step == 0:
            first_batch_s = time.perf_counter() - started
            loop_started = time.perf_counter()
        time.sleep(step_s)  # the model's forward, backward and optimizer step
        last_step_position = loader.sampler.state_dict()
        loader.sampler.advance()  # as a committed step does
        step_times.append(time.perf_counter() - step_started)
        waits.append(waited)
        for micro_batch in micro_batches:
            sample_ids = micro_batch.sample_ids.numpy()
            ids.update(sample_ids.tobytes())
            read.update(np.searchsorted(train.first_sample, sample_ids, side="right") - 1)
        if cache is not None:
            peak_cache = max(peak_cache, cache.size_bytes())
    loop_s = time.perf_counter() - loop_started
    position = loader.sampler.state_dict()
    loader.batches.close()  # after the prefetcher's last download
    stats = dict(vars(cache.stats)) if cache is not None else {}
    errors = list(getattr(loader.batches.lookahead, "errors", []))
    if cache is not None:
        peak_cache = max(peak_cache, cache.size_bytes())
    samples = (steps - 1) * config.train.global_batch_size
    sample_bytes = samples * (config.data.seq_len + 1) * loader.datasets.itemsize
    shard_bytes = [s.num_tokens * loader.datasets.itemsize for s in train.shards]
    return {
        "first_batch_s": first_batch_s,
        "stall_fraction": sum(waits[1:]) / sum(step_times[1:]),
        "mean_wait_ms": 1e3 * statistics.mean(waits[1:]),
        "max_wait_ms": 1e3 * max(waits[1:]),
        "samples_per_s": samples / loop_s,
        "mb_per_s": sample_bytes / loop_s / 1e6,
        "shards_read": sorted(int(n) for n in read),
        "bytes_consumed": sum(shard_bytes[n] for n in read),
        "sample_ids_sha256": ids.hexdigest(),
        "peak_cache_bytes": peak_cache,
        "cache_stats": stats,
        "prefetch_errors": errors,
        "position": position,
        "last_step_position": last_step_position,
    }


def streamed_run(
    args: argparse.Namespace, config: Any, store: Store, *, step_s: float
) -> dict[str, Any]:
    """A streamed run from an empty cache, what the store was asked for, then the resumes at
    its last step: with the cache it left (warm) and with an empty one."""
    cache_dir = args.work_dir / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    store.take_requests()
    result = run_loader(config, steps=args.steps, step_s=step_s)
    requests = store.take_requests()
    downloads: dict[int, int] = {}  # shard number -> GETs from its first byte
    for method, path, byte_range, _ in requests:
        name = path.split("?")[0].rsplit("/", 1)[1]
        if method == "GET" and name in args.shard_numbers and _from_start(byte_range):
            number = args.shard_numbers[name]
            downloads[number] = downloads.get(number, 0) + 1
    read = set(result["shards_read"])
    result.update(
        requests=len(requests),
        downloads=sum(downloads.values()),
        bytes_fetched=result["cache_stats"]["bytes_fetched"],
        fetch_ratio=result["cache_stats"]["bytes_fetched"] / result["bytes_consumed"],
        shards_fetched_again=sum(count - 1 for count in downloads.values()),
        bytes_fetched_not_read=sum(
            args.shard_bytes[number] * count
            for number, count in downloads.items()
            if number not in read
        ),
        cache_limit_bytes=args.cache_limit_bytes,
    )
    # Shards fetched for steps after the run (none, as the prefetcher stops at the run's
    # end), and apart from them what the run fetched for itself, once or again.
    fetched_for_run = result["bytes_fetched"] - result["bytes_fetched_not_read"]
    result["fetch_ratio_in_run"] = fetched_for_run / result["bytes_consumed"]
    result["resume_warm_s"] = first_batch_seconds(config, position=result["last_step_position"])
    shutil.rmtree(cache_dir, ignore_errors=True)
    result["resume_cold_s"] = first_batch_seconds(config, position=result["last_step_position"])
    return result


def _from_start(byte_range: str | None) -> bool:
    return byte_range is None or byte_range.startswith("bytes=0-")


def local_run(args: argparse.Namespace, config: Any, *, step_s: float) -> dict[str, Any]:
    result = run_loader(config, steps=args.steps, step_s=step_s)
    result["fetch_ratio"] = result["fetch_ratio_in_run"] = result["shards_fetched_again"] = None
    result["resume_warm_s"] = first_batch_seconds(config, position=result["last_step_position"])
    return result


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--reps", type=int, default=3, help="repetitions (local and streamed take turns)")
    add("--steps", type=int, default=320, help="fake steps per run (within the first epoch)")
    add("--step-ms", type=float, nargs="+", default=[0.0, 5.0, 50.0], help="fake step times")
    add("--num-shards", type=int, default=48)
    add("--shard-mib", type=float, default=4.0, help="shard size (data prepare --shard-tokens)")
    add("--seq-len", type=int, default=8192, help="data.seq_len (uint8 tokens)")
    add("--global-batch", type=int, default=64, help="train.global_batch_size (1 rank)")
    add("--micro-batch", type=int, default=16, help="train.micro_batch_size")
    add("--window", type=int, default=4, help="data.shuffle_window_shards")
    add("--prefetch", type=int, default=4, help="data.prefetch_shards")
    add("--latency-ms", type=float, default=20.0, help="added to every request")
    add("--bandwidth-mbps", type=float, default=100.0, help="link cap, MB/s (10^6 bytes)")
    add("--seed", type=int, default=0)
    add("--work-dir", type=Path, default=None, help="default: a temporary directory")
    add("--json", type=Path, default=None, help="write every measurement here")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, store: Store) -> list[dict[str, Any]]:
    """Every run, local and streamed taking turns; the order flips at each turn."""
    from steadytrain.data import read_index

    local_dir = make_corpus(
        args.work_dir,
        num_shards=args.num_shards,
        shard_bytes=int(args.shard_mib * 2**20),
        seed=args.seed,
    )
    shards = read_index(local_dir).splits["train"]
    args.shard_numbers = {shard.name: number for number, shard in enumerate(shards)}
    args.shard_bytes = [shard.num_tokens for shard in shards]  # uint8: a token is a byte
    args.cache_limit_bytes = (2 * args.window + args.prefetch) * max(args.shard_bytes)
    url = upload(local_dir, store.direct_url)
    configs = {
        side: loader_config(args, corpus=corpus, cache_limit_bytes=args.cache_limit_bytes)
        for side, corpus in (("local", str(local_dir)), ("stream", url))
    }
    steps_per_epoch = Loader(configs["local"]).sampler.steps_per_epoch
    if args.steps >= steps_per_epoch:
        raise ValueError(f"--steps: {args.steps}, must be below the {steps_per_epoch} of an epoch")
    args.link = calibrate_link(args, url)
    runs = []
    for rep in range(args.reps):
        for turn, step_ms in enumerate(args.step_ms):
            order = ("local", "stream") if (rep + turn) % 2 == 0 else ("stream", "local")
            for side in order:
                if side == "local":
                    result = local_run(args, configs[side], step_s=step_ms / 1e3)
                else:
                    result = streamed_run(args, configs[side], store, step_s=step_ms / 1e3)
                runs.append({"rep": rep, "step_ms": step_ms, "side": side, **result})
                print(_run_line(runs[-1]), flush=True)
    return runs


def calibrate_link(args: argparse.Namespace, url: str) -> dict[str, float]:
    """The link as the loader sees it: a small request's round trip, a shard's download rate.

    The first call also builds the S3 client, once per process: not counted anywhere."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    fs.cat_file(f"{root}/index.json")
    fs.invalidate_cache()
    started = time.perf_counter()
    for _ in range(5):
        fs.cat_file(f"{root}/index.json")
    small_s = (time.perf_counter() - started) / 5
    name = next(iter(args.shard_numbers))
    started = time.perf_counter()
    payload = fs.cat_file(f"{root}/{name}")
    shard_s = time.perf_counter() - started
    return {"small_request_ms": 1e3 * small_s, "shard_mb_per_s": len(payload) / shard_s / 1e6}


def _run_line(run: dict[str, Any]) -> str:
    line = (
        f"rep {run['rep']} step {run['step_ms']:g} ms {run['side']:6s} "
        f"stall {run['stall_fraction']:.2%} {run['samples_per_s']:.0f} samples/s "
        f"first batch {run['first_batch_s']:.3f} s, resume {run['resume_warm_s']:.3f} s"
    )
    if run["side"] == "stream":
        line += (
            f" (cold {run['resume_cold_s']:.3f} s), fetched/consumed {run['fetch_ratio']:.3f}, "
            f"peak cache {run['peak_cache_bytes'] / 2**20:.1f} MiB"
        )
    return line


def summarize(args: argparse.Namespace, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repetitions (and ranges) per step time and side, and the verdicts."""
    for rep, step_ms in {(run["rep"], run["step_ms"]) for run in runs}:
        same = {r["sample_ids_sha256"] for r in runs if (r["rep"], r["step_ms"]) == (rep, step_ms)}
        if len(same) != 1:
            raise AssertionError(f"rep {rep}, {step_ms} ms: local and streamed read other samples")
    rows = []
    for step_ms in args.step_ms:
        for side in ("local", "stream"):
            chosen = [run for run in runs if run["step_ms"] == step_ms and run["side"] == side]
            row: dict[str, Any] = {"step_ms": step_ms, "side": side, "reps": len(chosen)}
            for key in SUMMARIZED:
                values = [run[key] for run in chosen if run.get(key) is not None]
                if values:
                    row[key] = statistics.median(values)
                    row[f"{key}_range"] = [min(values), max(values)]
            rows.append(row)
    at_50 = [run for run in runs if run["side"] == "stream" and run["step_ms"] == 50.0]
    streamed = [run for run in runs if run["side"] == "stream"]
    verdicts = {}
    if at_50:
        worst = max(run["stall_fraction"] for run in at_50)
        verdicts["stall_at_50ms"] = {
            "median": statistics.median(run["stall_fraction"] for run in at_50),
            "worst": worst,
            "target": TARGET_STALL_AT_50MS,
            "met": worst <= TARGET_STALL_AT_50MS,
        }
    for key in ("fetch_ratio", "fetch_ratio_in_run") if streamed else ():
        worst = max(run[key] for run in streamed)
        verdicts[key] = {
            "median": statistics.median(run[key] for run in streamed),
            "worst": worst,
            "target": TARGET_FETCH_RATIO,
            "met": worst <= TARGET_FETCH_RATIO,
        }
    return {"rows": rows, "verdicts": verdicts}


SUMMARIZED = (
    "stall_fraction",
    "mean_wait_ms",
    "max_wait_ms",
    "samples_per_s",
    "mb_per_s",
    "fetch_ratio",
    "fetch_ratio_in_run",
    "shards_fetched_again",
    "peak_cache_bytes",
    "first_batch_s",
    "resume_warm_s",
    "resume_cold_s",
)


def print_table(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    print(
        "\n| step | side | stall (range) | mean wait ms | samples/s | MB/s | fetched ÷ consumed "
        "(for the run) | peak cache / limit | first batch cold s | resume warm s | resume cold s |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    limit = args.cache_limit_bytes
    for row in summary["rows"]:
        low, high = row["stall_fraction_range"]
        streamed = row["side"] == "stream"
        cells = [
            f"{row['step_ms']:g} ms",
            row["side"],
            f"{row['stall_fraction']:.2%} ({low:.2%}–{high:.2%})",
            f"{row['mean_wait_ms']:.2f}",
            f"{row['samples_per_s']:.0f}",
            f"{row['mb_per_s']:.1f}",
            f"{row['fetch_ratio']:.3f} ({row['fetch_ratio_in_run']:.3f})" if streamed else "–",
            f"{row['peak_cache_bytes'] / limit:.2f}" if streamed else "–",
            f"{row['first_batch_s']:.3f}",
            f"{row['resume_warm_s']:.3f}",
            f"{row['resume_cold_s']:.3f}" if streamed else "–",
        ]
        print("| " + " | ".join(cells) + " |")
    for name, verdict in summary["verdicts"].items():
        print(
            f"{name}: median {verdict['median']:.4f}, worst {verdict['worst']:.4f}, target "
            f"≤ {verdict['target']}: {'met' if verdict['met'] else 'MISSED'}"
        )


def machine() -> dict[str, Any]:
    import platform

    import torch

    commit = os.popen(f"git -C {REPO} rev-parse --short HEAD 2>/dev/null").read().strip()
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit,
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    temporary = None
    if args.work_dir is None:
        temporary = tempfile.mkdtemp(prefix="steadytrain-data-stream-")
        args.work_dir = Path(temporary)
    store = Store(latency_s=args.latency_ms / 1e3, bytes_per_s=args.bandwidth_mbps * 1e6)
    from tests.s3 import aws_env

    os.environ.update(aws_env(store.throttled_url))  # as a user of the store would set it
    started = time.perf_counter()
    try:
        runs = measure(args, store)
    finally:
        store.stop()
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    summary = summarize(args, runs)
    about = machine()
    print(
        f"\n{about['cpus']} CPUs, Python {about['python']}, torch {about['torch']}, commit "
        f"{about['commit']}; link: {args.latency_ms:g} ms per request, {args.bandwidth_mbps:g} "
        f"MB/s cap (measured: {args.link['small_request_ms']:.1f} ms small request, "
        f"{args.link['shard_mb_per_s']:.1f} MB/s one shard); cache limit "
        f"{args.cache_limit_bytes / 2**20:.1f} MiB; {time.perf_counter() - started:.0f} s"
    )
    print_table(args, summary)
    if args.json is not None:
        settings = {
            key: str(value) if isinstance(value, Path) else value
            for key, value in vars(args).items()
            if key not in {"shard_numbers", "json"}
        }
        for run in runs:
            run.pop("shards_read")
        report = {"settings": settings, "machine": about, **summary, "runs": runs}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
