"""Token shards: prepare them from text files, read them memory-mapped.

On disk a prepared corpus is a directory::

    index.json           format, version, dtype, tokenizer, splits -> shard files
    train-00000.bin      raw little-endian token ids, documents separated by 0
    val-00000.bin

The byte-level tokenizer maps each byte to its value (vocabulary 256). Which files go to
the validation split is decided per file from a hash of its relative path, so the split is
stable when files are added and no file is cut in two.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import mmap
import os
import shutil
import sysconfig
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from steadytrain.config import DataError

SHARD_FORMAT = "steadytrain-token-shards"
SHARD_FORMAT_VERSION = 1
DOCUMENT_SEPARATOR = 0
BYTE_VOCAB_SIZE = 256
INDEX_FILE = "index.json"
SPLITS = ("train", "val")
MAX_MAPPED_SHARDS = 64  # memory maps one reader keeps open (each holds a file descriptor)


@dataclass(frozen=True)
class ShardFile:
    path: Path  # where it is read: in the corpus directory, or in the shard cache
    num_tokens: int
    name: str = ""  # as index.json names it
    sha256: str | None = None  # as index.json records it (corpora prepared before: None)


@dataclass(frozen=True)
class ShardIndex:
    """A prepared corpus: its directory, dtype and the shard files of each split.

    A corpus in an object store has its ``url``; its ``directory`` is then the shard cache,
    where each shard is fetched before it is read.
    """

    directory: Path
    dtype: np.dtype[Any]
    vocab_size: int
    splits: dict[str, list[ShardFile]]
    fingerprint: str
    url: str | None = None

    def num_tokens(self, split: str) -> int:
        return sum(shard.num_tokens for shard in self.splits[split])


def is_prepared(directory: Path) -> bool:
    return (directory / INDEX_FILE).is_file()


def stdlib_source_files() -> list[Path]:
    """The standard library's own ``.py`` files (site-packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        path
        for path in root.rglob("*.py")
        if "site-packages" not in path.parts and "dist-packages" not in path.parts
    )


def resolve_source_files(corpus: str) -> tuple[Path, list[Path]]:
    """The root and the sorted text files named by ``corpus`` ('stdlib', a folder or a glob).

    Raises:
        DataError: when nothing matches.
    """
    if corpus == "stdlib":
        return Path(sysconfig.get_paths()["stdlib"]), stdlib_source_files()
    expanded = os.path.expanduser(corpus)
    if Path(expanded).is_dir():
        root = Path(expanded)
        files = sorted(path for path in root.rglob("*") if path.is_file())
    else:
        files = sorted(Path(match) for match in glob.glob(expanded, recursive=True))
        files = [path for path in files if path.is_file()]
        root = _glob_root(expanded)
    if not files:
        raise DataError(
            f"data.corpus: {corpus!r} matches no files; give 'stdlib', an existing folder, a "
            "glob of text files, or a directory made by 'steadytrain data prepare'"
        )
    return root, files


def _glob_root(pattern: str) -> Path:
    """The fixed leading folders of a glob: relative paths stay put when files are added."""
    fixed = []
    for part in Path(pattern).parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def prepare_shards(
    corpus: str,
    output_dir: Path,
    *,
    val_fraction: float = 0.02,
    max_bytes: int | None = None,
    shard_tokens: int = 16 * 2**20,
) -> ShardIndex:
    """Tokenize ``corpus`` byte-wise into shards under ``output_dir``, atomically.

    The shards are written to a temporary sibling directory that is renamed into place at
    the end, so an interrupted prepare never leaves a directory that looks prepared.
    If ``output_dir`` is already prepared, it is left untouched and returned.

    Raises:
        DataError: when the corpus is missing/empty or ``output_dir`` exists unprepared.
    """
    if is_prepared(output_dir):
        return read_index(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise DataError(
            f"data prepare: {output_dir} exists and is not a prepared corpus; choose an empty "
            "or new output directory"
        )
    root, files = resolve_source_files(corpus)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.parent / f".{output_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        splits, num_bytes = _write_splits(
            root,
            files,
            staging,
            val_fraction=val_fraction,
            max_bytes=max_bytes,
            shard_tokens=shard_tokens,
        )
        if not splits["train"]:
            raise DataError(
                f"data.corpus: {corpus!r} holds no readable text for training; point it at "
                "text files"
            )
        index = {
            "format": SHARD_FORMAT,
            "version": SHARD_FORMAT_VERSION,
            "tokenizer": "bytes",
            "vocab_size": BYTE_VOCAB_SIZE,
            "dtype": "uint8",
            "source": {"corpus": corpus, "num_files": len(files), "num_bytes": num_bytes},
            "splits": splits,
        }
        index["fingerprint"] = _fingerprint(index)
        _write_json_durably(staging / INDEX_FILE, index)
        try:
            os.rename(staging, output_dir)
        except OSError:
            if not is_prepared(output_dir):  # another process won the race: use theirs
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return read_index(output_dir)


