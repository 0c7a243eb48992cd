"""Recovery time: from a crashed rank to the first step after the resume, against its floor.

Each recovery is a real run: ``steadytrain train --nproc 2 --max-restarts 1`` checkpointing
every 10 steps and logging every step; once ``metrics.jsonl`` shows step 15 (past the
checkpoint at 10) the rank-1 worker is killed with SIGKILL. The agent restarts the group, the
workers resume from the checkpoint, and rank 0 writes a ``recovery`` event when the first step
after the resume ends (``steadytrain.telemetry.recovery``): the parts from the kill are
detection + restart (kill -> the new process started), imports, setup, checkpoint read and
the first step. The restarted workers are forked from the launcher's forkserver, which
imported torch and steadytrain when the first group started (a warm start, docs/reliability.md
"Crash and automatic restart"); the floor is nevertheless a fresh process, as the issue that
set the target defines it.

The floor is what any process that resumes from that checkpoint must pay: a fresh
``python -c "import torch"`` (wall time of the whole process, the median of
``--floor-samples`` per round) plus reading the newest
checkpoint's files at disk speed, in this benchmark's process, from a warm page cache (the
resume, too, reads a checkpoint written moments before). An informative second floor adds the
first optimizer construction, which imports ``torch._dynamo``. Floors and recoveries are
interleaved because the machine is shared and noisy; each round's ratio uses the floor
measured beside it, and the verdict is the median of the per-round ratios. A round starts once
other processes leave the CPU mostly idle (at most ``--max-wait`` seconds), and the share they
used during it is reported.

    .venv/bin/python benchmarks/recovery.py [--steps N] [--rounds R] [--floor-samples K]
        [--max-wait S] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from checkpoint_io import source_provenance
from checkpoint_io_measurements import ForeignCpu, files_in, resident_bytes, wait_for_quiet
from overhead import NOISY_FOREIGN_SHARE
from steadytrain.distributed import local_worker_pids, process_running
from steadytrain.telemetry import last_logged_progress

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "examples" / "tiny.yaml"
TARGET_RATIO = 1.5  # total recovery time / floor, at most
CHECKPOINT_EVERY = 10
KILL_AT_STEP = 15  # past the checkpoint at step CHECKPOINT_EVERY, before the next one
KILLED_RANK = 1
# Every step logged: the kill waits for step KILL_AT_STEP, the recovery's parts are exact.
OVERRIDES = (
    f"checkpoint.every_steps={CHECKPOINT_EVERY}",
    "log.every_steps=1",
    "log.console=false",
    "train.eval_batches=0",
)
POLL_S = 0.01
READ_CHUNK_BYTES = 16 * 2**20
FLOORS = {
    "import_torch": "import torch",
    # The first optimizer construction imports torch._dynamo: every training process pays it.
    "import_torch_adamw": "import torch; torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])",
}
# Recovery event field -> the part's name here; their sum with detection_restart is the total.
PARTS = {
    "imports_s": "imports",
    "setup_s": "setup",
    "checkpoint_read_s": "checkpoint_read",
    "first_step_s": "first_step",
}


# ---------------------------------------------------------------------------------------------
# The floor
# ---------------------------------------------------------------------------------------------


def time_process(code: str) -> float:
    """Wall seconds of a fresh ``python -c CODE``, from spawn to exit."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
    return time.perf_counter() - started


def read_checkpoint(run_dir: Path) -> dict[str, Any]:
    """Read every file of the run's newest checkpoint into one reused buffer, in this process."""
    newest = max((run_dir / "checkpoints").glob("step_*"), key=lambda path: path.name)
    paths = files_in(newest)
    resident_before = resident_bytes(paths)
    buffer = bytearray(READ_CHUNK_BYTES)
    view = memoryview(buffer)
    num_bytes = 0
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as file:
            while count := file.readinto(view):
                num_bytes += count
    seconds = time.perf_counter() - started
    return {
        "checkpoint": newest.name,
        "num_files": len(paths),
        "bytes": num_bytes,
        "seconds": seconds,
        "resident_bytes_before": resident_before,
    }


# ---------------------------------------------------------------------------------------------
# One recovery
# ---------------------------------------------------------------------------------------------


