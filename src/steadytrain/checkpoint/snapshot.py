"""A checkpoint's state files: named states in host memory, laid out as JSON + safetensors.

Each stem (``shared`` for the replicated parts, ``rank-NNNNN`` for one rank's own) is one
``STEM.json`` holding every part's non-tensor state (a skeleton) and one safetensors file per
part that has tensors. Reading never unpickles.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from steadytrain.checkpoint.codec import join_tensors, split_tensors
from steadytrain.checkpoint.contents import CheckpointContents
from steadytrain.checkpoint.manifest import Manifest, ManifestError
from steadytrain.checkpoint.storage import BytesPayload, Payload
from steadytrain.checkpoint.tensorfile import TensorFileError, tensor_file, tensors_from_bytes

STATE_FORMAT_VERSION = 1
TENSOR_SUFFIX = ".safetensors"
SHARED_STEM = "shared"


@dataclass
class PartsSnapshot:
    """Named states whose tensors are in host memory, ready to be written."""

    stem: str
    skeletons: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]]

    def to_files(self) -> dict[str, Payload]:
        """``STEM.json`` (skeletons) + one safetensors file per part that has tensors.

        The safetensors payloads stream the snapshot's tensors; nothing is serialized ahead.
        """
        files: dict[str, Payload] = {}
        tensor_files: dict[str, str] = {}
        for part, tensors in self.tensors.items():
            if tensors:
                shared = self.stem == SHARED_STEM
                filename = (
                    f"{part}{TENSOR_SUFFIX}" if shared else f"{self.stem}-{part}{TENSOR_SUFFIX}"
                )
                files[filename] = tensor_file(tensors)
                tensor_files[part] = filename
        document = {
            "version": STATE_FORMAT_VERSION,
            "tensor_files": tensor_files,
            "parts": self.skeletons,
        }
        files[f"{self.stem}.json"] = BytesPayload(json.dumps(document).encode())
        return files


def snapshot_parts(
    parts: dict[str, Any],
    *,
    stem: str,
    copy: bool = True,
    reuse: PartsSnapshot | None = None,
    host: bool = True,
) -> PartsSnapshot:
    """Every tensor of ``parts`` in host memory; the rest becomes a JSON skeleton.

    ``copy=False`` keeps CPU tensors as they are (no copy): only for a save that finishes
    before training changes them again. ``reuse``: an earlier snapshot whose write is done;
    its tensors receive the copies where key, dtype and shape match. ``host=False`` (with
    ``copy=False``): a template, tensors left where they are.
    """
    skeletons: dict[str, Any] = {}
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for part, state in parts.items():
        spare = reuse.tensors.get(part) if reuse is not None else None
        skeletons[part], tensors[part] = split_tensors(state, copy=copy, reuse=spare, host=host)
    return PartsSnapshot(stem=stem, skeletons=skeletons, tensors=tensors)


def host_buffers_like(template: PartsSnapshot) -> PartsSnapshot:
    """Host memory for a snapshot shaped like ``template``, allocated and touched now.

    Passed as ``reuse`` to the next ``snapshot_parts``, it takes the copies without a page
    fault: a first async save need not allocate while training waits.
    """
    tensors = {
        part: {key: torch.zeros(t.shape, dtype=t.dtype) for key, t in part_tensors.items()}
        for part, part_tensors in template.tensors.items()
    }
    return PartsSnapshot(stem=template.stem, skeletons={}, tensors=tensors)


def encode_parts(parts: dict[str, Any], *, stem: str) -> dict[str, bytes]:
    """The files of ``snapshot_parts(...).to_files()`` as bytes (for tests and tools)."""
    return {
        filename: b"".join(payload.chunks())
        for filename, payload in snapshot_parts(parts, stem=stem).to_files().items()
    }


def decode_parts(
    read: Callable[[str], bytes],
    *,
    stem: str,
    read_tensor_file: Callable[[str], dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Inverse of ``encode_parts``: JSON and safetensors only, never pickle.

    ``read(filename)`` returns a file's bytes; ``read_tensor_file(filename)`` (default: parse
    what ``read`` returns) a safetensors file's tensors.

    Raises:
        ManifestError: the state document is not one this version reads.
        TensorFileError: a tensor file is malformed, or the document names another file type.
    """
    document = json.loads(read(f"{stem}.json"))
    if not isinstance(document, dict) or document.get("version") != STATE_FORMAT_VERSION:
        version = document.get("version") if isinstance(document, dict) else None
        raise ManifestError(f"{stem}.json: unsupported state version {version!r}")
    tensors_of = read_tensor_file or (lambda filename: tensors_from_bytes(read(filename)))
    decoded = {}
    for part, skeleton in document["parts"].items():
        filename = document["tensor_files"].get(part)
        tensors = {}
        if filename is not None:
            if not (isinstance(filename, str) and filename.endswith(TENSOR_SUFFIX)):
                raise TensorFileError(f"{stem}.json names {filename!r}, not a safetensors file")
            tensors = tensors_of(filename)
        decoded[part] = join_tensors(skeleton, tensors)
    return decoded


def rank_stem(rank: int) -> str:
    return f"rank-{rank:05d}"


@dataclass
class CheckpointSnapshot:
    """One rank's share of a checkpoint, in host memory at a step boundary."""

    step: int
    rank: int
    parts: list[PartsSnapshot]
    manifest: Manifest


def take_snapshot(
    contents: CheckpointContents,
    *,
    rank: int,
    manifest: Manifest,
    copy: bool,
    reuse: list[PartsSnapshot] | None = None,
    host: bool = True,
) -> CheckpointSnapshot:
    """Everything that must survive a restart, in host memory (the blocking part of a save).

    Rank 0 takes the replicated parts (one copy is everyone's), every rank its own parts.
    ``copy=True`` (async saves) copies every tensor, so training may go on while it is
    written, into the tensors of ``reuse`` (the previous snapshot's parts, written already,
    or ``host_buffers_like`` them) where they match; ``copy=False`` (synchronous saves) writes
    CPU tensors from where they are. ``host=False`` with ``copy=False``: a template of the
    snapshot's layout, nothing copied.
    """
    spares = {part.stem: part for part in reuse or []}
    stems = {rank_stem(rank): contents.per_rank}
    if rank == 0:
        stems = {SHARED_STEM: contents.replicated, **stems}
    snapshots = [
        snapshot_parts(
            {name: part.state_dict() for name, part in named.items()},
            stem=stem,
            copy=copy,
            reuse=spares.get(stem),
            host=host,
        )
        for stem, named in stems.items()
    ]
    return CheckpointSnapshot(step=manifest.step, rank=rank, parts=snapshots, manifest=manifest)
