"""Datasets: fixed-length windows over token shards, or the user's own dataset factory."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from steadytrain.config import BatchLayout, Config, DataConfig, DataError, resolve_callable
from steadytrain.data.cache import ShardCache
from steadytrain.data.loader import NullLookahead, StepLookahead
from steadytrain.data.remote import ShardStore, is_remote, open_remote_index
from steadytrain.data.sampler import GlobalPositionSampler, MixtureOrder, SampleOrder
from steadytrain.data.shards import (
    SHARD_FORMAT_VERSION,
    ShardFile,
    ShardIndex,
    ShardMaps,
    is_prepared,
    map_shard_file,
    prepare_shards,
    read_index,
)
from steadytrain.data.streaming import CachedShards, DataMetricsSink, MetricWriter, ShardPrefetcher


class ShardReader(Protocol):
    """The tokens of shard ``shard_number``, memory-mapped (read them before the next call)."""

    def tokens(self, shard_number: int) -> np.ndarray: ...


class MappedShards:
    """Shard reader of a local corpus: shards memory-mapped lazily, once per process."""

    def __init__(self, shards: list[ShardFile], dtype: np.dtype[Any]) -> None:
        self._shards = shards
        self._dtype = dtype
        self._maps = ShardMaps()

    def tokens(self, shard_number: int) -> np.ndarray:
        tokens = self._maps.get(shard_number)
        if tokens is None:
            shard = self._shards[shard_number]
            tokens, inode = map_shard_file(shard.path, self._dtype, shard.num_tokens)
            self._maps.put(shard_number, tokens, inode)
        return tokens

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps are reopened by each worker rather than pickled as copies.
        return {**self.__dict__, "_maps": ShardMaps()}


class TokenWindowDataset(Dataset[torch.Tensor]):
    """Sample ``i`` is ``seq_len + 1`` consecutive tokens (inputs plus shifted targets).

    Windows start every ``seq_len`` tokens and never cross a shard boundary, so samples are
    numbered shard by shard. Local shards are memory-mapped lazily in each process, so loader
    workers share the page cache instead of copying the corpus; streamed ones are read from
    the shard cache (``reader``).
    """

    def __init__(
        self,
        index: ShardIndex,
        *,
        split: str,
        seq_len: int,
        reader: ShardReader | None = None,
    ) -> None:
        self.shards: list[ShardFile] = index.splits[split]
        self.seq_len = seq_len
        windows = [max(0, (shard.num_tokens - 1) // seq_len) for shard in self.shards]
        self.shard_num_samples = tuple(windows)
        self.first_sample = np.concatenate([[0], np.cumsum(windows)]).astype(np.int64)
        self._reader = reader or MappedShards(self.shards, index.dtype)

    def __len__(self) -> int:
        return int(self.first_sample[-1])

    def __getitem__(self, sample_id: int) -> torch.Tensor:
        return self.read_samples([sample_id])[0]

    def read_samples(self, sample_ids: Sequence[int]) -> torch.Tensor:
        """The samples ``sample_ids`` as one int64 tensor, a row each (what ``default_collate``
        makes of them one by one, without a tensor per sample)."""
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        outside = ids[(ids < 0) | (ids >= len(self))]
        if outside.size:
            raise IndexError(f"sample {int(outside[0])} outside [0, {len(self)})")
        shard_numbers = np.searchsorted(self.first_sample, ids, side="right") - 1
        starts = (ids - self.first_sample[shard_numbers]) * self.seq_len
        batch = torch.empty((len(ids), self.seq_len + 1), dtype=torch.int64)
        rows = batch.numpy()
        shard_tokens: dict[int, np.ndarray] = {}
        for row, (number, start) in enumerate(
            zip(shard_numbers.tolist(), starts.tolist(), strict=True)
        ):
            tokens = shard_tokens.get(number)
            if tokens is None:
                tokens = shard_tokens[number] = self._reader.tokens(number)
            rows[row] = tokens[start : start + self.seq_len + 1]  # widened to int64 in place
        return batch


class MixtureDataset(Dataset[torch.Tensor]):
    """The samples of several sources, numbered source after source (``data.sources``)."""

    def __init__(self, parts: list[TokenWindowDataset]) -> None:
        self.parts = parts
        self.first_sample = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(
            np.int64
        )

    def __len__(self) -> int:
        return int(self.first_sample[-1])

    def __getitem__(self, sample_id: int) -> torch.Tensor:
        return self.read_samples([sample_id])[0]

    def read_samples(self, sample_ids: Sequence[int]) -> torch.Tensor:
        """The samples ``sample_ids`` as one tensor, a row each, read source by source."""
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        outside = ids[(ids < 0) | (ids >= len(self))]
        if outside.size:
            raise IndexError(f"sample {int(outside[0])} outside [0, {len(self)})")
        sources = np.searchsorted(self.first_sample, ids, side="right") - 1
        batch = torch.empty((len(ids), self.parts[0].seq_len + 1), dtype=torch.int64)
        for source in np.unique(sources).tolist():
            rows = np.flatnonzero(sources == source)
            part_ids = ids[rows] - self.first_sample[source]
            batch[torch.from_numpy(rows)] = self.parts[source].read_samples(part_ids.tolist())
        return batch


@dataclass(frozen=True)
class Datasets:
    train: Dataset[Any]
    val: Dataset[Any] | None
    description: str
    tokens_per_sample: int
    cache: ShardCache | None = None  # where a streamed corpus's shards are fetched to
    itemsize: int = 1  # bytes per token of the shards
    source_caches: tuple[ShardCache, ...] = ()  # those of a mixture's streamed sources


def prepared_corpus_dir(data: DataConfig) -> Path:
    """Where the corpus lives prepared: the corpus itself, or a cache entry named by its spec.

    A corpus in an object store is read where it is: this is then its shard cache.
    """
    if is_remote(data.corpus):
        return shard_cache_dir(data)
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


def shard_cache_dir(data: DataConfig) -> Path:
    """The shared, content-addressed cache of streamed shards."""
    return Path(data.cache_dir).expanduser() / "shards"


def ensure_corpus(data: DataConfig) -> ShardIndex:
    """Open the prepared corpus, preparing it first when ``data.corpus`` is raw text.

    A corpus in an object store must be prepared there already: only its index is read.
    With ``data.sources``, every source is made ready and the first one's index returned.
    """
    if data.sources is not None:
        indexes = [ensure_corpus(source_config(data, n)) for n in range(len(data.sources))]
        return indexes[0]
    if is_remote(data.corpus):
        return open_remote_index(
            data.corpus,
            cache_dir=Path(data.cache_dir).expanduser(),
            max_attempts=data.fetch_attempts,
        )
    directory = prepared_corpus_dir(data)
    if is_prepared(directory):
        return read_index(directory)
    return prepare_shards(
        data.corpus, directory, val_fraction=data.val_fraction, max_bytes=data.max_corpus_bytes
    )


def source_config(data: DataConfig, number: int) -> DataConfig:
    """``data`` as if source ``number`` of ``data.sources`` were its only corpus."""
    assert data.sources is not None
    return data.model_copy(update={"corpus": data.sources[number].corpus, "sources": None})


def sample_order(data: DataConfig, dataset: Dataset[Any]) -> SampleOrder | MixtureOrder | None:
    """The order ``data`` asks for: a mixture of ``data.sources``, the windowed shuffle of
    ``data.shuffle_window_shards``, or None (global).

    Raises:
        DataError: a window asked for a dataset that is not made of token shards, or for a
            mixture.
    """
    if isinstance(dataset, MixtureDataset):
        assert data.sources is not None
        if data.shuffle_window_shards is not None:
            raise DataError(
                "data.shuffle_window_shards: not available with data.sources yet; drop one"
            )
        return MixtureOrder(
            names=tuple(source.corpus for source in data.sources),
            weights=tuple(source.weight for source in data.sources),
            source_samples=tuple(len(part) for part in dataset.parts),
        )
    if data.shuffle_window_shards is None:
        return None
    if not isinstance(dataset, TokenWindowDataset):
        raise DataError(
            "data.shuffle_window_shards: needs a corpus of token shards, not "
            "data.dataset_factory; drop one of them"
        )
    return SampleOrder(
        window_shards=data.shuffle_window_shards, shard_samples=dataset.shard_num_samples
    )


def step_lookahead(
    datasets: Datasets,
    sampler: GlobalPositionSampler,
    layout: BatchLayout,
    *,
    rank: int,
    prefetch_shards: int,
    end_step: int | None = None,
) -> StepLookahead:
    """The loader's lookahead: shard prefetching for a streamed corpus, else nothing;
    nothing is fetched for steps from ``end_step`` on (``train.max_steps``, counted as
    ``GlobalPositionSampler.global_step`` counts)."""
    train = datasets.train
    if datasets.cache is None or not isinstance(train, TokenWindowDataset):
        return NullLookahead()
    return ShardPrefetcher(
        datasets.cache,
        train.shards,
        train.first_sample,
        sampler,
        layout,
        rank=rank,
        prefetch_shards=prefetch_shards,
        itemsize=datasets.itemsize,
        end_step=end_step,
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
    if data.sources is not None:
        return _mixture_datasets(data)
    index = ensure_corpus(data)
    cache = None
    if index.url is not None:
        cache = ShardCache(
            index.directory,
            store=ShardStore(index.url, max_attempts=data.fetch_attempts),
            limit_bytes=int(data.cache_limit_gb * 2**30),
            loader_workers=data.num_workers,
        )
    train = TokenWindowDataset(
        index, split="train", seq_len=data.seq_len, reader=_reader(cache, index, "train")
    )
    val = TokenWindowDataset(
        index, split="val", seq_len=data.seq_len, reader=_reader(cache, index, "val")
    )
    where = f"streamed through {index.directory}" if cache is not None else str(index.directory)
    return Datasets(
        train=train,
        val=val if len(val) > 0 else None,
        description=(
            f"{data.corpus}: {index.num_tokens('train'):,} train tokens, "
            f"{len(train):,} samples of {data.seq_len}+1 ({where})"
        ),
        tokens_per_sample=data.seq_len,
        cache=cache,
        itemsize=index.dtype.itemsize,
    )


def _mixture_datasets(data: DataConfig) -> Datasets:
    """One dataset per source, numbered source after source; streamed sources are read
    through the shard cache without prefetching."""
    assert data.sources is not None
    trains, vals, caches = [], [], []
    for number in range(len(data.sources)):
        source = build_datasets(Config(data=source_config(data, number)))
        assert isinstance(source.train, TokenWindowDataset)
        trains.append(source.train)
        if source.cache is not None:
            caches.append(source.cache)
        if source.val is not None:
            assert isinstance(source.val, TokenWindowDataset)
            vals.append(source.val)
        if len(source.train) == 0:
            raise DataError(
                f"data.sources[{number}]: {data.sources[number].corpus} holds no training "
                f"sample of {data.seq_len}+1 tokens; use another corpus or a shorter seq_len"
            )
    train = MixtureDataset(trains)
    return Datasets(
        train=train,
        val=MixtureDataset(vals) if vals else None,
        description="mixture of "
        + ", ".join(
            f"{source.corpus} (weight {source.weight:g}, {len(part):,} samples)"
            for source, part in zip(data.sources, trains, strict=True)
        ),
        tokens_per_sample=data.seq_len,
        source_caches=tuple(caches),
    )


def with_data_metrics(sink: MetricWriter, datasets: Datasets) -> MetricWriter:
    """``sink``, adding the shard caches' counters to step records when data is streamed
    (the corpus, or a mixture's streamed sources)."""
    caches = (datasets.cache,) if datasets.cache is not None else datasets.source_caches
    return DataMetricsSink(sink, caches) if caches else sink


def _reader(cache: ShardCache | None, index: ShardIndex, split: str) -> ShardReader | None:
    return None if cache is None else CachedShards(cache, index.splits[split], index.dtype)


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
