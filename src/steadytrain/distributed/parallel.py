"""The parallelism wrapper: DDP now (FSDP2 later), with gradient-sync timing."""

# No "from __future__ import annotations": DDP checks the comm hook's real annotations.
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from steadytrain.distributed.runtime import Runtime, keep_until_exit


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
    """A model prepared for this runtime: call ``module``, save ``unwrapped``."""

    def __init__(self, module: nn.Module, *, runtime: Runtime) -> None:
        self.unwrapped = module.to(runtime.device)
        self.grad_sync_clock = GradSyncClock()
        self.module: nn.Module
        if runtime.is_distributed:
            # DDP broadcasts rank 0's parameters here, so all ranks start identical.
            ddp = DistributedDataParallel(
                self.unwrapped,
                device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
            )
            ddp.register_comm_hook(
                state=_HookState(self.grad_sync_clock, runtime.world_size),
                hook=_timed_mean_allreduce,
            )
            self.module = ddp
            keep_until_exit(ddp)  # its reducer's gloo group must never be destroyed
        else:
            self.module = self.unwrapped

    @contextlib.contextmanager
    def gradient_sync(self, *, enabled: bool) -> Iterator[None]:
        """Inside, backward syncs gradients only if ``enabled`` (``no_sync`` otherwise)."""
        if enabled or not isinstance(self.module, DistributedDataParallel):
            yield
        else:
            with self.module.no_sync():
                yield


class _HookState:
    def __init__(self, clock: GradSyncClock, world_size: int) -> None:
        self.clock = clock
        self.world_size = world_size


def _timed_mean_allreduce(
    state: _HookState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    # Same math as DDP's default hook (divide, then sum), plus a record of the interval.
    started = time.perf_counter()
    buffer = bucket.buffer()
    buffer.div_(state.world_size)
    work: Any = dist.all_reduce(buffer, async_op=True)

    def finish(future: torch.futures.Future[Any]) -> torch.Tensor:
        state.clock.record(started, time.perf_counter())
        return future.value()[0]

    return work.get_future().then(finish)
