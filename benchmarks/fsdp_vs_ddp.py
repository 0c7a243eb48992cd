"""FSDP vs DDP on the same model and machine: step time, grad_sync and peak memory per rank,
and the sharded save and load against the disk's own bandwidth.

Every run trains the same job (``examples/tiny.yaml``'s corpus; a GPT of ``checkpoint_io.py``'s
width whose weights and AdamW moments make a ~``--size-mb`` checkpoint) with ``steadytrain
train --nproc N`` over gloo on CPU; only ``parallel.strategy`` differs. Each round, for each
strategy (DDP then FSDP, reversed every other round, since the machine is shared and noisy):

1. a fresh run of ``--steps`` steps that saves synchronously once, after step ``--steps`` - 1;
2. the same command again (the checkpoint's files dropped from the page cache first): it
   resumes from that checkpoint, trains the last step and saves at the end.

From the runs' own files: the step time (rank 0's ``step_time_s`` less its ``checkpoint_s``,
each rank's ``rank_own_s``) and ``grad_sync_s`` over the steps after ``--warmup`` of run 1; the
save (checkpoint bytes / ``blocked_s`` of the ``checkpoint_saved`` events: snapshot, every
rank's write, the commit) and the load (bytes / ``checkpoint_read_s`` of run 2's ``recovery``
event: finding, reading and checking the checkpoint on every rank); each against the disk
measured in the same round by ``checkpoint_io``'s probe (one file of the checkpoint's size,
written + fsync, then read cold into one reused buffer). The load is also compared with its
floor on this machine: after the resume, the checkpoint's files dropped from the cache again,
one fresh process per rank reads exactly what that rank's resume read (its own ``rank-N*``
files and every shared file) cold into new memory, starting as long after its start as the
resume's workers took to reach the restore. A load allocates what it reads, and on a VM whose
host takes back freed memory the first touch of new memory can be slower than the disk; the
reused buffer of the disk probe never pays it. Peak memory per rank: each worker's ``VmHWM``
(peak resident set) from ``/proc/<pid>/status``, read every ``POLL_S`` until it exits, beside
the memory planner's per-rank peak of the model's tensors (``memory_plan.py``'s ``plan_for``).

    .venv/bin/python benchmarks/fsdp_vs_ddp.py [--steps 20] [--rounds 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from checkpoint_io import source_provenance
from checkpoint_io_measurements import (
    GB,
    NUM_HEADS,
    WIDTH,
    Settle,
    drop_from_cache,
    files_in,
    measure_disk,
    num_layers_for,
    resident_bytes,
    wait_for_quiet,
)
from memory_plan import build_run, plan_for
from overhead import LOG_EVERY, NOISY_FOREIGN_SHARE, check_timed_steps, train_logged, write_summary

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "examples" / "tiny.yaml"
STRATEGIES = ("ddp", "fsdp")
TARGET_SAVE_RATIO = 0.70  # sharded save GB/s / disk write GB/s, at least (as for DDP's)
TARGET_LOAD_RATIO = 0.70  # sharded load GB/s / disk read GB/s, at least
SEQ_LEN, MICRO_BATCH = 64, 2  # per rank, no accumulation: a step is mostly the model's size
POLL_S = 0.05  # how often each worker's VmHWM is read


# ---------------------------------------------------------------------------------------------
# Peak memory of the workers
# ---------------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of ``pid``, or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _peak_rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class WorkerPeaks:
    """Peak resident memory of every training worker this process starts while it runs.

    Workers are the descendants of this process that multiprocessing started (forked from the
    launcher's forkserver, or spawned); ranks are numbered by start time, since the agent
    starts local rank 0 first. ``VmHWM`` only grows, so the last reading before a worker
    exits is its peak up to ``POLL_S`` before the exit.
    """

    def __init__(self) -> None:
        self._peaks: dict[int, int] = {}
        self._started: dict[int, int] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> WorkerPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def by_rank(self) -> list[int]:
        """Each worker's peak in bytes, in the order the workers started."""
        order = sorted(self._peaks, key=lambda pid: (self._started[pid], pid))
        return [self._peaks[pid] for pid in order]

    def _poll(self) -> None:
        ticks = 0
        while not self._done.is_set():
            if ticks % 10 == 0:  # new workers appear rarely; their memory changes all the time
                self._find_workers()
            for pid in list(self._started):
                peak = _peak_rss_bytes(pid)
                if peak is not None:
                    self._peaks[pid] = max(peak, self._peaks.get(pid, 0))
            ticks += 1
            self._done.wait(POLL_S)

    def _find_workers(self) -> None:
        parents: dict[int, tuple[int, int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
                parents[int(entry.name)] = stat
        for pid, (parent, started) in parents.items():
            if pid in self._started or not self._descends_from_us(pid, parents):
                continue
            command, parent_command = _cmdline(pid), _cmdline(parent)
            forked = "multiprocessing.forkserver" in command and "forkserver" in parent_command
            if forked or "multiprocessing.spawn" in command:
                self._started[pid] = started

    @staticmethod
    def _descends_from_us(pid: int, parents: dict[int, tuple[int, int]]) -> bool:
        ours = os.getpid()
        while pid in parents and pid > 1:
            pid = parents[pid][0]
            if pid == ours:
                return True
        return False


# ---------------------------------------------------------------------------------------------
# The load's floor: the same bytes, cold, into new memory, in fresh processes
# ---------------------------------------------------------------------------------------------

# Standard library only, so that nothing but the read touches new memory. Each file goes into
# its own private anonymous mapping (huge pages advised), as steadytrain's reader allocates.
READ_PROBE = r"""
import json, mmap, os, sys, time
delay, paths = float(sys.argv[1]), sys.argv[2:]
time.sleep(delay)
started, regions = time.perf_counter(), []
for path in paths:
    size = os.path.getsize(path)
    region = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    view, filled = memoryview(region), 0
    with open(path, "rb", buffering=0) as handle:
        while filled < size:
            filled += handle.readinto(view[filled : filled + 16 * 2**20])
    regions.append(region)
print(json.dumps({"seconds": time.perf_counter() - started}))
"""


def files_of_rank(paths: list[Path], rank: int) -> list[Path]:
    """What a rank's resume reads: its own ``rank-N*`` files and every file of no rank."""
    own = f"rank-{rank:05d}"
    return [p for p in paths if p.name.startswith(own) or not p.name.startswith("rank-")]


def load_floor(paths: list[Path], *, nproc: int, delay_s: float) -> dict[str, Any]:
    """Seconds for ``nproc`` fresh processes to read their ranks' files cold, concurrently."""
    os.sync()
    drop_from_cache(paths)
    cached = resident_bytes(paths)
    probes = [
        subprocess.Popen(
            [sys.executable, "-c", READ_PROBE, str(delay_s), *map(str, files_of_rank(paths, r))],
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(nproc)
    ]
    seconds = [json.loads(probe.communicate()[0])["seconds"] for probe in probes]
    if any(probe.returncode for probe in probes):
        sys.exit("fsdp_vs_ddp: a read probe failed")
    return {"seconds": max(seconds), "per_rank_s": seconds, "cached_bytes_before": cached}


# ---------------------------------------------------------------------------------------------
# One strategy: a fresh run with a save, then the resume
# ---------------------------------------------------------------------------------------------


def job_overrides(args: argparse.Namespace, *, strategy: str) -> list[str]:
    """The job both strategies train; one save, synchronous, after step ``steps - 1``."""
    return [
        f"model.kwargs={{num_layers: {args.num_layers}, width: {WIDTH}, num_heads: {NUM_HEADS}}}",
        f"data.seq_len={SEQ_LEN}",
        "data.ledger=false",
        f"train.global_batch_size={MICRO_BATCH * args.nproc}",
        f"train.micro_batch_size={MICRO_BATCH}",
        f"train.max_steps={args.steps}",
        "train.eval_batches=0",
        f"checkpoint.every_steps={args.steps - 1}",
        "checkpoint.keep_last=2",
        "checkpoint.async_save=false",
        f"log.every_steps={LOG_EVERY}",
        "deterministic=false",
        "dist.backend=gloo",  # CPU, also on a machine with GPUs
        f"parallel.strategy={strategy}",
        *args.settings,
    ]


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def checkpoint_bytes(run_dir: Path, step: int) -> int:
    return sum(path.stat().st_size for path in files_in(checkpoint_dir(run_dir, step)))


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def saved_at(events: list[dict[str, Any]], step: int, *, run_dir: Path) -> dict[str, Any]:
    """The ``checkpoint_saved`` event of ``step``, its bytes and throughput."""
    found = [e for e in events if e["event"] == "checkpoint_saved" and e["step"] == step]
    if len(found) != 1:
        sys.exit(f"fsdp_vs_ddp: expected one save at step {step} in {run_dir}, got {found}")
    num_bytes = checkpoint_bytes(run_dir, step)
    return {
        "bytes": num_bytes,
        "blocked_s": found[0]["blocked_s"],
        "write_s": found[0]["write_s"],
        "gbps": num_bytes / found[0]["blocked_s"] / GB,
    }


def run_strategy(args: argparse.Namespace, *, strategy: str, run_dir: Path) -> dict[str, Any]:
    """A fresh run with one save, then its resume: step times, saves, the load, peaks."""
    overrides = job_overrides(args, strategy=strategy)
    common = {"config_path": args.config, "nproc": args.nproc, "run_dir": run_dir}
    save_step = args.steps - 1
    with WorkerPeaks() as train_peaks:
        records, launch = train_logged(overrides=[*overrides, "checkpoint.at_end=false"], **common)
    steady = [record for record in records if record["step"] > args.warmup]
    save = saved_at(read_events(run_dir), save_step, run_dir=run_dir)
    # The resume must read from the disk, as after a crash that took the page cache with it.
    os.sync()
    paths = files_in(checkpoint_dir(run_dir, save_step))
    drop_from_cache(paths)
    cached = resident_bytes(paths)
    with WorkerPeaks() as resume_peaks:
        _, resume_launch = train_logged(overrides=[*overrides, "checkpoint.at_end=true"], **common)
    events = read_events(run_dir)
    recovery = [e for e in events if e["event"] == "recovery"]
    if len(recovery) != 1 or recovery[0]["resumed_step"] != save_step:
        sys.exit(f"fsdp_vs_ddp: expected one resume from step {save_step} in {run_dir}")
    read_s = recovery[0]["checkpoint_read_s"]
    # After the resume, as long after a process's start as its workers reached the restore.
    floor = load_floor(
        paths, nproc=args.nproc, delay_s=recovery[0]["imports_s"] + recovery[0]["setup_s"]
    )
    ranks = range(args.nproc)
    return {
        # Rank 0's step time without the save that falls in the last interval.
        "step_time_s": statistics.fmean(r["step_time_s"] - r["checkpoint_s"] for r in steady),
        "rank_own_s": [statistics.fmean(r["rank_own_s"][rank] for r in steady) for rank in ranks],
        "grad_sync_s": statistics.fmean(r["grad_sync_s"] for r in steady),
        "grad_sync_share": statistics.fmean(r["grad_sync_share"] for r in steady),
        "phases_s": {
            name: statistics.fmean(r[f"{name}_s"] for r in steady)
            for name in ("forward", "backward", "grad_sync", "optimizer")
        },
        "final_loss": records[-1]["loss"],
        "save": save,
        "save_after_resume": saved_at(events, args.steps, run_dir=run_dir),
        "load": {
            "bytes": save["bytes"],
            "checkpoint_read_s": read_s,
            "gbps": save["bytes"] / read_s / GB,
            "cached_bytes_before": cached,
            "floor_s": floor["seconds"],
            "floor_per_rank_s": floor["per_rank_s"],
            "floor_cached_bytes_before": floor["cached_bytes_before"],
            "over_floor": floor["seconds"] / read_s,
        },
        "peak_rss_bytes": {"train": train_peaks.by_rank(), "resume": resume_peaks.by_rank()},
        "train_launch": launch,
        "resume_launch": resume_launch,
    }


# ---------------------------------------------------------------------------------------------
# Rounds, summary and report
# ---------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, *, scratch: Path) -> dict[str, Any]:
    """Interleave rounds: the disk, then each strategy (the order flips every other round)."""
    from steadytrain.config import load_config
    from steadytrain.data import ensure_corpus

    # Prepared once, so that no measured run pays for it.
    ensure_corpus(load_config(args.config, overrides=job_overrides(args, strategy="ddp")).data)
    rounds = []
    size = None
    for number in range(args.rounds):
        order = STRATEGIES if number % 2 == 0 else STRATEGIES[::-1]
        measured: dict[str, Any] = {
            "round": number + 1,
            "order": list(order),
            "machine_before": wait_for_quiet(args.max_wait),
        }
        if size is not None:  # known from round 1's checkpoint on
            measured["disk"] = probe_disk(scratch, num_bytes=size)
        for strategy in order:
            run_dir = scratch / f"round{number + 1}-{strategy}"
            measured[strategy] = run_strategy(args, strategy=strategy, run_dir=run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)
            size = size or measured[strategy]["save"]["bytes"]
            print_run(number + 1, strategy, measured[strategy])
        if "disk" not in measured:
            measured["disk"] = probe_disk(scratch, num_bytes=size)
        disk = measured["disk"]
        measured["ratios"] = {
            strategy: {
                "save": measured[strategy]["save"]["gbps"] / disk["write_gbps"],
                "save_after_resume": measured[strategy]["save_after_resume"]["gbps"]
                / disk["write_gbps"],
                "load": measured[strategy]["load"]["gbps"] / disk["read_gbps"],
                "load_over_floor": measured[strategy]["load"]["over_floor"],
            }
            for strategy in STRATEGIES
        }
        measured["fsdp_over_ddp_step"] = (
            measured["fsdp"]["step_time_s"] / measured["ddp"]["step_time_s"]
        )
        print(
            f"  round {number + 1} disk W {disk['write_gbps']:.2f} R {disk['read_gbps']:.2f} "
            f"GB/s; FSDP/DDP step {measured['fsdp_over_ddp_step']:.2f}",
            flush=True,
        )
        rounds.append(measured)
    return summarize(args, rounds)


def probe_disk(scratch: Path, *, num_bytes: int) -> dict[str, Any]:
    """``checkpoint_io``'s disk probe at the checkpoint's size (memory touched first)."""
    return measure_disk(scratch, num_bytes=num_bytes, prepare=Settle(4 * num_bytes, enabled=True))


def print_run(number: int, strategy: str, run: dict[str, Any]) -> None:
    peaks = "/".join(f"{peak / 2**20:.0f}" for peak in run["peak_rss_bytes"]["train"])
    print(
        f"  round {number} {strategy:<4} {run['step_time_s'] * 1000:7.1f} ms/step, grad_sync "
        f"{run['grad_sync_s'] * 1000:6.1f} ms; save {run['save']['gbps']:.2f} GB/s, load "
        f"{run['load']['gbps']:.2f} GB/s ({run['load']['over_floor']:.2f} of its floor, "
        f"{run['load']['floor_s']:.2f} s); peak RSS per rank {peaks} MiB",
        flush=True,
    )


def planned_peaks(args: argparse.Namespace) -> dict[str, int]:
    """The memory planner's per-rank peak of the job's tensors, DDP and FSDP (fp32)."""
    kwargs = {"num_layers": args.num_layers, "width": WIDTH, "num_heads": NUM_HEADS}
    run = build_run(kwargs, seq_len=SEQ_LEN, micro_batch_size=MICRO_BATCH, precision="fp32")
    plan = plan_for(run, world_size=args.nproc)
    return {"ddp": plan.ddp.peak, "fsdp": plan.fsdp.peak, "num_params": plan.num_params}


def summarize(args: argparse.Namespace, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Settings, machine, every round, and per strategy the medians over rounds."""

    def median(pick: Any) -> float:
        return statistics.median(pick(r) for r in rounds)

    strategies: dict[str, Any] = {}
    for s in STRATEGIES:
        strategies[s] = {
            "step_time_s": median(lambda r, s=s: r[s]["step_time_s"]),
            "rank_own_s": [
                median(lambda r, s=s, k=k: r[s]["rank_own_s"][k]) for k in range(args.nproc)
            ],
            "grad_sync_s": median(lambda r, s=s: r[s]["grad_sync_s"]),
            "grad_sync_share": median(lambda r, s=s: r[s]["grad_sync_share"]),
            "peak_rss_bytes": {
                phase: [
                    median(lambda r, s=s, p=phase, k=k: r[s]["peak_rss_bytes"][p][k])
                    for k in range(args.nproc)
                ]
                for phase in ("train", "resume")
            },
            "save_gbps": median(lambda r, s=s: r[s]["save"]["gbps"]),
            "save_after_resume_gbps": median(lambda r, s=s: r[s]["save_after_resume"]["gbps"]),
            "load_gbps": median(lambda r, s=s: r[s]["load"]["gbps"]),
            "save_write_s": median(lambda r, s=s: r[s]["save"]["write_s"]),
            "save_blocked_s": median(lambda r, s=s: r[s]["save"]["blocked_s"]),
            "load_s": median(lambda r, s=s: r[s]["load"]["checkpoint_read_s"]),
            "ratios": {
                key: median(lambda r, s=s, key=key: r["ratios"][s][key])
                for key in ("save", "save_after_resume", "load", "load_over_floor")
            },
            "load_floor_s": median(lambda r, s=s: r[s]["load"]["floor_s"]),
            "final_loss": median(lambda r, s=s: r[s]["final_loss"]),
            "contended_rounds": sum(
                r[s]["train_launch"].get("foreign_cpu_share", 0.0) > NOISY_FOREIGN_SHARE
                for r in rounds
            ),
        }
    fsdp = strategies["fsdp"]["ratios"]
    return {
        "benchmark": "fsdp_vs_ddp",
        "settings": {
            "config": str(args.config),
            "num_layers": args.num_layers,
            "width": WIDTH,
            "num_heads": NUM_HEADS,
            "seq_len": SEQ_LEN,
            "micro_batch_size": MICRO_BATCH,
            "steps": args.steps,
            "warmup_steps": args.warmup,
            "rounds": args.rounds,
            "nproc": args.nproc,
            "backend": "gloo",
            "overrides": job_overrides(args, strategy="STRATEGY"),
            "steadytrain": args.provenance,
        },
        "machine": {
            "cpu_cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB,
        },
        "rounds": rounds,
        "disk": {
            "write_gbps": median(lambda r: r["disk"]["write_gbps"]),
            "read_gbps": median(lambda r: r["disk"]["read_gbps"]),
        },
        "strategies": strategies,
        "fsdp_over_ddp_step": median(lambda r: r["fsdp_over_ddp_step"]),
        "planned_peak_bytes": planned_peaks(args),
        "targets": {
            "save_ratio_at_least": TARGET_SAVE_RATIO,
            "load_ratio_at_least": TARGET_LOAD_RATIO,
        },
        "within_target": {
            "fsdp_save": fsdp["save"] >= TARGET_SAVE_RATIO,
            "fsdp_load": fsdp["load"] >= TARGET_LOAD_RATIO,
        },
    }


def print_report(summary: dict[str, Any]) -> None:
    """One row per strategy (medians over rounds), then the verdicts."""
    settings, strategies = summary["settings"], summary["strategies"]
    disk, planned = summary["disk"], summary["planned_peak_bytes"]
    print(
        f"\nGPT {settings['num_layers']}x{settings['width']} ({planned['num_params']:,} "
        f"parameters), {settings['nproc']} ranks over gloo, micro-batch "
        f"{settings['micro_batch_size']} x {settings['seq_len']} tokens; steps "
        f"{settings['warmup_steps'] + 1}..{settings['steps']}, {settings['rounds']} rounds "
        f"(medians); disk W {disk['write_gbps']:.2f} R {disk['read_gbps']:.2f} GB/s"
    )
    header = (
        f"{'strategy':<8} {'step ms':>8} {'own ms/rank':>13} {'grad_sync ms':>12} "
        f"{'peak MiB/rank':>13} {'resume MiB':>11} {'planned MiB':>11} {'save GB/s':>9} "
        f"{'x disk':>6} {'load GB/s':>9} {'x disk':>6} {'noisy':>5}"
    )
    print(header + "\n" + "-" * len(header))
    for name, row in strategies.items():
        own = "/".join(f"{s * 1000:.0f}" for s in row["rank_own_s"])
        peaks = "/".join(f"{b / 2**20:.0f}" for b in row["peak_rss_bytes"]["train"])
        resume = "/".join(f"{b / 2**20:.0f}" for b in row["peak_rss_bytes"]["resume"])
        print(
            f"{name:<8} {row['step_time_s'] * 1000:>8.1f} {own:>13} "
            f"{row['grad_sync_s'] * 1000:>12.1f} {peaks:>13} {resume:>11} "
            f"{planned[name] / 2**20:>11.0f} {row['save_gbps']:>9.2f} "
            f"{row['ratios']['save']:>6.2f} {row['load_gbps']:>9.2f} "
            f"{row['ratios']['load']:>6.2f} {row['contended_rounds']:>5}"
        )
    ok = summary["within_target"]
    ratios = strategies["fsdp"]["ratios"]
    print(
        f"FSDP / DDP step time {summary['fsdp_over_ddp_step']:.2f} (median of rounds); "
        f"sharded save {ratios['save']:.2f} x disk write "
        f"({'within' if ok['fsdp_save'] else 'MISSES'} >= {TARGET_SAVE_RATIO}), "
        f"after a resume {ratios['save_after_resume']:.2f} x; sharded load "
        f"{ratios['load']:.2f} x disk read ({'within' if ok['fsdp_load'] else 'MISSES'} "
        f">= {TARGET_LOAD_RATIO}), {ratios['load_over_floor']:.2f} x its floor (the same "
        f"bytes cold into new memory: {strategies['fsdp']['load_floor_s']:.2f} s; DDP's "
        f"{strategies['ddp']['ratios']['load_over_floor']:.2f} x)"
    )


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="steps of each fresh run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps at the start")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--nproc", type=int, default=2, help="ranks per run")
    parser.add_argument("--size-mb", type=float, default=300, help="checkpoint size, about")
    parser.add_argument(
        "--max-wait", type=float, default=60, help="seconds to wait for a quiet machine per round"
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="steadytrain YAML")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        help="a config override for both strategies (repeatable)",
    )
    args = parser.parse_args(argv)
    check_timed_steps(parser, args)
    if args.rounds < 1 or args.size_mb <= 0:
        parser.error("--rounds and --size-mb must be positive")
    args.config = args.config.resolve()
    args.num_layers = num_layers_for(args.size_mb)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.provenance = source_provenance()  # before the run: others may commit meanwhile
    # Same file system as the repository, as checkpoint_io.py measures it.
    scratch = Path(tempfile.mkdtemp(prefix=".scratch-fsdp-vs-ddp-", dir=Path(__file__).parent))
    print(f"fsdp_vs_ddp: {args.rounds} round(s) of {', '.join(STRATEGIES)} in {scratch}")
    started = time.perf_counter()
    try:
        summary = measure(args, scratch=scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary["wall_seconds"] = time.perf_counter() - started
    print_report(summary)
    print(f"{summary['wall_seconds']:.0f} s in all")
    write_summary(args.json, summary)
    return 1 if args.check and not all(summary["within_target"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
