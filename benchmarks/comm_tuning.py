"""DDP communication tuning: each ``parallel.*`` setting against plain DDP in the same round.

Every variant trains the same job (examples/tiny.yaml by default) with ``steadytrain train
--nproc N`` over gloo on CPU; only its ``parallel.*`` settings differ. Rounds are
interleaved (the order alternates) because the machine is shared and noisy; each variant is
compared with the plain run of its own round, and the verdict is the median of those
per-round ratios. Figures come from the run's own ``metrics.jsonl``: step time, ``grad_sync_s``
(wall time with a bucket's all-reduce in flight, overlapping backward) and
``grad_sync_share``, over the steps after the warmup; the last logged loss shows what the
lossy hooks cost in accuracy. Every run starts from the same weights and data order.

The job runs without gradient accumulation (``train.micro_batch_size`` = global batch / N):
DDP's static graph refuses accumulation, and every variant must train the same way.

    .venv/bin/python benchmarks/comm_tuning.py [--steps N] [--rounds R] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
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

# Variant -> its parallel.* settings; "plain" is DDP's defaults (the baseline of each round).
VARIANTS: dict[str, list[str]] = {
    "plain": [],
    "bucket_1mb": ["parallel.bucket_cap_mb=1"],
    "bucket_25mb": ["parallel.bucket_cap_mb=25"],
    "bucket_view": ["parallel.gradient_as_bucket_view=true"],
    "static_graph": ["parallel.static_graph=true"],
    "fp16": ["parallel.comm_hook=fp16"],
    "bf16": ["parallel.comm_hook=bf16"],
    "powersgd_r1": ["parallel.comm_hook=powersgd", "parallel.powersgd_rank=1"],
    "powersgd_r4": ["parallel.comm_hook=powersgd", "parallel.powersgd_rank=4"],
}
# Per-round ratio name -> the per-run figure it divides (variant / plain of the same round).
RATIOS = {
    "step_ratio": "step_time_s",
    "grad_sync_ratio": "grad_sync_s",
    "share_ratio": "grad_sync_share",
}


def run_variant(
    *, config_path: Path, overrides: list[str], nproc: int, warmup: int, run_dir: Path
) -> dict[str, Any]:
    """One ``steadytrain train --nproc`` run: its steady-state means from metrics.jsonl."""
    records, launch = train_logged(
        config_path=config_path, overrides=overrides, nproc=nproc, run_dir=run_dir
    )
    steady = [record for record in records if record["step"] > warmup]  # interval means
    return {
        **{
            key: statistics.fmean(record[key] for record in steady)
            for key in ("step_time_s", "grad_sync_s", "grad_sync_share", "backward_s")
        },
        "final_loss": records[-1]["loss"],
        **launch,
    }


def measure(args: argparse.Namespace, *, work_dir: Path) -> dict[str, Any]:
    """Interleave rounds of every variant; per-round ratios against that round's plain run."""
    from steadytrain.config import load_config

    config = load_config(args.config, overrides=list(args.settings))
    micro_batch = config.train.global_batch_size // args.nproc
    overrides = [
        f"train.max_steps={args.steps}",
        f"train.micro_batch_size={micro_batch}",  # no accumulation: static graph refuses it
        f"log.every_steps={LOG_EVERY}",
        "train.eval_batches=0",
        "checkpoint.every_steps=0",
        "data.ledger=false",
        "dist.backend=gloo",  # CPU, also on a machine with GPUs
        # PowerSGD compresses from 2 steps before the timed ones: every timed step is.
        f"parallel.powersgd_start_step={max(0, args.warmup - 2)}",
        *args.settings,
    ]
    prepare_runs(args.config, overrides, nproc=args.nproc)
    rounds = []
    for number, order in alternating_orders(VARIANTS, args.rounds):
        measured: dict[str, Any] = {}
        for name in order:
            measured[name] = run_variant(
                config_path=args.config,
                overrides=[*overrides, *VARIANTS[name]],
                nproc=args.nproc,
                warmup=args.warmup,
                run_dir=work_dir / f"round{number + 1}-{name}",
            )
            print(
                f"  round {number + 1} {name:<13} {measured[name]['step_time_s'] * 1000:7.1f} "
                f"ms/step, grad_sync {measured[name]['grad_sync_s'] * 1000:6.1f} ms",
                flush=True,
            )
        ratios = {
            name: {
                ratio: measured[name][key] / measured["plain"][key] for ratio, key in RATIOS.items()
            }
            for name in VARIANTS
        }
        contended = [
            name
            for name in VARIANTS
            if measured[name].get("foreign_cpu_share", 0.0) > NOISY_FOREIGN_SHARE
        ]
        rounds.append(
            {
                "round": number + 1,
                "order": order,
                "contended": contended,
                "runs": measured,
                "ratios": ratios,
            }
        )
    return summarize(args, rounds, overrides=overrides)


