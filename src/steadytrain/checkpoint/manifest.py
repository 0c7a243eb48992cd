"""The manifest: the JSON file whose presence makes a checkpoint exist.

It is written last, after every file it lists is durable, and it carries what is needed to
decide whether the checkpoint is intact (file sizes and SHA-256 checksums) and whether it may be
restored into this run (the identity fields and their fingerprint).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "steadytrain-checkpoint"
MANIFEST_VERSION = 1
CHECKPOINT_PREFIX = "step_"


class ManifestError(ValueError):
    """A manifest that is not valid JSON or lacks required fields."""


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


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
        if payload.get("version") != MANIFEST_VERSION:
            raise ManifestError(f"unsupported manifest version {payload.get('version')!r}")
        try:
            files = {
                name: FileEntry(size=int(entry["size"]), sha256=str(entry["sha256"]))
                for name, entry in payload["files"].items()
            }
            return cls(
                step=int(payload["step"]),
                time=float(payload["time"]),
                identity_fingerprint=str(payload["identity_fingerprint"]),
                identity=dict(payload["identity"]),
                world_size=int(payload["world_size"]),
                global_batch_size=int(payload["global_batch_size"]),
                versions=dict(payload["versions"]),
                operational=dict(payload.get("operational", {})),
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


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
