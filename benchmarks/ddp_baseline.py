"""The hand-written DDP loop that benchmarks/overhead.py compares steadytrain against.

What a careful engineer writes by hand for the config's default GPT: a DataLoader over the
same token windows with a DistributedSampler, ``no_sync`` on non-final micro-steps, loss /
accumulation, gradient clipping, AdamW (decay on matrices only, as steadytrain) with the same
warmup + cosine schedule, ``zero_grad``, and nothing else: no metrics, no ledger, no phase
timers. Rank 0 writes the wall time of every step to ``--result``.

Started without torchrun's variables it launches ``--nproc`` workers itself with the launch
settings ``steadytrain train --nproc`` uses; it also runs as a torchrun worker:

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        benchmarks/ddp_baseline.py --result OUT.json --set deterministic=false
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml"


def run_worker(*, config_path: Path, overrides: list[str], result_path: Path) -> None:
    """Train the config's model by hand with DDP; rank 0 writes its per-step wall times."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from steadytrain.config import load_config
    from steadytrain.config.models import DEFAULT_MODEL_FACTORY
    from steadytrain.model.gpt import GPT

    config = load_config(config_path, overrides=overrides)
    if config.model.factory != DEFAULT_MODEL_FACTORY:
        raise ValueError(f"model.factory: the baseline builds {DEFAULT_MODEL_FACTORY} only")
    local_world_size = int(os.environ["LOCAL_WORLD_SIZE"])
    # The same thread split steadytrain's runtime makes: the cores shared by the local ranks.
    torch.set_num_threads(
        config.dist.cpu_threads or max(1, len(os.sched_getaffinity(0)) // local_world_size)
    )
    torch.use_deterministic_algorithms(config.deterministic)
    dist.init_process_group(backend="gloo")
    world_size = dist.get_world_size()
    accum_steps = config.train.global_batch_size // (world_size * config.train.micro_batch_size)
    torch.manual_seed(config.seed)
    model = GPT(**{"max_seq_len": config.data.seq_len, **config.model.kwargs})
    ddp = DistributedDataParallel(model)
    step_times, loop_seconds, last_loss = train_by_hand(ddp, config=config, accum_steps=accum_steps)
    if dist.get_rank() == 0:
        result = {
            "step_times_s": step_times,
            "loop_seconds": loop_seconds,
            "last_micro_batch_loss": last_loss,
            "num_threads": torch.get_num_threads(),
            "world_size": world_size,
            "grad_accum_steps": accum_steps,
        }
        result_path.write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def train_by_hand(ddp: Any, *, config: Any, accum_steps: int) -> tuple[list[float], float, float]:
    """The training loop; returns per-step seconds, the loop's seconds and the last loss."""
    loop = HandLoop(ddp, config=config, accum_steps=accum_steps)
    loop_started = time.perf_counter()
    step_times = loop.run(config.train.max_steps)
    loop_seconds = time.perf_counter() - loop_started
    return step_times, loop_seconds, loop.last_loss()  # host sync, after timing


class HandLoop:
    """The hand-written loop, a given number of steps at a time (``run``), so another loop
    can take turns with it in the same processes (benchmarks/overhead_paired.py)."""

    def __init__(self, ddp: Any, *, config: Any, accum_steps: int) -> None:
        from torch.utils.data import DataLoader, DistributedSampler

        from steadytrain.data import TokenWindowDataset, ensure_corpus

        train, model = config.train, ddp.module
        self.ddp, self.model, self.train, self.accum_steps = ddp, model, train, accum_steps
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in model.parameters() if p.dim() >= 2]},
                {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=train.lr,
            betas=train.betas,
            weight_decay=train.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda=lambda step: warmup_cosine(step, train=train)
        )
        dataset = TokenWindowDataset(
            ensure_corpus(config.data), split="train", seq_len=config.data.seq_len
        )
        self.sampler = DistributedSampler(dataset, shuffle=True, seed=config.seed, drop_last=True)
        self.loader = DataLoader(
            dataset,
            batch_size=train.micro_batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=config.data.num_workers,
        )
        self.batches, self.epoch = iter(self.loader), 0
        self.loss: torch.Tensor | None = None

    def run(self, num_steps: int) -> list[float]:
        """Train ``num_steps`` optimizer steps; the wall seconds of each."""
        from torch.nn import functional as F

        ddp, accum_steps, optimizer = self.ddp, self.accum_steps, self.optimizer
        step_times: list[float] = []
        for _ in range(num_steps):
            step_started = time.perf_counter()
            for micro_step in range(accum_steps):
                batch = self.next_batch()
                is_last = micro_step == accum_steps - 1
                with contextlib.nullcontext() if is_last else ddp.no_sync():
                    logits = ddp(batch[:, :-1])
                    loss = F.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1)
                    )
                    (loss / accum_steps).backward()
            if self.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train.grad_clip)
            optimizer.step()
            self.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_times.append(time.perf_counter() - step_started)
            self.loss = loss
        return step_times

    def next_batch(self) -> torch.Tensor:
        try:
            return next(self.batches)
        except StopIteration:
            self.epoch += 1
            self.sampler.set_epoch(self.epoch)
            self.batches = iter(self.loader)
            return next(self.batches)

    def last_loss(self) -> float:
        """The last micro-batch's loss (a host sync: call it outside timed code)."""
        return float("nan") if self.loss is None else float(self.loss.item())


def warmup_cosine(step: int, *, train: Any) -> float:
    """The learning-rate multiplier steadytrain uses: linear warmup, then cosine decay."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    progress = min(1.0, (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps))
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def launch_workers(*, nproc: int, worker_args: list[str], script: Path | None = None) -> None:
    """Start ``nproc`` workers of ``script`` (default: this one) with the launch settings
    ``steadytrain train --nproc`` uses."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    launch_config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"{(script or Path(__file__)).stem}-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    elastic_launch(launch_config, entrypoint=sys.executable)(
        str((script or Path(__file__)).resolve()), *worker_args
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="steadytrain YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value")
    parser.add_argument("--result", type=Path, required=True, help="rank 0 writes JSON here")
    parser.add_argument("--nproc", type=int, default=2, help="workers to launch (no torchrun)")
    args = parser.parse_args(argv)
    if "RANK" in os.environ:
        run_worker(config_path=args.config, overrides=args.overrides, result_path=args.result)
        return 0
    worker_args = ["--config", str(args.config.resolve()), "--result", str(args.result.resolve())]
    worker_args += [arg for override in args.overrides for arg in ("--set", override)]
    launch_workers(nproc=args.nproc, worker_args=worker_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
