"""Training from a corpus in an S3-protocol object store (the real moto server of
``tests/s3.py``), through the shard cache, with a windowed shuffle: exactly once, bit-identical
to the same shards read from local disk, across kill -9 (which leaves no process of the
killed rank behind, its DataLoader workers included), world-size changes, a tight cache,
corrupt cached shards, server errors and runs sharing one cache; the cache counters of
DataLoader workers reported with the trainer's. Runs serve several checks each: the suite's
time is tight.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from steadytrain.data.cache import file_sha256
from steadytrain.data.workers import start_time_of
from steadytrain.distributed import process_running
from tests.e2e.jobs import MAX_STEPS, assert_audit_ok, final_weights, start_training
from tests.e2e.jobs import train as train_job
from tests.helpers import (
    events,
    read_jsonl,
    run_steadytrain,
    wait_for_step,
    worker_pids,
)
from tests.s3 import SECRET, SLOW_DOWN, FaultProxy, aws_env, s3fs_for

pytestmark = pytest.mark.slow

SHARD_TOKENS = 1024  # small shards of one document each: a 24-step run crosses windows
DOCUMENT_BYTES = 1500  # 23 samples of 64+1 tokens
WINDOW = ["data.shuffle_window_shards=2", "data.prefetch_shards=2"]


def prepare(corpus: Path, output: str, endpoint: str):
    return run_steadytrain(
        "data",
        "prepare",
        "--corpus",
        corpus,
        "--output",
        output,
        "--shard-tokens",
        str(SHARD_TOKENS),
        "--val-fraction",
        "0",
        env=aws_env(endpoint),
    )


def train(
    run_dir: Path,
    job: list[str],
    endpoint: str,
    *extra: str,
    nproc: int = 2,
    env: dict[str, str] | None = None,
):
    return train_job(run_dir, job, *extra, nproc=nproc, env={**aws_env(endpoint), **(env or {})})


def start_train(run_dir: Path, job: list[str], endpoint: str):
    return start_training(run_dir, job, env=aws_env(endpoint))


def streamed(overrides: list[str], url: str, cache: Path, *more: str) -> list[str]:
    """The small deterministic job (tests/e2e/jobs.py) on ``url``, cached in ``cache``."""
    return [*overrides, f"data.corpus={url}", f"data.cache_dir={cache}", *WINDOW, *more]


def consumption(run_dir: Path) -> dict[int, list[int]]:
    """Per step, the sample ids consumed, in rank order, as the last attempt to record the
    step recorded them (earlier attempts' records of it were rolled back)."""
    attempts = [a["attempt"] for a in read_jsonl(run_dir / "ledger" / "attempts.jsonl")]
    by_step: dict[int, tuple[int, dict[int, list[int]]]] = {}
    for rank_file in sorted((run_dir / "ledger").glob("rank-*.jsonl")):
        rank = int(rank_file.stem.split("-")[1])
        for record in read_jsonl(rank_file):
            attempt = attempts.index(record["attempt"])
            seen, ids = by_step.get(record["step"], (-1, {}))
            if attempt > seen:
                seen, ids = attempt, {}
            if attempt == seen:
                ids[rank] = record["sample_ids"]
                by_step[record["step"]] = (seen, ids)
    return {
        step: list(itertools.chain.from_iterable(ids[rank] for rank in sorted(ids)))
        for step, (_, ids) in by_step.items()
    }


def shards_read(local_corpus: Path, sample_ids: list[int]) -> list[str]:
    """The checksums of the shards that hold ``sample_ids`` (64+1-token samples)."""
    shards = json.loads((local_corpus / "index.json").read_text())["splits"]["train"]
    owners, first = {}, 0
    for shard in shards:
        count = (shard["num_tokens"] - 1) // 64
        owners.update(dict.fromkeys(range(first, first + count), shard["sha256"]))
        first += count
    return list(dict.fromkeys(owners[sample_id] for sample_id in sample_ids))


def process_tree(pid: int) -> dict[tuple[int, str | None], str]:
    """Process ``pid`` and its descendants now, as ``{(pid, start time): name}``."""
    tree: dict[tuple[int, str | None], str] = {}
    pending = [pid]
    while pending:
        member = pending.pop()
        with contextlib.suppress(OSError):
            name = Path(f"/proc/{member}/comm").read_text().strip()
            tree[(member, start_time_of(member))] = name
            for task in os.listdir(f"/proc/{member}/task"):
                children = Path(f"/proc/{member}/task/{task}/children")
                with contextlib.suppress(OSError):
                    pending += [int(child) for child in children.read_text().split()]
    return tree


def still_running_after(timeout: float, processes: list[tuple[int, str | None]]) -> list[int]:
    """The pids of ``processes`` (pid, start time) still running (a zombie counts as gone)
    ``timeout`` seconds from now, or none as soon as all are gone."""
    deadline = time.monotonic() + timeout
    while True:
        running = [
            pid
            for pid, started in processes
            if start_time_of(pid) == started and process_running(pid)
        ]
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.05)


