"""The shard cache: atomic verified downloads, LRU eviction that spares pinned shards, and
several processes sharing one directory. The store is a real fsspec file system (a local
``file://`` prefix holding a prepared corpus, as ``data prepare`` writes it)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import IO

import numpy as np
import pytest

from steadytrain.config import BatchLayout, DataUnavailable
from steadytrain.data import (
    GlobalPositionSampler,
    SampleOrder,
    ShardCache,
    TokenWindowDataset,
    epoch_permutation,
    prepare_shards,
)
from steadytrain.data.remote import ShardStore, open_remote_index
from steadytrain.data.shards import ShardFile
from steadytrain.data.streaming import CachedShards, ShardPrefetcher

SHARD_TOKENS = 4096


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared corpus of eight train shards of 4201 tokens (one document each)."""
    source = tmp_path_factory.mktemp("text")
    for number in range(8):
        (source / f"doc{number}.txt").write_bytes(bytes([65 + number]) * 4200)
    output = tmp_path_factory.mktemp("store") / "corpus"
    prepare_shards(str(source), output, val_fraction=0.0, shard_tokens=SHARD_TOKENS)
    return output


def shards_of(store_dir: Path, cache_dir: Path) -> list[ShardFile]:
    index = open_remote_index(f"file://{store_dir}", cache_dir=cache_dir)
    return index.splits["train"]


def new_cache(store_dir: Path, cache_dir: Path, *, limit_bytes: int = 2**30) -> ShardCache:
    store = ShardStore(f"file://{store_dir}", max_attempts=2, first_backoff_s=0.0)
    return ShardCache(cache_dir / "shards", store=store, limit_bytes=limit_bytes)


def cached_shards(cache_dir: Path) -> set[str]:
    return {path.stem for path in (cache_dir / "shards").glob("*.bin")}


def test_a_shard_is_downloaded_once_verified_and_named_by_its_checksum(
    store_dir: Path, tmp_path: Path
) -> None:
    shards = shards_of(store_dir, tmp_path)
    assert len(shards) >= 6
    cache = new_cache(store_dir, tmp_path)
    path = cache.ensure(shards[0])
    assert path == tmp_path / "shards" / f"{shards[0].sha256}.bin"
    assert path.read_bytes() == (store_dir / shards[0].name).read_bytes()
    assert cache.ensure(shards[0]) == path
    assert (cache.stats.misses, cache.stats.hits) == (1, 1)
    assert cache.stats.bytes_fetched == path.stat().st_size
    assert not list((tmp_path / "shards").glob(".*partial*")), "a temporary file was left"
    # Another process (here: another cache on the same directory) finds it cached.
    again = new_cache(store_dir, tmp_path)
    assert again.ensure(shards[0]) == path
    assert (again.stats.misses, again.stats.hits, again.stats.bytes_fetched) == (0, 1, 0)


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_a_corrupt_or_partial_cached_shard_is_fetched_again(
    store_dir: Path, tmp_path: Path, damage: str
) -> None:
    shards = shards_of(store_dir, tmp_path)
    path = new_cache(store_dir, tmp_path).ensure(shards[1])
    data = bytearray(path.read_bytes())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    cache = new_cache(store_dir, tmp_path)
    assert cache.ensure(shards[1]).read_bytes() == (store_dir / shards[1].name).read_bytes()
    assert (cache.stats.corrupt, cache.stats.misses) == (1, 1)


def test_a_shard_that_never_matches_its_index_fails_naming_it(
    store_dir: Path, tmp_path: Path
) -> None:
    shards = shards_of(store_dir, tmp_path)
    wrong = ShardFile(
        path=shards[2].path, num_tokens=shards[2].num_tokens, name=shards[2].name, sha256="0" * 64
    )
    cache = new_cache(store_dir, tmp_path)
    with pytest.raises(DataUnavailable, match=f"{shards[2].name}: .*index.json says"):
        cache.ensure(wrong)
    assert not list((tmp_path / "shards").glob("*.bin")), "an unverified shard was kept"


