"""``train.compile``: compiled against eager step time, under DDP and FSDP, in the same round.

Every variant trains the same job (examples/tiny.yaml by default) with ``steadytrain train
--nproc N`` over gloo on CPU; only ``train.compile`` and ``parallel.strategy`` differ. Rounds
are interleaved (the order alternates) because the machine is shared and noisy; each compiled
run is compared with the eager run of its strategy in its own round, and the verdict is the
median of those per-round ratios. Figures come from the run's own ``metrics.jsonl``:

- steady-state step time: the mean over the logged intervals after ``--warmup`` steps;
- compile time, separately: the first logged interval's time beyond ``LOG_EVERY`` steady
  steps (the first step builds the graphs), less the same excess of the eager run beside it.

Each compiled run gets an empty inductor cache (``TORCHINDUCTOR_CACHE_DIR``), so the compile
time is a first run's; a rerun on the same machine reuses the cache and compiles faster.

    .venv/bin/python benchmarks/compile_speed.py [--steps N] [--rounds R] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

from checkpoint_io import source_provenance
from overhead import (
    LOG_EVERY,
    NOISY_FOREIGN_SHARE,
    alternating_orders,
    prepare_runs,
    run_variant_rounds,
    train_logged,
    variant_rounds_args,
)

STRATEGIES = ("ddp", "fsdp")
VARIANTS: dict[str, list[str]] = {
    f"{mode}_{strategy}": [
        f"parallel.strategy={strategy}",
        f"train.compile={str(mode == 'compiled').lower()}",
    ]
    for strategy in STRATEGIES
    for mode in ("eager", "compiled")
}


def run_variant(
    *, config_path: Path, overrides: list[str], nproc: int, warmup: int, run_dir: Path
) -> dict[str, Any]:
    """One ``steadytrain train --nproc`` run: steady step time and first-interval excess."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(run_dir.with_suffix(".inductor-cache"))
    records, launch = train_logged(
        config_path=config_path, overrides=overrides, nproc=nproc, run_dir=run_dir
    )
    steady = statistics.fmean(r["step_time_s"] for r in records if r["step"] > warmup)
    return {
        "step_time_s": steady,
        # Records are LOG_EVERY-step means: the first holds the graph-building first step.
        "first_interval_excess_s": (records[0]["step_time_s"] - steady) * LOG_EVERY,
        "final_loss": records[-1]["loss"],
        **launch,
    }


def measure(args: argparse.Namespace, *, work_dir: Path) -> dict[str, Any]:
    """Interleave rounds of every variant; compiled against eager of the same round."""

    overrides = [
        f"train.max_steps={args.steps}",
        f"log.every_steps={LOG_EVERY}",
        "train.eval_batches=0",
        "checkpoint.every_steps=0",
        "data.ledger=false",
        "dist.backend=gloo",  # CPU, also on a machine with GPUs
        *args.settings,
    ]
    prepare_runs(args.config, overrides, nproc=args.nproc)
    rounds = []
    for number, order in alternating_orders(VARIANTS, args.rounds):
        runs: dict[str, Any] = {}
        for name in order:
            runs[name] = run_variant(
                config_path=args.config,
                overrides=[*overrides, *VARIANTS[name]],
                nproc=args.nproc,
                warmup=args.warmup,
                run_dir=work_dir / f"round{number + 1}-{name}",
            )
            print(
                f"  round {number + 1} {name:<14} {runs[name]['step_time_s'] * 1000:7.1f} "
                f"ms/step, first interval {runs[name]['first_interval_excess_s']:+.1f} s",
                flush=True,
            )
        compared = {
            strategy: {
                "step_ratio": runs[f"compiled_{strategy}"]["step_time_s"]
                / runs[f"eager_{strategy}"]["step_time_s"],
                "compile_s": runs[f"compiled_{strategy}"]["first_interval_excess_s"]
                - runs[f"eager_{strategy}"]["first_interval_excess_s"],
            }
            for strategy in STRATEGIES
        }
        contended = [
            name
            for name in VARIANTS
            if runs[name].get("foreign_cpu_share", 0.0) > NOISY_FOREIGN_SHARE
        ]
        rounds.append({"round": number + 1, "order": order, "contended": contended, "runs": runs})
        rounds[-1]["compared"] = compared
    return {
        "benchmark": "compile_speed",
        "settings": {
            "config": str(args.config),
            "steps": args.steps,
            "warmup_steps": args.warmup,
            "rounds": args.rounds,
            "nproc": args.nproc,
            "backend": "gloo",
            "overrides": overrides,
        },
        "machine": {
            "cpu_cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "source": source_provenance(),
        "rounds": rounds,
        "variants": {
            name: {
                "step_time_s": statistics.median(r["runs"][name]["step_time_s"] for r in rounds),
                "final_loss": statistics.median(r["runs"][name]["final_loss"] for r in rounds),
                "contended_rounds": sum(name in r["contended"] for r in rounds),
            }
            for name in VARIANTS
        },
        "compiled_vs_eager": {
            strategy: {
                key: statistics.median(r["compared"][strategy][key] for r in rounds)
                for key in ("step_ratio", "compile_s")
            }
            for strategy in STRATEGIES
        },
    }


def print_report(summary: dict[str, Any]) -> None:
    """One row per strategy: eager and compiled step time, their ratio, the compile time."""
    settings, machine = summary["settings"], summary["machine"]
    print(
        f"\nsteps {settings['warmup_steps'] + 1}..{settings['steps']}, {settings['nproc']} "
        f"ranks, gloo on CPU, torch {machine['torch']}, {machine['cpu_cores']} cores, "
        f"{settings['rounds']} interleaved rounds (medians; ratios per round)"
    )
    header = (
        f"{'strategy':<8} {'eager ms':>9} {'compiled ms':>11} {'x eager':>7} "
        f"{'compile s':>9} {'loss eager':>10} {'loss comp.':>10} {'noisy':>5}"
    )
    print(header)
    print("-" * len(header))
    variants = summary["variants"]
    for strategy, compared in summary["compiled_vs_eager"].items():
        eager, compiled = variants[f"eager_{strategy}"], variants[f"compiled_{strategy}"]
        print(
            f"{strategy:<8} {eager['step_time_s'] * 1000:>9.1f} "
            f"{compiled['step_time_s'] * 1000:>11.1f} {compared['step_ratio']:>7.3f} "
            f"{compared['compile_s']:>9.1f} {eager['final_loss']:>10.4f} "
            f"{compiled['final_loss']:>10.4f} "
            f"{eager['contended_rounds'] + compiled['contended_rounds']:>5}"
        )
    print(
        f"'compile s': the compiled run's first {LOG_EVERY} steps beyond steady state, less "
        f"the eager run's; 'noisy': runs in which other processes used over "
        f"{NOISY_FOREIGN_SHARE:.0%} of the CPU"
    )


def main(argv: list[str] | None = None) -> int:
    args = variant_rounds_args(__doc__.split("\n\n")[0], argv, rounds=2)
    run_variant_rounds(
        "compile_speed", args, variants=tuple(VARIANTS), measure=measure, report=print_report
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
