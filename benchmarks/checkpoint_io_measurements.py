"""The measurements of ``checkpoint_io.py``: one function per thing measured.

The disk's own bandwidth, steadytrain's save and restore through the real protocol, the
``torch.save`` / ``torch.load`` peer, and one ``steadytrain train`` run with periodic saves.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from overhead import machine_cpu_ticks, run_logged
from steadytrain.checkpoint import (
    LocalStorage,
    Manifest,
    Payload,
    read_parts,
    save_checkpoint,
    snapshot_parts,
)
from steadytrain.checkpoint import verify_checkpoint as verify_steadytrain_checkpoint
from steadytrain.checkpoint.manifest import checksum_of
from steadytrain.config import TrainConfig
from steadytrain.distributed import capture_rng_state
from steadytrain.model.gpt import GPT
from steadytrain.train.optim import build_optimizer

WIDTH, NUM_HEADS = 512, 8
DISK_CHUNK_BYTES = 16 * 2**20
GB = 1e9
# A machine whose other processes use less than this share of the CPU counts as quiet.
QUIET_BUSY_SHARE = 0.15


# ---------------------------------------------------------------------------------------------
# The machine: quiet or not, page cache, the disk's own bandwidth
# ---------------------------------------------------------------------------------------------


def own_ticks() -> float:
    """CPU ticks used so far by this process (all threads) and its finished children."""
    ticks = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        ticks += (usage.ru_utime + usage.ru_stime) * os.sysconf("SC_CLK_TCK")
    return ticks


class ForeignCpu:
    """The share of the machine's CPU that other processes used while the block ran."""

    def __enter__(self) -> ForeignCpu:
        self.share: float | None = None
        self._before = machine_cpu_ticks(), own_ticks()
        return self

    def __exit__(self, *exc: object) -> None:
        after = machine_cpu_ticks()
        if after is None or self._before[0] is None:
            return
        total, busy, steal = (a - b for a, b in zip(after, self._before[0], strict=True))
        ours = own_ticks() - self._before[1]
        self.share = max(0.0, (busy - steal - ours) / max(1, total))


def test_runs() -> list[str]:
    """Command lines of test runs that may compete for the CPU (``pgrep -af pytest``)."""
    found = subprocess.run(["pgrep", "-af", "pytest"], capture_output=True, text=True)
    return found.stdout.splitlines()


def wait_for_quiet(max_wait_s: float) -> dict[str, Any]:
    """Wait (at most ``max_wait_s``) until other processes leave the CPU mostly idle.

    A test run (``pgrep -f pytest``) that is alive but idle does not count, yet is reported:
    it may start using the CPU during the round, which the round's own share then shows.
    """
    started = time.perf_counter()
    while True:
        with ForeignCpu() as probe:
            time.sleep(3.0)
        busy = probe.share if probe.share is not None else 0.0
        waited = time.perf_counter() - started
        if busy < QUIET_BUSY_SHARE or waited >= max_wait_s:
            return {
                "waited_s": round(waited, 1),
                "quiet": busy < QUIET_BUSY_SHARE,
                "others_cpu_share_before": round(busy, 3),
                "pytest_processes": len(test_runs()),
            }
        time.sleep(5.0)


def drop_from_cache(paths: list[Path]) -> None:
    """Ask the kernel to forget the clean pages of ``paths`` so the next read hits the disk."""
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def resident_bytes(paths: list[Path]) -> int | None:
    """Bytes of ``paths`` in the page cache (util-linux ``fincore``), or None without it."""
    if shutil.which("fincore") is None:
        return None
    found = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *map(str, paths)],
        capture_output=True,
        text=True,
    )
    if found.returncode != 0:
        return None
    return sum(int(value) for value in found.stdout.split())


class Settle:
    """Run before each measured operation so that every side starts from the same state.

    Two things on this kind of machine swing timings several-fold otherwise. ``os.sync()`` flushes
    what earlier steps left pending (ext4's journal, and the discards of deleted files on a
    ``discard`` mount). Touching and freeing ``num_bytes`` of memory: on a VM whose balloon
    driver hands free guest memory back to the host (free page reporting), the first touch of
    such memory costs a host fault per page (~0.4 GB/s here instead of >10 GB/s), and every
    buffer and page-cache page an operation allocates would pay it depending on how recently
    memory was freed. The host can take freed memory back within a second or two, so this
    narrows the swing without removing it; the speed of each warm-up is kept to show which
    regime the machine was in.
    """

    def __init__(self, num_bytes: int, *, enabled: bool) -> None:
        self.num_bytes = num_bytes
        self.enabled = enabled
        self.first_touch_gbps: list[float] = []

    def __call__(self) -> None:
        if not self.enabled:
            return
        os.sync()
        started = time.perf_counter()
        touched = np.ones(self.num_bytes, dtype=np.uint8)
        self.first_touch_gbps.append(self.num_bytes / (time.perf_counter() - started) / GB)
        del touched


def no_preparation() -> None:
    return None


