"""Read one stem of a checkpoint once, checking every byte against the manifest as it comes."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from steadytrain.checkpoint.discovery import read_head
from steadytrain.checkpoint.manifest import (
    Checksum,
    FileEntry,
    Manifest,
    ManifestError,
    checksum_matches,
)
from steadytrain.checkpoint.sharded import resolve_shards
from steadytrain.checkpoint.snapshot import decode_parts, rank_stem
from steadytrain.checkpoint.storage import CheckpointStorage, SizeMismatch
from steadytrain.checkpoint.tensorfile import (
    MAPPED_TENSOR_BYTES,
    TensorFileError,
    byte_view,
    empty_tensors,
    parse_header,
    prefault,
)


class CorruptCheckpoint(Exception):
    """A file of a checkpoint did not read back as written (one line: which and why)."""


def read_parts(
    storage: CheckpointStorage,
    name: str,
    manifest: Manifest,
    *,
    stem: str,
    templates: Callable[[], dict[str, Any]] = dict,
    rank: int | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Read one stem's files once each, check them against the manifest, and decode them.

    A safetensors file's data goes straight from storage into the tensors that are returned,
    and its checksum is computed from them: verifying costs no second read. Parts stored in
    shards (``shared`` of an FSDP checkpoint) are read from the rank files that hold what
    this rank needs, laid out as ``templates()`` (each part's own state) lays them out;
    ``rank`` (this process's) lets a resume at the same layout read only its own shards.
    The data of tensor files is read in one background thread while the states are built
    from their headers; this returns only once every byte has arrived and checked out.
    ``timings`` (when given) gains ``read_files`` (seconds reading and checking files) and
    ``read_wait`` (seconds this thread waited for the data at the end).

    Raises:
        CorruptCheckpoint: a file is missing, unlisted, of another size or checksum, or
            malformed: the checkpoint's fault.
        OSError: any other storage error (I/O error, out of memory, an object store that
            gave up after its retries): not the checkpoint's fault.
    """
    reader = _CheckedReader(storage, name, manifest, timings=timings)
    try:
        states = decode_parts(reader.document, stem=stem, read_tensor_file=reader.tensor_file)
        states = resolve_shards(
            states,
            templates=templates,
            rank_document=lambda rank: reader.document(f"{rank_stem(rank)}.json"),
            num_ranks=manifest.world_size,
            read_tensor_file=reader.tensor_file,
            data_ready=reader.wait,
            own_rank=rank,
        )
        reader.wait()
        return states
    except (ManifestError, TensorFileError, ValueError, KeyError, TypeError) as error:
        raise CorruptCheckpoint(f"{stem}: {error}") from None
    finally:
        reader.close()


class _CheckedReader:
    """Reads a checkpoint's files, each checked against its manifest entry; tensor files'
    data in one background thread (``wait`` for it)."""

    def __init__(
        self,
        storage: CheckpointStorage,
        name: str,
        manifest: Manifest,
        *,
        timings: dict[str, float] | None = None,
    ) -> None:
        self.storage = storage
        self.name = name
        self.manifest = manifest
        self.timings = {} if timings is None else timings
        self._filling: ThreadPoolExecutor | None = None
        self._pending: list[Future[float]] = []

    def _timed(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds

    def _entry(self, filename: str) -> FileEntry:
        entry = self.manifest.files.get(filename)
        if entry is None:
            raise CorruptCheckpoint(f"{filename}: not listed in the manifest")
        return entry

    def document(self, filename: str) -> bytes:
        started = time.perf_counter()
        entry = self._entry(filename)
        with _checkpoint_faults(filename):
            data = self.storage.read_file(self.name, filename)
        if len(data) != entry.size or not checksum_matches(entry.checksum, [data]):
            raise CorruptCheckpoint(f"{filename}: checksum mismatch (corrupted)")
        self._timed("read_files", time.perf_counter() - started)
        return data

    def tensor_file(self, filename: str) -> dict[str, torch.Tensor]:
        """The file's tensors, allocated from its header now and filled in the background:
        their data is there once ``wait()`` returns."""
        started = time.perf_counter()
        entry = self._entry(filename)
        with _checkpoint_faults(filename):
            head = read_head(self.storage, self.name, filename, entry.size)
            entries, data_start = parse_header(head, entry.size)
        tensors = empty_tensors(entries)
        if self._filling is None:
            self._filling = ThreadPoolExecutor(1, thread_name_prefix="steadytrain-load")
        fill = functools.partial(self._fill, filename, entry, head, data_start, tensors)
        self._pending.append(self._filling.submit(fill))
        self._timed("read_files", time.perf_counter() - started)
        return tensors

    def _fill(
        self,
        filename: str,
        entry: FileEntry,
        head: bytes,
        data_start: int,
        tensors: dict[str, torch.Tensor],
    ) -> float:
        """Read the data into ``tensors`` and check the file's checksum; the seconds it took."""
        started = time.perf_counter()
        checksum = Checksum.like(entry.checksum)
        checksum.update(head)
        views = [byte_view(tensor) for tensor in tensors.values()]
        # New memory's page faults, taken beside the read instead of inside it.
        large = [tensor for tensor in tensors.values() if tensor.nbytes >= MAPPED_TENSOR_BYTES]
        faulting = threading.Thread(target=prefault, args=(large,))
        if large:
            faulting.start()
        try:
            with _checkpoint_faults(filename):
                self.storage.read_into(
                    self.name, filename, views, offset=data_start, on_data=checksum.update
                )
        finally:
            if large:
                faulting.join()
        if checksum.value() != entry.checksum:
            raise CorruptCheckpoint(f"{filename}: checksum mismatch (corrupted)")
        return time.perf_counter() - started

    def wait(self) -> None:
        """Wait for every tensor file asked for so far; raise the first one's failure."""
        started = time.perf_counter()
        pending, self._pending = self._pending, []
        try:
            for future in pending:
                self._timed("read_files", future.result())
        finally:
            for future in pending:
                future.cancel()
        self._timed("read_wait", time.perf_counter() - started)

    def close(self) -> None:
        """Stop the background reads (after a failure elsewhere: their results are dropped)."""
        if self._filling is not None:
            self._filling.shutdown(wait=True, cancel_futures=True)
            self._filling = None


@contextlib.contextmanager
def _checkpoint_faults(filename: str) -> Iterator[None]:
    """Malformed data, a missing or wrong-sized file: the checkpoint's fault (corrupt); any
    other storage error is raised as it is."""
    try:
        yield
    except TensorFileError as error:
        raise CorruptCheckpoint(f"{filename}: {error}") from None
    except OSError as error:
        if _is_corruption(error):
            raise CorruptCheckpoint(f"{filename}: {error}") from None
        raise


def _is_corruption(error: OSError) -> bool:
    """A missing or wrong-sized file is the checkpoint's fault; other storage errors are not."""
    missing = isinstance(error, FileNotFoundError) or isinstance(error.__cause__, FileNotFoundError)
    return missing or isinstance(error, SizeMismatch)
