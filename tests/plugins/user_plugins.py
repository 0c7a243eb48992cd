"""User code as a user would write it: a model factory, a dataset factory and a loss hook.

Imported by training workers through ``model.factory: user_plugins:...`` with this folder on
PYTHONPATH, exactly as users plug in their own code without forking.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from steadytrain.model import next_token_loss


class BigramModel(nn.Module):
    """A token model of another shape than the built-in GPT: (batch, seq) -> logits."""

    def __init__(self, vocab_size: int, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.out = nn.Linear(width, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.embed(tokens)))


def build_bigram(*, vocab_size: int = 256, width: int = 16) -> BigramModel:
    return BigramModel(vocab_size, width)


class LinearTeacher(Dataset[dict[str, torch.Tensor]]):
    """Regression samples y = x·w + noise, generated deterministically per index."""

    def __init__(self, *, num_samples: int, dim: int, seed: int) -> None:
        self.num_samples = num_samples
        self.dim = dim
        self.seed = seed
        self.weight = torch.linspace(-1.0, 1.0, dim)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        x = torch.randn(self.dim, generator=generator)
        noise = 0.01 * torch.randn((), generator=generator)
        return {"x": x, "y": (x @ self.weight + noise).unsqueeze(0)}


def make_regression(*, split: str, num_samples: int = 256, dim: int = 8) -> LinearTeacher:
    return LinearTeacher(
        num_samples=num_samples if split == "train" else 64,
        dim=dim,
        seed=0 if split == "train" else 1,
    )


def build_regressor(*, dim: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, 1))


def mse_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(batch["x"]), batch["y"])


def not_a_module(**kwargs: object) -> str:
    return "this is not an nn.Module"


def failing_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    raise RuntimeError("this loss fails on purpose")


class PoisonedRegression(LinearTeacher):
    """``LinearTeacher`` whose samples in ``poison_ids`` carry a flag that turns the loss of
    the rank reading them into NaN (see ``poisonable_mse``): bad data on one rank only."""

    def __init__(self, *, poison_ids: list[int], **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.poison_ids = set(poison_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = super().__getitem__(index)
        sample["poison"] = torch.tensor(index in self.poison_ids)
        return sample


def make_poisoned_regression(
    *, split: str, poison_ids: list[int], num_samples: int = 256, dim: int = 8
) -> LinearTeacher:
    if split != "train":
        return make_regression(split=split, num_samples=num_samples, dim=dim)
    return PoisonedRegression(poison_ids=poison_ids, num_samples=num_samples, dim=dim, seed=0)


def poisonable_mse(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = F.mse_loss(model(batch["x"]), batch["y"])
    if "poison" in batch and bool(batch["poison"].any()):
        return loss * float("nan")
    return loss


def next_token_loss_slow_on_rank1(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The default loss, 60 ms slower on rank 1: a straggler in its forward phase."""
    if os.environ.get("RANK") == "1":
        time.sleep(0.06)
    return next_token_loss(model, batch)
