"""The final weights: one plain safetensors file, written durably at the end of training."""

from __future__ import annotations

from pathlib import Path

import torch

from steadytrain.checkpoint.storage import replace_durably
from steadytrain.checkpoint.tensorfile import tensor_file


def save_final_weights(model: torch.nn.Module, target: Path) -> Path:
    """Write ``model``'s weights to ``target`` durably: temp file, fsync, rename.

    A plain safetensors file (``format: pt`` metadata, as Hugging Face tools expect); tied
    weights are written under each of their names.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: value.detach().cpu() for name, value in model.state_dict().items()}
    replace_durably(target, tensor_file(tensors, metadata={"format": "pt"}))
    return target