def test_a_missing_shard_fails_at_once_naming_it(store_dir: Path, tmp_path: Path) -> None:
    shards = shards_of(store_dir, tmp_path)
    missing = ShardFile(path=shards[0].path, num_tokens=1, name="gone.bin", sha256="1" * 64)
    started = time.monotonic()
    with pytest.raises(DataUnavailable, match=r"gone\.bin: FileNotFoundError"):
        new_cache(store_dir, tmp_path).ensure(missing)
    assert time.monotonic() - started < 5


def test_eviction_is_lru_and_never_touches_pinned_shards(store_dir: Path, tmp_path: Path) -> None:
    shards = shards_of(store_dir, tmp_path)
    size = shards[0].num_tokens
    cache = new_cache(store_dir, tmp_path, limit_bytes=3 * size + 10)
    cache.pin([shards[0]])  # the current step's, used first: the oldest, but pinned
    for shard in shards[:5]:
        cache.ensure(shard)
        time.sleep(0.01)  # distinct modification times
    cached = cached_shards(tmp_path)
    assert shards[0].sha256 in cached
    assert {shards[3].sha256, shards[4].sha256} <= cached  # the most recently used
    assert shards[1].sha256 not in cached and shards[2].sha256 not in cached
    assert cache.stats.evictions == 2
    assert cache.size_bytes() <= cache.limit_bytes


def test_a_limit_below_the_pinned_shards_goes_over_it_rather_than_wait(
    store_dir: Path, tmp_path: Path
) -> None:
    shards = shards_of(store_dir, tmp_path)
    cache = new_cache(store_dir, tmp_path, limit_bytes=1)
    cache.pin(shards[:3])
    for shard in shards[:3]:
        assert cache.ensure(shard).is_file()
    assert cache.stats.evictions == 0
    assert cache.stats.over_limit == 3
    cache.pin([])
    cache.evict()
    assert cache.size_bytes() == 0


