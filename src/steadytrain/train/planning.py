"""Where the model meets the memory planner: ``plan memory --config`` builds the config's model
on the meta device (no memory, no initialization), counts it, and plans for its shape."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from steadytrain.config import Config
from steadytrain.model import GPT, build_model
from steadytrain.plan import GPTShape, MemoryPlan, plan_memory


def memory_flag_overrides(
    *, seq_len: int | None, micro_batch: int | None, precision: str | None
) -> list[str]:
    """``plan memory``'s --seq-len, --micro-batch and --precision as ``--set`` overrides, so
    that they apply before the model is built (the GPT's positions follow the sequence)."""
    flags: dict[str, object] = {
        "data.seq_len": seq_len,
        "train.micro_batch_size": micro_batch,
        "train.precision": precision,
    }
    return [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]


def gpt_shape(model: nn.Module) -> GPTShape | None:
    """The shape of the default GPT; None for any other model (or a GPT without blocks)."""
    if type(model) is not GPT or not len(model.blocks):
        return None
    block: Any = model.blocks[0]
    return GPTShape(
        num_layers=len(model.blocks),
        width=model.token_embedding.embedding_dim,
        num_heads=block.attention.num_heads,
        vocab_size=model.token_embedding.num_embeddings,
        max_seq_len=model.max_seq_len,
    )


@dataclass(frozen=True)
class ConfigMemoryPlan:
    plan: MemoryPlan
    warnings: list[str] = field(default_factory=list)  # for the user, one line each


def plan_config_memory(
    config: Config, *, world_size: int, gpu_memory_gb: float, headroom: float
) -> ConfigMemoryPlan:
    """The memory plan of ``config``'s model at its precision, micro-batch, sequence length
    and ``parallel`` settings.

    Raises:
        ConfigError: a value that cannot describe a run (``plan_memory``).
    """
    with torch.device("meta"):
        model = build_model(config)
    parameters = list(model.parameters())
    warnings = []
    other_dtypes = sorted({str(p.dtype) for p in parameters if p.dtype != torch.float32})
    if other_dtypes:
        warnings.append(
            f"the model has {', '.join(other_dtypes)} parameters; the plan counts 4 bytes "
            "(fp32) for each, so it overestimates"
        )
    plan = plan_memory(
        sum(p.numel() for p in parameters),
        world_size=world_size,
        gpu_memory_gb=gpu_memory_gb,
        precision=config.train.precision,
        shape=gpt_shape(model),
        micro_batch_size=config.train.micro_batch_size,
        seq_len=config.data.seq_len,
        headroom=headroom,
        parallel=config.parallel,
    )
    return ConfigMemoryPlan(plan, warnings)
