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

from steadytrain.telemetry.observers import StepObservers

PHASES = ("data_wait", "h2d", "forward", "backward", "grad_sync", "optimizer", "checkpoint")


class PhaseTimer:
    """Accumulates seconds per phase for the current step and tells ``observers``."""

    def __init__(
        self,
        *,
        device: torch.device,
        sync_every: int = 50,
        observers: StepObservers | None = None,
    ) -> None:
        self.observers = observers or StepObservers()
        self._sync_device = device.type == "cuda"
        self._sync_every = max(1, sync_every)
        self._step_number = 0
        self._seconds = dict.fromkeys(PHASES, 0.0)
        self._step_started = time.perf_counter()

    @property
    def sampling(self) -> bool:
        """Whether this step pays device syncs for exact phase times."""
        return self._sync_device and self._step_number % self._sync_every == 0

    def start_step(self, step: int = 0) -> None:
        self.observers.step_started(step=step)
        self._seconds = dict.fromkeys(PHASES, 0.0)
        if self.sampling:
            torch.cuda.synchronize()  # device sync (sampled steps only)
        self._step_started = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.observers.phase_started(name)
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.sampling:
                torch.cuda.synchronize()  # device sync (sampled steps only)
            seconds = time.perf_counter() - started
            # Phases outside the step contract (evaluation) are only seen by the observers.
            self._seconds[name] = self._seconds.get(name, 0.0) + seconds
            self.observers.phase_ended(name, seconds=seconds)

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
