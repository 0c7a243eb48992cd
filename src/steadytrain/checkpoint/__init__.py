"""Checkpoints: manifest, storage, commit protocol, verification, fallback and retention."""

from steadytrain.checkpoint.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    ManifestError,
    checkpoint_name,
    step_of,
)
from steadytrain.checkpoint.protocol import (
    CorruptCheckpoint,
    SaveOutcome,
    decode_parts,
    encode_parts,
    find_restorable,
    prune_checkpoints,
    rank_stem,
    read_parts,
    save_checkpoint,
    verify_checkpoint,
)
from steadytrain.checkpoint.storage import (
    BytesPayload,
    CheckpointStorage,
    LocalStorage,
    Payload,
    StorageError,
)

__all__ = [
    "MANIFEST_NAME",
    "BytesPayload",
    "CheckpointStorage",
    "CorruptCheckpoint",
    "FileEntry",
    "LocalStorage",
    "Manifest",
    "ManifestError",
    "Payload",
    "SaveOutcome",
    "StorageError",
    "checkpoint_name",
    "decode_parts",
    "encode_parts",
    "find_restorable",
    "prune_checkpoints",
    "rank_stem",
    "read_parts",
    "save_checkpoint",
    "step_of",
    "verify_checkpoint",
]
