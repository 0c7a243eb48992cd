"""Phase timers for the step contract.

On CPU a phase's wall time is its cost. On CUDA kernels run asynchronously, so an honest
per-phase time needs a device sync at each phase boundary; that sync is only paid on every
``sync_every``-th step (sampled steps), and other steps record host-side times.
"""

from __future__ import annotations

import time
from types import TracebackType

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
        self._phases: dict[str, _Phase] = {}

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

    def phase(self, name: str) -> _Phase:
        """A context that times ``name`` (reused: a plain object is cheaper per micro-step
        than a generator-based context manager)."""
        phase = self._phases.get(name)
        if phase is None:
            phase = self._phases[name] = _Phase(self, name)
        return phase

    def _phase_ended(self, name: str, started: float) -> None:
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


class _Phase:
    """One phase's timing context; nested entries of the same phase are timed separately."""

    __slots__ = ("_name", "_started", "_timer")

    def __init__(self, timer: PhaseTimer, name: str) -> None:
        self._timer, self._name = timer, name
        self._started: list[float] = []

    def __enter__(self) -> None:
        self._timer.observers.phase_started(self._name)
        self._started.append(time.perf_counter())

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._timer._phase_ended(self._name, self._started.pop())
