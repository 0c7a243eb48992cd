"""A checkpoint's state files: named states in host memory, laid out as JSON + safetensors.

Each stem (``shared`` for the replicated parts, ``rank-NNNNN`` for one rank's own) is one
``STEM.json`` holding every part's non-tensor state (a skeleton) and one safetensors file per
part that has tensors. A replicated part sharded across ranks (FSDP) keeps its skeleton in
``shared.json`` and each rank's local shards in that rank's stem (``sharded``). Reading never
unpickles.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from steadytrain.checkpoint.codec import host_copy, join_tensors, split_tensors
from steadytrain.checkpoint.contents import CheckpointContents
from steadytrain.checkpoint.manifest import Manifest, ManifestError
from steadytrain.checkpoint.sharded import ShardedTensor, local_shard
from steadytrain.checkpoint.storage import BytesPayload, Payload
from steadytrain.checkpoint.tensorfile import TensorFileError, tensor_file, tensors_from_bytes

# 2: sharded parts (``sharded`` and ``chunks``); model and optimizer keyed by parameter name.
STATE_FORMAT_VERSION = 2
READABLE_STATE_VERSIONS = (1, 2)
TENSOR_SUFFIX = ".safetensors"
SHARED_STEM = "shared"


@dataclass
class PartsSnapshot:
    """Named states whose tensors are in host memory, ready to be written."""

    stem: str
    skeletons: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]]
    # shared stem: each part's tensors stored in shards, by key: global shape and dtype
    sharded: dict[str, dict[str, ShardedTensor]] = field(default_factory=dict)
    # a rank's stem: where its shards (in ``tensors``) sit in the global tensors, by key
    chunks: dict[str, dict[str, list[int]]] = field(default_factory=dict)

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
        document: dict[str, Any] = {
            "version": STATE_FORMAT_VERSION,
            "tensor_files": tensor_files,
            "parts": self.skeletons,
        }
        if self.sharded:
            document["sharded"] = {
                part: {key: stored.describe() for key, stored in found.items()}
                for part, found in self.sharded.items()
            }
        if self.chunks:
            document["chunks"] = {
                part: {
                    key: {"offset": offset, "shape": list(self.tensors[part][key].shape)}
                    for key, offset in offsets.items()
                }
                for part, offsets in self.chunks.items()
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
    ``copy=False``): a template, tensors left where they are. DTensors (sharded parts) are
    only described (``sharded``): ``snapshot_shards`` takes each rank's shards.
    """
    skeletons: dict[str, Any] = {}
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    sharded: dict[str, dict[str, ShardedTensor]] = {}
    for part, state in parts.items():
        spare = (reuse.tensors.get(part) if reuse is not None else None) or {}
        skeletons[part], found = split_tensors(state, copy=False, host=False)
        tensors[part] = {
            key: host_copy(tensor, spare.get(key), copy=copy, host=host)
            for key, tensor in found.items()
            if not isinstance(tensor, DTensor)
        }
        described = {
            key: ShardedTensor(shape=tuple(tensor.shape), dtype=tensor.dtype)
            for key, tensor in found.items()
            if isinstance(tensor, DTensor)
        }
        if described:
            sharded[part] = described
    return PartsSnapshot(stem=stem, skeletons=skeletons, tensors=tensors, sharded=sharded)


def snapshot_shards(
    parts: dict[str, Any],
    *,
    into: PartsSnapshot,
    copy: bool = True,
    reuse: PartsSnapshot | None = None,
    host: bool = True,
) -> None:
    """Add this rank's local shard of every DTensor of ``parts`` to ``into`` (its stem),
    with where each sits in the global tensor; copies as in ``snapshot_parts``."""
    for part, state in parts.items():
        assert part not in into.skeletons, f"{part!r} is both a rank's own part and sharded"
        spare = (reuse.tensors.get(part) if reuse is not None else None) or {}
        _, found = split_tensors(state, copy=False, host=False)
        shards: dict[str, torch.Tensor] = {}
        offsets: dict[str, list[int]] = {}
        for key, tensor in found.items():
            if not isinstance(tensor, DTensor):
                continue
            local, offset = local_shard(tensor)
            if local.numel():  # a rank may hold nothing of a small tensor
                shards[key] = host_copy(local, spare.get(key), copy=copy, host=host)
                offsets[key] = offset
        if shards:
            into.tensors[part] = shards
            into.chunks[part] = offsets


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
    if not isinstance(document, dict) or document.get("version") not in READABLE_STATE_VERSIONS:
        version = document.get("version") if isinstance(document, dict) else None
        raise ManifestError(f"{stem}.json: unsupported state version {version!r}")
    tensors_of = read_tensor_file or (lambda filename: tensors_from_bytes(read(filename)))
    decoded = {}
    for part, skeleton in document["parts"].items():
        filename = document["tensor_files"].get(part)
        tensors: dict[str, Any] = {}
        if filename is not None:
            if not (isinstance(filename, str) and filename.endswith(TENSOR_SUFFIX)):
                raise TensorFileError(f"{stem}.json names {filename!r}, not a safetensors file")
            tensors = dict(tensors_of(filename))
        for key, described in document.get("sharded", {}).get(part, {}).items():
            tensors[key] = ShardedTensor.from_json(described)  # resolved by resolve_shards
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

    Rank 0 takes the replicated parts (one copy is everyone's), every rank its own parts
    and, when the replicated parts are sharded (``contents.sharded``), its local shards.
    ``copy=True`` (async saves) copies every tensor, so training may go on while it is
    written, into the tensors of ``reuse`` (the previous snapshot's parts, written already,
    or ``host_buffers_like`` them) where they match; ``copy=False`` (synchronous saves) writes
    CPU tensors from where they are. ``host=False`` with ``copy=False``: a template of the
    snapshot's layout, nothing copied.
    """
    spares = {part.stem: part for part in reuse or []}
    own_stem = rank_stem(rank)
    snapshots = []
    replicated: dict[str, Any] = {}
    if rank == 0 or contents.sharded:
        replicated = {name: part.state_dict() for name, part in contents.replicated.items()}
    if rank == 0:
        snapshots.append(
            snapshot_parts(
                replicated, stem=SHARED_STEM, copy=copy, reuse=spares.get(SHARED_STEM), host=host
            )
        )
    own = snapshot_parts(
        {name: part.state_dict() for name, part in contents.per_rank.items()},
        stem=own_stem,
        copy=copy,
        reuse=spares.get(own_stem),
        host=host,
    )
    if contents.sharded:
        snapshot_shards(replicated, into=own, copy=copy, reuse=spares.get(own_stem), host=host)
    snapshots.append(own)
    return CheckpointSnapshot(step=manifest.step, rank=rank, parts=snapshots, manifest=manifest)