def read_index(directory: Path) -> ShardIndex:
    """Open a prepared corpus's index.

    Raises:
        DataError: if the directory is not a prepared corpus of a known version.
    """
    index_path = directory / INDEX_FILE
    try:
        text = index_path.read_text()
    except FileNotFoundError:
        raise DataError(
            f"data.corpus: {directory} has no {INDEX_FILE}; prepare it with "
            f"'steadytrain data prepare --corpus SOURCE --output {directory}'"
        ) from None
    index = parse_index(text, where=str(index_path))
    shard_index = index_of(
        index, directory=directory, path_of=lambda entry: directory / entry["path"]
    )
    for shard in shard_index.splits["train"] + shard_index.splits["val"]:
        expected_bytes = shard.num_tokens * shard_index.dtype.itemsize
        if not shard.path.is_file() or shard.path.stat().st_size != expected_bytes:
            raise DataError(
                f"{shard.path}: missing or not {expected_bytes} bytes as {INDEX_FILE} says; "
                "prepare the corpus again"
            )
    return shard_index


def parse_index(text: str, *, where: str) -> dict[str, Any]:
    """The content of an ``index.json`` read from ``where``, checked for format and version.

    Raises:
        DataError: if it is not JSON, or not a shard index of a known version.
    """
    try:
        index = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: corrupt index ({error}); prepare the corpus again") from None
    if not isinstance(index, dict):
        raise DataError(f"{where}: not a shard index; prepare the corpus again")
    if index.get("format") != SHARD_FORMAT or index.get("version") != SHARD_FORMAT_VERSION:
        raise DataError(
            f"{where}: format {index.get('format')!r} version {index.get('version')!r} is "
            f"not {SHARD_FORMAT!r} version {SHARD_FORMAT_VERSION}; prepare the corpus again"
        )
    return index


def index_of(
    index: dict[str, Any],
    *,
    directory: Path,
    path_of: Callable[[dict[str, Any]], Path],
    url: str | None = None,
) -> ShardIndex:
    """A parsed ``index.json`` as a ``ShardIndex`` whose shards are read at ``path_of(entry)``."""
    splits = {
        split: [
            ShardFile(
                path=path_of(entry),
                num_tokens=int(entry["num_tokens"]),
                name=str(entry["path"]),
                sha256=entry.get("sha256"),
            )
            for entry in index["splits"].get(split, [])
        ]
        for split in SPLITS
    }
    return ShardIndex(
        directory=directory,
        dtype=np.dtype(index["dtype"]),
        vocab_size=int(index["vocab_size"]),
        splits=splits,
        fingerprint=str(index["fingerprint"]),
        url=url,
    )


def map_shard_file(path: Path, dtype: np.dtype[Any], num_tokens: int) -> tuple[np.ndarray, int]:
    """The tokens of the shard file at ``path``, memory-mapped read-only, and its inode.

    A plain ndarray (not ``np.memmap``), so slicing it per sample costs no subclass hooks.
    """
    with open(path, "rb") as handle:
        inode = os.fstat(handle.fileno()).st_ino
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mapped, dtype=dtype, count=num_tokens), inode