def run_recovery(*, config_path: Path, steps: int, run_dir: Path) -> dict[str, Any]:
    """Train, kill rank 1 past the first checkpoint, and read how the restarted group recovered."""
    overrides = [*OVERRIDES, f"train.max_steps={steps}"]
    command = [
        *(sys.executable, "-m", "steadytrain", "train", str(config_path)),
        *("--nproc", "2", "--max-restarts", "1", "--run-dir", str(run_dir)),
        *[arg for override in overrides for arg in ("--set", override)],
    ]
    log_path = run_dir.with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with ForeignCpu() as foreign, open(log_path, "w") as log:
        launcher = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        try:
            killed_at_step = wait_for_step(run_dir / "metrics.jsonl", KILL_AT_STEP, launcher)
            workers = workers_by_rank(launcher.pid)
            killed_at = time.time()
            os.kill(workers[KILLED_RANK], signal.SIGKILL)
            survivors_gone_at = wait_until_gone(
                [pid for rank, pid in workers.items() if rank != KILLED_RANK]
            )
            code = launcher.wait(timeout=600)
        finally:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()
    if code != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        sys.exit(f"recovery: {' '.join(command)} exited {code}:\n{tail}")
    event = recovery_event(run_dir / "events.jsonl")
    steady_steps = steps_after_recovery(run_dir / "metrics.jsonl")
    parts = {
        "detection_restart": event["process_started_at"] - killed_at,
        **{name: event[field] for field, name in PARTS.items()},
    }
    return {
        "killed_at_step": killed_at_step,
        "resumed_step": event["resumed_step"],
        "steps_recomputed": event["steps_recomputed"],
        "warm_start": event.get("warm_start"),
        "parts_s": parts,
        # kill -> the old group's survivors gone: the agent's detection and teardown.
        "survivors_stopped_s": survivors_gone_at - killed_at,
        "total_s": event["first_step_done_at"] - killed_at,
        # What a step costs once warm, for comparison with the first one.
        "later_step_median_s": statistics.median(steady_steps) if steady_steps else None,
        "foreign_cpu_share": foreign.share,
        "checkpoint_read_floor": read_checkpoint(run_dir),
    }


def wait_for_step(metrics_path: Path, step: int, launcher: subprocess.Popen[bytes]) -> int:
    """Poll ``metrics.jsonl`` until a training record of at least ``step``; that step."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if launcher.poll() is not None:
            sys.exit(f"recovery: the run ended (exit {launcher.returncode}) before step {step}")
        progress = last_logged_progress(metrics_path)
        if progress is not None and progress.step >= step:
            return progress.step
        time.sleep(POLL_S)
    sys.exit(f"recovery: no step {step} in {metrics_path} within 600 s")


def workers_by_rank(launcher_pid: int) -> dict[int, int]:
    """The launcher's worker processes, by rank."""
    found = local_worker_pids(launcher_pid)
    if sorted(found) != [0, 1]:
        sys.exit(f"recovery: expected workers of rank 0 and 1 under {launcher_pid}, got {found}")
    return found


def wait_until_gone(pids: list[int]) -> float:
    """Poll until every process of ``pids`` has exited (a zombie counts as gone); when."""
    while any(process_running(pid) for pid in pids):
        time.sleep(POLL_S)
    return time.time()