def files_in(directory: Path) -> list[Path]:
    return sorted(path for path in directory.rglob("*") if path.is_file())


def measure_disk(
    scratch: Path, *, num_bytes: int, prepare: Callable[[], None] = no_preparation
) -> dict[str, Any]:
    """Sequential write (buffered, then fsync) and cold read of one file of ``num_bytes``."""
    path = scratch / "disk.bin"
    chunk = os.urandom(DISK_CHUNK_BYTES)
    prepare()
    started = time.perf_counter()
    with open(path, "wb") as handle:
        remaining = num_bytes
        while remaining > 0:
            remaining -= handle.write(memoryview(chunk)[: min(remaining, DISK_CHUNK_BYTES)])
        handle.flush()
        os.fsync(handle.fileno())
    write_s = time.perf_counter() - started
    drop_from_cache([path])
    cached = resident_bytes([path])
    buffer = bytearray(DISK_CHUNK_BYTES)
    prepare()
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        while handle.readinto(buffer):
            pass
    read_s = time.perf_counter() - started
    path.unlink()
    return {
        "bytes": num_bytes,
        "write_s": write_s,
        "read_s": read_s,
        "write_gbps": num_bytes / write_s / GB,
        "read_gbps": num_bytes / read_s / GB,
        "cached_bytes_before_read": cached,
    }


# ---------------------------------------------------------------------------------------------
# The state, steadytrain's save and restore, torch.save and torch.load
# ---------------------------------------------------------------------------------------------


class EventRecorder:
    """The smallest ``EventSink``: keeps what the protocol reports."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, kind: str, **fields: Any) -> None:
        self.events.append((kind, fields))


def num_layers_for(size_mb: float) -> int:
    """Layers of a width-512 GPT whose weights + two AdamW moments are about ``size_mb``."""
    per_layer = 3 * 4 * (12 * WIDTH**2 + 13 * WIDTH)  # fp32 weights, exp_avg, exp_avg_sq
    fixed = 3 * 4 * ((256 + 1024 + 256 + 2) * WIDTH)  # embeddings, head, final norm
    return max(1, round((size_mb * 1e6 - fixed) / per_layer))


def build_state(num_layers: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A GPT and steadytrain's AdamW after one real optimizer step (so the moments exist)."""
    torch.manual_seed(0)
    model = GPT(num_layers=num_layers, width=WIDTH, num_heads=NUM_HEADS)
    optimizer = build_optimizer(model, TrainConfig())
    tokens = torch.randint(0, 256, (2, 64))
    logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def benchmark_manifest(step: int) -> Manifest:
    return Manifest(
        step=step,
        time=time.time(),
        identity_fingerprint="checkpoint-io-benchmark",
        identity={"benchmark": "checkpoint_io"},
        world_size=1,
        global_batch_size=1,
        versions={"torch": torch.__version__, "python": platform.python_version()},
    )


def steadytrain_save(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    storage: LocalStorage,
    *,
    step: int,
    copy: bool = False,
) -> dict[str, Any]:
    """One save through the real protocol, as the checkpointer does it; times of the stages.

    ``copy=False`` is a synchronous save (written from the live tensors); ``copy=True`` first
    takes the host-memory snapshot an async save takes.
    """
    started = time.perf_counter()
    snapshots = [
        snapshot_parts(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
            stem="shared",
            copy=copy,
        ),
        snapshot_parts({"rng": capture_rng_state()}, stem="rank-00000", copy=copy),
    ]
    files: dict[str, Payload] = {}
    for snapshot in snapshots:
        files.update(snapshot.to_files())
    snapshot_done = time.perf_counter()
    events = EventRecorder()
    outcome = save_checkpoint(
        storage, step=step, rank=0, files=files, manifest=benchmark_manifest(step), events=events
    )
    finished = time.perf_counter()
    if not outcome.committed:
        sys.exit(f"checkpoint_io: the save was not committed: {outcome.error}")
    # The profile: checksums alone, on the same payloads, to split save_checkpoint's time.
    hash_started = time.perf_counter()
    for payload in files.values():
        checksum_of(payload.chunks())
    checksum_s = time.perf_counter() - hash_started
    num_bytes = sum(path.stat().st_size for path in files_in(Path(outcome.location)))
    total_s = finished - started
    return {
        "bytes": num_bytes,
        "seconds": total_s,
        "gbps": num_bytes / total_s / GB,
        "snapshot_s": snapshot_done - started,
        "checksum_s": checksum_s,
        "write_fsync_commit_s": finished - snapshot_done - checksum_s,
        "location": outcome.location,
    }