def step_records(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, text_corpus: Path, bucket: str, s3_endpoint: str):
    """The same text, cut into 300 small documents, prepared twice: into a local folder and
    into the object store."""
    text = b"".join(path.read_bytes() for path in sorted(text_corpus.iterdir()))
    documents = tmp_path_factory.mktemp("documents")
    for number in range(300):
        piece = text[number * DOCUMENT_BYTES : (number + 1) * DOCUMENT_BYTES]
        (documents / f"doc-{number:04d}.txt").write_bytes(piece)
    local = tmp_path_factory.mktemp("local-corpus") / "shards"
    url = f"s3://{bucket}/corpus-{uuid.uuid4().hex[:6]}"
    for output in (str(local), url):
        result = prepare(documents, output, s3_endpoint)
        assert result.returncode == 0, result.output
        assert "shard(s)" in result.stdout
    return local, url


@pytest.fixture(scope="module")
def streamed_run(tmp_path_factory, corpora, overrides, s3_endpoint) -> tuple[Path, Path]:
    """One uninterrupted 2-rank run from s3://, windowed: its run dir and its cache."""
    _, url = corpora
    run_dir, cache = tmp_path_factory.mktemp("streamed"), tmp_path_factory.mktemp("cache")
    result = train(run_dir, streamed(overrides, url, cache), s3_endpoint)
    assert result.returncode == 0, result.output
    return run_dir, cache


