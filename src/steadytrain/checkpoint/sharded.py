"""Sharded parts (FSDP): each rank writes its local shards, any layout reads them back.

A replicated part whose state holds DTensors (a model or optimizer under FSDP) is written in
two places. ``shared.json`` keeps its skeleton, its plain tensors and, under ``sharded``,
each DTensor's global shape and dtype. Every rank's ``rank-NNNNN.json`` lists under
``chunks`` where its local shard of each DTensor sits in the global tensor (offset, shape),
and ``rank-NNNNN-PART.safetensors`` holds those shards. All of it goes through the same
manifest, checksums and commit as every other file.

Reading plans with ``torch.distributed.checkpoint`` (DCP): its planner works out which part
of which stored chunk each target needs, whatever the two layouts (another world size,
sharded into replicated and back). The chunk index comes from our JSON and the data from
our safetensors files, read and checked as every checkpoint file is: DCP's own file format
(its metadata is pickled) is never read.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.futures import Future

from steadytrain.checkpoint.tensorfile import DTYPE_CODES, DTYPES


@dataclass(frozen=True)
class ShardedTensor:
    """Where a decoded state has a tensor stored in shards: its global shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def describe(self) -> dict[str, Any]:
        if self.dtype not in DTYPE_CODES:
            raise TypeError(f"tensors of dtype {self.dtype} cannot be saved")
        return {"shape": list(self.shape), "dtype": DTYPE_CODES[self.dtype]}

    @classmethod
    def from_json(cls, described: dict[str, Any]) -> ShardedTensor:
        shape = tuple(int(size) for size in described["shape"])
        return cls(shape=shape, dtype=DTYPES[described["dtype"]])


@dataclass(frozen=True)
class Chunk:
    """One stored shard of a tensor: where it starts in the global tensor, and its shape."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]

    def overlaps(self, offset: tuple[int, ...], shape: tuple[int, ...]) -> bool:
        return all(
            start < other + length and other < start + size
            for start, size, other, length in zip(
                self.offset, self.shape, offset, shape, strict=True
            )
        )

    def inside(self, shape: tuple[int, ...]) -> bool:
        return all(
            start >= 0 and start + size <= total
            for start, size, total in zip(self.offset, self.shape, shape, strict=True)
        )


def local_shard(tensor: DTensor) -> tuple[torch.Tensor, list[int]]:
    """This rank's part of ``tensor`` and its offset in the global tensor."""
    offset, shape = needed_region(tensor)
    local = tensor.to_local()
    assert tuple(local.shape) == shape, "a DTensor's local shard has its planned shape"
    return local.contiguous(), list(offset)


def needed_region(target: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (offset, shape) of the global tensor that ``target`` holds on this rank."""
    if isinstance(target, DTensor):
        shape, offset = compute_local_shape_and_global_offset(
            target.shape, target.device_mesh, target.placements
        )
        return tuple(offset), tuple(shape)
    return (0,) * target.dim(), tuple(target.shape)


def tensor_leaves(state: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every tensor (or ``ShardedTensor``) of a nested state by dotted key, named as
    ``codec.split_tensors`` names them."""
    if isinstance(state, (torch.Tensor, ShardedTensor)):
        yield prefix, state
    elif isinstance(state, dict):
        for key, value in state.items():
            yield from tensor_leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(state, (list, tuple)):
        for index, value in enumerate(state):
            yield from tensor_leaves(value, f"{prefix}.{index}" if prefix else str(index))


def replace_leaves(state: Any, values: dict[str, Any], prefix: str = "") -> Any:
    """``state`` with the leaves named in ``values`` replaced."""
    if prefix in values:
        return values[prefix]
    if isinstance(state, dict):
        return {
            key: replace_leaves(value, values, f"{prefix}.{key}" if prefix else str(key))
            for key, value in state.items()
        }
    if isinstance(state, (list, tuple)):
        items = [
            replace_leaves(value, values, f"{prefix}.{index}" if prefix else str(index))
            for index, value in enumerate(state)
        ]
        return tuple(items) if isinstance(state, tuple) else items
    return state


@dataclass
class RankShards:
    """One rank's chunk index, from its ``rank-NNNNN.json``."""

    chunks: dict[str, dict[str, Chunk]]  # part -> key -> chunk
    tensor_files: dict[str, str]  # part -> safetensors filename

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> RankShards:
        chunks = {
            part: {
                key: Chunk(
                    offset=tuple(int(n) for n in entry["offset"]),
                    shape=tuple(int(n) for n in entry["shape"]),
                )
                for key, entry in entries.items()
            }
            for part, entries in document.get("chunks", {}).items()
        }
        return cls(chunks=chunks, tensor_files=dict(document["tensor_files"]))


def resolve_shards(
    states: dict[str, Any],
    *,
    templates: Callable[[], dict[str, Any]],
    rank_documents: Callable[[], list[bytes]],
    read_tensor_file: Callable[[str], dict[str, torch.Tensor]],
) -> dict[str, Any]:
    """``states`` with every ``ShardedTensor`` replaced by a tensor laid out as in
    ``templates()`` (each part's own state: a DTensor there is filled as a DTensor of the
    same layout, anything else as a full tensor on the host).

    ``rank_documents()``: every saving rank's ``rank-NNNNN.json``. Only the rank files holding
    a chunk this rank needs are read. The parts are not touched: the targets are new
    tensors, so nothing changes before every rank has read its share intact.

    Raises:
        ValueError: the chunk index does not describe the stored tensors (corrupt).
    """
    placeholders = {
        part: {key: leaf for key, leaf in tensor_leaves(state) if isinstance(leaf, ShardedTensor)}
        for part, state in states.items()
    }
    placeholders = {part: found for part, found in placeholders.items() if found}
    if not placeholders:
        return states
    ranks = [RankShards.from_document(json.loads(document)) for document in rank_documents()]
    targets: dict[str, torch.Tensor] = {}
    metadata: dict[str, Any] = {}
    layouts = templates()
    for part, found in placeholders.items():
        like = dict(tensor_leaves(layouts.get(part)))
        for key, stored in found.items():
            name = f"{part}/{key}"
            targets[name] = _target(stored, like.get(key))
            chunks = [
                shards.chunks[part][key] for shards in ranks if key in shards.chunks.get(part, {})
            ]
            metadata[name] = _storage_metadata(name, stored, chunks)
    data = _read_needed(targets, ranks, read_tensor_file)
    try:
        with warnings.catch_warnings():
            # DCP warns that no_dist means "a single process": here, each rank on its own.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(
                targets,
                storage_reader=ChunkReader(Metadata(state_dict_metadata=metadata), data),
                planner=DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
                no_dist=True,  # each rank plans its own reads: no collective, nothing to agree
            )
    except CheckpointException as failed:  # a BaseException: say what failed, as a ValueError
        causes = [
            str(cause[0] if isinstance(cause, tuple) else cause)
            for cause in failed.failures.values()
        ]
        raise ValueError(f"reading the shards failed: {'; '.join(causes)}") from None
    return {
        part: replace_leaves(
            state, {key: targets[f"{part}/{key}"] for key in placeholders.get(part, {})}
        )
        for part, state in states.items()
    }


