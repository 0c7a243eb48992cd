"""AdamW with decoupled decay on matrices only, and a warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from steadytrain.config import TrainConfig


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay applies to parameters of 2+ dimensions (not norms or biases)."""
    decayed = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    undecayed = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decayed, "weight_decay": train.weight_decay},
        {"params": undecayed, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=train.lr, betas=train.betas)


class WarmupCosine:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_ratio`` at ``max_steps``.

    A class rather than a lambda so the scheduler's state_dict can capture it.
    """

    def __init__(self, *, warmup_steps: int, max_steps: int, min_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = WarmupCosine(
        warmup_steps=train.warmup_steps, max_steps=train.max_steps, min_ratio=train.min_lr_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)
