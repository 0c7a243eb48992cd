"""Phase timers against controlled sleeps (CPU: every phase's wall time is its cost)."""

from __future__ import annotations

import time
from typing import Any

import torch

from steadytrain.telemetry import PHASES, PhaseTimer, StepObservers

SLACK_S = 0.25  # scheduling on a loaded machine; a sleep never ends early


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def step_started(self, *, step: int) -> None:
        self.calls.append(("step_started", step))

    def phase_started(self, phase: str, *, step: int) -> None:
        self.calls.append(("phase_started", phase, step))

    def phase_ended(self, phase: str, *, step: int, seconds: float) -> None:
        self.calls.append(("phase_ended", phase, step))

    def step_ended(self, *, step: int, action: str, seconds: float) -> None:
        self.calls.append(("step_ended", step))

    def event(self, kind: str, fields: dict[str, Any]) -> None:
        self.calls.append(("event", kind))


def test_each_phase_is_charged_its_own_sleep_and_the_step_their_sum() -> None:
    recorder = Recorder()
    timer = PhaseTimer(device=torch.device("cpu"), observers=StepObservers([recorder]))
    timer.start_step(7)
    with timer.phase("data_wait"):
        time.sleep(0.05)
    with timer.phase("forward"):
        time.sleep(0.10)
    with timer.phase("forward"):  # a second micro-step adds to the same phase
        time.sleep(0.05)
    timer.add("grad_sync", 0.03)  # measured elsewhere (the all-reduce hook)
    step_seconds, phases = timer.end_step()
    assert 0.05 <= phases["data_wait"] < 0.05 + SLACK_S
    assert 0.15 <= phases["forward"] < 0.15 + SLACK_S
    assert phases["grad_sync"] == 0.03
    assert phases["backward"] == phases["optimizer"] == 0.0
    assert set(phases) == set(PHASES)
    assert phases["data_wait"] + phases["forward"] <= step_seconds < 0.20 + SLACK_S
    assert not timer.sampling  # CPU: no device syncs, every step exact
    assert recorder.calls == [
        ("step_started", 7),
        ("phase_started", "data_wait", 7),
        ("phase_ended", "data_wait", 7),
        ("phase_started", "forward", 7),
        ("phase_ended", "forward", 7),
        ("phase_started", "forward", 7),
        ("phase_ended", "forward", 7),
    ]


def test_a_new_step_starts_from_zero() -> None:
    timer = PhaseTimer(device=torch.device("cpu"))
    timer.start_step(0)
    with timer.phase("optimizer"):
        time.sleep(0.02)
    timer.end_step()
    timer.start_step(1)
    _, phases = timer.end_step()
    assert phases["optimizer"] == 0.0
