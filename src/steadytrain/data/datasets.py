"""Datasets: fixed-length windows over token shards, or the user's own dataset factory."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from steadytrain.config import Config, DataConfig, DataError, resolve_callable
from steadytrain.data.shards import (
    SHARD_FORMAT_VERSION,
    ShardFile,
    ShardIndex,
    is_prepared,
    open_shard,
    prepare_shards,
    read_index,
)


class TokenWindowDataset(Dataset[torch.Tensor]):
    """Sample ``i`` is ``seq_len + 1`` consecutive tokens (inputs plus shifted targets).

    Windows start every ``seq_len`` tokens and never cross a shard boundary. Shards are
    memory-mapped lazily in each process, so loader workers share the page cache instead of
    copying the corpus.
    """

    def __init__(self, index: ShardIndex, *, split: str, seq_len: int) -> None:
        self._shards: list[ShardFile] = index.splits[split]
        self._dtype = index.dtype
        self.seq_len = seq_len
        windows = [max(0, (shard.num_tokens - 1) // seq_len) for shard in self._shards]
        self._first_sample = np.concatenate([[0], np.cumsum(windows)]).astype(np.int64)
        self._maps: dict[int, np.memmap[Any, Any]] = {}

    def __len__(self) -> int:
        return int(self._first_sample[-1])

    def __getitem__(self, sample_id: int) -> torch.Tensor:
        if not 0 <= sample_id < len(self):
            raise IndexError(f"sample {sample_id} outside [0, {len(self)})")
        shard_number = int(np.searchsorted(self._first_sample, sample_id, side="right") - 1)
        start = (sample_id - int(self._first_sample[shard_number])) * self.seq_len
        tokens = self._map(shard_number)[start : start + self.seq_len + 1]
        return torch.from_numpy(tokens.astype(np.int64))

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps are reopened by each worker rather than pickled as copies.
        return {**self.__dict__, "_maps": {}}

    def _map(self, shard_number: int) -> np.memmap[Any, Any]:
        if shard_number not in self._maps:
            self._maps[shard_number] = open_shard(self._shards[shard_number], self._dtype)
        return self._maps[shard_number]


@dataclass(frozen=True)
class Datasets:
    train: Dataset[Any]
    val: Dataset[Any] | None
    description: str
    tokens_per_sample: int


def prepared_corpus_dir(data: DataConfig) -> Path:
    """Where the corpus lives prepared: the corpus itself, or a cache entry named by its spec."""
    corpus_path = Path(data.corpus).expanduser()
    if is_prepared(corpus_path):
        return corpus_path
    spec = {
        "format_version": SHARD_FORMAT_VERSION,
        "corpus": data.corpus if data.corpus == "stdlib" else str(corpus_path.resolve()),
        "val_fraction": data.val_fraction,
        "max_corpus_bytes": data.max_corpus_bytes,
        "python": _stdlib_tag() if data.corpus == "stdlib" else None,
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    name = "stdlib" if data.corpus == "stdlib" else corpus_path.name or "corpus"
    return Path(data.cache_dir).expanduser() / f"{name}-{digest}"


def ensure_corpus(data: DataConfig) -> ShardIndex:
    """Open the prepared corpus, preparing it first when ``data.corpus`` is raw text."""
    directory = prepared_corpus_dir(data)
    if is_prepared(directory):
        return read_index(directory)
    return prepare_shards(
        data.corpus, directory, val_fraction=data.val_fraction, max_bytes=data.max_corpus_bytes
    )


def build_datasets(config: Config) -> Datasets:
    """The training and validation datasets the config asks for.

    Raises:
        DataError / FactoryError: when the corpus or the dataset factory cannot be used.
    """
    data = config.data
    if data.dataset_factory is not None:
        factory = resolve_callable(data.dataset_factory, field="data.dataset_factory")
        train = _call_dataset_factory(factory, split="train", kwargs=data.dataset_kwargs)
        val = _call_dataset_factory(factory, split="val", kwargs=data.dataset_kwargs)
        return Datasets(
            train=train,
            val=val,
            description=f"{data.dataset_factory} ({len(train)} train samples)",
            tokens_per_sample=data.seq_len,
        )
    index = ensure_corpus(data)
    train = TokenWindowDataset(index, split="train", seq_len=data.seq_len)
    val = TokenWindowDataset(index, split="val", seq_len=data.seq_len)
    return Datasets(
        train=train,
        val=val if len(val) > 0 else None,
        description=(
            f"{data.corpus}: {index.num_tokens('train'):,} train tokens, "
            f"{len(train):,} samples of {data.seq_len}+1 ({index.directory})"
        ),
        tokens_per_sample=data.seq_len,
    )


def _call_dataset_factory(factory: Any, *, split: str, kwargs: dict[str, Any]) -> Any:
    try:
        dataset = factory(split=split, **kwargs)
    except TypeError as error:
        raise DataError(
            f"data.dataset_factory: calling it with split={split!r} and data.dataset_kwargs "
            f"failed ({error}); accept split= and those keyword arguments"
        ) from None
    if dataset is None and split == "val":
        return None
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise DataError(
            f"data.dataset_factory: returned {type(dataset).__name__}, not a map-style dataset; "
            "return an object with __len__ and __getitem__"
        )
    return dataset


def _stdlib_tag() -> str:
    import sys

    return f"{sys.implementation.name}-{sys.version_info.major}.{sys.version_info.minor}"
