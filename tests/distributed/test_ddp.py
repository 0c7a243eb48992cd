"""Two ranks over gloo, launched with torchrun: DDP keeps ranks identical, and the loss is
normalised over the global batch so the update does not depend on how the batch is split.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import TINY_CONFIG, run_torchrun

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("worker_train.py")


def train_and_load(
    out_dir: Path, overrides: list[str], *, nproc: int
) -> list[dict[str, torch.Tensor]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = [*overrides, f"run_dir={out_dir / 'run'}"]
    result = run_torchrun(WORKER, TINY_CONFIG, out_dir, *overrides, nproc=nproc)
    assert result.returncode == 0, result.output
    return [load_file(out_dir / f"rank{rank}.safetensors") for rank in range(nproc)]


def test_ranks_hold_identical_weights_after_steps(
    small_overrides: list[str], tmp_path: Path
) -> None:
    ranks = train_and_load(tmp_path, [*small_overrides, "train.max_steps=5"], nproc=2)
    initial = train_and_load(tmp_path / "zero", [*small_overrides, "train.max_steps=1"], nproc=1)
    for name, tensor in ranks[0].items():
        assert torch.equal(tensor, ranks[1][name]), f"{name} differs between ranks"
    moved = [name for name, tensor in ranks[0].items() if not torch.equal(tensor, initial[0][name])]
    assert moved, "training did not change the weights"


@pytest.mark.parametrize(
    ("nproc", "micro_batch_size"),
    [(1, 4), (2, 4), (2, 2)],
    ids=["1rank-x2accum", "2rank-x1accum", "2rank-x2accum"],
)
def test_update_does_not_depend_on_how_the_global_batch_is_split(
    nproc: int, micro_batch_size: int, small_overrides: list[str], tmp_path: Path
) -> None:
    common = [
        *small_overrides,
        "train.global_batch_size=8",
        "train.max_steps=3",
        "train.grad_clip=0",
    ]
    reference = train_and_load(tmp_path / "ref", [*common, "train.micro_batch_size=8"], nproc=1)[0]
    split = train_and_load(
        tmp_path / "split", [*common, f"train.micro_batch_size={micro_batch_size}"], nproc=nproc
    )[0]
    for name, tensor in reference.items():
        torch.testing.assert_close(split[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
