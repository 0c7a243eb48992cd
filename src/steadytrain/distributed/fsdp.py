"""FSDP2 (PyTorch's ``fully_shard``): each rank holds 1/N of every parameter, its gradient and
its optimizer state; a block's full parameters exist only while it computes.

The blocks (the items of the model's ``nn.ModuleList``s, e.g. the GPT's transformer blocks)
are sharded one by one, then the root with what is left (embeddings, final norm, head), so
one block's parameters are gathered at a time. Sharding renames no parameter: checkpoints
and final weights keep DDP's names.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter


def model_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``module``: every item of its ``nn.ModuleList``s (outermost)."""
    blocks: list[nn.Module] = []
    nested: set[int] = set()
    for child in module.modules():
        if isinstance(child, nn.ModuleList) and id(child) not in nested:
            blocks.extend(child)
            nested.update(id(inner) for block in child for inner in block.modules())
    return blocks


def checkpoint_activations(module: nn.Module) -> int:
    """Recompute each block's activations in backward instead of keeping them.

    The composable ``checkpoint`` hooks the block in place (no wrapper module), so no
    parameter is renamed. Returns the number of blocks.
    """
    blocks = model_blocks(module)
    for block in blocks:
        checkpoint(block)
    return len(blocks)


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """``train.precision``'s FSDP policy: bf16 parameters for compute, gradients reduced in
    fp32 (into the fp32 shards the optimizer updates); fp32: no casts."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(
    module: nn.Module,
    *,
    device_type: str,
    world_size: int,
    precision: str,
    record_sync: Callable[[float, float], None],
) -> nn.Module:
    """``fully_shard`` the blocks, then the root, across all ranks; in place.

    FSDP broadcasts nothing: every rank built the same initial weights (same seed) and keeps
    its slice. Every gradient reduce-scatter is timed into ``record_sync`` (``grad_sync``).
    """
    mesh = init_device_mesh(device_type, (world_size,))
    policy = mixed_precision(precision)
    for block in model_blocks(module):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    for sharded in module.modules():
        if isinstance(sharded, FSDPModule):
            sharded.set_custom_reduce_scatter(TimedReduceScatter(record_sync))
    return module


class TimedReduceScatter(DefaultReduceScatter):
    """FSDP's own reduce-scatter, recording from its call to its completion.

    On CPU the interval ends when the host waited for it; on CUDA when the collective's
    future completes (close to when the device finished), without making the host wait.
    """

    def __init__(self, record: Callable[[float, float], None]) -> None:
        self.record = record

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: dist.ReduceOp.RedOpType,
        async_op: bool = False,
    ) -> dist.Work:
        started = time.perf_counter()
        work = super().__call__(output_tensor, input_tensor, group, op, async_op=True)
        if input_tensor.device.type == "cpu":
            work.wait()
            self.record(started, time.perf_counter())
        else:
            work.get_future().then(lambda _: self.record(started, time.perf_counter()))
            if not async_op:
                work.wait()  # the caller's stream waits for the collective, as FSDP's does
        return work


def set_gradient_sync(module: nn.Module, *, enabled: bool) -> None:
    """Whether the next backward reduce-scatters gradients (off: accumulate locally)."""
    assert isinstance(module, FSDPModule), "sharded by shard_model"
    module.set_requires_gradient_sync(enabled)
