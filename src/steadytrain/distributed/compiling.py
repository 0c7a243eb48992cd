"""``train.compile``: the model compiled with ``torch.compile``, in place, before DDP or FSDP.

Where: PyTorch's "Where to apply torch.compile?" (docs.pytorch.org/docs/stable/compile/
programming_model.where_to_apply_compile.html) says torch.compile "doesn't handle distributed
wrapper modules like DDP or FSDP very well, so consider applying torch.compile to the inner
module passed to the wrapper", with ``model.compile()`` before
``DistributedDataParallel(model)`` as its example. Dynamo still sees DDP's buckets from inside
(DDPOptimizer splits the graph at them, so all-reduces overlap backward), and skips FSDP2's
hooks (``torch._dynamo.config.skip_fsdp_hooks``), which then run eagerly around the graphs.

How: ``module.compile()``, not ``torch.compile(module)``, as the same page advises: the module
stays itself, so no ``_orig_mod.`` prefix enters a parameter name, a checkpoint or the final
weights, and compiled and eager runs resume each other's checkpoints.

When: the graphs are built by the first forward and backward, inside the first step, which the
hang watchdog gives ``fault.hang_warmup_s`` on top of ``fault.hang_timeout_s``; evaluation (one
more graph, without gradients) has the same allowance.
"""

from __future__ import annotations

import shutil

import torch
from torch import nn

from steadytrain.config import Config, ConfigError

CPU_COMPILERS = ("c++", "g++", "clang++")  # what inductor's CPU code generation calls


def check_compile(config: Config, *, device_type: str) -> None:
    """Refuse ``train.compile`` where it cannot work, before any rank builds a graph.

    ``deterministic: true`` works: inductor's lowerings check
    ``torch.are_deterministic_algorithms_enabled()`` and fall back to the deterministic eager
    kernels for scatter-like ops (the embedding's backward), and the mode is part of its
    cache key.

    Raises:
        ConfigError: one line naming the field and the fix.
    """
    if not config.train.compile:
        return
    if config.parallel.activation_checkpointing:
        # Measured here: backward's recomputation of a block under the compiled root picks
        # other graphs than forward did, and torch.utils.checkpoint refuses the mismatch.
        raise ConfigError(
            "train.compile: parallel.activation_checkpointing's recomputation fails under "
            f"torch.compile in torch {torch.__version__.split('+')[0]} (recomputed tensors "
            "differ from the saved ones, pytorch#166926); set one of them to false"
        )
    if device_type == "cpu" and not any(shutil.which(name) for name in CPU_COMPILERS):
        raise ConfigError(
            "train.compile: on CPU torch.compile generates C++ and no C++ compiler "
            f"({', '.join(CPU_COMPILERS)}) is on PATH; install one (e.g. g++) or set "
            "train.compile=false"
        )


def compile_in_place(module: nn.Module) -> nn.Module:
    """Compile ``module``'s calls (forward and its hooks) lazily, on the first call; in place."""
    module.compile()
    return module
