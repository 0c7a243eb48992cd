"""Step overhead: steadytrain against a hand-written DDP loop, same model, data and run.

Both sides train ``steadytrain.model.gpt.GPT`` (the config's kwargs) on the same prepared token
shards with the same micro-batch, sequence length, accumulation, AdamW + clipping and fp32, as
ranks started by torchrun's elastic agent over gloo on CPU. steadytrain runs through its CLI
(``--nproc``); the baseline is ``benchmarks/ddp_baseline.py``, started with the same launch
settings. Repetitions are interleaved because the machine is shared and noisy; each round
compares steadytrain with the baseline run beside it, and the verdict is the median of the
per-round ratios.

    .venv/bin/python benchmarks/overhead.py [--steps N] [--rounds R] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
BASELINE_SCRIPT = Path(__file__).resolve().parent / "ddp_baseline.py"
DEFAULT_CONFIG = REPO_ROOT / "examples" / "tiny.yaml"
TARGET_RATIO = 1.05
# steadytrain variants: their settings, and the most each may take against the baseline.
# Health, stragglers, the stall alarm and goodput are always on; "telemetry_all" adds the
# ledger and the Prometheus endpoint (every telemetry feature; issue target 1.02).
VARIANT_SETTINGS = {
    "ledger_off": ["data.ledger=false"],
    "ledger_on": ["data.ledger=true"],
    "telemetry_all": ["data.ledger=true", "telemetry.prometheus_port=0"],
}
TARGETS = {"ledger_off": TARGET_RATIO, "ledger_on": TARGET_RATIO, "telemetry_all": 1.02}
# steadytrain logs the mean step time per interval; warmup and steps must be multiples of it.
LOG_EVERY = 10
VARIANTS = ("baseline", *VARIANT_SETTINGS)
# A run during which other processes used more than this share of the CPU is marked noisy.
NOISY_FOREIGN_SHARE = 0.10
# Ratio name -> the per-run figure it divides (steadytrain / baseline of the same round).
RATIOS = {
    "ratio": "step_time_s",
    "interval_median_ratio": "interval_median_step_time_s",
    "interval_min_ratio": "interval_min_step_time_s",
    "loop_ratio": "loop_time_per_step_s",
}


# ---------------------------------------------------------------------------------------------
# One measured run of each variant
# ---------------------------------------------------------------------------------------------


def run_baseline(
    *, config_path: Path, overrides: list[str], nproc: int, warmup: int, work_dir: Path
) -> dict[str, Any]:
    """Run the baseline in a fresh launcher process; its steady-state mean step time."""
    result_path = work_dir / "result.json"
    command = [
        sys.executable,
        str(BASELINE_SCRIPT),
        "--nproc",
        str(nproc),
        "--config",
        str(config_path),
        "--result",
        str(result_path),
        *[arg for override in overrides for arg in ("--set", override)],
    ]
    launch = run_logged(command, log_path=work_dir / "output.log")
    result = json.loads(result_path.read_text())
    steady = result["step_times_s"][warmup:]
    # Means over the same LOG_EVERY-step intervals steadytrain reports, for the robust median.
    interval_means = [
        statistics.fmean(steady[start : start + LOG_EVERY])
        for start in range(0, len(steady), LOG_EVERY)
    ]
    return {
        "step_time_s": statistics.fmean(steady),
        "interval_median_step_time_s": statistics.median(interval_means),
        "interval_min_step_time_s": min(interval_means),
        "last_micro_batch_loss": result["last_micro_batch_loss"],
        "loop_time_per_step_s": result["loop_seconds"] / len(result["step_times_s"]),
        "num_threads": result["num_threads"],
        **launch,
    }


def run_steadytrain(
    *, config_path: Path, overrides: list[str], nproc: int, warmup: int, run_dir: Path
) -> dict[str, Any]:
    """Run ``steadytrain train --nproc``; its steady-state mean step time from metrics.jsonl."""
    records, launch = train_logged(
        config_path=config_path, overrides=overrides, nproc=nproc, run_dir=run_dir
    )
    # Each record is the mean over the LOG_EVERY steps that end at its step.
    steady = [record for record in records if record["step"] > warmup]
    phases = ("data_wait", "h2d", "forward", "backward", "grad_sync", "optimizer")
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    train_end = next(event for event in events if event["event"] == "train_end")
    return {
        "step_time_s": statistics.fmean(record["step_time_s"] for record in steady),
        "interval_median_step_time_s": statistics.median(
            record["step_time_s"] for record in steady
        ),
        "interval_min_step_time_s": min(record["step_time_s"] for record in steady),
        "last_logged_loss": records[-1]["loss"],
        # fit() wall time: includes warmup steps and the logging between timed steps.
        "loop_time_per_step_s": train_end["seconds"] / train_end["step"],
        "phases_s": {
            name: statistics.fmean(record[f"{name}_s"] for record in steady) for name in phases
        },
        **launch,
    }


def train_logged(
    *, config_path: Path, overrides: list[str], nproc: int, run_dir: Path
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``steadytrain train --nproc`` once: its timed metrics records and the launch figures."""
    command = [
        sys.executable,
        "-m",
        "steadytrain",
        "train",
        str(config_path),
        "--nproc",
        str(nproc),
        "--run-dir",
        str(run_dir),
        *[arg for override in overrides for arg in ("--set", override)],
    ]
    launch = run_logged(command, log_path=run_dir.with_suffix(".log"))
    records = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"step_time_s"' in line
    ]
    return records, launch


