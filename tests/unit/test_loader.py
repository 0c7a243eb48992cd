"""StepBatches feeds each rank exactly the sampler's micro-batches, with or without workers,
reads nothing past the run's end, pins micro-batches, and reports the shard cache's counters of
its worker processes, which die with the process that started them."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from steadytrain.config import BatchLayout
from steadytrain.data import (
    GlobalPositionSampler,
    MicroBatch,
    SampleOrder,
    ShardCache,
    StepBatches,
    TokenWindowDataset,
    reads_ahead,
)
from steadytrain.data.remote import ShardStore, open_remote_index
from steadytrain.data.shards import prepare_shards
from steadytrain.data.streaming import CachedShards
from steadytrain.data.workers import DieWithTrainer, start_time_of


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


def note_worker_id(path: Path, worker_id: int) -> None:
    """A user's ``worker_init_fn``."""
    path.write_text(str(worker_id))


class ReadLog(Dataset[torch.Tensor]):
    """The token dataset, noting in a file every micro-batch read, from whichever process."""

    def __init__(self, dataset: TokenWindowDataset, log: Path) -> None:
        self.dataset, self.log = dataset, log

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, sample_id: int) -> torch.Tensor:
        return self.read_samples([sample_id])[0]

    def read_samples(self, sample_ids: Sequence[int]) -> torch.Tensor:
        with open(self.log, "a") as handle:
            handle.write(json.dumps(list(sample_ids)) + "\n")
        return self.dataset.read_samples(sample_ids)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_nothing_is_read_ahead_past_the_runs_end(
    dataset: TokenWindowDataset, tmp_path: Path, num_workers: int
) -> None:
    """A run of 3 steps reads those 3 steps' micro-batches: neither the read-ahead thread nor
    the workers' prefetching go on to a 4th that no step would consume."""
    log = tmp_path / "reads.jsonl"
    layout = BatchLayout(world_size=2, micro_batch_size=2, grad_accum_steps=2)
    sampler = GlobalPositionSampler(num_samples=len(dataset), global_batch_size=8, seed=3)
    expected = [
        ids
        for step in range(3)
        for ids in sampler.rank_micro_batches(layout, rank=0, epoch=0, step_in_epoch=step)
    ]
    batches = StepBatches(
        ReadLog(dataset, log),
        sampler,
        layout,
        rank=0,
        num_workers=num_workers,
        end_step=3,
        worker_init_fn=functools.partial(note_worker_id, tmp_path / "worker"),
    )
    try:
        for _ in range(3):
            batches.next_step()
            sampler.advance()
        time.sleep(0.3)  # long enough for a read past the end to happen, if one were started
    finally:
        batches.close()
    read = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(read) == sorted(expected)
    assert (tmp_path / "worker").exists() == bool(num_workers)  # a worker_init_fn runs in each


class PinsItself:
    """A user's batch type with a ``pin_memory()`` of its own, as torch's DataLoader expects."""

    def __init__(self, *, pinned: bool = False) -> None:
        self.pinned = pinned

    def pin_memory(self) -> PinsItself:
        return PinsItself(pinned=True)


def test_a_dataloaders_pin_memory_pins_a_micro_batch_into_a_micro_batch() -> None:
    from torch.utils.data._utils.pin_memory import pin_memory  # what pin_memory=True runs

    micro = MicroBatch(
        sample_ids=torch.tensor([3, 4]), batch={"inputs": PinsItself(), "parts": [PinsItself()]}
    )
    result = pin_memory(micro)
    assert isinstance(result, MicroBatch)
    assert result.sample_ids is micro.sample_ids  # read on the host: not pinned
    assert result.batch["inputs"].pinned and result.batch["parts"][0].pinned


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="pinned host memory needs CUDA; this machine has none"
)
@pytest.mark.parametrize(("num_workers", "read_ahead"), [(0, True), (0, False), (1, False)])
def test_micro_batches_come_pinned_on_cuda(
    dataset: TokenWindowDataset, num_workers: int, read_ahead: bool
) -> None:
    layout = BatchLayout(world_size=1, micro_batch_size=2, grad_accum_steps=2)
    sampler = GlobalPositionSampler(num_samples=len(dataset), global_batch_size=4, seed=1)
    batches = StepBatches(
        dataset,
        sampler,
        layout,
        rank=0,
        num_workers=num_workers,
        pin_memory=True,
        read_ahead=read_ahead,
    )
    try:
        for _ in range(2):
            for micro in batches.next_step():
                assert micro.batch.is_pinned()
                assert torch.equal(micro.batch[0], dataset[int(micro.sample_ids[0])])
            sampler.advance()
    finally:
        batches.close()