def steadytrain_restore(
    location: Path,
    *,
    model: torch.nn.Module,
    source: torch.nn.Module,
    prepare: Callable[[], None] = no_preparation,
) -> dict[str, Any]:
    """The resume path and ``checkpoints verify``, each from a cold page cache."""
    storage, name = LocalStorage(location.parent), location.name
    paths = files_in(location)
    num_bytes = sum(path.stat().st_size for path in paths)

    drop_from_cache(paths)
    prepare()
    load = load_steadytrain(storage, name, model=model)
    check_restored(model, load.pop("optimizer"), source=source)

    drop_from_cache(paths)
    prepare()
    started = time.perf_counter()
    manifest, problems = verify_steadytrain_checkpoint(storage, name)
    verify_s = time.perf_counter() - started
    if manifest is None or problems:
        sys.exit(f"checkpoint_io: the checkpoint does not verify: {problems}")
    return {
        "bytes": num_bytes,
        "verify_s": verify_s,
        "verify_gbps": num_bytes / verify_s / GB,
        "load_gbps": num_bytes / load["seconds"] / GB,
        **load,
    }


def load_steadytrain(storage: LocalStorage, name: str, *, model: torch.nn.Module) -> dict[str, Any]:
    """What ``restore_training_state`` does on one rank: check the manifest and sizes, read
    every file once (format and checksum checked), then ``load_state_dict`` into ``model`` and
    a fresh AdamW."""
    optimizer = build_optimizer(model, TrainConfig())
    started = time.perf_counter()
    manifest, problems = verify_steadytrain_checkpoint(storage, name, read_files=False)
    if manifest is None or problems:
        sys.exit(f"checkpoint_io: the checkpoint does not check out: {problems}")
    checked = time.perf_counter()
    shared = read_parts(storage, name, manifest, stem="shared")
    read_parts(storage, name, manifest, stem="rank-00000")
    read_done = time.perf_counter()
    model.load_state_dict(shared["model"])
    optimizer.load_state_dict(shared["optimizer"])
    finished = time.perf_counter()
    return {
        "seconds": finished - started,
        "check_s": checked - started,
        "read_s": read_done - checked,
        "load_state_dict_s": finished - read_done,
        "optimizer": optimizer,
    }


def check_restored(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, source: torch.nn.Module
) -> None:
    """The restored weights and moments are those saved (so the timings are of real work)."""
    for (name, restored), original in zip(
        model.state_dict().items(), source.state_dict().values(), strict=True
    ):
        if not torch.equal(restored, original):
            sys.exit(f"checkpoint_io: {name} differs after restore")
    if not any(state.get("exp_avg") is not None for state in optimizer.state.values()):
        sys.exit("checkpoint_io: the restored optimizer has no AdamW moments")


def torch_save(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path
) -> dict[str, Any]:
    """The peer: ``torch.save`` of both state dicts into one file, then fsync."""
    started = time.perf_counter()
    with open(path, "wb") as handle:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - started
    num_bytes = path.stat().st_size
    return {"bytes": num_bytes, "seconds": seconds, "gbps": num_bytes / seconds / GB}


def torch_load(
    path: Path,
    *,
    model: torch.nn.Module,
    source: torch.nn.Module,
    prepare: Callable[[], None] = no_preparation,
) -> dict[str, Any]:
    """The peer: ``torch.load(weights_only=True)`` from a cold cache + ``load_state_dict``."""
    optimizer = build_optimizer(model, TrainConfig())
    drop_from_cache([path])
    prepare()
    started = time.perf_counter()
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    seconds = time.perf_counter() - started
    check_restored(model, optimizer, source=source)
    num_bytes = path.stat().st_size
    return {"bytes": num_bytes, "seconds": seconds, "gbps": num_bytes / seconds / GB}


# ---------------------------------------------------------------------------------------------
# One training run with periodic saves
# ---------------------------------------------------------------------------------------------


def run_training(
    *, config: Path, save_every: int, overrides: list[str], run_dir: Path, async_save: bool
) -> dict[str, Any]:
    """``steadytrain train`` once; the blocking seconds at each save step from metrics.jsonl."""
    command = [
        sys.executable,
        "-m",
        "steadytrain",
        "train",
        str(config),
        "--run-dir",
        str(run_dir),
        *[arg for override in overrides for arg in ("--set", override)],
        "--set",
        f"checkpoint.async_save={str(async_save).lower()}",
    ]
    launch = run_logged(command, log_path=run_dir.with_suffix(".log"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    saved = [event["step"] for event in events if event["event"] == "checkpoint_saved"]
    save_steps = [r["step"] for r in records if r["step"] % save_every == 0]
    if saved != save_steps:
        sys.exit(f"checkpoint_io: saves committed at {saved}, expected {save_steps} ({run_dir})")
    # Steps between the saves: with async_save the writer thread shares the CPU with them.
    between = [r["step_time_s"] for r in records if save_every < r["step"] < save_steps[-1]]
    train_end = next(event for event in events if event["event"] == "train_end")
    return {
        "blocked_s": {str(r["step"]): r["checkpoint_s"] for r in records if r["step"] in saved},
        "mean_blocked_s": statistics.fmean(
            r["checkpoint_s"] for r in records if r["step"] in saved
        ),
        "mean_step_between_saves_s": statistics.fmean(between),
        "fit_seconds": train_end["seconds"],
        **launch,
    }
