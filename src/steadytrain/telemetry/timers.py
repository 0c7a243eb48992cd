"""Phase timers for the step contract.

On CPU a phase's wall time is its cost. On CUDA kernels run asynchronously, so an honest
per-phase time needs a device sync at each phase boundary; that sync is only paid on every
``sync_every``-th step (sampled steps), and other steps record host-side times.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

PHASES = ("data_wait", "h2d", "forward", "backward", "grad_sync", "optimizer", "checkpoint")


class PhaseTimer:
    """Accumulates seconds per phase for the current step."""

    def __init__(self, *, device: torch.device, sync_every: int = 50) -> None:
        self._sync_device = device.type == "cuda"
        self._sync_every = max(1, sync_every)
        self._step_number = 0
        self._seconds = dict.fromkeys(PHASES, 0.0)
        self._step_started = time.perf_counter()

    @property
    def sampling(self) -> bool:
        """Whether this step pays device syncs for exact phase times."""
        return self._sync_device and self._step_number % self._sync_every == 0

    def start_step(self) -> None:
        self._seconds = dict.fromkeys(PHASES, 0.0)
        if self.sampling:
            torch.cuda.synchronize()  # device sync (sampled steps only)
        self._step_started = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.sampling:
                torch.cuda.synchronize()  # device sync (sampled steps only)
            self._seconds[name] += time.perf_counter() - started

    def add(self, name: str, seconds: float) -> None:
        """Charge time measured elsewhere (e.g. the gradient all-reduce) to ``name``."""
        self._seconds[name] += seconds

    def end_step(self) -> tuple[float, dict[str, float]]:
        """Close the step: its wall time and the seconds of each phase."""
        if self.sampling:
            torch.cuda.synchronize()  # device sync (sampled steps only)
        elapsed = time.perf_counter() - self._step_started
        self._step_number += 1
        return elapsed, dict(self._seconds)
