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

from steadytrain.checkpoint.tensorfile import DTYPE_CODES, DTYPES, Entry


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


def tiles(shape: tuple[int, ...], chunks: list[Chunk]) -> bool:
    """Whether ``chunks`` cover a tensor of ``shape`` exactly: each inside it, none
    overlapping another, together as many elements as it has."""
    if not all(len(c.offset) == len(c.shape) == len(shape) and c.inside(shape) for c in chunks):
        return False
    if sum(math.prod(chunk.shape) for chunk in chunks) != math.prod(shape):
        return False
    return not any(
        math.prod(a.shape) and math.prod(b.shape) and a.overlaps(b.offset, b.shape)
        for i, a in enumerate(chunks)
        for b in chunks[i + 1 :]
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


def index_problems(
    shared: dict[str, Any],
    rank_documents: dict[str, dict[str, Any]],
    header: Callable[[str], dict[str, Entry] | None],
) -> list[str]:
    """What is wrong with a sharded checkpoint's chunk index; empty when nothing is.

    Every tensor that ``shared`` (``shared.json``) stores in shards must be tiled exactly by
    the chunks the ranks' documents (``rank-NNNNN.json`` by filename) index, and every chunk
    must name such a tensor and sit in a tensor file whose header (``header(filename)``;
    None: the manifest does not list it) holds it with the chunk's shape and the tensor's
    dtype. A resume finds the same faults only when it reads the chunks.
    """
    try:
        stored = {
            (part, key): ShardedTensor.from_json(described)
            for part, found in shared.get("sharded", {}).items()
            for key, described in found.items()
        }
        ranks = {name: RankShards.from_document(doc) for name, doc in rank_documents.items()}
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        return [f"chunk index unreadable ({type(error).__name__}: {error})"]
    problems = []
    chunks: dict[tuple[str, str], list[Chunk]] = {name: [] for name in stored}
    for document, shards in sorted(ranks.items()):
        for part, entries in shards.chunks.items():
            filename = shards.tensor_files.get(part)
            entries_in_file = header(filename) if filename is not None else None
            if entries_in_file is None:
                problems.append(f"{document}: {part} shards in {filename!r}, not in the manifest")
                continue
            for key, chunk in entries.items():
                where = f"{document}: {part} {key}"
                if (part, key) not in stored:
                    problems.append(f"{where}: not a sharded tensor of shared.json")
                    continue
                chunks[(part, key)].append(chunk)
                entry = entries_in_file.get(key)
                dtype = stored[(part, key)].dtype
                if entry is None:
                    problems.append(f"{where}: not in {filename}")
                elif entry[0] != dtype or tuple(entry[1]) != chunk.shape:
                    problems.append(
                        f"{where}: {filename} holds {DTYPE_CODES.get(entry[0])} {entry[1]}, "
                        f"the index {DTYPE_CODES.get(dtype)} {list(chunk.shape)}"
                    )
    for (part, key), found in sorted(chunks.items()):
        shape = stored[(part, key)].shape
        if not tiles(shape, found):
            places = ", ".join(f"{list(c.offset)}+{list(c.shape)}" for c in found) or "none"
            problems.append(
                f"{part} {key}: the chunks ({places}) do not tile its shape {list(shape)}"
            )
    return problems


def resolve_shards(
    states: dict[str, Any],
    *,
    templates: Callable[[], dict[str, Any]],
    rank_documents: Callable[[], list[bytes]],
    read_tensor_file: Callable[[str], dict[str, torch.Tensor]],
) -> dict[str, Any]:
    """``states`` with every ``ShardedTensor`` replaced by a tensor laid out as in
    ``templates()`` (each part's own state: a DTensor there is filled as a DTensor of the
    same layout, anything else as a full tensor on the host). A template may give one
    tensor for a whole subtree (an optimizer's state of one parameter, before it has any):
    every tensor below it of its global shape is laid out like it.

    ``rank_documents()``: every saving rank's ``rank-NNNNN.json``. Only the rank files holding
    a chunk this rank needs are read. A stored chunk that is exactly this rank's part of a
    tensor (a resume at the same world size) becomes that part as read, without a copy;
    only the rest is planned and copied by DCP. The parts are not touched: the results are
    new tensors, so nothing changes before every rank has read its share intact.

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
    wanted: dict[str, tuple[ShardedTensor, DTensor | None]] = {}
    metadata: dict[str, Any] = {}
    layouts = templates()
    for part, found in placeholders.items():
        like = dict(tensor_leaves(layouts.get(part)))
        for key, stored in found.items():
            name = f"{part}/{key}"
            wanted[name] = (stored, _layout(like, key, stored))
            chunks = [
                shards.chunks[part][key] for shards in ranks if key in shards.chunks.get(part, {})
            ]
            metadata[name] = _storage_metadata(name, stored, chunks)
    regions = {name: _region(stored, layout) for name, (stored, layout) in wanted.items()}
    data = _read_needed(regions, ranks, read_tensor_file)
    resolved: dict[str, torch.Tensor] = {}
    resharded: dict[str, torch.Tensor] = {}
    for name, (stored, layout) in wanted.items():
        offset, shape = regions[name]
        as_stored = data.get((name, offset))
        if as_stored is not None and tuple(as_stored.shape) == shape:
            resolved[name] = _laid_out(as_stored, layout)
        elif math.prod(shape) == 0:
            resolved[name] = _target(stored, layout)  # nothing of it on this rank
        else:
            resharded[name] = _target(stored, layout)
    if resharded:
        _load_resharded(resharded, metadata, data)
    resolved.update(resharded)
    return {
        part: replace_leaves(
            state, {key: resolved[f"{part}/{key}"] for key in placeholders.get(part, {})}
        )
        for part, state in states.items()
    }


def _load_resharded(
    targets: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    data: dict[tuple[str, tuple[int, ...]], torch.Tensor],
) -> None:
    """Fill ``targets`` from the stored chunks in ``data``, as DCP plans the copies."""
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


def _layout(like: dict[str, Any], key: str, stored: ShardedTensor) -> DTensor | None:
    """The DTensor of a template that ``key`` is laid out as: its own leaf, else the nearest
    enclosing key's; None when there is none of ``stored``'s global shape (full on the host)."""
    probe = key
    while probe not in like:
        probe, dot, _ = probe.rpartition(".")
        if not dot:
            return None
    found = like[probe]
    if isinstance(found, DTensor) and tuple(found.shape) == stored.shape:
        return found
    return None


def _region(
    stored: ShardedTensor, layout: DTensor | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (offset, shape) of the global tensor this rank loads."""
    if layout is None:
        return (0,) * len(stored.shape), stored.shape
    return needed_region(layout)


def _target(stored: ShardedTensor, layout: DTensor | None) -> torch.Tensor:
    """A new tensor to load ``stored`` into: laid out as ``layout``, else full (on the host)."""
    if layout is not None:
        return torch.empty_like(layout, dtype=stored.dtype)
    return torch.empty(stored.shape, dtype=stored.dtype)


def _laid_out(local: torch.Tensor, layout: DTensor | None) -> torch.Tensor:
    """``local`` (this rank's part, as read) as a tensor laid out as ``layout``; no copy on
    the host."""
    if layout is None:
        return local
    return DTensor.from_local(
        local.to(layout.device),
        layout.device_mesh,
        layout.placements,
        run_check=False,
        shape=layout.shape,
        stride=layout.stride(),
    )


def _storage_metadata(
    name: str, stored: ShardedTensor, chunks: list[Chunk]
) -> TensorStorageMetadata:
    """DCP's description of a stored tensor; its chunks must tile it exactly."""
    if not tiles(stored.shape, chunks):
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
    regions: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
    ranks: list[RankShards],
    read_tensor_file: Callable[[str], dict[str, torch.Tensor]],
) -> dict[tuple[str, tuple[int, ...]], torch.Tensor]:
    """The stored chunks that overlap the ``regions`` this rank loads, by (name, offset)."""
    data: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
    for shards in ranks:
        for part, chunks in shards.chunks.items():
            wanted = [
                key
                for key, chunk in chunks.items()
                if f"{part}/{key}" in regions and chunk.overlaps(*regions[f"{part}/{key}"])
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
