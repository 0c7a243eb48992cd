"""Read one stem of a checkpoint once, checking every byte against the manifest as it comes."""

from __future__ import annotations

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
from steadytrain.checkpoint.snapshot import decode_parts
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
    storage: CheckpointStorage, name: str, manifest: Manifest, *, stem: str
) -> dict[str, Any]:
    """Read one stem's files once each, check them against the manifest, and decode them.

    A safetensors file's data goes straight from storage into the tensors that are returned,
    and its checksum is computed from them: verifying costs no second read.

    Raises:
        CorruptCheckpoint: a file is missing, unlisted, of another size or checksum, or
            malformed: the checkpoint's fault.
        OSError: any other storage error (I/O error, out of memory, an object store that
            gave up after its retries): not the checkpoint's fault.
    """

    def entry_of(filename: str) -> FileEntry:
        entry = manifest.files.get(filename)
        if entry is None:
            raise CorruptCheckpoint(f"{filename}: not listed in the manifest")
        return entry

    def read_document(filename: str) -> bytes:
        entry = entry_of(filename)
        try:
            data = storage.read_file(name, filename)
        except OSError as error:
            if _is_corruption(error):
                raise CorruptCheckpoint(f"{filename}: {error}") from None
            raise
        if len(data) != entry.size or not checksum_matches(entry.checksum, [data]):
            raise CorruptCheckpoint(f"{filename}: checksum mismatch (corrupted)")
        return data

    def read_tensor_file(filename: str) -> dict[str, torch.Tensor]:
        entry = entry_of(filename)
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

    try:
        return decode_parts(read_document, stem=stem, read_tensor_file=read_tensor_file)
    except (ManifestError, TensorFileError, ValueError, KeyError, TypeError) as error:
        raise CorruptCheckpoint(f"{stem}: {error}") from None


def _is_corruption(error: OSError) -> bool:
    """A missing or wrong-sized file is the checkpoint's fault; other storage errors are not."""
    missing = isinstance(error, FileNotFoundError) or isinstance(error.__cause__, FileNotFoundError)
    return missing or isinstance(error, SizeMismatch)
