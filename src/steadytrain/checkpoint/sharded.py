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
from collections.abc import Callable, Iterable, Iterator
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
    rank_document: Callable[[int], bytes],
    num_ranks: int,
    read_tensor_file: Callable[[str], dict[str, torch.Tensor]],
    data_ready: Callable[[], None] = lambda: None,
    own_rank: int | None = None,
) -> dict[str, Any]:
    """``states`` with every ``ShardedTensor`` replaced by a tensor laid out as in
    ``templates()`` (each part's own state: a DTensor there is filled as a DTensor of the
    same layout, anything else as a full tensor on the host). A template may give one
    tensor for a whole subtree (an optimizer's state of one parameter, before it has any):
    every tensor below it of its global shape is laid out like it.

    ``rank_document(rank)``: saving rank ``rank``'s ``rank-NNNNN.json`` (of ``num_ranks``).
    ``read_tensor_file(filename)``: a tensor file's tensors, whose data may still be arriving
    until ``data_ready()`` returns. ``own_rank``: this rank, when the checkpoint was saved at
    this world size: its own files are asked for first, so that their data arrives while the
    layouts are worked out, and when its chunks are exactly this rank's parts of every tensor
    (the same layout) nothing else is read and each chunk becomes that part as read, without
    a copy. Otherwise every document is read, then the rank files holding a chunk this rank
    needs, and what is not a chunk as stored is planned and copied by DCP. The parts are not
    touched: the results are new tensors, so nothing changes before every rank has read its
    share intact.

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
    own = None
    files: dict[str, dict[str, torch.Tensor]] = {}  # tensor files asked for, by name
    if own_rank is not None and 0 <= own_rank < num_ranks:
        own = RankShards.from_document(json.loads(rank_document(own_rank)))
        for part in placeholders:
            if own.chunks.get(part) and part in own.tensor_files:
                files[own.tensor_files[part]] = read_tensor_file(own.tensor_files[part])
    wanted: dict[str, tuple[ShardedTensor, DTensor | None]] = {}
    layouts = templates()
    for part, found in placeholders.items():
        like = dict(tensor_leaves(layouts.get(part)))
        for key, stored in found.items():
            wanted[f"{part}/{key}"] = (stored, _layout(like, key, stored))
    regions = _regions(wanted)
    ranks = _rank_shards(regions, rank_document, num_ranks=num_ranks, own=(own_rank, own))
    data = _read_needed(regions, ranks, read_tensor_file, files=files)
    if any(layout is not None and layout.device.type != "cpu" for _, layout in wanted.values()):
        data_ready()  # copied to the device below
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
        data_ready()  # DCP copies from the chunks
        metadata = {
            name: _storage_metadata(name, wanted[name][0], _chunks_of(name, ranks))
            for name in resharded
        }
        _load_resharded(resharded, metadata, data)
    resolved.update(resharded)
    return {
        part: replace_leaves(
            state, {key: resolved[f"{part}/{key}"] for key in placeholders.get(part, {})}
        )
        for part, state in states.items()
    }


Region = tuple[tuple[int, ...], tuple[int, ...]]  # (offset, shape) in the global tensor


def _regions(wanted: dict[str, tuple[ShardedTensor, DTensor | None]]) -> dict[str, Region]:
    """The region of each wanted tensor this rank loads; computed once per layout (a
    parameter's stands for all of its optimizer state, and many parameters share one)."""
    by_layout: dict[tuple[Any, ...], Region] = {}
    regions = {}
    for name, (stored, layout) in wanted.items():
        if layout is None:
            regions[name] = (0,) * len(stored.shape), stored.shape
            continue
        key = (tuple(layout.shape), id(layout.device_mesh), tuple(layout.placements))
        if key not in by_layout:
            by_layout[key] = needed_region(layout)
        regions[name] = by_layout[key]
    return regions


def _rank_shards(
    regions: dict[str, Region],
    rank_document: Callable[[int], bytes],
    *,
    num_ranks: int,
    own: tuple[int | None, RankShards | None],
) -> list[RankShards]:
    """The chunk indexes to read from: ``own`` (a rank and its index, read already) alone
    when its chunks are exactly the regions this rank loads, else every saving rank's."""
    own_rank, own_shards = own
    if own_shards is not None and all(
        _holds(own_shards, name, region) for name, region in regions.items()
    ):
        return [own_shards]
    return [
        own_shards
        if rank == own_rank and own_shards is not None
        else RankShards.from_document(json.loads(rank_document(rank)))
        for rank in range(num_ranks)
    ]


def _holds(shards: RankShards, name: str, region: Region) -> bool:
    """Whether ``shards`` hold ``region`` of tensor ``name`` as one chunk (or it is empty)."""
    offset, shape = region
    if math.prod(shape) == 0:
        return True
    part, _, key = name.partition("/")
    chunk = shards.chunks.get(part, {}).get(key)
    return chunk is not None and chunk.offset == offset and chunk.shape == shape


def _chunks_of(name: str, ranks: Iterable[RankShards]) -> list[Chunk]:
    part, _, key = name.partition("/")
    return [shards.chunks[part][key] for shards in ranks if key in shards.chunks.get(part, {})]


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
    regions: dict[str, Region],
    ranks: list[RankShards],
    read_tensor_file: Callable[[str], dict[str, torch.Tensor]],
    *,
    files: dict[str, dict[str, torch.Tensor]],
) -> dict[tuple[str, tuple[int, ...]], torch.Tensor]:
    """The stored chunks that overlap the ``regions`` this rank loads, by (name, offset);
    ``files``: the tensor files asked for already (others are added as they are read)."""
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
            filename = shards.tensor_files[part]
            if filename not in files:
                files[filename] = read_tensor_file(filename)
            tensors = files[filename]
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
