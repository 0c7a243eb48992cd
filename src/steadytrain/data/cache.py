"""The shard cache: streamed shards on local disk, bounded, shared safely between processes.

Layout under ``data.cache_dir``::

    shards/<sha256>.bin      a verified shard, named by its checksum from index.json
    shards/<sha256>.lock     held exclusively while one process downloads that shard
    shards/<sha256>.pin      held shared by every process that needs it for its current or
                             next step; eviction takes it exclusively, without waiting

Names are content addresses, so runs of any corpus that share a cache directory share equal
shards and never mistake one shard for another. A download goes to a private temporary file,
is checked against its sha256 and made durable, then renamed into place (atomic): a reader
sees a whole verified shard or none. A cached shard is checked (size and sha256) the first
time a process uses it; a corrupt or partial one is deleted and fetched again.

Eviction is least recently used (file modification times, touched on use). A download first
reserves its shard's size (its temporary file, ``.<sha256>.<bytes>.partial-<id>``, exists
before any byte arrives and counts at its full size), then evicts until cached shards and
every download in flight fit the limit, so concurrent downloads, of any process, never take
the cache over it; a temporary file whose ``.lock`` nobody holds is a dead download's and is
deleted. A pinned shard is never evicted; when only
pinned shards are left the cache stays over its limit rather than wait (a limit smaller than
one step's shards must not deadlock), and ``over_limit`` counts those times.

Locks are ``flock`` locks. A DataLoader worker forked while this process holds one inherits
the descriptor; the child closes its copies at once (``os.register_at_fork``), so the lock
stays the parent's alone.

The counters (``CacheStats``) live in shared memory made when the cache is opened, before any
DataLoader worker starts: one row for the opening process, one per worker (worker ``k``
writes row ``1 + k``, forked or spawned), so ``stats`` and the metrics sum what every process
of the loader did. Each row has one writer: a loader stops its workers before the next
ones start.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import uuid
import warnings
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import get_worker_info

from steadytrain.config import DataUnavailable
from steadytrain.data.remote import ShardStore
from steadytrain.data.shards import ShardFile

HASH_CHUNK_BYTES = 8 * 2**20
_PARTIAL = ".partial-"  # in the name of a download's temporary file

_held_descriptors: set[int] = set()  # lock descriptors this process holds
_registry_lock = threading.Lock()
_open_caches: weakref.WeakSet[ShardCache] = weakref.WeakSet()


def _forget_inherited_locks() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()  # a thread of the parent may have held it
    for descriptor in list(_held_descriptors):
        with contextlib.suppress(OSError):
            os.close(descriptor)
    _held_descriptors.clear()
    for cache in list(_open_caches):
        cache._forget_locks()


os.register_at_fork(after_in_child=_forget_inherited_locks)


def _lock(path: Path, mode: int) -> int | None:
    """A descriptor of ``path`` holding an ``flock`` of ``mode``; None if non-blocking and
    taken."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(descriptor, mode)
    except BlockingIOError:
        os.close(descriptor)
        return None
    with _registry_lock:
        _held_descriptors.add(descriptor)
    return descriptor


def _unlock(descriptor: int) -> None:
    with _registry_lock:
        _held_descriptors.discard(descriptor)
    os.close(descriptor)  # releases the flock


@dataclass
class CacheStats:
    """What the cache did since it was opened, in the process that opened it and its
    DataLoader workers."""

    hits: int = 0  # a shard asked for was already cached
    misses: int = 0  # it had to be downloaded
    bytes_fetched: int = 0
    evictions: int = 0
    corrupt: int = 0  # cached shards that failed their checksum and were fetched again
    over_limit: int = 0  # times eviction stopped above the limit: every shard left pinned


COUNTERS = tuple(field.name for field in fields(CacheStats))


