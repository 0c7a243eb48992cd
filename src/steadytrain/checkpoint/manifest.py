"""The manifest: the JSON file whose presence makes a checkpoint exist.

It is written last, after every file it lists is durable, and it carries what is needed to
decide whether the checkpoint is intact (file sizes and checksums) and whether it may be
restored into this run (the identity fields and their fingerprint).

Checksums name their algorithm (``"xxh3-128:<hex>"``). They detect corruption — a flipped
bit, a truncated or swapped file — not tampering: whoever can rewrite a file can rewrite the
manifest too. XXH3-128 hashes at memory speed (~30 GB/s per core), so checking costs a small
fraction of reading; version-1 manifests (SHA-256) still verify and load.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import xxhash

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "steadytrain-checkpoint"
MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)
CHECKPOINT_PREFIX = "step_"
CHECKSUM_ALGORITHM = "xxh3-128"
_HASHERS: dict[str, Callable[[], Any]] = {
    "xxh3-128": xxhash.xxh3_128,
    "sha256": hashlib.sha256,  # manifest version 1
}


class ManifestError(ValueError):
    """A manifest that is not valid JSON or lacks required fields."""


@dataclass(frozen=True)
class FileEntry:
    size: int
    checksum: str  # "ALGORITHM:HEX"


@dataclass
class Manifest:
    step: int
    time: float
    identity_fingerprint: str
    identity: dict[str, Any]
    world_size: int
    global_batch_size: int
    versions: dict[str, str]
    operational: dict[str, Any] = field(default_factory=dict)
    # Identity changes allowed with --allow-change during this run's history, oldest first:
    # {"step": resumed at, "field": dotted name, "old": value, "new": value}.
    identity_overrides: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, FileEntry] = field(default_factory=dict)
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        payload = asdict(self)
        return json.dumps(payload, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse and check a manifest.

        Raises:
            ManifestError: when it is not a steadytrain manifest of a known version.
        """
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as error:
            raise ManifestError(f"not valid JSON ({error})") from None
        if not isinstance(payload, dict) or payload.get("format") != MANIFEST_FORMAT:
            raise ManifestError("not a steadytrain checkpoint manifest")
        version = payload.get("version")
        if version not in READABLE_VERSIONS:
            raise ManifestError(f"unsupported manifest version {version!r}")
        try:
            files = {name: _file_entry(entry, version) for name, entry in payload["files"].items()}
            return cls(
                step=int(payload["step"]),
                time=float(payload["time"]),
                identity_fingerprint=str(payload["identity_fingerprint"]),
                identity=dict(payload["identity"]),
                world_size=int(payload["world_size"]),
                global_batch_size=int(payload["global_batch_size"]),
                versions=dict(payload["versions"]),
                operational=dict(payload.get("operational", {})),
                identity_overrides=[dict(item) for item in payload.get("identity_overrides", [])],
                files=files,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ManifestError(f"missing or malformed field ({error})") from None


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint directory name, or None if it is not one."""
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    digits = name[len(CHECKPOINT_PREFIX) :]
    return int(digits) if digits.isascii() and digits.isdigit() else None


class Checksum:
    """A running checksum: ``update`` with the bytes in order, then ``value``."""

    def __init__(self, algorithm: str = CHECKSUM_ALGORITHM) -> None:
        self.algorithm = algorithm
        self._digest = _HASHERS[algorithm]()

    @classmethod
    def like(cls, expected: str) -> Checksum:
        """A checksum with the algorithm that ``expected`` (``"ALGORITHM:HEX"``) names."""
        return cls(expected.partition(":")[0])

    def update(self, data: Any) -> None:
        self._digest.update(data)

    def value(self) -> str:
        return f"{self.algorithm}:{self._digest.hexdigest()}"


def checksum_of(chunks: Iterable[Any], algorithm: str = CHECKSUM_ALGORITHM) -> str:
    """``"ALGORITHM:HEX"`` of the bytes in ``chunks`` (bytes-like objects, in order)."""
    checksum = Checksum(algorithm)
    for chunk in chunks:
        checksum.update(chunk)
    return checksum.value()


def checksum_matches(expected: str, chunks: Iterable[Any]) -> bool:
    """Whether ``chunks`` hash to ``expected``, with the algorithm ``expected`` names."""
    algorithm = expected.partition(":")[0]
    return algorithm in _HASHERS and checksum_of(chunks, algorithm) == expected


def _file_entry(entry: dict[str, Any], version: int) -> FileEntry:
    if version == 1:
        return FileEntry(size=int(entry["size"]), checksum=f"sha256:{entry['sha256']}")
    checksum = str(entry["checksum"])
    if checksum.partition(":")[0] not in _HASHERS:
        raise ValueError(f"unknown checksum algorithm in {checksum!r}")
    return FileEntry(size=int(entry["size"]), checksum=checksum)
