"""Where checkpoints live. ``CheckpointStorage`` is the plug-in point; ``LocalStorage`` is the
local-disk implementation (temp directory + fsync + rename).

A checkpoint is a directory ``step_XXXXXXXX/`` of files plus ``manifest.json``. Writers put
files in a staging location, and ``commit`` makes the checkpoint visible only once the
manifest is durable; a directory without a manifest is never listed as a checkpoint.
"""

from __future__ import annotations

import functools
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from steadytrain.checkpoint.manifest import MANIFEST_NAME, step_of

READ_CHUNK_BYTES = 8 * 2**20
PARALLEL_READ_BYTES = 64 * 2**20  # smaller reads stay in the calling thread
HAVE_PREADV = hasattr(os, "preadv")  # Linux and the BSDs; elsewhere one thread, os.pread


class StorageError(OSError):
    """A storage operation failed (disk full, permission, network)."""


class SizeMismatch(StorageError):
    """A file is shorter or longer than its manifest says: the checkpoint's fault."""


class Payload(Protocol):
    """A file's bytes, produced in chunks; ``chunks()`` starts over each time it is called."""

    @property
    def size(self) -> int: ...

    def chunks(self) -> Iterator[memoryview]: ...


@dataclass(frozen=True)
class BytesPayload:
    """A payload that is already one ``bytes`` (JSON documents, the manifest)."""

    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def chunks(self) -> Iterator[memoryview]:
        yield memoryview(self.data)