class ShardCache:
    """Fetches shards of one store into a bounded, shared, content-addressed directory."""

    def __init__(
        self,
        directory: Path,
        *,
        store: ShardStore,
        limit_bytes: int,
        loader_workers: int = 0,
    ) -> None:
        """Open the cache in ``directory``, fetching from ``store``, at most ``limit_bytes``.

        Args:
            loader_workers: DataLoader workers that will read through this cache per loader
                (their counters are shared from now on, before they start).
        """
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.limit_bytes = limit_bytes
        self._counters = torch.zeros((1 + loader_workers, len(COUNTERS)), dtype=torch.int64)
        if loader_workers:
            self._counters.share_memory_()  # seen by forked and spawned workers alike
        self._row: np.ndarray | None = self._counters.numpy()[0]  # this process's counters
        self._store = store
        self._verified: set[str] = set()  # checked in this process
        self._pins: dict[str, int] = {}
        self._stats_lock = threading.Lock()
        self._thread_locks: dict[str, threading.Lock] = {}
        self._evict_lock = threading.Lock()
        _open_caches.add(self)

    def path_of(self, shard: ShardFile) -> Path:
        return self.directory / f"{_checksum(shard)}.bin"

    def ensure(self, shard: ShardFile, *, itemsize: int = 1) -> Path:
        """The local path of ``shard``, verified; downloaded first if need be.

        Raises:
            DataUnavailable: when it cannot be downloaded, or its bytes never match
                index.json.
        """
        checksum = _checksum(shard)
        path = self.path_of(shard)
        if self.is_ready(shard):
            self._count(hits=1)
            return path
        with self._thread_lock(checksum), self._download_lock(checksum):
            if self._cached_copy_is_good(shard, path, itemsize=itemsize):
                self._count(hits=1)
            else:
                self._download(shard, path, itemsize=itemsize)
            self._verified.add(checksum)
            touch(path)
        self.evict()
        return path

    def is_ready(self, shard: ShardFile) -> bool:
        """Whether ``shard`` is cached and was verified by this process."""
        return _checksum(shard) in self._verified and self.path_of(shard).is_file()

    def pin(self, shards: Iterable[ShardFile]) -> None:
        """From now on exactly ``shards`` are pinned by this cache: no process evicts them.

        Pinned shards are touched, so they are also the most recently used ones.
        """
        wanted = {_checksum(shard) for shard in shards}
        for checksum in set(self._pins) - wanted:
            _unlock(self._pins.pop(checksum))
        for checksum in wanted - set(self._pins):
            descriptor = _lock(self.directory / f"{checksum}.pin", fcntl.LOCK_SH)
            assert descriptor is not None  # a blocking lock always returns one
            self._pins[checksum] = descriptor
            touch(self.directory / f"{checksum}.bin")

    def evict(self, *, count_over_limit: bool = True) -> None:
        """Delete least recently used shards until the cache is within its limit, skipping
        every shard some process has pinned."""
        with self._evict_lock:  # this process's downloads evict one at a time, none twice
            self._evict(count_over_limit=count_over_limit)

    def _evict(self, *, count_over_limit: bool) -> None:
        entries = sorted(self._entries(), key=lambda entry: entry[2])  # oldest first
        total = sum(size for _, size, _ in entries) + self._reserved_bytes()
        for path, size, _ in entries:
            if total <= self.limit_bytes:
                return
            checksum = path.stem
            if checksum in self._pins:
                continue
            descriptor = _lock(self.directory / f"{checksum}.pin", fcntl.LOCK_EX | fcntl.LOCK_NB)
            if descriptor is None:
                continue  # another process needs it now
            try:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    total -= size
                    self._count(evictions=1)
                    self._verified.discard(checksum)
            finally:
                _unlock(descriptor)
        if total > self.limit_bytes and count_over_limit:
            self._count(over_limit=1)

    def size_bytes(self) -> int:
        return sum(size for _, size, _ in self._entries())

    @property
    def stats(self) -> CacheStats:
        """The counters of the process that opened the cache and of its loader workers."""
        totals = self._counters.numpy().sum(axis=0).tolist()
        return CacheStats(**dict(zip(COUNTERS, totals, strict=True)))

    def snapshot(self) -> dict[str, int]:
        """The counters and the cache's size, as metric fields (``data_cache_*``)."""
        metrics = {f"data_cache_{name}": value for name, value in vars(self.stats).items()}
        metrics["data_cache_bytes"] = self.size_bytes()
        return metrics

    def close(self) -> None:
        self.pin([])

    def _entries(self) -> Iterator[tuple[Path, int, float]]:
        with os.scandir(self.directory) as scan:
            for entry in scan:
                if entry.name.endswith(".bin"):
                    with contextlib.suppress(FileNotFoundError):
                        status = entry.stat()
                        yield Path(entry.path), status.st_size, status.st_mtime

    def _reserved_bytes(self) -> int:
        """The full sizes of the downloads in flight (their ``.lock`` is held); temporary
        files of dead downloads are deleted."""
        reserved = 0
        for partial in self.directory.glob(f".*{_PARTIAL}*"):
            checksum, _, size = partial.name[1:].partition(_PARTIAL)[0].partition(".")
            descriptor = _lock(self.directory / f"{checksum}.lock", fcntl.LOCK_EX | fcntl.LOCK_NB)
            if descriptor is None:  # its download is going on
                reserved += int(size) if size.isdigit() else 0
                continue
            try:
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()
            finally:
                _unlock(descriptor)
        return reserved

    def _cached_copy_is_good(self, shard: ShardFile, path: Path, *, itemsize: int) -> bool:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        if size == shard.num_tokens * itemsize and file_sha256(path) == shard.sha256:
            return True
        self._count(corrupt=1)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return False

    def _download(self, shard: ShardFile, path: Path, *, itemsize: int) -> None:
        expected = shard.num_tokens * itemsize
        temporary = self.directory / f".{path.stem}.{expected}{_PARTIAL}{uuid.uuid4().hex[:8]}"
        try:
            temporary.touch()  # the reservation: seen by every evict() from now on
            self.evict(count_over_limit=False)  # room for it before its bytes arrive
            for attempt in range(2):  # a checksum mismatch may be a torn transfer: once more
                with open(temporary, "wb") as handle:
                    size, checksum = self._store.download(shard.name, handle)
                    handle.flush()
                    os.fsync(handle.fileno())
                self._count(misses=1 if attempt == 0 else 0, bytes_fetched=size)
                if size == expected and checksum == shard.sha256:
                    os.rename(temporary, path)
                    return
            raise DataUnavailable(
                f"{self._store.url}/{shard.name}: {size} bytes with sha256 {checksum[:12]}…, "
                f"index.json says {expected} bytes with {str(shard.sha256)[:12]}…; upload "
                "the corpus again ('steadytrain data prepare --output URL' to a new prefix)"
            )
        finally:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()

    @contextlib.contextmanager
    def _download_lock(self, checksum: str) -> Iterator[None]:
        descriptor = _lock(self.directory / f"{checksum}.lock", fcntl.LOCK_EX)
        assert descriptor is not None
        try:
            yield
        finally:
            _unlock(descriptor)

    def _thread_lock(self, checksum: str) -> threading.Lock:
        with self._stats_lock:
            return self._thread_locks.setdefault(checksum, threading.Lock())

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            row = self._own_row()
            for name, delta in deltas.items():
                row[COUNTERS.index(name)] += delta

    def _own_row(self) -> np.ndarray:
        """This process's row of counters: a loader worker's own row, found at its first
        count; any other process that inherited the cache keeps counts of its own."""
        if self._row is None:
            worker = get_worker_info()
            if worker is not None and 1 + worker.id < len(self._counters):
                self._row = self._counters.numpy()[1 + worker.id]
            else:
                if worker is not None:
                    warnings.warn(
                        f"shard cache: DataLoader worker {worker.id} was not counted for when "
                        f"the cache was opened ({len(self._counters) - 1} workers); its cache "
                        "counters are not reported",
                        stacklevel=2,
                    )
                self._counters = torch.zeros((1, len(COUNTERS)), dtype=torch.int64)
                self._row = self._counters.numpy()[0]
        return self._row

    def _forget_locks(self) -> None:
        """In a forked child: the parent's pins, thread locks and counter row are not this
        process's."""
        self._pins = {}
        self._stats_lock = threading.Lock()
        self._evict_lock = threading.Lock()
        self._thread_locks = {}
        self._row = None

    def __getstate__(self) -> dict[str, object]:
        # A spawned DataLoader worker gets its own locks and no pins; the shared counters
        # travel as shared memory (torch's pickler for worker processes).
        return {
            **self.__dict__,
            "_pins": {},
            "_stats_lock": None,
            "_evict_lock": None,
            "_thread_locks": {},
            "_row": None,
        }

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._stats_lock = threading.Lock()
        self._evict_lock = threading.Lock()
        _open_caches.add(self)


def _checksum(shard: ShardFile) -> str:
    assert shard.sha256 is not None, "remote indexes are checked for checksums when opened"
    return shard.sha256


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def touch(path: Path) -> None:
    """Mark ``path`` as just used (least-recently-used order across processes)."""
    with contextlib.suppress(FileNotFoundError):
        os.utime(path)