class ShardMaps:
    """The memory-mapped shards of one reader, by shard number: at most
    ``MAX_MAPPED_SHARDS``, the least recently used unmapped first."""

    def __init__(self) -> None:
        self._maps: collections.OrderedDict[int, tuple[np.ndarray, int]] = collections.OrderedDict()

    def get(self, number: int) -> np.ndarray | None:
        entry = self._maps.get(number)
        if entry is None:
            return None
        self._maps.move_to_end(number)
        return entry[0]

    def put(self, number: int, tokens: np.ndarray, inode: int) -> None:
        self._maps[number] = (tokens, inode)
        while len(self._maps) > MAX_MAPPED_SHARDS:
            self._maps.popitem(last=False)

    def inodes(self) -> list[tuple[int, int]]:
        return [(number, inode) for number, (_, inode) in self._maps.items()]

    def drop(self, number: int) -> None:
        # The map itself goes when no array read from it is left.
        self._maps.pop(number, None)


def validation_files(relative_paths: list[str], val_fraction: float) -> set[str]:
    """Files held out: those whose path hashes below ``val_fraction``.

    A non-zero fraction always holds out at least one file (the lowest hash) when there are
    two or more, so a small corpus still gets a validation split.
    """
    scores = {path: _hash_fraction(path) for path in relative_paths}
    chosen = {path for path, score in scores.items() if score < val_fraction}
    if not chosen and val_fraction > 0 and len(scores) > 1:
        chosen = {min(scores, key=lambda path: scores[path])}
    return chosen


def _hash_fraction(relative_path: str) -> float:
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def _write_splits(
    root: Path,
    files: list[Path],
    staging: Path,
    *,
    val_fraction: float,
    max_bytes: int | None,
    shard_tokens: int,
) -> tuple[dict[str, list[dict[str, Any]]], int]:
    writers = {split: _ShardWriter(staging, split, shard_tokens) for split in SPLITS}
    num_bytes = 0
    relative = {
        path: path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        for path in files
    }
    held_out = validation_files(list(relative.values()), val_fraction)
    for path, text in _read_documents(files, max_bytes=max_bytes):
        split = "val" if relative[path] in held_out else "train"
        writers[split].write(text + bytes([DOCUMENT_SEPARATOR]))
        num_bytes += len(text)
    return {split: writer.close() for split, writer in writers.items()}, num_bytes


def _read_documents(files: list[Path], *, max_bytes: int | None) -> Iterator[tuple[Path, bytes]]:
    budget = max_bytes if max_bytes is not None else float("inf")
    for path in files:
        if budget <= 0:
            return
        try:
            content = path.read_bytes()
        except OSError:
            continue
        # Separators inside a document would fake document boundaries.
        content = content.replace(bytes([DOCUMENT_SEPARATOR]), b"")
        if not content:
            continue
        content = content[: int(min(len(content), budget))]
        budget -= len(content)
        yield path, content


class _ShardWriter:
    def __init__(self, directory: Path, split: str, shard_tokens: int) -> None:
        self._directory = directory
        self._split = split
        self._shard_tokens = shard_tokens
        self._pending: list[bytes] = []
        self._pending_tokens = 0
        self._written: list[dict[str, Any]] = []

    def write(self, tokens: bytes) -> None:
        self._pending.append(tokens)
        self._pending_tokens += len(tokens)
        if self._pending_tokens >= self._shard_tokens:
            self._flush()

    def close(self) -> list[dict[str, Any]]:
        if self._pending_tokens:
            self._flush()
        return self._written

    def _flush(self) -> None:
        payload = b"".join(self._pending)
        name = f"{self._split}-{len(self._written):05d}.bin"
        with open(self._directory / name, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        self._written.append(
            {
                "path": name,
                "num_tokens": len(payload),
                "sha256": hashlib.sha256(payload).hexdigest(),
            }
        )
        self._pending, self._pending_tokens = [], 0


def _fingerprint(index: dict[str, Any]) -> str:
    canonical = json.dumps(
        {key: index[key] for key in ("tokenizer", "dtype", "splits")}, sort_keys=True
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _write_json_durably(path: Path, payload: dict[str, Any]) -> None:
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
