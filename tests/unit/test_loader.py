"""StepBatches feeds each rank exactly the sampler's micro-batches, with or without workers."""

from __future__ import annotations

import pytest
import torch

from steadytrain.config import BatchLayout
from steadytrain.data import GlobalPositionSampler, StepBatches, TokenWindowDataset
from steadytrain.data.shards import prepare_shards


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> TokenWindowDataset:
    source = tmp_path_factory.mktemp("text")
    for number in range(6):
        (source / f"doc{number}.txt").write_text(f"document {number} " * 200)
    index = prepare_shards(str(source), tmp_path_factory.mktemp("shards") / "c", val_fraction=0)
    return TokenWindowDataset(index, split="train", seq_len=16)


def collect(dataset, *, rank: int, num_workers: int, steps: int, start: dict | None = None):
    layout = BatchLayout(world_size=2, micro_batch_size=2, grad_accum_steps=2)
    sampler = GlobalPositionSampler(num_samples=len(dataset), global_batch_size=8, seed=3)
    if start is not None:
        sampler.load_state_dict(start)
    batches = StepBatches(dataset, sampler, layout, rank=rank, num_workers=num_workers)
    seen = []
    for _ in range(steps):
        expected = sampler.rank_micro_batches(
            layout, rank=rank, epoch=sampler.epoch, step_in_epoch=sampler.step_in_epoch
        )
        micro_batches = batches.next_step()
        assert [micro.sample_ids.tolist() for micro in micro_batches] == expected
        for micro in micro_batches:
            for sample_id, row in zip(micro.sample_ids.tolist(), micro.batch, strict=True):
                assert torch.equal(row, dataset[sample_id])
        seen.append([micro.sample_ids.tolist() for micro in micro_batches])
        sampler.advance()
    return seen, sampler.state_dict()


def test_micro_batches_follow_the_sampler_across_epochs(dataset: TokenWindowDataset) -> None:
    steps_per_epoch = len(dataset) // 8
    seen, state = collect(dataset, rank=1, num_workers=0, steps=steps_per_epoch + 3)
    assert state["epoch"] == 1 and state["samples_consumed"] == 3 * 8
    assert len(seen) == steps_per_epoch + 3


def test_worker_processes_deliver_the_same_batches(dataset: TokenWindowDataset) -> None:
    in_process, _ = collect(dataset, rank=0, num_workers=0, steps=5)
    with_workers, _ = collect(dataset, rank=0, num_workers=2, steps=5)
    assert with_workers == in_process


def test_resuming_from_a_position_continues_exactly(dataset: TokenWindowDataset) -> None:
    straight, _ = collect(dataset, rank=0, num_workers=0, steps=6)
    first, state = collect(dataset, rank=0, num_workers=0, steps=2)
    rest, _ = collect(dataset, rank=0, num_workers=0, steps=4, start=state)
    assert first + rest == straight
