"""The final weights: one plain safetensors file, written durably at the end of training."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from steadytrain.checkpoint.storage import replace_durably
from steadytrain.checkpoint.tensorfile import tensor_file


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
