"""StepBatches feeds each rank exactly the sampler's micro-batches, with or without workers."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from steadytrain.config import BatchLayout
from steadytrain.data import (
    GlobalPositionSampler,
    SampleOrder,
    StepBatches,
    TokenWindowDataset,
    reads_ahead,
)
from steadytrain.data.shards import prepare_shards


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> TokenWindowDataset:
    source = tmp_path_factory.mktemp("text")
    for number in range(6):
        (source / f"doc{number}.txt").write_text(f"document {number} " * 200)
    index = prepare_shards(str(source), tmp_path_factory.mktemp("shards") / "c", val_fraction=0)
    return TokenWindowDataset(index, split="train", seq_len=16)


def collect(
    dataset,
    *,
    rank: int,
    num_workers: int,
    steps: int,
    start: dict | None = None,
    read_ahead: bool = True,
):
    layout = BatchLayout(world_size=2, micro_batch_size=2, grad_accum_steps=2)
    sampler = GlobalPositionSampler(num_samples=len(dataset), global_batch_size=8, seed=3)
    if start is not None:
        sampler.load_state_dict(start)
    batches = StepBatches(
        dataset, sampler, layout, rank=rank, num_workers=num_workers, read_ahead=read_ahead
    )
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
    readers = [t for t in threading.enumerate() if t.name.startswith("step-read-ahead")]
    batches.close()
    return seen, sampler.state_dict(), readers


def test_micro_batches_follow_the_sampler_across_epochs(dataset: TokenWindowDataset) -> None:
    steps_per_epoch = len(dataset) // 8
    seen, state, _ = collect(dataset, rank=1, num_workers=0, steps=steps_per_epoch + 3)
    assert state["epoch"] == 1 and state["samples_consumed"] == 3 * 8
    assert len(seen) == steps_per_epoch + 3


def test_worker_processes_deliver_the_same_batches(dataset: TokenWindowDataset) -> None:
    in_process, _, readers = collect(dataset, rank=0, num_workers=0, steps=5)
    with_workers, _, _ = collect(dataset, rank=0, num_workers=2, steps=5)
    not_ahead, _, no_readers = collect(dataset, rank=0, num_workers=0, steps=5, read_ahead=False)
    assert with_workers == in_process == not_ahead
    assert len(readers) == 1 and no_readers == []  # data.read_ahead: never (auto on CPU)


def test_reading_ahead_is_for_cuda_unless_set() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [reads_ahead(setting, device=cpu) for setting in ("auto", "always", "never")] == [
        False,
        True,
        False,
    ]
    assert [reads_ahead(setting, device=cuda) for setting in ("auto", "always", "never")] == [
        True,
        True,
        False,
    ]


def test_resuming_from_a_position_continues_exactly(dataset: TokenWindowDataset) -> None:
    straight, _, _ = collect(dataset, rank=0, num_workers=0, steps=6)
    first, state, _ = collect(dataset, rank=0, num_workers=0, steps=2)
    rest, _, _ = collect(dataset, rank=0, num_workers=0, steps=4, start=state)
    assert first + rest == straight


def test_a_step_read_ahead_at_another_position_is_dropped(dataset: TokenWindowDataset) -> None:
    """The next step is read in the background; a trainer that goes back (a rollback or
    resume) still gets the sampler's micro-batches of the position it is at."""
    layout = BatchLayout(world_size=1, micro_batch_size=2, grad_accum_steps=2)
    sampler = GlobalPositionSampler(num_samples=len(dataset), global_batch_size=4, seed=5)
    batches = StepBatches(dataset, sampler, layout, rank=0)
    try:
        start = sampler.state_dict()
        first = batches.next_step()  # step 1 is now being read ahead
        sampler.load_state_dict(start)
        again = batches.next_step()
        assert [m.sample_ids.tolist() for m in again] == [m.sample_ids.tolist() for m in first]
        assert all(torch.equal(a.batch, b.batch) for a, b in zip(again, first, strict=True))
        sampler.advance()
        expected = sampler.rank_micro_batches(layout, rank=0, epoch=0, step_in_epoch=1)
        assert [m.sample_ids.tolist() for m in batches.next_step()] == expected
    finally:
        batches.close()


def test_a_step_read_ahead_fails_at_that_step_not_before(tmp_path: Path) -> None:
    """Reading ahead moves no error forward: the step whose shard is gone raises when the
    trainer asks for it, and the step before it is delivered."""
    source = tmp_path / "text"
    source.mkdir()
    for number in range(4):  # one shard per document, 4 samples of 16+1 each
        (source / f"doc{number}.txt").write_bytes(bytes([97 + number]) * 64)
    index = prepare_shards(str(source), tmp_path / "c", val_fraction=0, shard_tokens=65)
    dataset = TokenWindowDataset(index, split="train", seq_len=16)
    order = SampleOrder(window_shards=1, shard_samples=dataset.shard_num_samples)
    sampler = GlobalPositionSampler(num_samples=16, global_batch_size=4, seed=1, order=order)
    layout = BatchLayout(world_size=1, micro_batch_size=2, grad_accum_steps=2)
    shard_of_step = [
        {int(i) // 4 for i in sampler.step_sample_ids(epoch=0, step_in_epoch=step)}
        for step in range(2)
    ]
    assert (
        all(len(shards) == 1 for shards in shard_of_step) and shard_of_step[0] != shard_of_step[1]
    )
    (second,) = shard_of_step[1]
    dataset.shards[second].path.unlink()
    batches = StepBatches(dataset, sampler, layout, rank=0)
    try:
        assert len(batches.next_step()) == 2
        sampler.advance()
        with pytest.raises(FileNotFoundError):
            batches.next_step()
    finally:
        batches.close()
