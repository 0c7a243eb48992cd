"""AdamW with decoupled decay on matrices only, and a warmup + cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from steadytrain.config import TrainConfig

DECAYED_GROUP = 0  # index of the parameter group with weight decay


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay applies to parameters of 2+ dimensions (not norms or biases)."""
    decayed = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    undecayed = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decayed, "weight_decay": train.weight_decay},  # DECAYED_GROUP
        {"params": undecayed, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=train.lr, betas=train.betas)


class WarmupCosine:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_ratio`` at ``max_steps``.

    A class rather than a lambda so the scheduler's state_dict can capture it (its
    attributes are saved and restored with the checkpoint).
    """

    def __init__(self, *, warmup_steps: int, max_steps: int, min_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.min_ratio = min_ratio
        # Set by ``respan``: from this step on, the decay runs from ``respan_ratio``.
        self.respan_step = 0
        self.respan_ratio = 1.0

    def __call__(self, step: int) -> float:
        if self.respan_step and step >= self.respan_step:
            start, start_ratio = self.respan_step, self.respan_ratio
        elif step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        else:
            start, start_ratio = self.warmup_steps, 1.0
        progress = min(1.0, (step - start) / max(1, self.max_steps - start))
        return self.min_ratio + (start_ratio - self.min_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )

    def respan(self, *, at_step: int, max_steps: int) -> None:
        """End the decay at ``max_steps`` instead, going on from the multiplier at ``at_step``.

        No jump and no second warmup: from ``at_step`` the cosine runs from its current value
        down to ``min_ratio`` at the new ``max_steps``. A run that had finished its decay
        therefore goes on at ``min_ratio``. Before the decay has begun (still in warmup) the
        decay simply spans to the new ``max_steps``.
        """
        if at_step > (self.respan_step or self.warmup_steps):
            self.respan_ratio = self(at_step)
            self.respan_step = at_step
        self.max_steps = max_steps


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = WarmupCosine(
        warmup_steps=train.warmup_steps, max_steps=train.max_steps, min_ratio=train.min_lr_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)


def apply_hyperparameters(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    train: TrainConfig,
    *,
    changed: Mapping[str, Any],
) -> None:
    """Make a restored optimizer and schedule follow ``train`` (after ``--allow-change``).

    A checkpoint restores the learning rate, weight decay, betas and schedule it was saved
    with; the config's values take over from the restored step on. A new ``train.max_steps``
    re-spans the decay from the current step (``WarmupCosine.respan``); the other schedule
    settings apply as if they had been set from the start.
    """
    schedule = scheduler.lr_lambdas[0]
    assert isinstance(schedule, WarmupCosine), "built by build_scheduler"
    step = scheduler.last_epoch
    if "train.max_steps" in changed:
        schedule.respan(at_step=step, max_steps=train.max_steps)
    schedule.warmup_steps, schedule.min_ratio = train.warmup_steps, train.min_lr_ratio
    scheduler.base_lrs = [train.lr for _ in optimizer.param_groups]
    for index, group in enumerate(optimizer.param_groups):
        group["initial_lr"] = train.lr
        group["betas"] = train.betas
        if index == DECAYED_GROUP:
            group["weight_decay"] = train.weight_decay
        group["lr"] = train.lr * schedule(step)  # what the next optimizer step uses
