"""Read a streamed corpus through the shard cache, and fetch its shards ahead of use.

``CachedShards`` is the dataset's shard reader for a corpus in an object store: samples are
read from the cached shard file, memory-mapped once per process, which is fetched (and
verified) first if need be, inline, so a shard that prefetching has not brought yet shows up
as ``data_wait``, never hidden.

``ShardPrefetcher`` is the loader's step lookahead. At each step it computes, from the same
pure ``(seed, epoch)`` order as the sampler, which shards this rank reads at the current and
next step (pinned: no process evicts them) and which it reads after them, and background
threads download those in order of first use, ``FETCH_THREADS`` at once,
``data.prefetch_shards`` beyond the pinned ones and never more than the cache limit leaves
room for. Nothing is fetched for steps past the run's end (``train.max_steps``): those bytes
would never be read.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from steadytrain.config import BatchLayout
from steadytrain.data.cache import ShardCache
from steadytrain.data.sampler import (
    GlobalPositionSampler,
    epoch_permutation,
    rank_micro_batch_offsets,
)
from steadytrain.data.shards import ShardFile, ShardMaps, map_shard_file

MAX_STEPS_SCANNED = 256  # how far ahead the prefetcher looks for its next shards
FETCH_THREADS = 4  # shards the prefetcher downloads at once, in order of first use


class CachedShards:
    """Shard reader over a ``ShardCache``: shards are memory-mapped from verified local copies.

    A map stays valid when another process evicts its file (the bytes stay until unmapped);
    whenever a new shard is mapped, the maps of evicted or replaced files are let go, so
    their disk space is freed.
    """

    def __init__(self, cache: ShardCache, shards: list[ShardFile], dtype: np.dtype[Any]) -> None:
        self.cache = cache
        self._shards = shards
        self._dtype = dtype
        self._maps = ShardMaps()

    def tokens(self, shard_number: int) -> np.ndarray:
        tokens = self._maps.get(shard_number)
        if tokens is None:
            self._unmap_evicted()
            tokens, inode = self._map(self._shards[shard_number])
            self._maps.put(shard_number, tokens, inode)
        return tokens

    def _map(self, shard: ShardFile) -> tuple[np.ndarray, int]:
        path = self.cache.ensure(shard, itemsize=self._dtype.itemsize)
        try:
            return map_shard_file(path, self._dtype, shard.num_tokens)
        except FileNotFoundError:  # evicted by another process since: fetch it again
            path = self.cache.ensure(shard, itemsize=self._dtype.itemsize)
            return map_shard_file(path, self._dtype, shard.num_tokens)

    def _unmap_evicted(self) -> None:
        for number, inode in self._maps.inodes():
            try:
                current = os.stat(self.cache.path_of(self._shards[number])).st_ino
            except FileNotFoundError:
                current = None
            if current != inode:
                self._maps.drop(number)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": ShardMaps()}


class ShardPrefetcher:
    """The step lookahead of a streamed corpus: pins this rank's current and next shards and
    downloads the following ones in background threads."""

    def __init__(
        self,
        cache: ShardCache,
        shards: list[ShardFile],
        first_sample: np.ndarray,
        sampler: GlobalPositionSampler,
        layout: BatchLayout,
        *,
        rank: int,
        prefetch_shards: int,
        itemsize: int,
        end_step: int | None = None,
    ) -> None:
        self._cache = cache
        self._shards = shards
        self._first_sample = first_sample
        self._sampler = sampler
        self._offsets = [
            range(r.start, r.stop) for r in rank_micro_batch_offsets(layout, rank=rank)
        ]
        self._prefetch_shards = prefetch_shards
        self._itemsize = itemsize
        self._end_step = end_step  # the run's last step is the one before it
        self._permutations: dict[int, np.ndarray] = {}
        self._step_shards: dict[tuple[int, int], tuple[int, ...]] = {}
        self._wanted: list[ShardFile] = []
        self._wanted_numbers: tuple[set[int], list[int]] = (set(), [])
        self._last_pinned: set[int] = set()
        self._last_ahead: list[int] = []
        self._failed = False  # a download of the last list failed: the next step tries again
        self._tried: set[str] = set()  # shards taken from the current list
        self._in_flight: set[str] = set()  # shards being downloaded now
        self._closed = False
        self._condition = threading.Condition()
        # The last failures: the reader meets the same error inline, and reports it.
        self.errors: collections.deque[str] = collections.deque(maxlen=16)
        # Several downloads at once: one shard's requests wait out the store's latency
        # while another's bytes use the link.
        self._threads = [
            threading.Thread(target=self._run, name=f"shard-prefetch-{number}", daemon=True)
            for number in range(FETCH_THREADS)
        ]
        for thread in self._threads:
            thread.start()

    def at_step(self, *, epoch: int, step_in_epoch: int) -> None:
        """The loader is about to read step ``step_in_epoch`` of ``epoch``."""
        upcoming = self._positions(epoch, step_in_epoch)
        pinned = _distinct(
            shard
            for position in itertools.islice(upcoming, 2)
            for shard in self._shards_of(*position)
        )
        self._cache.pin(self._shards[number] for number in pinned)
        if set(pinned) == self._last_pinned:
            # The same pinned shards are followed by the same ones: the scan would repeat,
            # and waking the thread for an unchanged list only takes the GIL from training.
            ahead = self._last_ahead
        else:
            ahead = self._ahead(upcoming, pinned=pinned)
            self._last_pinned, self._last_ahead = set(pinned), ahead
        with self._condition:
            if self._wanted_numbers != (self._last_pinned, ahead) or self._failed:
                self._wanted_numbers = (self._last_pinned, ahead)
                self._wanted = [self._shards[number] for number in [*pinned, *ahead]]
                self._failed = False
                self._tried = set(self._in_flight)
                self._condition.notify_all()
        self._forget_before(epoch, step_in_epoch)

    def prime(self, *, epoch: int, step_in_epoch: int) -> None:
        """Fetch this rank's shards of that step now, in this thread (none at the run's end)."""
        self.at_step(epoch=epoch, step_in_epoch=step_in_epoch)
        if not self._before_end(epoch, step_in_epoch):
            return
        for number in self._shards_of(epoch, step_in_epoch):
            self._cache.ensure(self._shards[number], itemsize=self._itemsize)

    def _ahead(self, upcoming: Iterator[tuple[int, int]], *, pinned: list[int]) -> list[int]:
        """The next ``prefetch_shards`` shards after the pinned ones, in order of first use,
        as many as fit in the cache beside the pinned ones."""
        room = self._cache.limit_bytes - sum(self._bytes(number) for number in pinned)
        ahead: list[int] = []
        for _, position in zip(range(MAX_STEPS_SCANNED), upcoming, strict=False):
            for number in self._shards_of(*position):
                if number in pinned or number in ahead:
                    continue
                if len(ahead) >= self._prefetch_shards or self._bytes(number) > room:
                    return ahead
                room -= self._bytes(number)
                ahead.append(number)
        return ahead

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        deadline = time.monotonic() + 30
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._cache.close()

    def _run(self) -> None:
        while (shard := self._next_download()) is not None:
            try:
                self._cache.ensure(shard, itemsize=self._itemsize)
            except Exception as error:
                self.errors.append(f"{shard.name}: {error}")
                with self._condition:
                    self._failed = True
            finally:
                with self._condition:
                    self._in_flight.discard(shard.name)

    def _next_download(self) -> ShardFile | None:
        """The first wanted shard not yet tried for this list and not cached (waits for one);
        None once closed. Trying each once per list keeps a failing store from being hammered:
        the next step's list tries again."""
        with self._condition:
            while not self._closed:
                for shard in self._wanted:
                    if shard.name in self._tried or self._cache.is_ready(shard):
                        continue
                    self._tried.add(shard.name)
                    self._in_flight.add(shard.name)
                    return shard
                self._condition.wait()
            return None

    def _positions(self, epoch: int, step_in_epoch: int) -> Iterator[tuple[int, int]]:
        """The positions of the steps from this one to the run's end."""
        while self._before_end(epoch, step_in_epoch):
            yield epoch, step_in_epoch
            step_in_epoch += 1
            if step_in_epoch >= self._sampler.steps_per_epoch:
                epoch, step_in_epoch = epoch + 1, 0

    def _before_end(self, epoch: int, step_in_epoch: int) -> bool:
        step = self._sampler.global_step(epoch=epoch, step_in_epoch=step_in_epoch)
        return self._end_step is None or step < self._end_step

    def _shards_of(self, epoch: int, step_in_epoch: int) -> tuple[int, ...]:
        key = (epoch, step_in_epoch)
        if key not in self._step_shards:
            batch = self._sampler.global_batch_size
            step_ids = self._permutation(epoch)[step_in_epoch * batch : (step_in_epoch + 1) * batch]
            ids = np.concatenate([step_ids[r.start : r.stop] for r in self._offsets])
            numbers = np.searchsorted(self._first_sample, ids, side="right") - 1
            self._step_shards[key] = tuple(_distinct(int(n) for n in numbers))
        return self._step_shards[key]

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            self._permutations[epoch] = epoch_permutation(
                seed=self._sampler.seed,
                epoch=epoch,
                num_samples=self._sampler.num_samples,
                order=self._sampler.order,
            )
        return self._permutations[epoch]

    def _forget_before(self, epoch: int, step_in_epoch: int) -> None:
        for key in [key for key in self._step_shards if key < (epoch, step_in_epoch)]:
            del self._step_shards[key]
        for old in [old for old in self._permutations if old < epoch]:
            del self._permutations[old]

    def _bytes(self, number: int) -> int:
        return self._shards[number].num_tokens * self._itemsize