PIN_IN_ANOTHER_PROCESS = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from steadytrain.data import ShardCache
    from steadytrain.data.remote import ShardStore, open_remote_index

    store, cache_dir = sys.argv[1], Path(sys.argv[2])
    shards = open_remote_index(store, cache_dir=cache_dir).splits["train"]
    cache = ShardCache(cache_dir / "shards", store=ShardStore(store), limit_bytes=2**30)
    cache.pin([shards[0]])
    cache.ensure(shards[0])
    print("pinned", flush=True)
    sys.stdin.read()
    """
)


def test_a_shard_pinned_by_another_process_is_not_evicted(store_dir: Path, tmp_path: Path) -> None:
    shards = shards_of(store_dir, tmp_path)
    other = subprocess.Popen(
        [sys.executable, "-c", PIN_IN_ANOTHER_PROCESS, f"file://{store_dir}", str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "pinned"
        cache = new_cache(store_dir, tmp_path, limit_bytes=1)
        cache.ensure(shards[1])
        assert cached_shards(tmp_path) == {shards[0].sha256}  # ours went, theirs stayed
    finally:
        other.communicate("", timeout=30)
    cache.evict()  # their pin ended with their process
    assert cache.size_bytes() == 0


def test_concurrent_downloads_reserve_room_first_and_stay_within_the_limit(
    store_dir: Path, tmp_path: Path
) -> None:
    shards = shards_of(store_dir, tmp_path)
    size = shards[0].num_tokens
    directory = tmp_path / "shards"
    on_disk: list[int] = []  # every file's bytes, each time a download has written its shard
    together = threading.Barrier(3, timeout=30)

    class ObservedStore(ShardStore):
        def download(self, name: str, handle: IO[bytes]) -> tuple[int, str]:
            together.wait()  # three downloads in flight at once
            result = super().download(name, handle)
            handle.flush()
            on_disk.append(sum(p.stat().st_size for p in directory.iterdir() if p.is_file()))
            together.wait()  # none is renamed before all three have written
            return result

    for shard in shards[:3]:  # three cached already: room for one more
        new_cache(store_dir, tmp_path).ensure(shard)
    store = ObservedStore(f"file://{store_dir}", max_attempts=2, first_backoff_s=0.0)
    cache = ShardCache(directory, store=store, limit_bytes=4 * size + 10)
    threads = [threading.Thread(target=cache.ensure, args=(shard,)) for shard in shards[3:6]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(on_disk) == 3
    assert max(on_disk) <= cache.limit_bytes  # no longer 3 cached + 3 downloaded
    assert cache.stats.evictions == 2  # two of the three older shards made room
    assert all(cache.is_ready(shard) for shard in shards[3:6])
    assert not list(directory.glob(".*partial*"))


def test_a_dead_downloads_temporary_file_is_deleted_and_not_counted(
    store_dir: Path, tmp_path: Path
) -> None:
    shards = shards_of(store_dir, tmp_path)
    size = shards[0].num_tokens
    cache = new_cache(store_dir, tmp_path, limit_bytes=2 * size + 10)
    dead = tmp_path / "shards" / f".{shards[5].sha256}.{size}.partial-deadbeef"
    dead.write_bytes(b"x" * 100)  # a download killed midway: nobody holds its lock
    for shard in shards[:2]:
        cache.ensure(shard)
    assert not dead.exists()
    assert cache.stats.evictions == 0  # its reservation did not push a shard out


def test_caches_sharing_a_directory_download_each_shard_once(
    store_dir: Path, tmp_path: Path
) -> None:
    shards = shards_of(store_dir, tmp_path)
    caches = [new_cache(store_dir, tmp_path) for _ in range(4)]
    errors: list[BaseException] = []

    def fetch_all(cache: ShardCache) -> None:
        try:
            for shard in shards:
                cache.ensure(shard)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=fetch_all, args=(cache,)) for cache in caches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert sum(cache.stats.misses for cache in caches) == len(shards)
    assert sum(cache.stats.hits for cache in caches) == 3 * len(shards)
    for shard in shards:
        cached = (tmp_path / "shards" / f"{shard.sha256}.bin").read_bytes()
        assert cached == (store_dir / shard.name).read_bytes()


def test_a_forked_child_does_not_keep_the_parents_locks(store_dir: Path, tmp_path: Path) -> None:
    """A DataLoader worker forked while a pin is held must not hold it after the parent lets
    go (flock locks are shared by forked descriptors)."""
    shards = shards_of(store_dir, tmp_path)
    cache = new_cache(store_dir, tmp_path)
    cache.pin([shards[0]])
    cache.ensure(shards[0])
    read_end, write_end = os.pipe()
    ready_read, ready_write = os.pipe()
    child = os.fork()
    if child == 0:  # the child waits, holding whatever it inherited
        os.close(write_end)
        os.write(ready_write, b"r")  # the fork hooks have run
        os.read(read_end, 1)
        os._exit(0)
    try:
        os.close(read_end)
        os.close(ready_write)
        assert os.read(ready_read, 1) == b"r"
        os.close(ready_read)
        cache.pin([])
        other = new_cache(store_dir, tmp_path, limit_bytes=1)
        other.evict()
        assert other.stats.evictions == 1, "the child still held the parent's pin"
    finally:
        os.write(write_end, b"x")
        os.close(write_end)
        os.waitpid(child, 0)


def windowed_prefetcher(
    store_dir: Path, cache_dir: Path, *, end_step: int | None = None
) -> tuple[ShardPrefetcher, TokenWindowDataset, GlobalPositionSampler, list[str]]:
    """A prefetcher of 1 rank (steps of 8 samples, window of 2 shards, 2 shards ahead) over
    the store, its dataset and sampler, and the shards' checksums in reading order."""
    index = open_remote_index(f"file://{store_dir}", cache_dir=cache_dir)
    cache = new_cache(store_dir, cache_dir)
    dataset = TokenWindowDataset(
        index,
        split="train",
        seq_len=64,
        reader=CachedShards(cache, index.splits["train"], index.dtype),
    )
    order = SampleOrder(window_shards=2, shard_samples=dataset.shard_num_samples)
    sampler = GlobalPositionSampler(
        num_samples=len(dataset), global_batch_size=8, seed=3, order=order
    )
    prefetcher = ShardPrefetcher(
        cache,
        dataset.shards,
        dataset.first_sample,
        sampler,
        BatchLayout(world_size=1, micro_batch_size=8, grad_accum_steps=1),
        rank=0,
        prefetch_shards=2,
        itemsize=1,
        end_step=end_step,
    )
    permutation = epoch_permutation(seed=3, epoch=0, num_samples=len(dataset), order=order)
    owners = np.searchsorted(dataset.first_sample, permutation, side="right") - 1
    reading_order = [dataset.shards[n].sha256 for n in dict.fromkeys(owners.tolist())]
    return prefetcher, dataset, sampler, reading_order


