"""Step observers: features that watch the loop (watchdog heartbeat, telemetry) without
adding branches to ``fit()``. Observers only observe; control flow goes through the agreed
step decision."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class StepObserver(Protocol):
    """Called by the loop, in the training thread; each call must return quickly."""

    def step_started(self, *, step: int) -> None: ...

    def phase_started(self, phase: str, *, step: int) -> None: ...

    def phase_ended(self, phase: str, *, step: int, seconds: float) -> None: ...

    def step_ended(self, *, step: int, action: str, seconds: float) -> None: ...

    def event(self, kind: str, fields: dict[str, Any]) -> None: ...


class QuietObserver:
    """A base for observers that watch a few calls: every call does nothing until overridden."""

    def step_started(self, *, step: int) -> None:
        return None

    def phase_started(self, phase: str, *, step: int) -> None:
        return None

    def phase_ended(self, phase: str, *, step: int, seconds: float) -> None:
        return None

    def step_ended(self, *, step: int, action: str, seconds: float) -> None:
        return None

    def event(self, kind: str, fields: dict[str, Any]) -> None:
        return None


class StepObservers:
    """Fans every call out to ``observers`` in order (none: each call is an empty loop)."""

    def __init__(self, observers: Sequence[StepObserver] = ()) -> None:
        self.observers = list(observers)
        self._step = 0

    def step_started(self, *, step: int) -> None:
        self._step = step
        for observer in self.observers:
            observer.step_started(step=step)

    def phase_started(self, phase: str) -> None:
        for observer in self.observers:
            observer.phase_started(phase, step=self._step)

    def phase_ended(self, phase: str, *, seconds: float) -> None:
        for observer in self.observers:
            observer.phase_ended(phase, step=self._step, seconds=seconds)

    def step_ended(self, *, step: int, action: str, seconds: float) -> None:
        for observer in self.observers:
            observer.step_ended(step=step, action=action, seconds=seconds)

    def event(self, kind: str, fields: dict[str, Any]) -> None:
        for observer in self.observers:
            observer.event(kind, fields)