class CheckpointStorage(Protocol):
    def staging_location(self, name: str, *, token: str) -> str:
        """Where the files of checkpoint ``name`` are written before commit."""
        ...

    def write_file(self, location: str, filename: str, payload: Payload) -> None:
        """Write ``payload`` durably (it survives a crash once this returns)."""
        ...

    def commit(self, location: str, name: str, manifest: bytes) -> None:
        """Write the manifest last and make the checkpoint visible as ``name``."""
        ...

    def discard(self, location: str) -> None:
        """Remove an uncommitted staging location (best effort)."""
        ...

    def checkpoint_names(self) -> list[str]:
        """Names of ``step_*`` directories, oldest step first, with or without a manifest."""
        ...

    def read_file(self, name: str, filename: str) -> bytes: ...

    def read_range(self, name: str, filename: str, start: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``start`` (fewer at the end of the file)."""
        ...

    def read_into(
        self,
        name: str,
        filename: str,
        buffers: Sequence[memoryview],
        *,
        offset: int = 0,
        on_data: Callable[[memoryview], None] | None = None,
    ) -> None:
        """Fill ``buffers`` in order with the file's bytes from ``offset`` to its very end.

        ``on_data`` sees every filled byte exactly once, in file order, in pieces: as they
        arrive, or all at the end (e.g. after a retried download).

        Raises:
            StorageError: when the file is shorter or longer than that.
        """
        ...

    def read_chunks(self, name: str, filename: str) -> Iterator[bytes]: ...

    def file_size(self, name: str, filename: str) -> int | None:
        """Size in bytes, or None when the file is missing."""
        ...

    def delete(self, name: str) -> None: ...

    def remove_leftovers(self) -> list[str]:
        """Remove staging debris of saves that crashed; call when no save is in flight."""
        ...

    def free_bytes(self) -> int | None:
        """Free space at the destination, when it can be known."""
        ...

    def describe(self, name: str) -> str:
        """A human-readable location of checkpoint ``name`` (no credentials)."""
        ...


def default_read_threads() -> int:
    """Reads in flight for one large file: one per core this process may use, 2 to 8.

    Also where ranks share the cores (2 ranks on 2 cores): in interleaved 2-rank restores of
    a 312 MB checkpoint, one thread per rank was no faster than two (0.65-0.80 of the disk
    against 0.67-0.82 sharded, 0.65-0.68 against 0.69-0.72 replicated).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2
    return max(2, min(8, cores))


class LocalStorage:
    """Checkpoints as directories under ``root`` on a local or shared POSIX file system.

    Args:
        root: the directory that holds the ``step_*`` directories.
        read_threads: reads in flight for one large file (default: ``default_read_threads``).
        parallel_read_bytes: reads at least this large go to the threads; smaller ones stay
            in the calling thread.
    """

    def __init__(
        self,
        root: Path,
        *,
        read_threads: int | None = None,
        parallel_read_bytes: int = PARALLEL_READ_BYTES,
    ) -> None:
        self.root = root
        self.read_threads = read_threads or default_read_threads()
        self.parallel_read_bytes = parallel_read_bytes

    def staging_location(self, name: str, *, token: str) -> str:
        staging = self.root / f".{name}.partial-{token}"
        try:
            staging.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageError(f"cannot create {staging}: {error}") from error
        return str(staging)

    def write_file(self, location: str, filename: str, payload: Payload) -> None:
        path = Path(location) / filename
        try:
            write_durably(path, payload)
        except OSError as error:
            raise StorageError(f"cannot write {path}: {error}") from error

    def commit(self, location: str, name: str, manifest: bytes) -> None:
        staging, final = Path(location), self.root / name
        self.write_file(location, MANIFEST_NAME, BytesPayload(manifest))
        try:
            _fsync_directory(staging)
            if final.exists():
                # A rejected checkpoint of the same step (e.g. corrupt, then re-trained) is
                # moved aside first so the rename below stays atomic.
                replaced = self.root / f".{name}.replaced-{uuid.uuid4().hex[:8]}"
                os.rename(final, replaced)
                os.rename(staging, final)
                shutil.rmtree(replaced, ignore_errors=True)
            else:
                os.rename(staging, final)
            _fsync_directory(self.root)
        except OSError as error:
            raise StorageError(f"cannot commit {final}: {error}") from error

    def discard(self, location: str) -> None:
        shutil.rmtree(location, ignore_errors=True)

    def checkpoint_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        named = [
            (step, entry.name)
            for entry in self.root.iterdir()
            if (step := step_of(entry.name)) is not None and entry.is_dir()
        ]
        return [name for _, name in sorted(named)]

    def read_file(self, name: str, filename: str) -> bytes:
        return (self.root / name / filename).read_bytes()

    def read_range(self, name: str, filename: str, start: int, length: int) -> bytes:
        with open(self.root / name / filename, "rb", buffering=0) as handle:
            return os.pread(handle.fileno(), length, start)

    def read_into(
        self,
        name: str,
        filename: str,
        buffers: Sequence[memoryview],
        *,
        offset: int = 0,
        on_data: Callable[[memoryview], None] | None = None,
    ) -> None:
        """Large reads go in ``READ_CHUNK_BYTES`` pieces to ``read_threads`` threads.

        Several reads in flight keep a fast disk busy, and on a fresh buffer much of a read's
        cost is faulting in the destination pages, which then happens on several cores.
        ``on_data`` runs in this thread on each piece as soon as it and all before it are
        read, while the next pieces are being read.
        """
        deliver = on_data or _ignore
        path = self.root / name / filename
        expected = offset + sum(len(buffer) for buffer in buffers)
        with open(path, "rb", buffering=0) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size != expected:
                relation = "shorter" if size < expected else "longer"
                raise SizeMismatch(f"{path}: {relation} than its manifest says")
            pieces = list(_pieces(buffers, offset))
            read = functools.partial(_read_piece, handle.fileno(), path)
            small = expected - offset < self.parallel_read_bytes
            if small or self.read_threads == 1 or not HAVE_PREADV:
                for piece in pieces:
                    deliver(read(piece))
                return
            pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="steadytrain-read")
            try:
                for view in pool.map(read, pieces):  # in order, as each completes
                    deliver(view)
            finally:
                pool.shutdown(cancel_futures=True)  # a failed piece stops the rest

    def read_chunks(self, name: str, filename: str) -> Iterator[bytes]:
        with open(self.root / name / filename, "rb") as handle:
            while chunk := handle.read(READ_CHUNK_BYTES):
                yield chunk

    def file_size(self, name: str, filename: str) -> int | None:
        path = self.root / name / filename
        return path.stat().st_size if path.is_file() else None

    def delete(self, name: str) -> None:
        target = self.root / name
        if not target.exists():
            return
        # Rename first so a crash mid-delete never leaves a half-deleted "committed" step.
        doomed = self.root / f".{name}.deleting-{uuid.uuid4().hex[:8]}"
        os.rename(target, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def remove_leftovers(self) -> list[str]:
        if not self.root.is_dir():
            return []
        debris = [
            entry
            for entry in self.root.iterdir()
            if entry.name.startswith(".step_") and entry.is_dir()
        ]
        for entry in debris:
            shutil.rmtree(entry, ignore_errors=True)
        return [entry.name for entry in debris]

    def free_bytes(self) -> int | None:
        probe = self.root
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        return shutil.disk_usage(probe).free

    def describe(self, name: str) -> str:
        return str(self.root / name)


def _pieces(buffers: Sequence[memoryview], offset: int) -> Iterator[tuple[int, memoryview]]:
    """``(file offset, destination)`` pieces of at most ``READ_CHUNK_BYTES``, in file order."""
    position = offset
    for buffer in buffers:
        for start in range(0, len(buffer), READ_CHUNK_BYTES):
            piece = buffer[start : start + READ_CHUNK_BYTES]
            yield position, piece
            position += len(piece)


def _read_piece(descriptor: int, path: Path, piece: tuple[int, memoryview]) -> memoryview:
    position, view = piece
    filled = 0
    while filled < len(view):
        if HAVE_PREADV:
            count = os.preadv(descriptor, [view[filled:]], position + filled)
        else:
            data = os.pread(descriptor, len(view) - filled, position + filled)
            view[filled : filled + len(data)] = data
            count = len(data)
        if count == 0:
            raise SizeMismatch(f"{path}: shorter than its manifest says")
        filled += count
    return view


def _ignore(view: memoryview) -> None:
    return None


def write_durably(path: Path, payload: Payload) -> None:
    """Write ``payload`` to ``path`` chunk by chunk (unbuffered) and fsync it."""
    with open(path, "wb", buffering=0) as handle:
        for chunk in payload.chunks():
            while chunk:
                chunk = chunk[handle.write(chunk) :]
        os.fsync(handle.fileno())


def replace_durably(path: Path, payload: Payload) -> None:
    """Write ``payload`` beside ``path``, fsync it, then rename it over ``path`` (atomic)."""
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    write_durably(staging, payload)
    os.replace(staging, path)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
