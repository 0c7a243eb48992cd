"""Prepared corpora in an object store (``s3://bucket/prefix`` and any other fsspec URL).

``data prepare --output URL`` prepares the shards locally, then uploads every shard and
``index.json`` last: like a checkpoint's manifest, the index is the commit, so an upload cut
short never looks prepared. Training reads the index at start and fetches shards through
the shard cache (``data/cache.py``). Transient errors are retried with exponential backoff;
permanent ones (no such bucket or object, access denied) fail at once. Credentials come from
the standard environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL`` …) or the provider's config files, and are never written anywhere.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

from steadytrain.config import DataError, DataUnavailable, redact_url
from steadytrain.data.shards import (
    INDEX_FILE,
    SPLITS,
    ShardIndex,
    index_of,
    parse_index,
    prepare_shards,
)

T = TypeVar("T")
READ_BLOCK_BYTES = 8 * 2**20  # large objects are best read in 8-16 MB requests
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_remote(corpus: str) -> bool:
    """Whether ``corpus`` names an object store URL rather than a local path."""
    scheme = urlsplit(corpus).scheme
    return len(scheme) > 1 and scheme != "file" and "://" in corpus


class ShardStore:
    """A prepared corpus at an fsspec URL: its index, and each shard's bytes."""

    def __init__(self, url: str, *, max_attempts: int = 5, first_backoff_s: float = 0.5) -> None:
        self.url = url.rstrip("/")
        self._max_attempts = max_attempts
        self._first_backoff_s = first_backoff_s
        try:
            import fsspec

            self._fs, root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as error:
            raise DataError(
                f"data.corpus: {redact_url(self.url)} cannot be opened ({error}); install the "
                "fsspec driver for its scheme (s3fs for s3://) or fix the URL"
            ) from None
        self._root = str(root).rstrip("/")

    def read_index(self) -> dict[str, Any]:
        """The corpus's ``index.json``, checked.

        Raises:
            DataError: when it is missing or not a shard index.
            DataUnavailable: when the store cannot be reached.
        """
        where = f"{redact_url(self.url)}/{INDEX_FILE}"
        try:
            data = self._retry(lambda: self._fs.cat_file(f"{self._root}/{INDEX_FILE}"), what=where)
        except DataUnavailable as error:
            if isinstance(error.__cause__, FileNotFoundError):
                raise DataUnavailable(
                    f"data.corpus: {where} not found (no such bucket or prefix, or not "
                    f"prepared); prepare it with 'steadytrain data prepare --corpus SOURCE "
                    f"--output {redact_url(self.url)}'"
                ) from None
            raise
        return parse_index(data.decode(errors="replace"), where=where)

    def download(self, name: str, handle: IO[bytes]) -> tuple[int, str]:
        """Write shard ``name`` to ``handle`` (from its start on every attempt); returns its
        size and sha256.

        Raises:
            DataUnavailable: when it cannot be read after the retries.
        """
        path = f"{self._root}/{name}"

        def attempt() -> tuple[int, str]:
            handle.seek(0)
            handle.truncate()
            digest, size = hashlib.sha256(), 0
            with self._fs.open(path, "rb", block_size=READ_BLOCK_BYTES) as source:
                while chunk := source.read(READ_BLOCK_BYTES):
                    handle.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
            return size, digest.hexdigest()

        return self._retry(attempt, what=f"{redact_url(self.url)}/{name}")

    def upload(self, directory: Path) -> None:
        """Upload a prepared corpus: every shard first, ``index.json`` last (the commit)."""
        for shard in sorted(directory.glob("*.bin")):
            self._put(shard, f"{self._root}/{shard.name}")
        index = (directory / INDEX_FILE).read_bytes()
        target = f"{self._root}/{INDEX_FILE}"
        self._retry(lambda: self._fs.pipe_file(target, index), what=target)

    def _put(self, source: Path, target: str) -> None:
        self._retry(lambda: self._fs.put_file(str(source), target), what=target)

    def is_prepared(self) -> bool:
        path = f"{self._root}/{INDEX_FILE}"
        return bool(self._retry(lambda: self._fs.exists(path), what=redact_url(self.url)))

    def _retry(self, operation: Callable[[], T], *, what: str) -> T:
        delay = self._first_backoff_s
        for attempt in range(1, self._max_attempts + 1):
            try:
                return operation()
            except PERMANENT_ERRORS as error:
                raise DataUnavailable(
                    f"{what}: {type(error).__name__}: {error}; check the URL and the "
                    "credentials in the environment"
                ) from error
            except Exception as error:
                if attempt == self._max_attempts:
                    raise DataUnavailable(
                        f"{what}: gave up after {attempt} attempts ({type(error).__name__}: "
                        f"{error}); check that the store is reachable, then run again"
                    ) from error
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")


def open_remote_index(url: str, *, cache_dir: Path | None, max_attempts: int = 5) -> ShardIndex:
    """The index of the corpus at ``url``; its shards are read from ``cache_dir/shards`` once
    fetched (None: the index only describes them).

    Raises:
        DataError: when the index is missing, malformed, or lacks shard checksums.
        DataUnavailable: when the store cannot be reached.
    """
    store = ShardStore(url, max_attempts=max_attempts)
    index = store.read_index()
    for split in SPLITS:
        for entry in index["splits"].get(split, []):
            if not entry.get("sha256"):
                raise DataError(
                    f"{redact_url(url)}/{INDEX_FILE}: shard {entry.get('path')!r} has no sha256; "
                    "prepare the corpus again with this version of steadytrain"
                )
    shard_dir = (cache_dir or Path(".")) / "shards"
    return index_of(
        index,
        directory=shard_dir,
        path_of=lambda entry: shard_dir / f"{entry['sha256']}.bin",
        url=store.url,
    )


def prepare_remote(
    corpus: str,
    url: str,
    *,
    val_fraction: float,
    max_bytes: int | None,
    shard_tokens: int,
) -> ShardIndex:
    """Prepare ``corpus`` into the object store at ``url``: the same shards and index as a
    local prepare. A prefix that already holds an index is left untouched."""
    store = ShardStore(url)
    if not store.is_prepared():
        with tempfile.TemporaryDirectory(prefix="steadytrain-prepare-") as staging:
            local = prepare_shards(
                corpus,
                Path(staging) / "corpus",
                val_fraction=val_fraction,
                max_bytes=max_bytes,
                shard_tokens=shard_tokens,
            )
            store.upload(local.directory)
    return open_remote_index(url, cache_dir=None)


def prepare_corpus(
    corpus: str,
    output: str,
    *,
    val_fraction: float = 0.02,
    max_bytes: int | None = None,
    shard_tokens: int = 16 * 2**20,
) -> ShardIndex:
    """``data prepare``: shards of ``corpus`` in the folder or object store URL ``output``."""
    settings: dict[str, Any] = {
        "val_fraction": val_fraction,
        "max_bytes": max_bytes,
        "shard_tokens": shard_tokens,
    }
    if is_remote(output):
        return prepare_remote(corpus, output, **settings)
    return prepare_shards(corpus, Path(output), **settings)