def streamed_dataset(tmp_path: Path, *, loader_workers: int) -> tuple[TokenWindowDataset, int]:
    """Six shards of 1201 tokens (18 samples of 64+1 each) in a ``file://`` store, read
    through an empty shard cache; and the bytes of each shard."""
    source = tmp_path / "text"
    source.mkdir()
    for number in range(6):
        (source / f"doc{number}.txt").write_bytes(bytes([97 + number]) * 1200)
    prepare_shards(str(source), tmp_path / "store", val_fraction=0, shard_tokens=1000)
    url = f"file://{tmp_path / 'store'}"
    index = open_remote_index(url, cache_dir=tmp_path / "cache")
    cache = ShardCache(
        index.directory, store=ShardStore(url), limit_bytes=2**30, loader_workers=loader_workers
    )
    reader = CachedShards(cache, index.splits["train"], index.dtype)
    return TokenWindowDataset(index, split="train", seq_len=64, reader=reader), 1201


def test_the_cache_counts_what_loader_workers_fetched(tmp_path: Path) -> None:
    """Two forked workers read every shard, over two epochs (new workers in the second): the
    cache's counters in the trainer's process are the sum of what each worker did."""
    dataset, shard_bytes = streamed_dataset(tmp_path, loader_workers=2)
    layout = BatchLayout(world_size=2, micro_batch_size=2, grad_accum_steps=2)
    sampler = GlobalPositionSampler(num_samples=len(dataset), global_batch_size=8, seed=3)
    end = sampler.steps_per_epoch + 2  # into the second epoch
    batches = StepBatches(dataset, sampler, layout, rank=0, num_workers=2, end_step=end)
    worker_shards: dict[tuple[int, int], set[int]] = {}  # (epoch, worker) -> shards it read
    try:
        for _ in range(end):
            first_item = sampler.step_in_epoch * layout.grad_accum_steps  # in this epoch
            for number, micro in enumerate(batches.next_step()):
                worker = (first_item + number) % 2  # a DataLoader deals items round robin
                shards = np.searchsorted(
                    dataset.first_sample, micro.sample_ids.numpy(), side="right"
                )
                worker_shards.setdefault((sampler.epoch, worker), set()).update(
                    (shards - 1).tolist()
                )
            sampler.advance()
    finally:
        batches.close()
    stats = dataset._reader.cache.stats  # type: ignore[attr-defined]
    shards_read = set().union(*worker_shards.values())
    assert stats.misses == len(shards_read) == 6  # each downloaded once, by one worker
    assert stats.bytes_fetched == 6 * shard_bytes
    # Every other first use in a worker found it cached (and checked it).
    assert stats.hits == sum(len(shards) for shards in worker_shards.values()) - 6
    snapshot = dataset._reader.cache.snapshot()  # type: ignore[attr-defined]
    assert snapshot["data_cache_misses"] == 6 and snapshot["data_cache_hits"] == stats.hits


def test_a_spawned_workers_cache_counts_are_reported(tmp_path: Path) -> None:
    dataset, shard_bytes = streamed_dataset(tmp_path, loader_workers=1)
    loader = DataLoader(dataset, batch_size=16, num_workers=1, multiprocessing_context="spawn")
    assert sum(len(batch) for batch in loader) == len(dataset)
    stats = dataset._reader.cache.stats  # type: ignore[attr-defined]
    assert (stats.misses, stats.hits, stats.bytes_fetched) == (6, 0, 6 * shard_bytes)


def run_worker_init(init: DieWithTrainer) -> None:
    """What a DataLoader worker does: run its ``worker_init_fn``, then wait for work."""
    init(3)
    time.sleep(60)


def test_a_loader_worker_dies_with_the_trainer_even_by_kill9(tmp_path: Path) -> None:
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    init = DieWithTrainer(
        trainer_pid=trainer.pid,
        trainer_started=start_time_of(trainer.pid),
        then=functools.partial(note_worker_id, tmp_path / "worker"),
    )
    worker = multiprocessing.get_context("fork").Process(target=run_worker_init, args=(init,))
    worker.start()
    try:
        worker.join(timeout=0.5)
        assert worker.exitcode is None  # lives while the trainer does
        assert (tmp_path / "worker").read_text() == "3"  # the user's init ran too
        trainer.kill()
        worker.join(timeout=5)
        assert worker.exitcode == -signal.SIGKILL
    finally:
        trainer.kill()
        worker.kill()


def test_a_loader_worker_whose_trainer_is_gone_already_dies_at_once() -> None:
    """A trainer dead before its worker started, or whose pid a later process has."""
    trainer = subprocess.Popen([sys.executable, "-c", "pass"])
    trainer.wait()
    inits = [
        DieWithTrainer(trainer_pid=trainer.pid, trainer_started="1"),
        DieWithTrainer(trainer_pid=os.getpid(), trainer_started="1"),  # a reused pid
    ]
    workers = [
        multiprocessing.get_context("fork").Process(target=run_worker_init, args=(init,))
        for init in inits
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=5)
        assert worker.exitcode == -signal.SIGKILL