def test_the_prefetcher_fetches_ahead_in_reading_order_and_pins_the_current_shards(
    store_dir: Path, tmp_path: Path
) -> None:
    prefetcher, dataset, sampler, reading_order = windowed_prefetcher(store_dir, tmp_path)
    cache = dataset._reader.cache  # type: ignore[attr-defined]
    try:
        prefetcher.at_step(epoch=0, step_in_epoch=0)
        deadline = time.monotonic() + 30
        while cache.stats.misses < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        # Steps 0 and 1 read the first window's two shards; the next two come ahead.
        assert cached_shards(tmp_path) == set(reading_order[:4])
        other = new_cache(store_dir, tmp_path, limit_bytes=1)
        other.evict()
        assert cached_shards(tmp_path) == set(reading_order[:2]), (
            "a pinned shard of the current or next step was evicted"
        )
        # Reading the step through the dataset gives the sampler's samples, from the cache.
        for sample_id in sampler.step_sample_ids(epoch=0, step_in_epoch=0).tolist():
            shard = int(np.searchsorted(dataset.first_sample, sample_id, side="right") - 1)
            start = (sample_id - int(dataset.first_sample[shard])) * 64
            expected = (store_dir / dataset.shards[shard].name).read_bytes()[start : start + 65]
            assert bytes(dataset[sample_id].numpy().astype(np.uint8)) == expected
    finally:
        prefetcher.close()


def test_the_prefetcher_fetches_nothing_for_steps_past_the_runs_end(
    store_dir: Path, tmp_path: Path
) -> None:
    """A run that ends after step 1 fetches the shards of steps 0 and 1 only, not those that
    steps after it (and prefetch_shards) would have brought; at its end, nothing."""
    prefetcher, _, _, reading_order = windowed_prefetcher(store_dir, tmp_path, end_step=2)
    try:
        prefetcher.prime(epoch=0, step_in_epoch=0)  # the first window's shards
        prefetcher.prime(epoch=0, step_in_epoch=1)
    finally:
        prefetcher.close()  # lets every download that was started finish
    assert cached_shards(tmp_path) == set(reading_order[:2])
    at_end, _, _, _ = windowed_prefetcher(store_dir, tmp_path / "later", end_step=2)
    try:
        at_end.prime(epoch=0, step_in_epoch=2)  # a resume of the finished run
    finally:
        at_end.close()
    assert cached_shards(tmp_path / "later") == set()


def mapped_deleted_files(directory: Path) -> list[str]:
    """Files under ``directory`` this process still maps though they were deleted."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return [line for line in lines if str(directory) in line and line.endswith("(deleted)")]


def test_a_shard_evicted_while_mapped_is_still_read_right_then_let_go(
    store_dir: Path, tmp_path: Path
) -> None:
    """The reader maps each shard once; another process's eviction does not change what it
    reads, and the map is dropped when the next shard is mapped, so the disk space is freed."""
    shards = shards_of(store_dir, tmp_path)
    reader = CachedShards(new_cache(store_dir, tmp_path), shards, np.dtype(np.uint8))
    first = reader.tokens(0)
    expected = (store_dir / shards[0].name).read_bytes()
    assert bytes(first) == expected
    evictor = new_cache(store_dir, tmp_path, limit_bytes=1)
    evictor.evict()  # nothing is pinned: the mapped shard's file goes
    assert not (tmp_path / "shards" / f"{shards[0].sha256}.bin").exists()
    assert bytes(reader.tokens(0)) == expected  # the same map, still the verified bytes
    assert mapped_deleted_files(tmp_path / "shards")
    del first
    assert bytes(reader.tokens(1)) == (store_dir / shards[1].name).read_bytes()
    assert mapped_deleted_files(tmp_path / "shards") == []
    assert bytes(reader.tokens(0)) == expected  # fetched again
    assert reader.cache.stats.misses == 3
