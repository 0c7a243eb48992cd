"""DDP communication hooks from the config: PyTorch's own, each timed for ``grad_sync``.

Every bucket goes through ``timed_hook``, which calls the configured hook (PyTorch's mean
all-reduce, fp16 or bf16 compression, or PowerSGD) and records the interval from the call to
its future's completion. The settings that cannot work on this backend are refused by
``check_gradient_sync`` before any model is wrapped.
"""

# No "from __future__ import annotations": DDP checks the comm hook's real annotations.
import time
from collections.abc import Callable
from typing import Protocol

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from steadytrain.config import BatchLayout, ConfigError, ParallelConfig

# PyTorch's minimum for PowerSGD with error feedback: DDP rebuilds its buckets after the first
# sync, and PowerSGD's memory is per bucket, so the first two syncs of a process are plain.
POWERSGD_SETTLING_SYNCS = 2

StatelessHook = Callable[[dist.ProcessGroup, dist.GradBucket], torch.futures.Future[torch.Tensor]]
_STATELESS_HOOKS: dict[str, StatelessHook] = {
    "allreduce": default_hooks.allreduce_hook,
    "fp16": default_hooks.fp16_compress_hook,
    "bf16": default_hooks.bf16_compress_hook,
}


# DDP's own settings at their defaults; under FSDP any other value would be silently ignored.
DDP_ONLY_DEFAULTS = {
    "bucket_cap_mb": None,
    "gradient_as_bucket_view": False,
    "static_graph": False,
    "comm_hook": "allreduce",
}


def check_gradient_sync(settings: ParallelConfig, *, backend: str, layout: BatchLayout) -> None:
    """Refuse DDP settings that cannot work with this backend, batch layout or strategy.

    Raises:
        ConfigError: one line naming the field and the fix.
    """
    if settings.strategy == "fsdp":
        for field, default in DDP_ONLY_DEFAULTS.items():
            value = getattr(settings, field)
            if value != default:
                raise ConfigError(
                    f"parallel.{field}: {value!r} is a DDP setting and parallel.strategy is "
                    "'fsdp', which reduce-scatters gradients its own way; remove "
                    f"parallel.{field} or set parallel.strategy=ddp"
                )
        return
    if layout.world_size == 1:
        return  # no DDP, nothing to refuse
    if settings.static_graph and layout.grad_accum_steps > 1:
        per_rank = layout.micro_batch_size * layout.grad_accum_steps
        raise ConfigError(
            "parallel.static_graph: DDP's static graph fails with gradient accumulation "
            f"(no_sync) in torch {torch.__version__.split('+')[0]} (pytorch#143580), and this "
            f"run accumulates {layout.grad_accum_steps} micro-steps at {layout.world_size} "
            f"ranks; set train.micro_batch_size={per_rank} (no accumulation) or "
            "parallel.static_graph=false"
        )
    if settings.comm_hook == "bf16" and backend == "nccl" and torch.cuda.nccl.version() < (2, 10):
        found = ".".join(map(str, torch.cuda.nccl.version()))
        raise ConfigError(
            f"parallel.comm_hook: 'bf16' needs NCCL 2.10 or newer for bfloat16 all-reduce, "
            f"and this torch has NCCL {found}; use 'fp16' or 'allreduce'"
        )


class GradientSync(Protocol):
    """What DDP's hook calls for each bucket; ``forget`` drops memory of earlier steps."""

    def __call__(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]: ...

    def forget(self) -> None: ...


def build_gradient_sync(
    settings: ParallelConfig,
    *,
    backend: str,
    powersgd_start_step: int,
    current_step: Callable[[], int],
) -> GradientSync:
    """The configured hook, ready to be called per bucket (run ``check_gradient_sync`` first)."""
    world = dist.group.WORLD
    assert world is not None, "the process group starts before the model is wrapped"
    if settings.comm_hook != "powersgd":
        return StatelessSync(_STATELESS_HOOKS[settings.comm_hook], world)
    return PowerSGDSync(
        world,
        rank=settings.powersgd_rank,
        start_step=powersgd_start_step,
        current_step=current_step,
        # PyTorch's hook waits for its second and third all-reduce inside the completion
        # callback of the one before, and gloo runs completion callbacks on its worker
        # threads: with two or more buckets in flight the ranks hang at the first compressed
        # step (seen with torch 2.13, 2 ranks). On gloo a bucket starts once the one before
        # it is done.
        one_bucket_at_a_time=backend == "gloo",
    )


class StatelessSync:
    """One of PyTorch's hooks that keep nothing between steps: mean, fp16 or bf16."""

    def __init__(self, hook: StatelessHook, group: dist.ProcessGroup) -> None:
        self.hook = hook
        self.group = group

    def __call__(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        return self.hook(self.group, bucket)

    def forget(self) -> None:
        """Nothing to forget."""


class PowerSGDSync:
    """PyTorch's PowerSGD hook from ``start_step`` on; PyTorch's mean all-reduce before.

    PowerSGD keeps per-bucket memory across steps: each rank's compression error (fed back
    into the next step's gradient) and the low-rank factors it warm-starts from. That memory
    lives in this process only: a restarted process starts it afresh (docs/scaling.md).
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        *,
        rank: int,
        start_step: int,
        current_step: Callable[[], int],
        one_bucket_at_a_time: bool,
    ) -> None:
        self.group = group
        self.state = powerSGD_hook.PowerSGDState(
            process_group=group,
            matrix_approximation_rank=rank,
            start_powerSGD_iter=POWERSGD_SETTLING_SYNCS,
        )
        self.start_step = start_step
        self.current_step = current_step
        self.one_bucket_at_a_time = one_bucket_at_a_time
        self._in_flight: torch.futures.Future[torch.Tensor] | None = None

    def __call__(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        # Until it has seen the settling syncs, PowerSGD's own hook all-reduces (and counts).
        settled = self.state.iter >= self.state.start_powerSGD_iter
        if settled and self.current_step() < self.start_step:
            return default_hooks.allreduce_hook(self.group, bucket)
        if self.one_bucket_at_a_time and self._in_flight is not None:
            self._in_flight.wait()
        future = powerSGD_hook.powerSGD_hook(self.state, bucket)
        self._in_flight = None if bucket.is_last() else future  # the last bucket ends a sync
        return future

    def forget(self) -> None:
        """Drop the error feedback and the warm-start factors: the next compressed step
        starts from zero error and freshly drawn factors, as the first one did."""
        self.state.error_dict.clear()
        self.state.p_memory_dict.clear()
        self.state.q_memory_dict.clear()

    def compression_rate(self) -> float:
        """Elements before over elements after compression, over all compressed steps so
        far (0 before the first)."""
        return float(self.state.compression_stats()[0])


class TimedHookState:
    """What DDP passes to ``timed_hook``: the gradient sync and where its intervals go."""

    def __init__(self, sync: GradientSync, record: Callable[[float, float], None]) -> None:
        self.sync = sync
        self.record = record


def timed_hook(
    state: TimedHookState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """Run the configured hook on ``bucket``; record from this call to its completion."""
    started = time.perf_counter()
    future = state.sync(bucket)

    def finish(done: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
        state.record(started, time.perf_counter())
        return done.value()

    return future.then(finish)
