"""Step overhead, paired: steadytrain's ``fit()`` and the hand-written loop take turns in the
same processes, block by block, so both see the same machine at nearly the same moment.

``benchmarks/overhead.py`` compares separate runs; on a shared machine their step times drift
by more than the few percent it must resolve. Here one job of ``--nproc`` ranks builds both
sides once — steadytrain's parts exactly as ``steadytrain train`` builds them
(``session.build_parts``: phase timers, agreed decision, watchdog, stall watch, metrics, the
variant's ledger and Prometheus endpoint) and the baseline of ``benchmarks/ddp_baseline.py``
(its own model, DDP, AdamW, DataLoader) — and calls ``fit()`` once. A step observer hands
the processes to the hand loop for ``--block`` steps after every ``--block`` steps of
``fit()``: H0 S1 H1 S2 H2 … Each fit() block S_i is compared with the mean of the hand loop's
turns on either side of it; the verdict is the median over blocks. Each variant is its own job.

    .venv/bin/python benchmarks/overhead_paired.py [--pairs 24] [--block 10] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from steadytrain.telemetry.observers import QuietObserver

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_baseline import HandLoop, launch_workers
from overhead import (
    DEFAULT_CONFIG,
    LOG_EVERY,
    TARGETS,
    VARIANT_SETTINGS,
    machine_cpu_ticks,
    write_summary,
)

# Bootstrap resamples for the confidence interval of the median pair ratio.
BOOTSTRAP = 2000


# ---------------------------------------------------------------------------------------------
# The worker: both loops in one process
# ---------------------------------------------------------------------------------------------


def run_worker(args: argparse.Namespace) -> None:
    """Build both sides and train with ``fit()``; between its blocks the hand loop takes its
    turn (``TakeTurns``). Rank 0 writes the blocks' times as JSON."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from steadytrain.config import load_config
    from steadytrain.distributed import start_runtime, stop_runtime, use_deterministic_kernels
    from steadytrain.fault import HangWatchdog, PreemptionSignals
    from steadytrain.model.gpt import GPT
    from steadytrain.train.loop import fit
    from steadytrain.train.session import build_parts

    config = load_config(
        args.config,
        overrides=[
            *args.overrides,
            f"train.max_steps={args.warmup + args.pairs * args.block}",
            f"run_dir={args.run_dir}",
        ],
    )
    preemption = PreemptionSignals(list(config.fault.preempt_signals))
    runtime = start_runtime(config)
    if args.pin:
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[int(os.environ["LOCAL_RANK"]) % len(cores)]})
    use_deterministic_kernels(config.deterministic)
    parts = build_parts(config, runtime, preemption=preemption)
    torch.manual_seed(config.seed)
    hand = HandLoop(
        DistributedDataParallel(GPT(**{"max_seq_len": config.data.seq_len, **config.model.kwargs})),
        config=config,
        accum_steps=parts.layout.grad_accum_steps,
    )
    turns = TakeTurns(hand, block=args.block, warmup=args.warmup, barrier=dist.barrier)
    parts.timer.observers.observers.append(turns)
    result = fit(parts)
    if runtime.is_main:
        # fit()'s own mean step time per block, from its records (one per LOG_EVERY steps).
        for block in turns.blocks:
            records = [
                r
                for r in result.history
                if block["first_step"] < r["step"] <= block["last_step"] and "step_time_s" in r
            ]
            block["steadytrain"]["step_time_s"] = statistics.fmean(
                r["step_time_s"] for r in records
            )
            block["steadytrain"]["phases_s"] = {
                name: statistics.fmean(r[f"{name}_s"] for r in records)
                for name in ("data_wait", "h2d", "forward", "backward", "grad_sync", "optimizer")
            }
        output = {
            "blocks": turns.blocks,
            "baseline_blocks": turns.baseline,
            "num_threads": torch.get_num_threads(),
            "world_size": runtime.world_size,
            "grad_accum_steps": parts.layout.grad_accum_steps,
            "pinned": args.pin,
            "baseline_last_loss": hand.last_loss(),
        }
        Path(args.result).write_text(json.dumps(output))
    for observer in parts.timer.observers.observers:
        if isinstance(observer, HangWatchdog):
            observer.stop()
    parts.watch.close()
    parts.ledger.close()
    parts.metrics.close()
    parts.events.close()
    dist.barrier()
    preemption.restore()
    stop_runtime()


