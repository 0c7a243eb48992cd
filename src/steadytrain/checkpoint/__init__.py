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
    SaveOutcome,
    decode_parts,
    encode_parts,
    find_restorable,
    prune_checkpoints,
    rank_stem,
    save_checkpoint,
    verify_checkpoint,
)
from steadytrain.checkpoint.storage import CheckpointStorage, LocalStorage, StorageError

__all__ = [
    "MANIFEST_NAME",
    "CheckpointStorage",
    "FileEntry",
    "LocalStorage",
    "Manifest",
    "ManifestError",
    "SaveOutcome",
    "StorageError",
    "checkpoint_name",
    "decode_parts",
    "encode_parts",
    "find_restorable",
    "prune_checkpoints",
    "rank_stem",
    "save_checkpoint",
    "step_of",
    "verify_checkpoint",
]
