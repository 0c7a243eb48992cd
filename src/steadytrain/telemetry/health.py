"""The three headline signals, stragglers and the health score (docs/telemetry.md).

Pure functions over what the loop already measures, plus ``RunWatch``, a step observer that
keeps what they need between logged steps (the last durable checkpoint, skipped steps,
stragglers named) and raises the stall alarm from a daemon thread.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from steadytrain.telemetry.goodput import Usage, goodput_fields

# Phases in which a rank computes or loads; the others wait for peers (grad_sync) or are
# shared work done at the same step boundary by every rank (checkpoint).
OWN_PHASES = ("data_wait", "h2d", "forward", "backward", "optimizer")
# Phases the stall alarm waits out: long by nature, and guarded by the hang watchdog's allowance.
QUIET_PHASES = ("eval", "checkpoint")


@dataclass(frozen=True)
class Straggler:
    rank: int
    host: str
    ratio: float  # its own time per step / the median of the other ranks'
    phase: str  # the phase where it spent the most time beyond the others' median
    own_s: float
    others_median_s: float

    def reason(self) -> str:
        return f"rank {self.rank} slow ({self.phase}, {self.ratio:.1f}× the others)"


def own_seconds(phases: Mapping[str, float]) -> float:
    """Seconds per step a rank spent computing and loading, not waiting in collectives.

    DDP's gradient all-reduce overlaps backward, and a rank that waits for a slow peer waits
    inside it: ``grad_sync_s`` (the time with an all-reduce in flight) is taken out of
    ``backward_s``. That also takes out communication that overlapped real work, the same for
    every rank, so ranks stay comparable.
    """
    total = sum(phases.get(f"{name}_s", 0.0) for name in OWN_PHASES)
    return max(0.0, total - phases.get("grad_sync_s", 0.0))


def comparable_seconds(
    per_rank: Sequence[Mapping[str, Any]], *, exact_only: bool
) -> list[dict[str, Any]] | None:
    """Each rank's host and per-step phase seconds, as a straggler check may compare them.

    On CPU, the measured phases. On CUDA (``exact_only``) an unsynced phase time is the time
    its kernels took to launch, not to run, so only the synced samples count: each rank's
    ``synced_<phase>_s`` under the plain names; None when a rank has no synced sample in
    the interval (the check waits for an interval that has one).
    """
    if not exact_only:
        return [dict(entry) for entry in per_rank]
    exact = []
    for entry in per_rank:
        synced = {
            key.removeprefix("synced_"): value
            for key, value in entry.items()
            if key.startswith("synced_")
        }
        if not synced:
            return None
        exact.append({"host": entry.get("host", ""), **synced})
    return exact


def find_stragglers(per_rank: Sequence[Mapping[str, Any]], *, ratio: float) -> list[Straggler]:
    """Ranks slower than ``ratio`` × the median of the others, in their own time per step.

    ``per_rank[r]`` holds rank r's ``host`` and its per-step phase seconds (``forward_s``…).
    A synchronous step takes the slowest rank's time on every rank, so step times cannot tell;
    own time (``own_seconds``) can. One rank alone has no others to compare with.
    """
    if len(per_rank) < 2:
        return []
    own = [own_seconds(entry) for entry in per_rank]
    found = []
    for rank, entry in enumerate(per_rank):
        others = [entry_own for other, entry_own in enumerate(own) if other != rank]
        median = statistics.median(others)
        if median <= 0 or own[rank] <= ratio * median:
            continue
        excess = {
            name: entry.get(f"{name}_s", 0.0)
            - statistics.median(
                [o.get(f"{name}_s", 0.0) for other, o in enumerate(per_rank) if other != rank]
            )
            for name in OWN_PHASES
        }
        found.append(
            Straggler(
                rank=rank,
                host=str(entry.get("host", "")),
                ratio=own[rank] / median,
                phase=max(excess, key=lambda name: excess[name]),
                own_s=own[rank],
                others_median_s=median,
            )
        )
    return found


@dataclass(frozen=True)
class HealthInputs:
    step_time_s: float
    grad_sync_share: float
    data_wait_share: float
    seconds_since_checkpoint: float | None  # None: checkpointing is off
    checkpoint_interval_s: float | None  # every_steps × step time; None when off
    restarts: int
    skipped_steps: int  # in the interval just logged
    stragglers: Sequence[Straggler] = ()
    stalled_s: float | None = None


def health_score(inputs: HealthInputs) -> tuple[int, list[str]]:
    """A score from 0 to 100 and its reasons, the largest first (docs/telemetry.md).

    100 minus penalties, each bounded; a stall is 0 by itself.
    """
    if inputs.stalled_s is not None:
        return 0, [f"no step for {format_duration(inputs.stalled_s)}"]
    penalties: list[tuple[float, str]] = []
    if inputs.grad_sync_share > 0.25:
        penalties.append(
            (
                min(30.0, (inputs.grad_sync_share - 0.25) * 100),
                f"grad sync {inputs.grad_sync_share:.0%} of step time",
            )
        )
    if inputs.data_wait_share > 0.10:
        penalties.append(
            (
                min(20.0, (inputs.data_wait_share - 0.10) * 100),
                f"data wait {inputs.data_wait_share:.0%} of step time",
            )
        )
    if inputs.seconds_since_checkpoint is None:
        penalties.append((15.0, "checkpointing is off"))
    elif inputs.checkpoint_interval_s is not None:
        overdue = inputs.seconds_since_checkpoint / max(inputs.checkpoint_interval_s, 60.0)
        if overdue > 2:
            penalties.append(
                (
                    min(25.0, (overdue - 2) * 10),
                    f"no checkpoint for {format_duration(inputs.seconds_since_checkpoint)}",
                )
            )
    if inputs.restarts:
        plural = "s" if inputs.restarts > 1 else ""
        penalties.append((min(15.0, 5.0 * inputs.restarts), f"{inputs.restarts} restart{plural}"))
    if inputs.skipped_steps:
        penalties.append(
            (
                min(20.0, 10.0 * inputs.skipped_steps),
                f"{inputs.skipped_steps} non-finite step(s) skipped",
            )
        )
    for straggler in inputs.stragglers[:2]:
        penalties.append((10.0, straggler.reason()))
    penalties.sort(key=lambda penalty: -penalty[0])
    score = 100.0 - sum(penalty for penalty, _ in penalties)
    return max(0, round(score)), [reason for _, reason in penalties]


def format_duration(seconds: float, *, digits: int | None = None) -> str:
    """``45 s``, ``38 min``, ``2.5 h``: a duration as people read it; with ``digits``, to that
    many significant digits and below a second in ms (``250 ms``, ``12.5 s``, ``38.2 min``)."""
    if digits is not None:
        for unit, size, below in (("ms", 0.001, 1.0), ("s", 1.0, 120.0), ("min", 60.0, 7200.0)):
            if seconds < below:
                return f"{seconds / size:.{digits}g} {unit}"
        return f"{seconds / 3600:.{digits}g} h"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class WatchReading:
    """The watch at a log step: recovery posture, skipped steps since the last reading,
    restarts and device usage (``RunWatch.reading``)."""

    seconds_since_checkpoint: float
    steps_at_risk: int
    skipped: int
    restarts: int
    usage: Usage


class RunWatch:
    """A step observer on rank 0: what the headline signals need between logged steps, and
    the stall alarm (a ``stall`` event when no step has completed for ``stall_after_s``).
    """

    def __init__(
        self,
        *,
        emit: Callable[..., None],
        stall_after_s: float,
        restarts: int,
        world_size: int = 1,
        earlier: Usage | None = None,
        process_started: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._emit = emit
        self._clock = clock
        self.restarts = restarts
        self._world_size = world_size
        self._earlier = earlier or Usage()
        self._process_started = clock() if process_started is None else process_started
        self._computed = 0
        self._lock = threading.Lock()
        self._protected_since = clock()  # work before this is in a durable checkpoint
        self._protected_step: int | None = None
        self._last_step_done = clock()
        self._last_step = -1
        self._skipped = 0
        self._stall_after_s = stall_after_s
        self._stalled = False
        self._quiet = False
        self._named: set[int] = set()
        self._streaks: dict[int, int] = {}
        self._confirmed: list[Straggler] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if stall_after_s > 0:
            self._thread = threading.Thread(
                target=self._watch, name="steadytrain-stall-alarm", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        self._stop.set()

    # StepObserver ---------------------------------------------------------------------
    def step_started(self, *, step: int) -> None:
        return None

    def phase_started(self, phase: str, *, step: int) -> None:
        if phase in QUIET_PHASES:  # long by nature: evaluation, a synchronous save
            with self._lock:
                self._quiet = True

    def phase_ended(self, phase: str, *, step: int, seconds: float) -> None:
        if phase in QUIET_PHASES:
            with self._lock:  # the stall clock restarts when the long phase ends
                self._quiet, self._last_step_done = False, self._clock()

    def step_ended(self, *, step: int, action: str, seconds: float) -> None:
        with self._lock:
            self._last_step_done, self._last_step = self._clock(), step
            self._computed += 1
            self._skipped += action == "skip"
            stalled, self._stalled = self._stalled, False
        if stalled:
            self._emit("stall_cleared", step=step + 1)

    def event(self, kind: str, fields: dict[str, Any]) -> None:
        if kind == "checkpoint_saved":  # written once the checkpoint is committed
            with self._lock:
                self._protected_since = float(fields.get("time", self._clock()))
                self._protected_step = int(fields["step"])

    # Signals --------------------------------------------------------------------------
    def confirm(
        self, candidates: Sequence[Straggler], *, checks: int
    ) -> tuple[list[Straggler], list[Straggler]]:
        """Of this check's ``candidates``, the stragglers (over the ratio at ``checks``
        consecutive checks) and those just named (each gets one event per spell)."""
        streaks = {c.rank: self._streaks.get(c.rank, 0) + 1 for c in candidates}
        self._streaks = streaks
        confirmed = [c for c in candidates if streaks[c.rank] >= checks]
        new = [c for c in confirmed if c.rank not in self._named]
        self._named = {c.rank for c in confirmed}
        self._confirmed = confirmed
        return confirmed, new

    def last_confirmed(self) -> list[Straggler]:
        """The stragglers of the last check (for an interval with nothing to check)."""
        return list(self._confirmed)

    def is_stalled(self) -> bool:
        """Whether the stall alarm is raised now (until the next step completes)."""
        with self._lock:
            return self._stalled

    def seconds_since_step(self) -> float:
        """Seconds since the last step completed (or since this watch began)."""
        with self._lock:
            return self._clock() - self._last_step_done

    def usage(self) -> Usage:
        """Device time and steps computed: earlier attempts' and this process's so far."""
        with self._lock:
            computed = self._computed
        now = Usage(self._world_size * (self._clock() - self._process_started), computed)
        return self._earlier.plus(now)

    def take_skipped(self) -> int:
        """Steps skipped since the last call."""
        with self._lock:
            skipped, self._skipped = self._skipped, 0
        return skipped

    def reading(self, *, step: int, resumed_step: int) -> WatchReading:
        """What a log step's record reports of the watch, now (and the skips since the last
        reading)."""
        since, at_risk = self.posture(step=step, resumed_step=resumed_step)
        return WatchReading(
            seconds_since_checkpoint=since,
            steps_at_risk=at_risk,
            skipped=self.take_skipped(),
            restarts=self.restarts,
            usage=self.usage(),
        )

    def posture(self, *, step: int, resumed_step: int) -> tuple[float, int]:
        """Seconds of work not yet in a durable checkpoint, and the steps at risk."""
        with self._lock:
            since, protected = self._protected_since, self._protected_step
        return self._clock() - since, step - (protected if protected is not None else resumed_step)

    def _watch(self) -> None:
        period = min(1.0, self._stall_after_s / 4)
        while not self._stop.wait(period):
            with self._lock:  # armed by the first step: setup and compilation are not stalls
                idle = self._clock() - self._last_step_done
                due = (
                    self._last_step >= 0
                    and not self._quiet
                    and idle > self._stall_after_s
                    and not self._stalled
                )
                if due:
                    self._stalled = True
                step = self._last_step + 1
            if due:
                with contextlib.suppress(OSError, ValueError):  # the event log may be closing
                    self._emit("stall", step=step, seconds_without_step=round(idle, 1))


def headline_signals(
    record: Mapping[str, Any],
    *,
    reading: WatchReading,
    per_rank: Sequence[Mapping[str, Any]] | None,
    hosts: Sequence[str],
    stragglers: Sequence[Straggler],
    checkpoint_every_steps: int,
    useful_steps: int,
    price_per_device_hour: float | None = None,
) -> dict[str, Any]:
    """The fields a logged step adds to its metrics record: the three headline signals
    (forward progress, communication cost, recovery posture) and the health score, from the
    watch's ``reading`` taken at that step."""
    step_time = float(record["step_time_s"])
    since, at_risk, skipped = (
        reading.seconds_since_checkpoint,
        reading.steps_at_risk,
        reading.skipped,
    )
    interval_s = checkpoint_every_steps * step_time if checkpoint_every_steps else None
    score, reasons = health_score(
        HealthInputs(
            step_time_s=step_time,
            grad_sync_share=float(record["grad_sync_share"]),
            data_wait_share=float(record["data_wait_s"]) / step_time if step_time > 0 else 0.0,
            seconds_since_checkpoint=since if checkpoint_every_steps else None,
            checkpoint_interval_s=interval_s,
            restarts=reading.restarts,
            skipped_steps=skipped,
            stragglers=stragglers,
        )
    )
    return {
        "steps_per_second": 1.0 / step_time if step_time > 0 else 0.0,
        "seconds_since_checkpoint": since,
        "steps_at_risk": at_risk,
        # A failure at a uniformly random moment loses half an interval on average.
        "expected_lost_s": interval_s / 2 if interval_s is not None else None,
        "restarts": reading.restarts,
        "skipped_in_interval": skipped,
        "stragglers": [straggler.rank for straggler in stragglers],
        # None when the interval had nothing comparable (CUDA without a synced sample).
        "rank_own_s": [own_seconds(entry) for entry in per_rank] if per_rank is not None else None,
        "rank_hosts": list(hosts),
        "health_score": score,
        "health_reasons": reasons[:3],
        **goodput_fields(
            reading.usage, useful_steps=useful_steps, price_per_device_hour=price_per_device_hour
        ),
    }


def resumes_since_fresh_start(events: Sequence[Mapping[str, Any]]) -> int:
    """How often this run has come back from a checkpoint after its processes stopped:
    ``resume`` events after the run directory's last fresh start (a ``train_start`` at step
    0), less the ones a rollback wrote (each followed by ``rolled_back``)."""
    count = 0
    for event in events:
        kind = event.get("event")
        if kind == "train_start" and event.get("step") == 0:
            count = 0
        elif kind == "resume":
            count += 1
        elif kind == "rolled_back":
            count -= 1
    return max(0, count)
