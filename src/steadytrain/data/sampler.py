"""The resumable global-position sampler (Contract 2).

Epoch ``e`` visits the dataset in one permutation, a pure function of ``(seed, e)``. Step
``s`` of the epoch consumes permutation positions ``[s·B, (s+1)·B)`` where ``B`` is the global
batch. Inside a step, position offset ``p`` belongs to

    micro_step = p // (world_size · micro_batch)
    rank       = (p mod (world_size · micro_batch)) // micro_batch

so each micro-step takes one contiguous block, split across ranks in rank order. The state
is the global position ``(epoch, samples_consumed)``, never a per-rank index, so a restart
with another world size (same ``B``) continues exactly where training stopped. The last
``num_samples mod B`` positions of each epoch cannot fill a step: they are the *tail*,
reported, never silently lost.

The permutation is global by default. A ``SampleOrder`` with a shard window makes it local
to shards, for corpora streamed through a bounded cache: the epoch's generator first permutes
the shards, then, window by window of ``window_shards`` consecutive shards of that order,
permutes the samples of the window's shards. Still a pure function of ``(seed, epoch)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from steadytrain.config import BatchLayout, DataError

SAMPLER_STATE_VERSION = 1
MIXTURE_STREAM = 0x6D6978  # keeps a source's pass permutations apart from the epoch's


@dataclass(frozen=True)
class SampleOrder:
    """A windowed shuffle: samples are numbered shard by shard, ``shard_samples[k]`` of them
    in shard ``k``; an epoch permutes the shards, then the samples within each window of
    ``window_shards`` shards of that order."""

    window_shards: int
    shard_samples: tuple[int, ...]

    @property
    def is_global(self) -> bool:
        """A window of every shard: the same order as the global permutation."""
        return self.window_shards >= len(self.shard_samples)

    def describe(self) -> dict[str, Any]:
        """What the ledger records so that ``audit`` can recompute the order."""
        return {"window_shards": self.window_shards, "shard_samples": list(self.shard_samples)}


@dataclass(frozen=True)
class MixtureOrder:
    """A weighted mixture of sources whose samples are numbered source after source.

    An epoch has as many samples as all sources together; source ``k`` contributes
    ``epoch_counts()[k]`` of them (its share of the weights, largest remainders rounded up):
    the next ones of its own stream, which visits the source pass after pass, each pass a
    permutation of ``(seed, pass, k)``. The epoch's samples are then shuffled together.
    Over the run, each source's stream is consumed exactly once, in order.
    """

    names: tuple[str, ...]
    weights: tuple[float, ...]
    source_samples: tuple[int, ...]

    @property
    def is_global(self) -> bool:
        return False

    def epoch_counts(self) -> list[int]:
        total, weight_sum = sum(self.source_samples), sum(self.weights)
        shares = [total * weight / weight_sum for weight in self.weights]
        counts = [int(share) for share in shares]
        by_remainder = sorted(range(len(shares)), key=lambda k: counts[k] - shares[k])
        for k in by_remainder[: total - sum(counts)]:
            counts[k] += 1
        return counts

    def first_sample(self) -> np.ndarray:
        """The global id of each source's first sample, and the total last."""
        return np.concatenate([[0], np.cumsum(self.source_samples)]).astype(np.int64)

    def describe(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "weights": list(self.weights),
            "source_samples": list(self.source_samples),
        }


def epoch_permutation(
    *,
    seed: int,
    epoch: int,
    num_samples: int,
    order: SampleOrder | MixtureOrder | None = None,
) -> np.ndarray:
    """The visiting order of epoch ``epoch``: identical on every rank, machine and restart,
    and for every world size."""
    generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    if isinstance(order, MixtureOrder):
        return generator.permutation(_mixture_samples(order, seed=seed, epoch=epoch))
    if order is None or order.is_global:
        return generator.permutation(num_samples)
    return _windowed_permutation(generator, order, num_samples=num_samples)


def _mixture_samples(order: MixtureOrder, *, seed: int, epoch: int) -> np.ndarray:
    """Epoch ``epoch``'s samples of every source, source after source (global ids)."""
    pieces = []
    first = order.first_sample()
    for k, (size, count) in enumerate(zip(order.source_samples, order.epoch_counts(), strict=True)):
        positions = np.arange(epoch * count, (epoch + 1) * count, dtype=np.int64)
        passes, within = positions // size, positions % size
        ids = np.empty(count, dtype=np.int64)
        for number in np.unique(passes).tolist():
            source_pass = np.random.Generator(
                np.random.PCG64(np.random.SeedSequence([seed, number, k, MIXTURE_STREAM]))
            ).permutation(size)
            chosen = passes == number
            ids[chosen] = source_pass[within[chosen]]
        pieces.append(ids + first[k])
    return np.concatenate(pieces)