class TakeTurns(QuietObserver):
    """A step observer that runs the hand loop for ``block`` steps after every ``block``
    steps of ``fit()`` (after ``warmup`` steps of each), timing both sides' blocks.

    The hand loop's turn starts once a step has ended, so ``fit()``'s block covers its
    ``block`` steps and everything between them (a log step's record, started and finished).
    Barriers before and after each turn line the ranks up; they are timed by neither side.
    """

    def __init__(self, hand: HandLoop, *, block: int, warmup: int, barrier: Any) -> None:
        self.hand, self.block, self.warmup, self.barrier = hand, block, warmup, barrier
        self.baseline: list[dict[str, float]] = []  # H0, H1, …: the hand loop's timed turns
        self.blocks: list[dict[str, Any]] = []  # fit()'s blocks S1, S2, … between them
        self.resumed_at: float | None = None  # when fit() took over again
        self.cpu_resumed_at = 0.0  # the training thread's CPU seconds then

    def step_ended(self, *, step: int, action: str, seconds: float) -> None:
        done = step + 1
        if done < self.warmup or (done - self.warmup) % self.block:
            return
        ended, cpu_ended = time.perf_counter(), time.thread_time()
        if self.resumed_at is None:  # the end of the warm-up: the hand loop's warm-up too
            self.hand.run(self.warmup)
        else:
            self.blocks.append(
                {
                    "first_step": done - self.block,
                    "last_step": done,
                    "steadytrain": {
                        "seconds": ended - self.resumed_at,
                        "cpu_seconds": cpu_ended - self.cpu_resumed_at,
                    },
                    **cpu_shares(),
                }
            )
        self.barrier()
        started, cpu_started = time.perf_counter(), time.thread_time()
        step_times = self.hand.run(self.block)
        self.baseline.append(
            {
                "seconds": time.perf_counter() - started,
                "cpu_seconds": time.thread_time() - cpu_started,
                "step_time_s": statistics.fmean(step_times),
            }
        )
        self.barrier()
        self.resumed_at, self.cpu_resumed_at = time.perf_counter(), time.thread_time()


_last_ticks: list[tuple[int, int, int] | None] = [None]


def cpu_shares() -> dict[str, float]:
    """The machine's busy and steal shares since the last call (ours included: about 1.0
    while two ranks run on two cores)."""
    now, before = machine_cpu_ticks(), _last_ticks[0]
    _last_ticks[0] = now
    if now is None or before is None:
        return {}
    total, busy, steal = (a - b for a, b in zip(now, before, strict=True))
    return {"busy_share": busy / max(1, total), "steal_share": steal / max(1, total)}


# ---------------------------------------------------------------------------------------------
# The orchestrator: one job per variant, then the pair ratios
# ---------------------------------------------------------------------------------------------


