"""Checkpoints in an object store (``s3://bucket/prefix`` and any other fsspec URL).

Object stores have no atomic rename, so the manifest is the commit: every file of a checkpoint
is uploaded first, and ``manifest.json`` last. A prefix without a manifest (an upload cut short)
is never listed as good, and a checkpoint is deleted manifest-first so a half-deleted one never
looks committed. Transient errors (timeouts, throttling, 5xx) are retried with exponential
backoff; permanent ones (no such bucket, access denied) fail at once. Credentials come from the
standard environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` …),
the provider's config files, or ``checkpoint.storage_options``; none of them is ever written to
a manifest, a log, an event or the saved config.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from steadytrain.checkpoint.manifest import MANIFEST_NAME, step_of
from steadytrain.checkpoint.storage import (
    READ_CHUNK_BYTES,
    BytesPayload,
    Payload,
    SizeMismatch,
    StorageError,
)
from steadytrain.config import redact_url

T = TypeVar("T")
UPLOAD_PART_BYTES = 64 * 2**20  # multipart uploads buffer one part at a time
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class ObjectStorage:
    """``CheckpointStorage`` over an fsspec file system (S3, GCS, Azure, …)."""

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict[str, Any] | None = None,
        max_attempts: int = 5,
        first_backoff_s: float = 0.5,
        upload_part_bytes: int = UPLOAD_PART_BYTES,
    ) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self._fs, self._root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self._root = self._root.rstrip("/")
        self._max_attempts = max_attempts
        self._first_backoff_s = first_backoff_s
        self._part_bytes = upload_part_bytes

    def staging_location(self, name: str, *, token: str) -> str:
        location = f"{self._root}/{name}"
        # Re-saving a step (its old copy was rejected): uncommit the old one before any upload.
        manifest = f"{location}/{MANIFEST_NAME}"
        if self._retry(lambda: self._fs.exists(manifest)):
            self._retry(lambda: self._fs.rm(manifest))
        return location

    def write_file(self, location: str, filename: str, payload: Payload) -> None:
        path = f"{location}/{filename}"
        if payload.size <= self._part_bytes:
            data = b"".join(payload.chunks())
            self._retry(lambda: self._fs.pipe_file(path, data))
        else:
            self._retry(lambda: self._upload(path, payload))

    def _upload(self, path: str, payload: Payload) -> None:
        """Stream a large payload as a multipart upload; a failed one is aborted, not completed."""
        handle = self._fs.open(path, "wb", block_size=self._part_bytes)
        try:
            for chunk in payload.chunks():
                handle.write(chunk)
            handle.close()  # uploads the last part and completes the upload
        except BaseException:
            with contextlib.suppress(Exception):
                handle.discard()  # aborts the multipart upload
            with contextlib.suppress(AttributeError):
                handle.closed = True  # so that collecting it never completes the upload
            raise

    def commit(self, location: str, name: str, manifest: bytes) -> None:
        # The manifest is the commit.
        self.write_file(location, MANIFEST_NAME, BytesPayload(manifest))

    def discard(self, location: str) -> None:
        # Best effort: a prefix without a manifest is never taken for a checkpoint.
        with contextlib.suppress(Exception):
            self._fs.rm(location, recursive=True)

    def checkpoint_names(self) -> list[str]:
        try:
            entries = self._retry(lambda: self._fs.ls(self._root, detail=False, refresh=True))
        except StorageError as error:
            if isinstance(error.__cause__, FileNotFoundError):
                return []
            raise
        names = [str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in entries]
        steps = {name: step for name in names if (step := step_of(name)) is not None}
        return sorted(steps, key=steps.__getitem__)

    def read_file(self, name: str, filename: str) -> bytes:
        path = f"{self._root}/{name}/{filename}"
        return self._retry(lambda: self._fs.cat_file(path))

    def read_range(self, name: str, filename: str, start: int, length: int) -> bytes:
        path = f"{self._root}/{name}/{filename}"
        return self._retry(lambda: self._fs.cat_file(path, start=start, end=start + length))

    def read_into(
        self,
        name: str,
        filename: str,
        buffers: Sequence[memoryview],
        *,
        offset: int = 0,
        on_data: Callable[[memoryview], None] | None = None,
    ) -> None:
        path = f"{self._root}/{name}/{filename}"
        self._retry(lambda: self._read_into(path, buffers, offset))
        # Only now: a retried download starts over, and ``on_data`` sees each byte once.
        if on_data is not None:
            for buffer in buffers:
                on_data(buffer)

    def _read_into(self, path: str, buffers: Sequence[memoryview], offset: int) -> None:
        """One attempt; a retry starts over and overwrites what an earlier one filled."""
        expected = offset + sum(len(buffer) for buffer in buffers)
        with self._fs.open(path, "rb", block_size=READ_CHUNK_BYTES) as handle:
            if handle.size != expected:
                raise SizeMismatch(f"{path}: {handle.size} bytes, its manifest says {expected}")
            handle.seek(offset)
            for buffer in buffers:
                filled = 0
                while filled < len(buffer):
                    data = handle.read(min(READ_CHUNK_BYTES, len(buffer) - filled))
                    if not data:
                        raise SizeMismatch(f"{path}: shorter than its manifest says")
                    buffer[filled : filled + len(data)] = data
                    filled += len(data)

    def read_chunks(self, name: str, filename: str) -> Iterator[bytes]:
        path = f"{self._root}/{name}/{filename}"
        with self._retry(lambda: self._fs.open(path, "rb", block_size=READ_CHUNK_BYTES)) as handle:
            while chunk := handle.read(READ_CHUNK_BYTES):
                yield chunk

    def file_size(self, name: str, filename: str) -> int | None:
        path = f"{self._root}/{name}/{filename}"
        try:
            info = self._retry(lambda: self._fs.info(path, refresh=True))
        except StorageError as error:
            if isinstance(error.__cause__, FileNotFoundError):
                return None
            raise
        return int(info["size"])

    def delete(self, name: str) -> None:
        location = f"{self._root}/{name}"
        manifest = f"{location}/{MANIFEST_NAME}"
        if self._retry(lambda: self._fs.exists(manifest)):
            self._retry(lambda: self._fs.rm(manifest))  # uncommit first
        self.discard(location)

    def remove_leftovers(self) -> list[str]:
        # Called at start, with no save in flight: a step prefix without a manifest is an
        # upload cut short by a crash.
        leftovers = [
            name for name in self.checkpoint_names() if self.file_size(name, MANIFEST_NAME) is None
        ]
        for name in leftovers:
            self.discard(f"{self._root}/{name}")
        return leftovers

    def free_bytes(self) -> int | None:
        return None  # object stores do not run out in a way we can ask about

    def describe(self, name: str) -> str:
        return redact_url(f"{self.url}/{name}" if name else self.url)

    def _retry(self, operation: Callable[[], T]) -> T:
        delay = self._first_backoff_s
        for attempt in range(1, self._max_attempts + 1):
            try:
                return operation()
            except StorageError:
                raise  # already a verdict (e.g. a size that does not match)
            except PERMANENT_ERRORS as error:
                raise StorageError(f"{type(error).__name__}: {error}") from error
            except Exception as error:
                if attempt == self._max_attempts:
                    raise StorageError(
                        f"gave up after {attempt} attempts: {type(error).__name__}: {error}"
                    ) from error
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")
