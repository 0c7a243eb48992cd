"""A torchrun worker: two ranks at different paces agree on when to check signals.

Usage (under torchrun, 2 ranks): worker_guard.py OUT_DIR
Each rank decides 60 steps with a fake clock (rank 0: 1/64 s a step, rank 1: 1/16 s) and a
signal check every 0.25 s; rank 1 alone receives a preemption signal from step 30 on. Each
writes ``rank<R>.json``: the steps where the table was all-reduced, and the first step whose
decision was to stop.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from steadytrain.fault import StepGuard


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    pace = (1 / 64, 1 / 16)[rank]  # seconds per step, exact in binary
    now = [0.0]
    guard = StepGuard(
        rank=rank,
        world_size=2,
        device=torch.device("cpu"),
        max_consecutive_nonfinite=3,
        max_rollbacks=0,
        signal_check_s=0.25,
        clock=lambda: now[0],
    )
    checks: list[int] = []
    all_reduce = dist.all_reduce

    def counted(*args: object, **kwargs: object) -> object:
        checks.append(step)
        return all_reduce(*args, **kwargs)  # type: ignore[arg-type]

    dist.all_reduce = counted  # type: ignore[assignment]
    stopped_at = None
    one = torch.tensor(1.0)
    for step in range(60):
        now[0] = step * pace
        decision = guard.decide(
            step=step, preempt_requested=rank == 1 and step >= 30, loss=one, grad_norm=one
        )
        if decision.stop is not None and stopped_at is None:
            stopped_at = step
    (out_dir / f"rank{rank}.json").write_text(
        json.dumps({"checks": checks, "stopped_at": stopped_at})
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