def _target(stored: ShardedTensor, like: Any) -> torch.Tensor:
    """A new tensor to load ``stored`` into: laid out like ``like`` when that is a DTensor
    of the same global shape, else full (on the host)."""
    if isinstance(like, DTensor) and tuple(like.shape) == stored.shape:
        return torch.empty_like(like, dtype=stored.dtype)
    return torch.empty(stored.shape, dtype=stored.dtype)


def _storage_metadata(
    name: str, stored: ShardedTensor, chunks: list[Chunk]
) -> TensorStorageMetadata:
    """DCP's description of a stored tensor; its chunks must tile it exactly."""
    covered = sum(math.prod(chunk.shape) for chunk in chunks)
    overlapping = any(
        math.prod(a.shape) and math.prod(b.shape) and a.overlaps(b.offset, b.shape)
        for i, a in enumerate(chunks)
        for b in chunks[i + 1 :]
    )
    inside = all(c.inside(stored.shape) for c in chunks)
    if covered != math.prod(stored.shape) or overlapping or not inside:
        raise ValueError(f"the shards of {name} do not tile its shape {list(stored.shape)}")
    return TensorStorageMetadata(
        properties=TensorProperties(dtype=stored.dtype),
        size=torch.Size(stored.shape),
        chunks=[
            ChunkStorageMetadata(offsets=torch.Size(c.offset), sizes=torch.Size(c.shape))
            for c in chunks
        ],
    )


def _read_needed(
    targets: dict[str, torch.Tensor],
    ranks: list[RankShards],
    read_tensor_file: Callable[[str], dict[str, torch.Tensor]],
) -> dict[tuple[str, tuple[int, ...]], torch.Tensor]:
    """The stored chunks that overlap what this rank's targets hold, by (name, offset)."""
    data: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
    for shards in ranks:
        for part, chunks in shards.chunks.items():
            wanted = [
                key
                for key, chunk in chunks.items()
                if f"{part}/{key}" in targets
                and chunk.overlaps(*needed_region(targets[f"{part}/{key}"]))
            ]
            if not wanted:
                continue
            tensors = read_tensor_file(shards.tensor_files[part])
            for key in wanted:
                tensor = tensors.get(key)
                if tensor is None or tuple(tensor.shape) != chunks[key].shape:
                    raise ValueError(f"{shards.tensor_files[part]}: {key} is not as indexed")
                data[(f"{part}/{key}", chunks[key].offset)] = tensor
    return data


class ChunkReader(StorageReader):
    """DCP's reader over chunks already read and checked; the metadata is from our JSON."""

    def __init__(
        self, metadata: Metadata, data: dict[tuple[str, tuple[int, ...]], torch.Tensor]
    ) -> None:
        self.metadata = metadata
        self.data = data

    def reset(self, checkpoint_id: Any = None) -> None:
        """Nothing to reset: one reader serves one load."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self.metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        """The metadata is ours already."""

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        for request in plan.items:
            index: MetadataIndex = request.storage_index
            assert index.offset is not None, "a tensor read names its chunk"
            chunk = self.data[(index.fqn, tuple(index.offset))]
            for dim, (start, length) in enumerate(
                zip(request.storage_offsets, request.lengths, strict=True)
            ):
                chunk = chunk.narrow(dim, start, length)
            target = planner.resolve_tensor(request).detach()
            target.copy_(chunk)
            planner.commit_tensor(request, target)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True
