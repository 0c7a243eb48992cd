"""The parallelism wrapper: DDP now (FSDP2 later), with its communication settings and
gradient-sync timing."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from steadytrain.config import Config, powersgd_start_step
from steadytrain.distributed.comm_hooks import (
    GradientSync,
    TimedHookState,
    build_gradient_sync,
    timed_hook,
)
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
    """A model prepared for this runtime: call ``module``, save ``unwrapped``.

    Across ranks it is DDP with ``config.parallel``'s buckets, gradient views, static graph
    and communication hook (refuse what cannot work with ``check_gradient_sync`` first).
    ``current_step`` tells the hook which step it syncs (PowerSGD starts at a step).
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
        if not runtime.is_distributed:
            return
        settings = config.parallel
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

    @contextlib.contextmanager
    def gradient_sync(self, *, enabled: bool) -> Iterator[None]:
        """Inside, backward syncs gradients only if ``enabled`` (``no_sync`` otherwise)."""
        if enabled or not isinstance(self.module, DistributedDataParallel):
            yield
        else:
            with self.module.no_sync():
                yield

    def forget_dropped_gradients(self) -> None:
        """Clear what the communication hook remembers of earlier steps' gradients.

        For a step whose update is dropped (skipped, or rolled back past): PowerSGD has
        folded its gradients, non-finite ones included, into its error feedback, which
        would otherwise poison every later step. The other hooks remember nothing.
        """
        if self.comm_hook is not None:
            self.comm_hook.forget()