def measure_variant(variant: str, args: argparse.Namespace, *, work_dir: Path) -> dict[str, Any]:
    """One job for ``variant``: its pair ratios and their median, with a bootstrap interval."""
    run_dir, result_path = work_dir / variant, work_dir / f"{variant}.json"
    overrides = [*args.common, *VARIANT_SETTINGS[variant]]
    worker_args = [
        "--worker",
        "--config",
        str(args.config),
        "--result",
        str(result_path),
        "--run-dir",
        str(run_dir),
        "--pairs",
        str(args.pairs),
        "--block",
        str(args.block),
        "--warmup",
        str(args.warmup),
        *(["--pin"] if args.pin else []),
        *[arg for override in overrides for arg in ("--set", override)],
    ]
    started = time.perf_counter()
    launch_workers(nproc=args.nproc, worker_args=worker_args, script=Path(__file__))
    seconds = time.perf_counter() - started
    result = json.loads(result_path.read_text())
    # Each fit() block S_i against the hand loop's turns on either side of it, H_(i-1) and H_i:
    # bracketing cancels a drift in machine speed that is linear over the three turns.
    pairs, baseline = result["blocks"], result["baseline_blocks"]
    for number, pair in enumerate(pairs):
        before, after = baseline[number], baseline[number + 1]
        pair["pair"] = number + 1
        pair["baseline"] = {
            key: (before[key] + after[key]) / 2 for key in ("seconds", "cpu_seconds", "step_time_s")
        }
        pair["wall_ratio"] = pair["steadytrain"]["seconds"] / pair["baseline"]["seconds"]
        pair["step_ratio"] = pair["steadytrain"]["step_time_s"] / pair["baseline"]["step_time_s"]
        pair["cpu_ratio"] = pair["steadytrain"]["cpu_seconds"] / pair["baseline"]["cpu_seconds"]
    wall = [pair["wall_ratio"] for pair in pairs]
    baseline_ms = [1000 * pair["baseline"]["seconds"] / args.block for pair in pairs]
    low, high = bootstrap_median_interval(wall, seed=args.seed)
    phases = {
        name: 1000 * statistics.fmean(pair["steadytrain"]["phases_s"][name] for pair in pairs)
        for name in pairs[0]["steadytrain"]["phases_s"]
    }
    return {
        "variant": variant,
        "job_seconds": seconds,
        "pairs": pairs,
        "median_wall_ratio": statistics.median(wall),
        "median_wall_ratio_95": [low, high],
        "median_step_ratio": statistics.median(pair["step_ratio"] for pair in pairs),
        "median_cpu_ratio": statistics.median(pair["cpu_ratio"] for pair in pairs),
        "total_wall_ratio": sum(p["steadytrain"]["seconds"] for p in pairs)
        / sum(p["baseline"]["seconds"] for p in pairs),
        "pair_ratio_cv": statistics.pstdev(wall) / statistics.fmean(wall),
        "baseline_ms_per_step": {
            "min": min(baseline_ms),
            "max": max(baseline_ms),
            "cv": statistics.pstdev(baseline_ms) / statistics.fmean(baseline_ms),
        },
        "steadytrain_phases_ms": phases,
        "max_steal_share": max(pair.get("steal_share", 0.0) for pair in pairs),
        "target": TARGETS[variant],
        "within_target": high <= TARGETS[variant],
        "num_threads": result["num_threads"],
        "pinned": result["pinned"],
    }


def bootstrap_median_interval(values: list[float], *, seed: int) -> tuple[float, float]:
    """A 95% percentile-bootstrap interval of the median of ``values``."""
    rng = random.Random(seed)
    medians = sorted(
        statistics.median(rng.choices(values, k=len(values))) for _ in range(BOOTSTRAP)
    )
    return medians[int(0.025 * BOOTSTRAP)], medians[int(0.975 * BOOTSTRAP) - 1]