def test_s3_and_local_corpora_train_the_same_samples_and_weights(
    corpora, streamed_run, overrides, s3_endpoint, tmp_path: Path
) -> None:
    local, url = corpora
    run_dir, cache = streamed_run
    assert json.loads(
        s3fs_for(s3_endpoint).cat(f"{url.removeprefix('s3://')}/index.json")
    ) == json.loads((local / "index.json").read_text())
    local_run = train(tmp_path, [*overrides, f"data.corpus={local}", *WINDOW], s3_endpoint)
    assert local_run.returncode == 0, local_run.output
    assert consumption(tmp_path) == consumption(run_dir)
    assert final_weights(tmp_path) == final_weights(run_dir)
    assert_audit_ok(run_dir)
    # The windowed order is not the global one (the default would give the reference's).
    meta = json.loads((run_dir / "ledger" / "meta.json").read_text())
    assert meta["shuffle"]["window_shards"] == 2
    last = step_records(run_dir)[-1]
    assert last["data_cache_misses"] > 0 and last["data_cache_bytes_fetched"] > 0
    assert last["data_cache_bytes"] == sum(p.stat().st_size for p in cache.rglob("*.bin"))
    shown = run_steadytrain("status", run_dir, "--json")
    assert shown.returncode == 0, shown.output
    assert json.loads(shown.stdout)["data_cache"]["misses"] == last["data_cache_misses"]
    screen = run_steadytrain("status", run_dir)
    assert f"{last['data_cache_misses']} downloads" in screen.stdout, screen.output
    for path in [*run_dir.rglob("*"), *cache.rglob("*")]:  # credentials are never written
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_kill9_resume_with_a_cache_smaller_than_the_data_is_bit_identical(
    corpora, streamed_run, overrides, s3_endpoint, tmp_path: Path
) -> None:
    _, url = corpora
    index = json.loads((corpora[0] / "index.json").read_text())
    shard_bytes = sorted(entry["num_tokens"] for entry in index["splits"]["train"])
    limit_gb = 6 * shard_bytes[len(shard_bytes) // 2] / 2**30  # six median shards
    job = streamed(
        overrides, url, tmp_path / "cache", f"data.cache_limit_gb={limit_gb}", "data.num_workers=2"
    )
    run_dir = tmp_path / "run"
    process = start_train(run_dir, job, s3_endpoint)
    try:
        wait_for_step(run_dir, MAX_STEPS // 2 + 1, process)
        started = process_tree(process.pid)
        os.kill(worker_pids(process)[-1], signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    # Nothing of the killed run is left: the killed rank's DataLoader workers (whose parent,
    # a forkserver, outlives it) and that forkserver included.
    assert list(started.values()).count("pt_data_worker") == 4, started  # 2 per rank
    left = still_running_after(10, list(started))
    assert not left, [f"{name} {pid}" for (pid, _), name in started.items() if pid in left]
    resumed = train(run_dir, job, s3_endpoint)
    assert resumed.returncode == 0, resumed.output
    assert events(run_dir, "resume")
    assert final_weights(run_dir) == final_weights(streamed_run[0])
    assert_audit_ok(run_dir)
    assert max(record["data_cache_evictions"] for record in step_records(run_dir)) > 0


def test_resume_from_s3_with_another_world_size_workers_and_server_errors_stays_exact(
    streamed_run, corpora, overrides, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """One rank with two loader workers resumes a two-rank run, from an empty cache, through
    a store that answers errors first, then recovers."""
    reference, _ = streamed_run
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "final")
    resume_from = run_dir / "checkpoints" / f"step_{MAX_STEPS - 8:08d}"
    job = streamed(overrides, corpora[1], tmp_path / "cache", "data.num_workers=2")
    # botocore sends each request once; s3fs retries SlowDown 5 times, then steadytrain's own
    # retries (with backoff) take over.
    fault_proxy.fail(SLOW_DOWN, times=8, method="GET")
    resumed = train(
        run_dir,
        job,
        fault_proxy.url,
        "--resume-from",
        resume_from,
        nproc=1,
        env={"AWS_MAX_ATTEMPTS": "1"},
    )
    assert resumed.returncode == 0, resumed.output
    assert fault_proxy.injected == 8
    assert events(run_dir, "resume")[-1]["saved_world_size"] == 2
    # Each step consumed the same samples (split across ranks another way).
    consumed = consumption(run_dir)
    assert {step: sorted(ids) for step, ids in consumed.items()} == {
        step: sorted(ids) for step, ids in consumption(reference).items()
    }
    assert_audit_ok(run_dir)
    expected = load_file(reference / "final" / "model.safetensors")
    for name, tensor in load_file(run_dir / "final" / "model.safetensors").items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-3, atol=1e-4)
    # The cache counters add up the trainer's process and its two workers. The cache was
    # empty: every download is one the store logged (by whichever process made it).
    last = step_records(run_dir)[-1]
    shard_bytes = {p.name: p.stat().st_size for p in corpora[0].glob("*.bin")}
    downloads = [
        name
        for request in fault_proxy.requests
        if request.method == "GET"
        and not request.injected
        and (name := request.path.split("?")[0].rsplit("/", 1)[1]) in shard_bytes
    ]
    assert last["data_cache_misses"] == len(downloads) > 0
    assert last["data_cache_bytes_fetched"] == sum(shard_bytes[name] for name in downloads)
    # Each worker counts a hit or a download at its first use of each shard; the workers
    # take the 4 micro-batches of 2 per step in turns.
    micro_batches = [
        consumed[step][start : start + 2]
        for step in range(MAX_STEPS - 8, MAX_STEPS)
        for start in range(0, 8, 2)
    ]
    first_uses = sum(
        len(shards_read(corpora[0], [i for ids in micro_batches[worker::2] for i in ids]))
        for worker in range(2)
    )
    assert last["data_cache_hits"] + last["data_cache_misses"] >= first_uses


def test_two_runs_share_a_cache_with_a_corrupt_shard_in_it(
    streamed_run, corpora, overrides, s3_endpoint, tmp_path: Path
) -> None:
    reference, reference_cache = streamed_run
    cache = tmp_path / "cache"
    shutil.copytree(reference_cache, cache)
    first_step = shards_read(corpora[0], consumption(reference)[0])
    assert len(first_step) >= 2
    for number, path in enumerate(cache / "shards" / f"{sha}.bin" for sha in first_step[:2]):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data) if number == 0 else bytes(data[:100]))  # flipped, cut
    job = streamed(overrides, corpora[1], cache, "train.max_steps=6")
    runs = [tmp_path / "first", tmp_path / "second"]
    processes = [start_train(run_dir, job, s3_endpoint) for run_dir in runs]
    for process in processes:
        assert process.wait(timeout=240) == 0
    expected = consumption(reference)
    for run_dir in runs:
        assert consumption(run_dir) == {step: expected[step] for step in range(6)}
        assert_audit_ok(run_dir)
    for path in (cache / "shards").glob("*.bin"):
        assert file_sha256(path) == path.stem, f"{path.name} is not what its name says"
    assert not list((cache / "shards").glob(".*partial*"))


