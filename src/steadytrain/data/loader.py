"""Feed one rank its micro-batches, step by step, from the sampler's global position."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from steadytrain.config import BatchLayout
from steadytrain.data.sampler import GlobalPositionSampler
from steadytrain.data.workers import die_with_this_process


@dataclass
class MicroBatch:
    """What the model sees in one micro-step, and the sample ids it came from."""

    sample_ids: torch.Tensor
    batch: Any

    def pin_memory(self) -> MicroBatch:
        """This micro-batch with the batch's tensors in pinned host memory, so their copy to
        the device does not block (a DataLoader's ``pin_memory`` calls this); the sample ids
        stay where they are: they are read on the host. Needs an accelerator."""
        return MicroBatch(sample_ids=self.sample_ids, batch=pinned(self.batch))


def pinned(batch: Any) -> Any:
    """``batch`` with its tensors (also inside dicts, lists and tuples, and objects with a
    ``pin_memory()`` of their own) in pinned host memory."""
    if isinstance(batch, torch.Tensor) or hasattr(batch, "pin_memory"):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {key: pinned(value) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(pinned(value) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(pinned(value) for value in batch)
    return batch


class StepLookahead(Protocol):
    """Told, before each step's micro-batches are read, which step that is (prefetching)."""

    def at_step(self, *, epoch: int, step_in_epoch: int) -> None: ...

    def prime(self, *, epoch: int, step_in_epoch: int) -> None:
        """Make that step's data ready now (raising here what reading it would raise)."""

    def close(self) -> None: ...


class NullLookahead:
    """The lookahead of data that needs none (a local corpus, a dataset factory)."""

    def at_step(self, *, epoch: int, step_in_epoch: int) -> None:
        return None

    def prime(self, *, epoch: int, step_in_epoch: int) -> None:
        return None

    def close(self) -> None:
        return None


@runtime_checkable
class ReadsSamples(Protocol):
    """A dataset that reads a micro-batch's samples together, stacked as ``default_collate``
    stacks them one by one (the token datasets: no tensor per sample)."""

    def read_samples(self, sample_ids: Sequence[int]) -> Any: ...


class _MicroBatches(Dataset[MicroBatch]):
    """Item ``sample_ids`` is the micro-batch of those samples of ``dataset``: read together
    when it can, else item by item and collated."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset
        self._reads_samples = isinstance(dataset, ReadsSamples)

    def __getitem__(self, sample_ids: list[int]) -> MicroBatch:
        if self._reads_samples:
            batch = self.dataset.read_samples(sample_ids)  # type: ignore[attr-defined]
        else:
            batch = default_collate([self.dataset[sample_id] for sample_id in sample_ids])
        return MicroBatch(sample_ids=torch.tensor(sample_ids, dtype=torch.int64), batch=batch)


def _as_read(micro_batch: Any) -> Any:
    return micro_batch


class _RankSchedule(Sampler[list[int]]):
    """This rank's micro-batches from ``first_step`` to the end of ``epoch``, or to the
    run's end (global step ``end_step``) if that comes first."""

    def __init__(
        self,
        sampler: GlobalPositionSampler,
        layout: BatchLayout,
        *,
        rank: int,
        epoch: int,
        first_step: int,
        end_step: int | None,
    ) -> None:
        self._sampler = sampler
        self._layout = layout
        self._rank = rank
        self._epoch = epoch
        self._first_step = first_step
        self._last_step = sampler.steps_per_epoch
        if end_step is not None:
            epoch_start = sampler.global_step(epoch=epoch, step_in_epoch=0)
            self._last_step = max(first_step, min(self._last_step, end_step - epoch_start))

    def __len__(self) -> int:
        return (self._last_step - self._first_step) * self._layout.grad_accum_steps

    def __iter__(self) -> Iterator[list[int]]:
        for step_in_epoch in range(self._first_step, self._last_step):
            yield from self._sampler.rank_micro_batches(
                self._layout, rank=self._rank, epoch=self._epoch, step_in_epoch=step_in_epoch
            )


class StepBatches:
    """Yields, per optimizer step, this rank's micro-batches at the sampler's position.

    Loader workers may read ahead; nothing here moves the sampler. The trainer advances it
    only when a step commits, which is what makes the position exact on resume. Without
    workers, a dataset that reads samples together (the token datasets) has the next step
    read in a background thread while this one trains (``_StepReadAhead``), if ``read_ahead``.
    Nothing is read ahead for steps from ``end_step`` on (``train.max_steps``: the run ends
    before them). With ``pin_memory`` (CUDA) every micro-batch comes in pinned memory.
    Workers die as soon as the process that made them does, even by ``kill -9``
    (``workers.DieWithTrainer``); ``worker_init_fn`` runs in each worker after that is set up.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        sampler: GlobalPositionSampler,
        layout: BatchLayout,
        *,
        rank: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        lookahead: StepLookahead | None = None,
        read_ahead: bool = True,
        end_step: int | None = None,
        worker_init_fn: Callable[[int], None] | None = None,
    ) -> None:
        self._micro_batches = _MicroBatches(dataset)
        self.lookahead = lookahead or NullLookahead()
        self._sampler = sampler
        self._layout = layout
        self._rank = rank
        self._num_workers = num_workers
        self._pin_memory = pin_memory
        self._end_step = end_step
        self._worker_init_fn = worker_init_fn
        self._iterator: Iterator[MicroBatch] | None = None
        self._iterator_position: tuple[int, int] | None = None
        self._read_ahead: _StepReadAhead | None = None
        if read_ahead and num_workers == 0 and isinstance(dataset, ReadsSamples):
            # Only our own datasets: a user's may draw from the RNGs the training thread
            # uses, and reading it in another thread would make runs nondeterministic.
            self._read_ahead = _StepReadAhead(
                self._micro_batches, self._step_sample_ids, pin_memory=pin_memory
            )

    def next_step(self) -> list[MicroBatch]:
        """The micro-batches of the step at the sampler's current position."""
        position = (self._sampler.epoch, self._sampler.step_in_epoch)
        self.lookahead.at_step(epoch=position[0], step_in_epoch=position[1])
        if self._read_ahead is not None:
            micro_batches = self._read_ahead.take(position)
            following = self._following(position)
            if self._before_end(following):
                # The lookahead pinned the next step's shards too: reading them now is safe.
                self._read_ahead.start(following)
            return micro_batches
        if self._iterator is None or self._iterator_position != position:
            # The old workers stop before new ones start (and take their counter rows).
            self._iterator = None
            self._iterator = self._open(epoch=position[0], first_step=position[1])
        micro_batches = [next(self._iterator) for _ in range(self._layout.grad_accum_steps)]
        self._iterator_position = (position[0], position[1] + 1)
        return micro_batches

    def prepare_first_step(self) -> None:
        """Fetch what the step at the sampler's position reads, before training starts."""
        self.lookahead.prime(epoch=self._sampler.epoch, step_in_epoch=self._sampler.step_in_epoch)

    def close(self) -> None:
        self._iterator = None  # stops its workers
        if self._read_ahead is not None:
            self._read_ahead.close()
        self.lookahead.close()

    def _before_end(self, position: tuple[int, int]) -> bool:
        step = self._sampler.global_step(epoch=position[0], step_in_epoch=position[1])
        return self._end_step is None or step < self._end_step

    def _step_sample_ids(self, position: tuple[int, int]) -> list[list[int]]:
        return self._sampler.rank_micro_batches(
            self._layout, rank=self._rank, epoch=position[0], step_in_epoch=position[1]
        )

    def _following(self, position: tuple[int, int]) -> tuple[int, int]:
        epoch, step_in_epoch = position
        if step_in_epoch + 1 < self._sampler.steps_per_epoch:
            return epoch, step_in_epoch + 1
        return epoch + 1, 0

    def _open(self, *, epoch: int, first_step: int) -> Iterator[MicroBatch]:
        schedule = _RankSchedule(
            self._sampler,
            self._layout,
            rank=self._rank,
            epoch=epoch,
            first_step=first_step,
            # A step asked for at or past the end is read all the same.
            end_step=self._end_step if self._before_end((epoch, first_step)) else None,
        )
        if self._num_workers == 0:
            # Read in this thread: a DataLoader would add only its per-item overhead.
            micro_batches = (self._micro_batches[sample_ids] for sample_ids in schedule)
            if self._pin_memory:
                return (micro.pin_memory() for micro in micro_batches)
            return micro_batches
        # Each item is a whole micro-batch (the schedule yields its sample ids), so a worker
        # reads it in one call rather than sample by sample.
        loader = DataLoader(
            self._micro_batches,
            sampler=schedule,
            batch_size=None,
            collate_fn=_as_read,
            num_workers=self._num_workers,
            pin_memory=self._pin_memory,
            # torch's own check in a worker watches its parent, which under --nproc is a
            # forkserver that outlives this process: the workers watch this process instead.
            worker_init_fn=die_with_this_process(then=self._worker_init_fn),
        )
        return iter(loader)


def reads_ahead(setting: str, *, device: torch.device) -> bool:
    """Whether ``StepBatches`` reads the next step in a background thread, by
    ``data.read_ahead`` (auto: on CUDA only; on CPU the training itself uses every core)."""
    return setting == "always" or (setting == "auto" and device.type == "cuda")


class _StepReadAhead:
    """Reads one step's micro-batches ahead, in one background thread.

    The copy of shard tokens into the batch releases the GIL, so it overlaps the training
    step instead of delaying the next one. Reading never moves the sampler: a step read
    ahead at a position the trainer does not ask for next (a rollback, a resume) is dropped,
    and its error, if reading failed, is raised only if that step is asked for.
    """

    def __init__(
        self,
        micro_batches: _MicroBatches,
        step_sample_ids: Callable[[tuple[int, int]], list[list[int]]],
        *,
        pin_memory: bool,
    ) -> None:
        self._micro_batches = micro_batches
        self._step_sample_ids = step_sample_ids
        self._pin_memory = pin_memory
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step-read-ahead")
        self._pending: tuple[tuple[int, int], Future[list[MicroBatch]]] | None = None

    def take(self, position: tuple[int, int]) -> list[MicroBatch]:
        """The micro-batches at ``position``: the ones read ahead, or read now."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending_position, future = pending
            if pending_position == position:
                return future.result()  # waits (data_wait) if it is not done; raises its error
            with contextlib.suppress(Exception):
                future.result()  # let it finish: one thread reads the dataset at a time
        return self._read(self._step_sample_ids(position))

    def start(self, position: tuple[int, int]) -> None:
        # Sample ids are computed in this thread: the sampler is not thread-safe.
        self._pending = (
            position,
            self._executor.submit(self._read, self._step_sample_ids(position)),
        )

    def close(self) -> None:
        self._pending = None
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _read(self, step_sample_ids: list[list[int]]) -> list[MicroBatch]:
        micro_batches = [self._micro_batches[sample_ids] for sample_ids in step_sample_ids]
        if self._pin_memory:  # here too, off the training thread
            return [micro.pin_memory() for micro in micro_batches]
        return micro_batches


def validation_batches(
    dataset: Dataset[Any],
    *,
    world_size: int,
    rank: int,
    micro_batch_size: int,
    max_batches: int,
) -> list[MicroBatch]:
    """A fixed set of held-out micro-batches for this rank: the first samples, in order.

    Every rank gets the same number of equally sized micro-batches, so the mean over ranks
    is the mean over all evaluated samples.
    """
    per_round = world_size * micro_batch_size
    num_batches = min(max_batches, len(dataset) // per_round)  # type: ignore[arg-type]
    micro_batches = _MicroBatches(dataset)
    batches = []
    for number in range(num_batches):
        first = number * per_round + rank * micro_batch_size
        batches.append(micro_batches[list(range(first, first + micro_batch_size))])
    return batches