def print_report(summary: dict[str, Any]) -> None:
    settings = summary["settings"]
    print(
        f"\n{settings['pairs']} pairs of {settings['block']}-step blocks per variant, "
        f"{settings['nproc']} ranks, gloo, CPU, pinned={settings['pin']}, "
        f"torch {torch.__version__}"
    )
    header = (
        f"{'variant':<14} {'baseline ms/step':>17} {'median ratio':>12} {'95% interval':>15} "
        f"{'total ratio':>11} {'step ratio':>10} {'CPU ratio':>9} {'pair CV':>7} {'target':>6}"
        "  verdict"
    )
    print(header)
    print("-" * len(header))
    for v in summary["variants"].values():
        base = v["baseline_ms_per_step"]
        low, high = v["median_wall_ratio_95"]
        verdict = (
            "within" if v["within_target"] else ("ABOVE" if low > v["target"] else "not shown")
        )
        print(
            f"{v['variant']:<14} {base['min']:>7.1f}..{base['max']:<7.1f}  "
            f"{v['median_wall_ratio']:>12.3f} {low:>7.3f}..{high:<6.3f} "
            f"{v['total_wall_ratio']:>11.3f} {v['median_step_ratio']:>10.3f} "
            f"{v['median_cpu_ratio']:>9.3f} "
            f"{v['pair_ratio_cv']:>7.1%} {v['target']:>6}  {verdict}"
        )
    for v in summary["variants"].values():
        print(
            f"steadytrain phases, {v['variant']} (ms/step): "
            + ", ".join(f"{name} {ms:.2f}" for name, ms in v["steadytrain_phases_ms"].items())
        )
    print(
        "ratio: fit() wall time per step (log steps included) over the hand loop's turns before "
        "and after it, in the same processes; verdict: 'within' when the 95% interval's upper "
        "end is at or below the target; CPU ratio: the same for the training thread's CPU "
        "seconds (host work, without waits for the other rank or for a core)"
    )


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=24, help="fit() blocks per variant")
    parser.add_argument("--block", type=int, default=10, help="steps per block")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps of each side")
    parser.add_argument("--nproc", type=int, default=2, help="ranks")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="steadytrain YAML")
    parser.add_argument(
        "--variant",
        dest="variants",
        action="append",
        choices=sorted(VARIANT_SETTINGS),
        help="steadytrain variants to measure (repeatable; default: all)",
    )
    parser.add_argument("--pin", action="store_true", help="pin each rank to one core")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep run dirs here")
    parser.add_argument("--check", action="store_true", help="exit 1 unless within targets")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="a config override for both sides (repeatable), e.g. a smaller model",
    )
    # Worker-side arguments (set by the orchestrator).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.block % LOG_EVERY or args.warmup % LOG_EVERY or args.pairs < 4:
        parser.error(
            f"--block and --warmup must be multiples of {LOG_EVERY} (steadytrain logs every "
            f"{LOG_EVERY} steps) and --pairs at least 4 (got {args.block}, {args.warmup}, "
            f"{args.pairs})"
        )
    args.config = args.config.resolve()
    args.variants = args.variants or list(VARIANT_SETTINGS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    from steadytrain.config import load_config
    from steadytrain.data import ensure_corpus

    args.common = [
        f"log.every_steps={LOG_EVERY}",
        "log.console=false",
        "deterministic=false",
        "train.eval_batches=0",
        "checkpoint.every_steps=0",
        "dist.backend=gloo",
        *args.overrides,
    ]
    ensure_corpus(load_config(args.config, overrides=args.common).data)  # once, untimed
    work_dir = args.work_dir.resolve() if args.work_dir else Path(tempfile.mkdtemp())
    print(f"overhead (paired): {', '.join(args.variants)}; {args.pairs} pairs × {args.block} steps")
    try:
        variants = {}
        for variant in args.variants:
            variants[variant] = measure_variant(variant, args, work_dir=work_dir)
            v = variants[variant]
            print(
                f"  {variant:<14} median ratio {v['median_wall_ratio']:.3f} "
                f"({v['median_wall_ratio_95'][0]:.3f}..{v['median_wall_ratio_95'][1]:.3f}) "
                f"in {v['job_seconds']:.0f} s",
                flush=True,
            )
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    summary = {
        "benchmark": "overhead_paired",
        "settings": {
            "config": str(args.config),
            "pairs": args.pairs,
            "block": args.block,
            "warmup": args.warmup,
            "nproc": args.nproc,
            "pin": args.pin,
            "set": args.overrides,
            "cpu_cores": len(os.sched_getaffinity(0)),
        },
        "variants": variants,
        "within_target": all(v["within_target"] for v in variants.values()),
    }
    print_report(summary)
    write_summary(args.json, summary)
    return 1 if args.check and not summary["within_target"] else 0


if __name__ == "__main__":
    sys.exit(main())