def check_timed_steps(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--warmup`` and ``--steps`` must be whole logging intervals, with steps to time."""
    if args.warmup % LOG_EVERY or args.steps % LOG_EVERY or args.steps <= args.warmup:
        parser.error(
            f"--warmup and --steps must be multiples of {LOG_EVERY} with --steps > --warmup "
            f"(got {args.warmup} and {args.steps})"
        )


def variant_rounds_args(
    description: str,
    argv: list[str] | None,
    *,
    rounds: int,
    steps: int = 60,
    check: str | None = None,
    settings_help: str = "a config override for every variant (repeatable), e.g. a larger model",
) -> argparse.Namespace:
    """The command line of a benchmark that trains steadytrain variants in interleaved rounds
    (comm_tuning.py, compile_speed.py): steps, warm-up, rounds, ranks, config, JSON output,
    work directory, ``--set`` overrides for every variant, and ``--check`` (with its help)
    where the benchmark has a target to exit 1 on."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps at the start")
    parser.add_argument("--rounds", type=int, default=rounds, help="interleaved repetitions")
    parser.add_argument("--nproc", type=int, default=2, help="ranks per run")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="steadytrain YAML")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep run dirs here")
    if check is not None:
        parser.add_argument("--check", action="store_true", help=check)
    parser.add_argument("--set", dest="settings", action="append", default=[], help=settings_help)
    args = parser.parse_args(argv)
    check_timed_steps(parser, args)
    args.config = args.config.resolve()
    # Runs start in the repository root; keep paths meaning what they meant here.
    args.work_dir = args.work_dir.resolve() if args.work_dir is not None else None
    return args


def run_variant_rounds(
    name: str,
    args: argparse.Namespace,
    *,
    variants: tuple[str, ...],
    measure: Any,
    report: Any,
) -> dict[str, Any]:
    """Measure (in ``args.work_dir``, or a temporary directory removed afterwards), print the
    report, write the JSON, and return the summary."""
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix=f"steadytrain-{name}-"))
    print(f"{name}: {args.rounds} round(s) of {', '.join(variants)}")
    try:
        summary = measure(args, work_dir=work_dir)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    report(summary)
    write_summary(args.json, summary)
    return summary


def alternating_orders(names: Sequence[str], rounds: int) -> Iterator[tuple[int, list[str]]]:
    """Each round's number and the order its variants run in, reversed every other round so
    a drift in machine load does not always favour one of them."""
    for number in range(rounds):
        yield number, list(names) if number % 2 == 0 else list(names)[::-1]


def prepare_runs(config_path: Path, overrides: list[str], *, nproc: int) -> Any:
    """The runs' config, once: a batch that does not divide over ``nproc`` ranks fails here,
    and the corpus is prepared outside every measured run."""
    from steadytrain.config import batch_layout, load_config
    from steadytrain.data import ensure_corpus

    config = load_config(config_path, overrides=overrides)
    batch_layout(config, world_size=nproc)
    ensure_corpus(config.data)
    return config


