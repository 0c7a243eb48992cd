"""Model weights on their own: the final weights file, and one part of a committed checkpoint.

Written durably at the end of training; read back (by ``steadytrain serve``) as a resume reads
a checkpoint: strictly parsed safetensors, checksums checked where a manifest records them,
never unpickled.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from steadytrain.checkpoint.discovery import verify_checkpoint
from steadytrain.checkpoint.manifest import Manifest
from steadytrain.checkpoint.read import CorruptCheckpoint, read_parts
from steadytrain.checkpoint.snapshot import SHARED_STEM
from steadytrain.checkpoint.storage import CheckpointStorage, replace_durably
from steadytrain.checkpoint.tensorfile import TensorFileError, tensor_file, tensors_from_bytes


def save_final_weights(weights: Mapping[str, torch.Tensor], target: Path) -> Path:
    """Write ``weights`` (a model's full state dict) to ``target`` durably: temp file, fsync,
    rename.

    A plain safetensors file (``format: pt`` metadata, as Hugging Face tools expect); tied
    weights are written under each of their names.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: value.detach().cpu() for name, value in weights.items()}
    replace_durably(target, tensor_file(tensors, metadata={"format": "pt"}))
    return target


def load_final_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a final weights file, its header checked strictly (nothing unpickled).

    No manifest records its checksum: the format check is what verifies it.

    Raises:
        CorruptCheckpoint: the file is missing, cut short or not a well-formed safetensors file.
    """
    try:
        return tensors_from_bytes(path.read_bytes())
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{path}: missing") from None
    except TensorFileError as error:
        raise CorruptCheckpoint(f"{path}: {error}") from None


def read_checkpoint_part(
    storage: CheckpointStorage, name: str, *, part: str = "model", template: Any = None
) -> tuple[Manifest, Any]:
    """One replicated part's state (by default the model's) from committed checkpoint ``name``.

    Verified as a resume verifies: the manifest and file sizes first, then every byte read
    checked against its manifest checksum. ``template`` (the part's own state) lays out a
    sharded (FSDP) checkpoint's tensors; without one they are assembled in full on the host.

    Raises:
        CorruptCheckpoint: the checkpoint is uncommitted, incomplete, corrupted or has no
            such part.
        OSError: storage that cannot be read (not the checkpoint's fault).
    """
    manifest, problems = verify_checkpoint(storage, name, read_files=False)
    if manifest is None or problems:
        raise CorruptCheckpoint(f"{storage.describe(name)}: {'; '.join(problems)}")
    layouts = {} if template is None else {part: template}
    states = read_parts(storage, name, manifest, stem=SHARED_STEM, templates=lambda: layouts)
    if part not in states:
        raise CorruptCheckpoint(f"{storage.describe(name)}: holds no {part} state")
    return manifest, states[part]
