"""Goodput and cost: how much of the devices' time went into steps that count.

``steps_computed`` counts every step a process ran, including the ones recomputed after a
restart (the work since the last checkpoint) and after a rollback, and the ones whose update
the non-finite guard dropped; ``useful_steps`` is the progress reached less the dropped ones.
``device_seconds`` is the world size times each attempt's wall time, from its process start
(or its ``train_start`` event) to its last record. Earlier attempts are read back from the run
directory's files, so their steps are exact with ``log.every_steps: 1`` and a lower bound
otherwise (the steps after an attempt's last logged one leave no trace); the current attempt
counts every step it runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Usage:
    device_seconds: float = 0.0
    steps_computed: int = 0

    def plus(self, other: Usage) -> Usage:
        return Usage(
            self.device_seconds + other.device_seconds, self.steps_computed + other.steps_computed
        )


# Events a process writes while it starts, before its ``train_start``: they belong to the
# attempt that follows, and must not stretch the one before it over the time in between.
STARTUP_EVENTS = frozenset(
    {
        "resume",
        "checkpoint_rejected",
        "checkpoint_debris_removed",
        "checkpoint_space_low",
        "config_changed",
        "identity_override",
        "rng_reseeded",
        "prometheus_started",
    }
)


def earlier_usage(
    events: Sequence[Mapping[str, Any]],
    metrics: Sequence[Mapping[str, Any]],
    *,
    before: float | None = None,
) -> Usage:
    """The usage of the attempts recorded in ``events.jsonl`` and ``metrics.jsonl``, since the
    run directory's last fresh start (a ``train_start`` at step 0); records from ``before``
    on (this process's own start) are left out."""
    usage = Usage()
    for attempt in split_attempts(events, metrics, before=before):
        usage = usage.plus(_attempt_usage(attempt))
    return usage


def split_attempts(
    events: Sequence[Mapping[str, Any]],
    metrics: Sequence[Mapping[str, Any]],
    *,
    before: float | None = None,
) -> list[list[Mapping[str, Any]]]:
    """The run's attempts since its last fresh start (a ``train_start`` at step 0), each its
    ``train_start`` event and then, in time order, the training records (``step_time_s``)
    and the events written after it and before the next one. Events a process writes while
    it starts (``STARTUP_EVENTS``) are left out; so are records from ``before`` on."""
    timeline = sorted(
        [
            (float(e["time"]), 0, e)
            for e in events
            if "time" in e and e.get("event") not in STARTUP_EVENTS
        ]
        + [(float(r["time"]), 1, r) for r in metrics if "time" in r and "step_time_s" in r],
        key=lambda item: (item[0], item[1]),
    )
    if before is not None:
        timeline = [item for item in timeline if item[0] < before]
    attempts: list[list[Mapping[str, Any]]] = []
    for _, is_metric, record in timeline:
        if not is_metric and record.get("event") == "train_start":
            if record.get("step") == 0:
                attempts = []
            attempts.append([record])
        elif attempts:
            attempts[-1].append(record)
    return attempts


def _attempt_usage(records: Sequence[Mapping[str, Any]]) -> Usage:
    start = records[0]
    world_size = int(start.get("world_size", 1))
    began = float(start["time"])
    position, computed = int(start.get("step", 0)), 0
    for record in records[1:]:
        if record.get("event") == "recovery" and record.get("process_started_at"):
            began = min(began, float(record["process_started_at"]))
        elif record.get("event") == "rolled_back":
            # Computed through the failing step; the window is passed over, not recomputed,
            # and training goes on after it.
            step = int(record.get("step", position)) + 1
            computed += max(0, step - position)
            position = step
        elif "step_time_s" in record or record.get("event") == "checkpoint_saved":
            step = int(record["step"])  # a checkpoint of step N proves N steps were computed
            computed += max(0, step - position)
            position = max(position, step)
    ended = max(float(record["time"]) for record in records)
    return Usage(device_seconds=world_size * (ended - began), steps_computed=computed)


def goodput_fields(
    usage: Usage, *, useful_steps: int, price_per_device_hour: float | None
) -> dict[str, Any]:
    """The metrics-record fields: device-hours, goodput and (with a price) the cost so far."""
    device_hours = usage.device_seconds / 3600
    # Earlier attempts' counts are lower bounds; every useful step was computed at least once.
    computed = max(usage.steps_computed, useful_steps)
    return {
        "device_hours": device_hours,
        "steps_computed": computed,
        "useful_steps": useful_steps,
        "goodput": useful_steps / computed if computed else None,
        "cost": device_hours * price_per_device_hour if price_per_device_hour is not None else None,
    }