def write_summary(path: Path | None, summary: dict[str, Any]) -> None:
    """The results as JSON at ``path`` (nothing without one)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {path}")


def run_logged(command: list[str], *, log_path: Path) -> dict[str, Any]:
    """Run ``command`` with its output in ``log_path``; how long, and how contended the machine.

    ``foreign_cpu_share`` is the share of the machine's CPU time that processes other than this
    run used meanwhile (from /proc/stat less the run's own CPU time); ``steal_share`` is the
    share the hypervisor gave to other guests. Either one high marks a noisy measurement.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    ticks_before, ours_before = machine_cpu_ticks(), own_children_ticks()
    started = time.perf_counter()
    with open(log_path, "w") as log:
        completed = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, check=False
        )
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        sys.exit(f"overhead: {' '.join(command)} failed ({completed.returncode}):\n{tail}")
    measured: dict[str, Any] = {"launch_seconds": seconds}
    ticks_after = machine_cpu_ticks()
    if ticks_before is not None and ticks_after is not None:
        total, busy, steal = (
            after - before for after, before in zip(ticks_after, ticks_before, strict=True)
        )
        ours = own_children_ticks() - ours_before
        measured["foreign_cpu_share"] = max(0.0, (busy - steal - ours) / max(1, total))
        measured["steal_share"] = steal / max(1, total)
    return measured


def machine_cpu_ticks() -> tuple[int, int, int] | None:
    """Machine-wide (total, busy, steal) CPU ticks so far; None where /proc/stat is missing."""
    try:
        first_line = Path("/proc/stat").read_text().split("\n", 1)[0]
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal (guest time is already inside user)
    fields = [int(value) for value in first_line.split()[1:9]]
    total = sum(fields)
    return total, total - fields[3] - fields[4], fields[7]


