"""The parallelism wrapper: DDP (with its communication settings) or FSDP2, activation
checkpointing, gradient-sync timing, and the global gradient norm."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from steadytrain.config import Config, powersgd_start_step
from steadytrain.distributed.comm_hooks import (
    GradientSync,
    TimedHookState,
    build_gradient_sync,
    timed_hook,
)
from steadytrain.distributed.compiling import compile_in_place
from steadytrain.distributed.fsdp import checkpoint_activations, set_gradient_sync, shard_model
from steadytrain.distributed.runtime import Runtime, keep_until_exit

_IN_SYNC = contextlib.nullcontext()  # backward syncs as it always does


class GradSyncClock:
    """Wall time during which at least one gradient all-reduce was in flight.

    DDP overlaps the all-reduce of each bucket with the rest of backward, so this is the
    union of the buckets' in-flight intervals, not time added to the step. On CUDA the
    intervals end when the collective's future completes, which is close to, not exactly,
    when the device finished it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._intervals: list[tuple[float, float]] = []

    def record(self, start: float, end: float) -> None:
        with self._lock:
            self._intervals.append((start, end))

    def take_seconds(self) -> float:
        """Seconds covered since the last call; resets the clock."""
        with self._lock:
            intervals, self._intervals = sorted(self._intervals), []
        covered, reach = 0.0, float("-inf")
        for start, end in intervals:
            if end <= reach:
                continue
            covered += end - max(start, reach)
            reach = end
        return covered


class ParallelModel:
    """A model prepared for this runtime: call ``module``, save ``unwrapped``.

    Across ranks it is DDP with ``config.parallel``'s buckets, gradient views, static graph
    and communication hook, or FSDP2 (``parallel.strategy: fsdp``: ``unwrapped`` is then the
    sharded model itself, its parameters DTensors); refuse what cannot work with
    ``check_gradient_sync`` first. ``current_step`` tells the hook which step it syncs
    (PowerSGD starts at a step).
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        runtime: Runtime,
        config: Config,
        current_step: Callable[[], int] = lambda: 0,
    ) -> None:
        self.unwrapped = module.to(runtime.device)
        self.grad_sync_clock = GradSyncClock()
        self.module: nn.Module = self.unwrapped
        self.comm_hook: GradientSync | None = None  # the hook DDP calls per bucket
        self.sharded = False  # FSDP: parameters, gradients and optimizer state are DTensors
        settings = config.parallel
        if settings.activation_checkpointing:
            checkpoint_activations(self.unwrapped)
        if config.train.compile:
            # The inner module, before DDP or FSDP wraps it, as PyTorch advises (compiling.py).
            compile_in_place(self.unwrapped)
        if not runtime.is_distributed:
            return
        if settings.strategy == "fsdp":
            shard_model(
                self.unwrapped,
                device_type=runtime.device.type,
                world_size=runtime.world_size,
                precision=config.train.precision,
                record_sync=self.grad_sync_clock.record,
            )
            self.sharded = True
            return
        # DDP broadcasts rank 0's parameters here, so all ranks start identical.
        ddp = DistributedDataParallel(
            self.unwrapped,
            device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
            bucket_cap_mb=settings.bucket_cap_mb,
            gradient_as_bucket_view=settings.gradient_as_bucket_view,
            static_graph=settings.static_graph,
        )
        self.comm_hook = build_gradient_sync(
            settings,
            backend=runtime.backend,
            powersgd_start_step=powersgd_start_step(config),
            current_step=current_step,
        )
        ddp.register_comm_hook(
            state=TimedHookState(self.comm_hook, self.grad_sync_clock.record), hook=timed_hook
        )
        self.module = ddp
        keep_until_exit(ddp)  # its reducer's gloo group must never be destroyed

    def gradient_sync(self, *, enabled: bool) -> contextlib.AbstractContextManager[None]:
        """Inside, backward syncs gradients only if ``enabled`` (``no_sync`` otherwise)."""
        if self.sharded:
            set_gradient_sync(self.unwrapped, enabled=enabled)
        elif not enabled and isinstance(self.module, DistributedDataParallel):
            return self.module.no_sync()
        return _IN_SYNC

    def gradient_norm(self) -> torch.Tensor:
        """The L2 norm of all synced gradients, the same on every rank (on the device).

        Under FSDP each rank holds a shard of every gradient: the shards' partial norms are
        summed by an all-reduce of one number (a collective, every step).
        """
        grads = [p.grad for p in self.unwrapped.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return norm

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's full weights in host memory, under their parameter names.

        Under FSDP a collective: every rank calls it, the shards are gathered, and only
        rank 0 receives the weights (the others get an empty dict).
        """
        if not self.sharded:
            return {name: v.detach().cpu() for name, v in self.unwrapped.state_dict().items()}
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.unwrapped, options=options)
        return {name: value for name, value in weights.items() if isinstance(value, torch.Tensor)}

    def forget_dropped_gradients(self) -> None:
        """Clear what the communication hook remembers of earlier steps' gradients.

        For a step whose update is dropped (skipped, or rolled back past): PowerSGD has
        folded its gradients, non-finite ones included, into its error feedback, which
        would otherwise poison every later step. The other hooks remember nothing.
        """
        if self.comm_hook is not None:
            self.comm_hook.forget()
