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

Then the sharded save and restore under the conditions the checkpoint I/O target is defined
in, as ``checkpoint_io.py`` measures DDP's (``checkpoint_io_sharded.py``, ``--settled-rounds``
rounds): long-lived workers that touch memory first, cold cache, each operation timed on its
own against the disk of its round, with each rank's restore by phase.

    .venv/bin/python benchmarks/fsdp_vs_ddp.py [--steps 20] [--rounds 5] [--settled-rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
from checkpoint_io_sharded_report import settled_io
from fsdp_vs_ddp_probes import WorkerPeaks, load_floor
from fsdp_vs_ddp_report import (
    MICRO_BATCH,
    SEQ_LEN,
    STRATEGIES,
    TARGET_LOAD_RATIO,
    TARGET_SAVE_RATIO,
    print_report,
    print_run,
    summarize,
)
from overhead import LOG_EVERY, check_timed_steps, train_logged, write_summary

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "examples" / "tiny.yaml"


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
    return summarize(args, rounds, overrides=job_overrides(args, strategy="STRATEGY"))


def probe_disk(scratch: Path, *, num_bytes: int) -> dict[str, Any]:
    """``checkpoint_io``'s disk probe at the checkpoint's size (memory touched first)."""
    return measure_disk(scratch, num_bytes=num_bytes, prepare=Settle(4 * num_bytes, enabled=True))


def measure_settled(args: argparse.Namespace, *, scratch: Path) -> dict[str, Any]:
    """The sharded save and restore as ``checkpoint_io.py`` measures DDP's: long-lived workers
    with memory touched first (``checkpoint_io_sharded.py``), after a quiet moment."""
    quiet = wait_for_quiet(args.max_wait)
    print(f"fsdp_vs_ddp: {args.settled_rounds} settled round(s) of the sharded save and load")
    settled = settled_io(
        nproc=args.nproc, rounds=args.settled_rounds, size_mb=args.size_mb, scratch=scratch
    )
    return {**settled, "machine_before": quiet}


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
    parser.add_argument(
        "--settled-rounds",
        type=int,
        default=5,
        help="rounds of the settled sharded save and load (checkpoint_io_sharded.py; 0: none)",
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
    if args.rounds < 1 or args.size_mb <= 0 or args.settled_rounds < 0:
        parser.error("--rounds and --size-mb must be positive, --settled-rounds not negative")
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
        if args.settled_rounds:
            summary["settled"] = measure_settled(args, scratch=scratch)
            layouts = summary["settled"]["layouts"]
            summary["within_target"]["fsdp_save_settled"] = (
                layouts["fsdp"]["save_ratio"] >= TARGET_SAVE_RATIO
            )
            summary["within_target"]["fsdp_load_settled"] = (
                layouts["fsdp"]["load_ratio"] >= TARGET_LOAD_RATIO
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary["wall_seconds"] = time.perf_counter() - started
    print_report(summary)
    print(f"{summary['wall_seconds']:.0f} s in all")
    write_summary(args.json, summary)
    return 1 if args.check and not all(summary["within_target"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