def assert_one_line_data_error(result, *, mentions: list[str]) -> None:
    assert result.returncode == 7, result.output
    assert "Traceback" not in result.output, result.output
    error_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1, result.stderr
    for text in mentions:
        assert text in error_lines[0], error_lines[0]


def test_bad_stores_are_one_line_errors(
    corpora, overrides, bucket: str, s3_endpoint: str, tmp_path: Path
) -> None:
    missing = f"s3://{bucket}/not-prepared"
    no_index = train(tmp_path / "a", streamed(overrides, missing, tmp_path / "c"), s3_endpoint)
    assert_one_line_data_error(no_index, mentions=[f"{missing}/index.json", "data prepare"])

    unreachable = train(
        tmp_path / "b",
        streamed(overrides, corpora[1], tmp_path / "c", "data.fetch_attempts=1"),
        "http://127.0.0.1:9",  # nothing listens on the discard port
    )
    assert_one_line_data_error(unreachable, mentions=["index.json", "reachable"])

    # A shard whose bytes no longer match index.json's checksum.
    tampered = f"s3://{bucket}/tampered-{uuid.uuid4().hex[:6]}"
    fs = s3fs_for(s3_endpoint)
    fs.copy(corpora[1].removeprefix("s3://"), tampered.removeprefix("s3://"), recursive=True)
    index = json.loads(fs.cat(f"{tampered.removeprefix('s3://')}/index.json"))
    for entry in index["splits"]["train"]:
        shard = f"{tampered.removeprefix('s3://')}/{entry['path']}"
        fs.pipe(shard, bytes(entry["num_tokens"]))
    bad = train(tmp_path / "d", streamed(overrides, tampered, tmp_path / "c"), s3_endpoint)
    assert_one_line_data_error(bad, mentions=["index.json says", "upload the corpus again"])


def test_a_mixture_of_a_local_and_a_streamed_source_is_audited_per_source(
    corpora, overrides, s3_endpoint, tmp_path: Path
) -> None:
    local, url = corpora
    job = [
        *(setting for setting in overrides if not setting.startswith("data.corpus=")),
        f"data.cache_dir={tmp_path / 'cache'}",
        f"data.sources=[{{corpus: {local}, weight: 3}}, {{corpus: '{url}', weight: 1}}]",
    ]
    first = train(tmp_path, job, s3_endpoint)
    assert first.returncode == 0, first.output
    assert step_records(tmp_path)[-1]["data_cache_misses"] > 0  # the streamed source's cache
    resume_from = tmp_path / "checkpoints" / f"step_{MAX_STEPS - 8:08d}"
    resumed = train(tmp_path, job, s3_endpoint, "--resume-from", resume_from, nproc=1)
    assert resumed.returncode == 0, resumed.output
    audit = run_steadytrain("audit", tmp_path)
    assert audit.returncode == 0, audit.output
    local_line, streamed_line = (line for line in audit.stdout.splitlines() if "source " in line)
    assert local_line.startswith(f"source {local} (weight 3): ")
    assert streamed_line.startswith(f"source {url} (weight 1): ")
    consumed = [
        int(line.split(": ")[1].split()[0].replace(",", "")) for line in (local_line, streamed_line)
    ]
    assert sum(consumed) == MAX_STEPS * 8
    assert 2 * consumed[1] < consumed[0] < 4 * consumed[1]  # weight 3 to 1