def _distinct(numbers: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(numbers))


class MetricWriter(Protocol):
    """A metric sink (``telemetry.MetricSink``), as far as the data metrics need one."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class DataMetricsSink:
    """Adds the shard caches' counters (``data_cache_*``) to every step record it writes.

    They count what the caches of the rank writing metrics (rank 0) did: its prefetching and
    its reads, in the trainer's process and in its DataLoader workers, summed over the
    streamed sources of a mixture; ``data_cache_bytes`` is the size of their directories.
    """

    def __init__(self, sink: MetricWriter, caches: Sequence[ShardCache]) -> None:
        self._sink = sink
        self._caches = caches

    def write(self, record: dict[str, Any]) -> None:
        if "loss" in record:  # a step record, not a validation one
            record = {**record, **self.snapshot()}
        self._sink.write(record)

    def snapshot(self) -> dict[str, int]:
        totals: dict[str, int] = collections.Counter()
        for cache in self._caches:
            totals.update(cache.snapshot())
        # Caches of one directory (the sources of a mixture) hold the same shards: once.
        directories = {cache.directory: cache for cache in self._caches}
        totals["data_cache_bytes"] = sum(cache.size_bytes() for cache in directories.values())
        return dict(totals)

    def close(self) -> None:
        self._sink.close()
