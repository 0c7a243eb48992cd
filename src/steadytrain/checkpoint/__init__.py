"""Checkpoints (Contract 3): what a checkpoint holds, where it lives, saving and committing,
loading with verification and last-good fallback, discovery and retention, async writing.

``train`` hands over a ``CheckpointContents`` (named objects with ``state_dict()`` /
``load_state_dict()``) and a ``RunIdentity``; everything else happens here.
"""

from steadytrain.checkpoint.checkpointer import (
    Checkpointer,
    NoCheckpoints,
    PeriodicCheckpointer,
    build_checkpointer,
)
from steadytrain.checkpoint.contents import CheckpointContents, EventSink, RunIdentity, Stateful
from steadytrain.checkpoint.discovery import (
    check_free_space,
    find_restorable,
    prune_checkpoints,
    remove_leftovers,
    verify_checkpoint,
)
from steadytrain.checkpoint.inspection import CheckpointStatus, inspect_checkpoints
from steadytrain.checkpoint.load import (
    RESTORE_PHASES,
    CheckpointRefused,
    Restored,
    ResumeRequest,
    restore_checkpoint,
)
from steadytrain.checkpoint.location import checkpoint_storage, open_storage
from steadytrain.checkpoint.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    ManifestError,
    checkpoint_name,
    checksum_of,
    step_of,
)
from steadytrain.checkpoint.object_store import ObjectStorage
from steadytrain.checkpoint.read import CorruptCheckpoint, read_parts
from steadytrain.checkpoint.save import SaveOutcome, save_checkpoint, write_snapshot
from steadytrain.checkpoint.snapshot import (
    CheckpointSnapshot,
    PartsSnapshot,
    decode_parts,
    encode_parts,
    host_buffers_like,
    rank_stem,
    snapshot_parts,
    take_snapshot,
)
from steadytrain.checkpoint.storage import (
    BytesPayload,
    CheckpointStorage,
    LocalStorage,
    Payload,
    StorageError,
    replace_durably,
)
from steadytrain.checkpoint.weights import (
    load_final_weights,
    read_checkpoint_part,
    save_final_weights,
)

__all__ = [
    "MANIFEST_NAME",
    "RESTORE_PHASES",
    "BytesPayload",
    "CheckpointContents",
    "CheckpointRefused",
    "CheckpointSnapshot",
    "CheckpointStatus",
    "CheckpointStorage",
    "Checkpointer",
    "CorruptCheckpoint",
    "EventSink",
    "FileEntry",
    "LocalStorage",
    "Manifest",
    "ManifestError",
    "NoCheckpoints",
    "ObjectStorage",
    "PartsSnapshot",
    "Payload",
    "PeriodicCheckpointer",
    "Restored",
    "ResumeRequest",
    "RunIdentity",
    "SaveOutcome",
    "Stateful",
    "StorageError",
    "build_checkpointer",
    "check_free_space",
    "checkpoint_name",
    "checkpoint_storage",
    "checksum_of",
    "decode_parts",
    "encode_parts",
    "find_restorable",
    "host_buffers_like",
    "inspect_checkpoints",
    "load_final_weights",
    "open_storage",
    "prune_checkpoints",
    "rank_stem",
    "read_checkpoint_part",
    "read_parts",
    "remove_leftovers",
    "replace_durably",
    "restore_checkpoint",
    "save_checkpoint",
    "save_final_weights",
    "snapshot_parts",
    "step_of",
    "take_snapshot",
    "verify_checkpoint",
    "write_snapshot",
]