def _windowed_permutation(
    generator: np.random.Generator, order: SampleOrder, *, num_samples: int
) -> np.ndarray:
    if sum(order.shard_samples) != num_samples:
        raise DataError(
            f"sampler: shards hold {sum(order.shard_samples)} samples, the dataset {num_samples}"
        )
    first = np.concatenate([[0], np.cumsum(order.shard_samples)]).astype(np.int64)
    shard_order = generator.permutation(len(order.shard_samples))
    pieces = []
    for start in range(0, len(shard_order), order.window_shards):
        window = shard_order[start : start + order.window_shards]
        ids = np.concatenate([np.arange(first[k], first[k + 1]) for k in window])
        pieces.append(generator.permutation(ids))
    return np.concatenate(pieces)


def rank_micro_batch_offsets(layout: BatchLayout, *, rank: int) -> list[range]:
    """For ``rank``, the step-relative position offsets of each of its micro-batches."""
    block = layout.samples_per_micro_step
    return [
        range(
            micro * block + rank * layout.micro_batch_size,
            micro * block + (rank + 1) * layout.micro_batch_size,
        )
        for micro in range(layout.grad_accum_steps)
    ]


@dataclass(frozen=True)
class SamplerPosition:
    epoch: int
    samples_consumed: int


class GlobalPositionSampler:
    """Owns the global data position; says which samples each rank reads at each step."""

    def __init__(
        self,
        *,
        num_samples: int,
        global_batch_size: int,
        seed: int,
        order: SampleOrder | MixtureOrder | None = None,
    ) -> None:
        if num_samples < global_batch_size:
            raise DataError(
                f"data: the training split has {num_samples} samples, fewer than "
                f"train.global_batch_size={global_batch_size}; use more data, a shorter "
                "data.seq_len or a smaller global batch"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.order = order
        self.steps_per_epoch = num_samples // global_batch_size
        self.tail_size = num_samples - self.steps_per_epoch * global_batch_size
        self.epoch = 0
        self.samples_consumed = 0
        self._cached_epoch = -1
        self._cached_permutation = np.empty(0, dtype=np.int64)

    @property
    def position(self) -> SamplerPosition:
        return SamplerPosition(epoch=self.epoch, samples_consumed=self.samples_consumed)

    @property
    def step_in_epoch(self) -> int:
        return self.samples_consumed // self.global_batch_size

    def global_step(self, *, epoch: int, step_in_epoch: int) -> int:
        """The steps taken before that position since the start of training: the trainer's
        step number there (both move on every committed or skipped step, from 0)."""
        return epoch * self.steps_per_epoch + step_in_epoch

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._cached_epoch:
            self._cached_permutation = epoch_permutation(
                seed=self.seed, epoch=epoch, num_samples=self.num_samples, order=self.order
            )
            self._cached_epoch = epoch
        return self._cached_permutation

    def step_sample_ids(self, *, epoch: int, step_in_epoch: int) -> np.ndarray:
        """All ``B`` sample ids of one step, in global position order."""
        start = step_in_epoch * self.global_batch_size
        return self.permutation(epoch)[start : start + self.global_batch_size]

    def rank_micro_batches(
        self, layout: BatchLayout, *, rank: int, epoch: int, step_in_epoch: int
    ) -> list[list[int]]:
        """The sample ids ``rank`` reads in each micro-step of the given step."""
        self._check_layout(layout)
        step_ids = self.step_sample_ids(epoch=epoch, step_in_epoch=step_in_epoch)
        return [
            step_ids[offsets.start : offsets.stop].tolist()
            for offsets in rank_micro_batch_offsets(layout, rank=rank)
        ]

    def advance(self) -> bool:
        """Count one committed step; returns True when that step finished the epoch."""
        self.samples_consumed += self.global_batch_size
        if self.samples_consumed >= self.steps_per_epoch * self.global_batch_size:
            self.epoch += 1
            self.samples_consumed = 0
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": SAMPLER_STATE_VERSION,
            "epoch": self.epoch,
            "samples_consumed": self.samples_consumed,
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by any world size with the same data and global batch.

        Raises:
            DataError: when the saved position belongs to other data or another global batch.
        """
        if state.get("version") != SAMPLER_STATE_VERSION:
            raise DataError(f"sampler state version {state.get('version')!r} is not supported")
        for key in ("num_samples", "global_batch_size", "seed"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"sampler: saved {key}={state[key]} differs from this run's "
                    f"{getattr(self, key)}; resume with the same data and global batch"
                )
        if state["samples_consumed"] % self.global_batch_size:
            raise DataError("sampler: saved position is not on a step boundary")
        self.epoch = int(state["epoch"])
        self.samples_consumed = int(state["samples_consumed"])

    def _check_layout(self, layout: BatchLayout) -> None:
        if layout.global_batch_size != self.global_batch_size:
            raise DataError(
                f"batch layout covers {layout.global_batch_size} samples per step, the sampler "
                f"{self.global_batch_size}"
            )
