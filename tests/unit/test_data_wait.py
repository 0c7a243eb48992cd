"""``data_wait_s`` tells the truth: a known delay in reading a user's dataset shows up in it in
full when nothing is read ahead, and is hidden behind a slower step when the next step is read
ahead. Real training in a group of one, with a dataset factory as users plug theirs in."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from steadytrain.config import load_config
from steadytrain.train import run_training
from tests.helpers import TINY_CONFIG

READ_DELAY_S = 0.03  # per micro-batch read: two micro-batches a step
STEP_DELAY_S = 0.05  # per micro-step's loss: the step takes longer than reading the next one
MICRO_STEPS = 2
THIS_MODULE = "tests.unit.test_data_wait"  # the factories, as a config names them


class SlowReads(Dataset[dict[str, torch.Tensor]]):
    """Regression samples that take ``read_delay_s`` to read, per micro-batch (it reads a
    micro-batch's samples together, as the token datasets do, so it can be read ahead)."""

    def __init__(self, *, num_samples: int, read_delay_s: float) -> None:
        self.num_samples, self.read_delay_s = num_samples, read_delay_s

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: rows[0] for name, rows in self.read_samples([index]).items()}

    def read_samples(self, sample_ids: Sequence[int]) -> dict[str, torch.Tensor]:
        time.sleep(self.read_delay_s)
        x = torch.stack([torch.full((4,), float(i % 7)) for i in sample_ids])
        return {"x": x, "y": x.sum(dim=1, keepdim=True)}


def make_slow_reads(*, split: str, read_delay_s: float) -> SlowReads:
    return SlowReads(num_samples=256 if split == "train" else 16, read_delay_s=read_delay_s)


def build_linear() -> nn.Module:
    return nn.Linear(4, 1)


def slow_mse(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    time.sleep(STEP_DELAY_S)
    return F.mse_loss(model(batch["x"]), batch["y"])


def data_waits(tmp_path: Path, *, read_ahead: str) -> list[float]:
    """Each step's ``data_wait_s`` in a 6-step run reading ``SlowReads``."""
    config = load_config(
        TINY_CONFIG,
        overrides=[
            f"run_dir={tmp_path / read_ahead}",
            f"data.dataset_factory={THIS_MODULE}:make_slow_reads",
            f"data.dataset_kwargs={{read_delay_s: {READ_DELAY_S}}}",
            f"data.read_ahead={read_ahead}",
            "data.ledger=false",
            f"model.factory={THIS_MODULE}:build_linear",
            "model.kwargs={}",
            f"train.loss_fn={THIS_MODULE}:slow_mse",
            "train.max_steps=6",
            "train.global_batch_size=8",
            f"train.micro_batch_size={8 // MICRO_STEPS}",
            "train.warmup_steps=1",
            "train.eval_batches=0",
            "checkpoint.every_steps=0",
            "log.every_steps=1",
            "log.console=false",
        ],
    )
    history = run_training(config).history
    assert [record["step"] for record in history] == list(range(1, 7))
    return [record["data_wait_s"] for record in history]


@pytest.mark.parametrize("read_ahead", ["never", "always"])
def test_a_known_read_delay_shows_in_data_wait(tmp_path: Path, read_ahead: str) -> None:
    per_step = MICRO_STEPS * READ_DELAY_S
    waits = data_waits(tmp_path, read_ahead=read_ahead)
    assert waits[0] >= per_step  # nothing was read ahead of the first step
    if read_ahead == "never":  # every step waits for its reads, and for little else
        assert min(waits) >= per_step, waits
        assert statistics.median(waits) < 1.5 * per_step, waits
    else:  # the next step's reads happen while this one trains (it takes longer)
        assert statistics.median(waits[1:]) < 0.25 * per_step, waits
