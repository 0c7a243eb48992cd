"""A model factory that writes down what mixed precision looks like from inside a run.

The built-in GPT, plus two observers a user could add to their own model: a forward pre-hook
on the output head (the parameters and activations a forward computes with) and PyTorch's
global optimizer step pre-hook (the parameters the optimizer updates and the gradients it
updates them with, after the gradient reduction). Each rank appends one JSON line per
observation to ``record_dir/rank-N.jsonl``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

from steadytrain.model.gpt import GPT


def kinds(tensors: list[torch.Tensor]) -> list[str]:
    """The distinct 'Type dtype' of ``tensors``, e.g. 'DTensor torch.float32'."""
    return sorted(
        {f"{'DTensor' if isinstance(t, DTensor) else 'Tensor'} {t.dtype}" for t in tensors}
    )


def build_recording_gpt(*, record_dir: str, **kwargs: Any) -> nn.Module:
    model = GPT(**kwargs)
    path = Path(record_dir) / f"rank-{os.environ.get('RANK', '0')}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(record: dict[str, Any]) -> None:
        with path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def before_head(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        write({"at": "forward", "weights": kinds([module.weight]), "inputs": kinds([inputs[0]])})

    def before_step(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        gradients = [p.grad for p in parameters if p.grad is not None]
        write(
            {"at": "optimizer_step", "parameters": kinds(parameters), "gradients": kinds(gradients)}
        )

    model.head.register_forward_pre_hook(before_head)
    register_optimizer_step_pre_hook(before_step)
    return model
