"""The summary and report of ``fsdp_vs_ddp.py``: medians over rounds, the planner's figures,
the verdicts against the targets, and the printed tables."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from typing import Any

import torch

from checkpoint_io_measurements import GB, NUM_HEADS, WIDTH
from checkpoint_io_sharded_report import print_settled
from memory_plan import build_run, plan_for
from overhead import NOISY_FOREIGN_SHARE

STRATEGIES = ("ddp", "fsdp")
TARGET_SAVE_RATIO = 0.70  # sharded save GB/s / disk write GB/s, at least (as for DDP's)
TARGET_LOAD_RATIO = 0.70  # sharded load GB/s / disk read GB/s, at least
SEQ_LEN, MICRO_BATCH = 64, 2  # per rank, no accumulation: a step is mostly the model's size


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


def summarize(
    args: argparse.Namespace, rounds: list[dict[str, Any]], *, overrides: list[str]
) -> dict[str, Any]:
    """Settings (``overrides``: the job's), machine, every round, and per strategy the medians
    over rounds."""

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
            "overrides": overrides,
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
    if "settled" in summary:
        print_settled(summary["settled"])
        settled = summary["settled"]["layouts"]["fsdp"]
        print(
            f"settled sharded save {settled['save_ratio']:.2f} x disk write "
            f"({'within' if ok['fsdp_save_settled'] else 'MISSES'} >= {TARGET_SAVE_RATIO}), "
            f"load {settled['load_ratio']:.2f} x disk read "
            f"({'within' if ok['fsdp_load_settled'] else 'MISSES'} >= {TARGET_LOAD_RATIO})"
        )