def own_children_ticks() -> float:
    """CPU ticks used so far by finished child processes (their waited children included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# Rounds, summary and report
# ---------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, *, work_dir: Path) -> dict[str, Any]:
    """Interleave rounds of every variant; per-round and median ratios against the baseline."""
    overrides = [
        f"train.max_steps={args.steps}",
        f"log.every_steps={LOG_EVERY}",
        "deterministic=false",
        "train.eval_batches=0",
        "checkpoint.every_steps=0",
        # Both sides on CPU over gloo, also on a machine with GPUs.
        "dist.backend=gloo",
        *args.settings,  # both sides: e.g. a smaller model
    ]
    prepare_runs(args.config, overrides, nproc=args.nproc)
    common = {"config_path": args.config, "nproc": args.nproc, "warmup": args.warmup}
    rounds = []
    for number, order in alternating_orders(VARIANTS, args.rounds):
        measured: dict[str, Any] = {}
        for variant in order:
            run_dir = work_dir / f"round{number + 1}-{variant}"
            if variant == "baseline":
                measured[variant] = run_baseline(overrides=overrides, work_dir=run_dir, **common)
            else:
                measured[variant] = run_steadytrain(
                    overrides=[*overrides, *VARIANT_SETTINGS[variant]], run_dir=run_dir, **common
                )
            print(
                f"  round {number + 1} {variant:<10} "
                f"{measured[variant]['step_time_s'] * 1000:7.1f} ms/step",
                flush=True,
            )
        for variant in VARIANTS[1:]:
            for prefix, key in RATIOS.items():
                measured[f"{prefix}_{variant}"] = measured[variant][key] / measured["baseline"][key]
        contended = [
            variant
            for variant in VARIANTS
            if measured[variant].get("foreign_cpu_share", 0.0) > NOISY_FOREIGN_SHARE
        ]
        rounds.append(
            {"round": number + 1, "order": list(order), "contended": contended, **measured}
        )
    return summarize(args, rounds)


def summarize(args: argparse.Namespace, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Settings, machine, every round, and the median over rounds of each ratio."""
    medians = {
        f"median_{prefix}": {
            variant: statistics.median(r[f"{prefix}_{variant}"] for r in rounds)
            for variant in VARIANTS[1:]
        }
        for prefix in RATIOS
    }
    baseline_times = [r["baseline"]["step_time_s"] for r in rounds]
    return {
        "benchmark": "overhead",
        "settings": {
            "config": str(args.config),
            "steps": args.steps,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps - args.warmup,
            "rounds": args.rounds,
            "nproc": args.nproc,
            "backend": "gloo",
            "log_every_steps": LOG_EVERY,
            "set": list(args.settings),
        },
        "machine": {
            "cpu_cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "rounds": rounds,
        **medians,
        # The noise floor: how much the same baseline varies from run to run.
        "baseline_spread": {
            "min_s": min(baseline_times),
            "max_s": max(baseline_times),
            "cv": statistics.pstdev(baseline_times) / statistics.fmean(baseline_times),
        },
        "target_ratio": TARGET_RATIO,
        "targets": TARGETS,
        "within_target": all(
            medians["median_ratio"][variant] <= target for variant, target in TARGETS.items()
        ),
    }


def print_report(summary: dict[str, Any]) -> None:
    """The per-round table, the median ratios and steadytrain's own phase split."""
    settings = summary["settings"]
    print(
        f"\nsteady-state mean step time over steps {settings['warmup_steps'] + 1}.."
        f"{settings['steps']} ({settings['nproc']} ranks, gloo, CPU, "
        f"torch {summary['machine']['torch']}, {summary['machine']['cpu_cores']} cores)"
    )
    variants = VARIANTS[1:]
    header = f"{'round':>5}  {'baseline ms':>11}" + "".join(
        f"  {variant.replace('_', ' ') + ' ms':>17}  {'ratio':>5}" for variant in variants
    )
    header += f"  {'others CPU %':>15}"
    print(header)
    print("-" * len(header))
    for r in summary["rounds"]:
        others = "/".join(
            f"{r[variant]['foreign_cpu_share'] * 100:.0f}"
            if "foreign_cpu_share" in r[variant]
            else "?"
            for variant in VARIANTS
        )
        mark = "*" if r["contended"] else " "
        print(
            f"{r['round']:>4}{mark}  {r['baseline']['step_time_s'] * 1000:>11.1f}"
            + "".join(
                f"  {r[variant]['step_time_s'] * 1000:>17.1f}  {r[f'ratio_{variant}']:>5.3f}"
                for variant in variants
            )
            + f"  {others:>15}"
        )
    if any(r["contended"] for r in summary["rounds"]):
        print(
            f"* other processes used over {NOISY_FOREIGN_SHARE:.0%} of the CPU during a run of "
            "this round; its times are noisy (rerun on a quiet machine to confirm)"
        )
    spread = summary["baseline_spread"]
    print(
        f"baseline run-to-run: {spread['min_s'] * 1000:.1f}..{spread['max_s'] * 1000:.1f} ms "
        f"(coefficient of variation {spread['cv']:.1%}), the noise floor of one ratio"
    )
    verdict = "within" if summary["within_target"] else "ABOVE"
    targets = ", ".join(f"{v.replace('_', ' ')} {t}" for v, t in summary["targets"].items())
    for prefix, label in (
        ("ratio", f"mean step time ({verdict} targets: {targets})"),
        ("interval_median_ratio", f"median of {LOG_EVERY}-step means"),
        ("interval_min_ratio", f"fastest {LOG_EVERY}-step mean"),
        ("loop_ratio", "whole loop incl. warmup and logging"),
    ):
        median = summary[f"median_{prefix}"]
        print(
            f"median ratio, {label}: "
            + ", ".join(f"{v.replace('_', ' ')} {median[v]:.3f}" for v in VARIANTS[1:])
        )
    for variant in VARIANTS[1:]:
        phase_ms = {
            name: 1000 * statistics.fmean(r[variant]["phases_s"][name] for r in summary["rounds"])
            for name in summary["rounds"][0][variant]["phases_s"]
        }
        print(
            f"steadytrain phases, {variant.replace('_', ' ')} (ms/step, mean of rounds): "
            + ", ".join(f"{name} {ms:.1f}" for name, ms in phase_ms.items())
        )


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # Run-to-run noise dominates on a shared machine, so more short rounds beat fewer long ones.
    return variant_rounds_args(
        __doc__.split("\n\n")[0],
        argv,
        rounds=5,
        steps=80,
        check="exit 1 above the target ratio",
        settings_help="a config override for both sides (repeatable), e.g. a smaller model",
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = run_variant_rounds(
        "overhead", args, variants=VARIANTS, measure=measure, report=print_report
    )
    return 1 if args.check and not summary["within_target"] else 0


if __name__ == "__main__":
    sys.exit(main())