def summarize(
    args: argparse.Namespace, rounds: list[dict[str, Any]], *, overrides: list[str]
) -> dict[str, Any]:
    """Settings, machine, every round, and per variant the medians over rounds."""

    def median_of(name: str, pick: Any) -> float:
        return statistics.median(pick(r, name) for r in rounds)

    variants = {}
    for name in VARIANTS:
        variants[name] = {
            "settings": VARIANTS[name],
            "step_time_s": median_of(name, lambda r, n: r["runs"][n]["step_time_s"]),
            "grad_sync_s": median_of(name, lambda r, n: r["runs"][n]["grad_sync_s"]),
            "grad_sync_share": median_of(name, lambda r, n: r["runs"][n]["grad_sync_share"]),
            **{
                f"median_{ratio}": median_of(name, lambda r, n, k=ratio: r["ratios"][n][k])
                for ratio in RATIOS
            },
            "final_loss": median_of(name, lambda r, n: r["runs"][n]["final_loss"]),
            "contended_rounds": sum(name in r["contended"] for r in rounds),
        }
    plain_times = [r["runs"]["plain"]["step_time_s"] for r in rounds]
    return {
        "benchmark": "comm_tuning",
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
        "variants": variants,
        # The noise floor: how much the same plain run varies from round to round.
        "plain_spread": {
            "min_s": min(plain_times),
            "max_s": max(plain_times),
            "cv": statistics.pstdev(plain_times) / statistics.fmean(plain_times),
        },
    }


def print_report(summary: dict[str, Any]) -> None:
    """One row per variant: medians over rounds, ratios against the plain run of each round."""
    settings, machine = summary["settings"], summary["machine"]
    print(
        f"\nsteps {settings['warmup_steps'] + 1}..{settings['steps']}, {settings['nproc']} "
        f"ranks, gloo on CPU, torch {machine['torch']}, {machine['cpu_cores']} cores, "
        f"{settings['rounds']} interleaved rounds (medians; ratios against plain per round)"
    )
    header = (
        f"{'variant':<13} {'step ms':>8} {'x plain':>7} {'grad_sync ms':>12} {'x plain':>7} "
        f"{'sync share':>10} {'x plain':>7} {'final loss':>10} {'noisy':>5}"
    )
    print(header)
    print("-" * len(header))
    for name, row in summary["variants"].items():
        print(
            f"{name:<13} {row['step_time_s'] * 1000:>8.1f} {row['median_step_ratio']:>7.3f} "
            f"{row['grad_sync_s'] * 1000:>12.1f} {row['median_grad_sync_ratio']:>7.3f} "
            f"{row['grad_sync_share']:>10.1%} {row['median_share_ratio']:>7.3f} "
            f"{row['final_loss']:>10.4f} {row['contended_rounds']:>5}"
        )
    spread = summary["plain_spread"]
    print(
        f"plain round to round: {spread['min_s'] * 1000:.1f}..{spread['max_s'] * 1000:.1f} ms "
        f"(coefficient of variation {spread['cv']:.1%}), the noise floor of one ratio; "
        f"'noisy': rounds in which other processes used over {NOISY_FOREIGN_SHARE:.0%} of "
        "the CPU during the run"
    )


def main(argv: list[str] | None = None) -> int:
    args = variant_rounds_args(__doc__.split("\n\n")[0], argv, rounds=3)
    run_variant_rounds(
        "comm_tuning", args, variants=tuple(VARIANTS), measure=measure, report=print_report
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
