"""Read one stem of a checkpoint once, checking every byte against the manifest as it comes."""

from __future__ import annotations

from collections.abc import Callable
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
    TensorFileError,
    byte_view,
    empty_tensors,
    parse_header,
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
) -> dict[str, Any]:
    """Read one stem's files once each, check them against the manifest, and decode them.

    A safetensors file's data goes straight from storage into the tensors that are returned,
    and its checksum is computed from them: verifying costs no second read. Parts stored in
    shards (``shared`` of an FSDP checkpoint) are read from the rank files that hold what
    this rank needs, laid out as ``templates()`` (each part's own state) lays them out.

    Raises:
        CorruptCheckpoint: a file is missing, unlisted, of another size or checksum, or
            malformed: the checkpoint's fault.
        OSError: any other storage error (I/O error, out of memory, an object store that
            gave up after its retries): not the checkpoint's fault.
    """
    reader = _CheckedReader(storage, name, manifest)
    try:
        states = decode_parts(reader.document, stem=stem, read_tensor_file=reader.tensor_file)
        return resolve_shards(
            states,
            templates=templates,
            rank_documents=lambda: [
                reader.document(f"{rank_stem(rank)}.json") for rank in range(manifest.world_size)
            ],
            read_tensor_file=reader.tensor_file,
        )
    except (ManifestError, TensorFileError, ValueError, KeyError, TypeError) as error:
        raise CorruptCheckpoint(f"{stem}: {error}") from None


class _CheckedReader:
    """Reads a checkpoint's files, each checked against its manifest entry."""

    def __init__(self, storage: CheckpointStorage, name: str, manifest: Manifest) -> None:
        self.storage = storage
        self.name = name
        self.manifest = manifest

    def _entry(self, filename: str) -> FileEntry:
        entry = self.manifest.files.get(filename)
        if entry is None:
            raise CorruptCheckpoint(f"{filename}: not listed in the manifest")
        return entry

    def document(self, filename: str) -> bytes:
        entry = self._entry(filename)
        try:
            data = self.storage.read_file(self.name, filename)
        except OSError as error:
            if _is_corruption(error):
                raise CorruptCheckpoint(f"{filename}: {error}") from None
            raise
        if len(data) != entry.size or not checksum_matches(entry.checksum, [data]):
            raise CorruptCheckpoint(f"{filename}: checksum mismatch (corrupted)")
        return data

    def tensor_file(self, filename: str) -> dict[str, torch.Tensor]:
        entry = self._entry(filename)
        storage, name = self.storage, self.name
        try:
            head = read_head(storage, name, filename, entry.size)
            entries, data_start = parse_header(head, entry.size)
            tensors = empty_tensors(entries)
            checksum = Checksum.like(entry.checksum)
            checksum.update(head)
            views = [byte_view(tensor) for tensor in tensors.values()]
            storage.read_into(name, filename, views, offset=data_start, on_data=checksum.update)
        except TensorFileError as error:
            raise CorruptCheckpoint(f"{filename}: {error}") from None
        except OSError as error:
            if _is_corruption(error):
                raise CorruptCheckpoint(f"{filename}: {error}") from None
            raise
        if checksum.value() != entry.checksum:
            raise CorruptCheckpoint(f"{filename}: checksum mismatch (corrupted)")
        return tensors


def _is_corruption(error: OSError) -> bool:
    """A missing or wrong-sized file is the checkpoint's fault; other storage errors are not."""
    missing = isinstance(error, FileNotFoundError) or isinstance(error.__cause__, FileNotFoundError)
    return missing or isinstance(error, SizeMismatch)