def read_records(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # torn by the kill
    return records


def steps_after_recovery(metrics_path: Path) -> list[float]:
    """``step_time_s`` of the resumed attempt's steps after its first one."""
    records = read_records(metrics_path)
    start = next(index for index, record in enumerate(records) if "recovery" in record)
    # The recovery record carries the first step's number; that step's own record follows it.
    first_step = records[start]["step"]
    return [
        record["step_time_s"]
        for record in records[start + 1 :]
        if "step_time_s" in record and record["step"] > first_step
    ]


def recovery_event(events_path: Path) -> dict[str, Any]:
    events = read_records(events_path)
    recoveries = [event for event in events if event.get("event") == "recovery"]
    if len(recoveries) != 1 or recoveries[0]["process_started_at"] is None:
        sys.exit(f"recovery: expected one recovery event with its start in {events_path}")
    return recoveries[0]


# ---------------------------------------------------------------------------------------------
# Rounds, summary and report
# ---------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, *, work_dir: Path) -> dict[str, Any]:
    """Floor, recovery, floor, recovery, ...; each round's ratios against its own floor."""
    from steadytrain.config import load_config
    from steadytrain.data import ensure_corpus

    # Prepare (or find cached) the corpus once, so no recovery pays for it.
    ensure_corpus(load_config(args.config).data)
    rounds = []
    for number in range(1, args.rounds + 1):
        quiet = wait_for_quiet(args.max_wait) if args.max_wait > 0 else None
        with ForeignCpu() as floor_foreign:
            samples: dict[str, list[float]] = {name: [] for name in FLOORS}
            for _ in range(args.floor_samples):
                for name, code in FLOORS.items():
                    samples[name].append(time_process(code))
        # One process start varies by a second here; the round's floor is the median of a few.
        floors = {name: statistics.median(seconds) for name, seconds in samples.items()}
        recovery = run_recovery(
            config_path=args.config, steps=args.steps, run_dir=work_dir / f"round{number}"
        )
        read_s = recovery["checkpoint_read_floor"]["seconds"]
        floor_s = {name: seconds + read_s for name, seconds in floors.items()}
        shares = [s for s in (floor_foreign.share, recovery["foreign_cpu_share"]) if s is not None]
        measured = {
            "round": number,
            "quiet_wait": quiet,
            "floor_process_samples_s": samples,
            "floor_processes_s": floors,
            "floor_s": floor_s,
            "floor_foreign_cpu_share": floor_foreign.share,
            # The larger of the two: either side measured under load makes the ratio noisy.
            "others_cpu_share": max(shares) if shares else None,
            **recovery,
            "ratio": recovery["total_s"] / floor_s["import_torch"],
            "ratio_adamw_floor": recovery["total_s"] / floor_s["import_torch_adamw"],
        }
        print(
            f"  round {number}: floor {floor_s['import_torch']:.2f} s, recovery "
            f"{recovery['total_s']:.2f} s (killed at step {recovery['killed_at_step']}, resumed "
            f"from {recovery['resumed_step']}), ratio {measured['ratio']:.2f}",
            flush=True,
        )
        rounds.append(measured)
    return summarize(args, rounds)


def summarize(args: argparse.Namespace, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Settings, machine, every round, and the medians over rounds."""

    def median(pick: Any) -> float:
        return statistics.median(pick(r) for r in rounds)

    medians = {
        "total_s": median(lambda r: r["total_s"]),
        "parts_s": {
            name: median(lambda r, n=name: r["parts_s"][n]) for name in rounds[0]["parts_s"]
        },
        "survivors_stopped_s": median(lambda r: r["survivors_stopped_s"]),
        "later_step_median_s": median(lambda r: r["later_step_median_s"] or 0.0),
        "floor_processes_s": {
            name: median(lambda r, n=name: r["floor_processes_s"][n]) for name in FLOORS
        },
        "checkpoint_read_floor_s": median(lambda r: r["checkpoint_read_floor"]["seconds"]),
        "floor_s": {name: median(lambda r, n=name: r["floor_s"][n]) for name in FLOORS},
        "ratio": median(lambda r: r["ratio"]),
        "ratio_adamw_floor": median(lambda r: r["ratio_adamw_floor"]),
    }
    return {
        "benchmark": "recovery",
        "settings": {
            "config": str(args.config),
            "steps": args.steps,
            "rounds": args.rounds,
            "nproc": 2,
            "checkpoint_every_steps": CHECKPOINT_EVERY,
            "kill_at_step": KILL_AT_STEP,
            "killed_rank": KILLED_RANK,
        },
        "machine": {
            "cpu_cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_start": args.loadavg_start,
            "loadavg_end": Path("/proc/loadavg").read_text().strip(),
        },
        "provenance": args.provenance,
        "rounds": rounds,
        "medians": medians,
        "target_ratio": TARGET_RATIO,
        "within_target": medians["ratio"] <= TARGET_RATIO,
    }


def print_report(summary: dict[str, Any]) -> None:
    """Per-round parts and floors, the medians, the ratios and the verdict."""
    rounds, medians = summary["rounds"], summary["medians"]
    part_names = list(medians["parts_s"])
    print(
        f"\nrecovery after SIGKILL of rank {KILLED_RANK} at step >= {KILL_AT_STEP} "
        f"(checkpoint every {CHECKPOINT_EVERY}; {summary['settings']['nproc']} ranks, gloo, CPU, "
        f"torch {summary['machine']['torch']}, {summary['machine']['cpu_cores']} cores), seconds"
    )
    columns = ["round", *part_names, "total", "floor", "ratio", "floor+opt", "ratio", "others%"]
    widths = [5, *(max(len(n), 6) for n in part_names), 6, 6, 5, 9, 5, 7]
    header = "  ".join(f"{name:>{width}}" for name, width in zip(columns, widths, strict=True))
    print(header)
    print("-" * len(header))

    def row(label: str, values: dict[str, Any], others: float | None) -> None:
        cells = [
            *(f"{values['parts_s'][name]:.2f}" for name in part_names),
            f"{values['total_s']:.2f}",
            f"{values['floor_s']['import_torch']:.2f}",
            f"{values['ratio']:.2f}",
            f"{values['floor_s']['import_torch_adamw']:.2f}",
            f"{values['ratio_adamw_floor']:.2f}",
            "?" if others is None else f"{others * 100:.0f}",
        ]
        print(
            f"{label:>5}  "
            + "  ".join(f"{cell:>{width}}" for cell, width in zip(cells, widths[1:], strict=True))
        )

    noisy = [(r["others_cpu_share"] or 0) > NOISY_FOREIGN_SHARE for r in rounds]
    for r, is_noisy in zip(rounds, noisy, strict=True):
        row(f"{r['round']}{'*' if is_noisy else ''}", r, r["others_cpu_share"])
    row("med", medians, None)
    if any(noisy):
        print(
            f"* other processes used over {NOISY_FOREIGN_SHARE:.0%} of the CPU during this "
            "round; its times are noisy (rerun on a quiet machine to confirm)"
        )
    floors = medians["floor_processes_s"]
    read = rounds[0]["checkpoint_read_floor"]
    warm = all(
        (r["checkpoint_read_floor"]["resident_bytes_before"] or 0)
        >= r["checkpoint_read_floor"]["bytes"]
        for r in rounds
    )
    print(
        f"floor (median): import torch {floors['import_torch']:.2f} s + checkpoint read "
        f"{medians['checkpoint_read_floor_s'] * 1000:.1f} ms ({read['bytes'] / 1e6:.1f} MB in "
        f"{read['num_files']} files, in the benchmark process; page cache "
        f"{'warm: every byte resident' if warm else 'not fully resident or unknown'}); "
        f"with the first AdamW {floors['import_torch_adamw']:.2f} s"
    )
    detection = medians["parts_s"]["detection_restart"]
    print(
        f"detection_restart {detection:.2f} s (median): kill -> the old group's survivors gone "
        f"{medians['survivors_stopped_s']:.2f} s, then rendezvous + spawn"
    )
    print(
        f"first step after the resume {medians['parts_s']['first_step']:.2f} s against "
        f"{medians['later_step_median_s']:.2f} s for a later step (median step_time_s)"
    )
    largest = max(part_names, key=lambda name: medians["parts_s"][name])
    print(
        f"largest part: {largest} ({medians['parts_s'][largest] / medians['total_s']:.0%} of "
        f"the total)"
    )
    verdict = "within" if summary["within_target"] else "ABOVE"
    print(
        f"median ratio total / floor {medians['ratio']:.2f} ({verdict} target <= "
        f"{summary['target_ratio']}); against the floor with the first AdamW "
        f"{medians['ratio_adamw_floor']:.2f}"
    )


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="train.max_steps of each run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions")
    parser.add_argument(
        "--floor-samples", type=int, default=3, help="floor processes per round (median)"
    )
    parser.add_argument(
        "--max-wait",
        type=float,
        default=60,
        help="seconds to wait for a quiet machine before each round (0: do not wait)",
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="steadytrain YAML")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep run dirs here")
    parser.add_argument("--check", action="store_true", help="exit 1 above the target ratio")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.floor_samples < 1 or args.steps <= KILL_AT_STEP + 1:
        parser.error(
            f"--rounds and --floor-samples must be positive and --steps above {KILL_AT_STEP + 1}"
        )
    args.config = args.config.resolve()
    args.work_dir = args.work_dir.resolve() if args.work_dir is not None else None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.loadavg_start = Path("/proc/loadavg").read_text().strip()
    args.provenance = source_provenance()  # before the run: others may commit meanwhile
    # Same file system as the repository (and so as a run directory under it).
    work_dir = args.work_dir or Path(
        tempfile.mkdtemp(prefix=".scratch-recovery-", dir=Path(__file__).parent)
    )
    print(f"recovery: {args.rounds} round(s) of floor / recovery; load {args.loadavg_start}")
    try:
        summary = measure(args, work_dir=work_dir)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    print_report(summary)
    machine = summary["machine"]
    print(f"load average: {machine['loadavg_start']} -> {machine['loadavg_end']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if args.check and not summary["within_target"] else 0


if __name__ == "__main__":
    sys.exit(main())
