"""What a run's own files say its checkpoints and restarts cost (``plan checkpoints --run``).

Read from ``config.yaml`` (``checkpoint.async_save``, ``checkpoint.every_steps``),
``events.jsonl`` (the timings the checkpointer puts in each ``checkpoint_saved`` event, the
``recovery`` events, and ``train_start`` for the attempts) and ``metrics.jsonl`` (the step
time), since the run's last fresh start. Medians throughout, so one slow save or a first step
that compiles does not move them. A figure the run did not measure is None, and
``RunCosts.source`` says why.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steadytrain.config import ConfigError, load_config
from steadytrain.telemetry.goodput import split_attempts
from steadytrain.telemetry.sinks import read_jsonl

# A recovery's restart when the command was run again: from the new process's start.
_RESTART_PARTS = ("imports_s", "setup_s", "checkpoint_read_s", "first_step_s")


@dataclass(frozen=True)
class RunCosts:
    """A run's measured checkpoint and restart costs, in seconds (docs/planning.md)."""

    run_dir: Path
    asynchronous: bool  # its checkpoint.async_save: the mode of the saves measured
    every_steps: int  # its checkpoint.every_steps
    log_every_steps: int  # its log.every_steps
    blocked_s: float | None  # training blocked by a save, the wait for an earlier one left out
    waited_s: float | None  # training waiting for the previous background save
    write_s: float | None  # writing and committing (asynchronously: in the background)
    num_saves: int  # saves in the run's mode that carry timings
    num_untimed_saves: int  # checkpoint_saved events without timings (an earlier steadytrain)
    restart_s: float | None  # from a failure (or the new process) to the first step done
    num_recoveries: int
    num_agent_restarts: int  # recoveries after torchrun's agent restarted the group
    step_s: float | None  # seconds per step, its checkpoint phase left out
    num_intervals: int  # logged intervals the step time is the median of

    @property
    def checkpoint_s(self) -> float | None:
        """C, the save until durable: the background write asynchronously, all of the
        blocking synchronously."""
        return self.write_s if self.asynchronous else self.blocked_s

    @property
    def stall_s(self) -> float | None:
        """S, what an asynchronous save blocks (its snapshot); a synchronous run has none."""
        return self.blocked_s if self.asynchronous else None

    def source(self, figure: str) -> str:
        """How ``figure`` (``checkpoint_s``, ``stall_s``, ``restart_s`` or ``mode``) was
        measured, or why it was not, in words that start with the run directory."""
        run = str(self.run_dir)
        if figure == "mode":
            return f"{run}: checkpoint.async_save in config.yaml"
        if figure == "restart_s":
            return self._restart_source()
        if figure == "stall_s" and not self.asynchronous:
            return f"{run} saved synchronously, so it measured no asynchronous stall"
        if not self.num_saves:
            return self._no_saves()
        if figure == "stall_s":
            return f"{run}: median snapshot of {self.num_saves} asynchronous save(s)"
        if self.asynchronous:
            return f"{run}: median background write of {self.num_saves} save(s)"
        return f"{run}: median of {self.num_saves} synchronous save(s)"

    def _no_saves(self) -> str:
        run, mode = str(self.run_dir), "asynchronous" if self.asynchronous else "synchronous"
        if self.num_untimed_saves:
            return (
                f"{run}: its {self.num_untimed_saves} checkpoint_saved event(s) hold no save "
                "timings (an earlier steadytrain wrote them)"
            )
        if self.every_steps == 0:
            return f"{run} saved no checkpoints (checkpoint.every_steps: 0)"
        return f"{run} has no {mode} checkpoint_saved event"

    def _restart_source(self) -> str:
        run = str(self.run_dir)
        if not self.num_recoveries:
            return f"{run} has no recovery event"
        source = f"{run}: median of {self.num_recoveries} recovery event(s)"
        if self.num_agent_restarts:
            # total_s starts at the failed attempt's last logged record (docs/planning.md).
            source += (
                f", {self.num_agent_restarts} by torchrun's agent: each from its last logged "
                f"step, so up to log.every_steps ({self.log_every_steps}) steps of lost "
                "computing are in it"
            )
        return source


def measure_run_costs(run_dir: Path) -> RunCosts:
    """The save, write, restart and step costs ``run_dir`` measured (None: not measured).

    Raises:
        ConfigError: ``run_dir`` is not a run directory, or its config does not load.
    """
    config_path, events_path = run_dir / "config.yaml", run_dir / "events.jsonl"
    if not config_path.is_file() or not events_path.is_file():
        raise ConfigError(
            f"{run_dir} is not a run directory (no config.yaml or events.jsonl); give the "
            "directory a run was trained in (its --run-dir)"
        )
    config = load_config(config_path)
    metrics_path = run_dir / "metrics.jsonl"
    attempts = split_attempts(
        _timed(read_jsonl(events_path)),
        _timed(read_jsonl(metrics_path) if metrics_path.is_file() else []),
    )
    events = [record for attempt in attempts for record in attempt if "event" in record]
    asynchronous = config.checkpoint.async_save
    saves = [e for e in events if e["event"] == "checkpoint_saved"]
    timed = [e for e in saves if _timings(e) is not None and e["async_save"] == asynchronous]
    restarts = [
        (seconds, bool(event.get("restart")))
        for event in events
        if event["event"] == "recovery" and (seconds := _restart_seconds(event)) is not None
    ]
    steps = _step_seconds(attempts)
    return RunCosts(
        run_dir=run_dir,
        asynchronous=asynchronous,
        every_steps=config.checkpoint.every_steps,
        log_every_steps=config.log.every_steps,
        blocked_s=_median(_positive(e["blocked_s"]) for e in timed),
        waited_s=_median(_finite(e["waited_s"]) for e in timed),
        write_s=_median(_positive(e["write_s"]) for e in timed),
        num_saves=len(timed),
        num_untimed_saves=sum(_timings(e) is None for e in saves),
        restart_s=_median(seconds for seconds, _ in restarts),
        num_recoveries=len(restarts),
        num_agent_restarts=sum(by_agent for _, by_agent in restarts),
        step_s=_median(steps),
        num_intervals=len(steps),
    )


def _timed(records: Iterable[Any]) -> list[dict[str, Any]]:
    """The records that are JSON objects with a numeric ``time`` (others are not ours)."""
    return [r for r in records if isinstance(r, dict) and _finite(r.get("time")) is not None]


def _timings(save: Mapping[str, Any]) -> tuple[float, float, float] | None:
    """A ``checkpoint_saved`` event's timings (blocked, waited, write), when it has them all
    and each is a duration; None for an event written before saves were timed."""
    blocked, waited, write = (_finite(save.get(f)) for f in ("blocked_s", "waited_s", "write_s"))
    if blocked is None or waited is None or write is None or min(blocked, waited, write) < 0:
        return None
    if not isinstance(save.get("async_save"), bool):
        return None
    return blocked, waited, write


def _step_seconds(attempts: Sequence[Sequence[Mapping[str, Any]]]) -> list[float]:
    """Each logged interval's seconds per step, its checkpoint phase left out.

    A record covers the steps after the previous record of its attempt (the first one: after
    the attempt's ``train_start``) up to its own ``step``. An interval that holds a rollback
    is left out: its time includes restoring a checkpoint (the steps passed over are not
    recomputed, so the count of steps stays right).
    """
    seconds: list[float] = []
    for attempt in attempts:
        previous = int(_finite(attempt[0].get("step")) or 0)
        rolled_back = False
        for record in attempt[1:]:
            if record.get("event") == "rolled_back":
                rolled_back = True
            if "step_time_s" not in record or _finite(record.get("step")) is None:
                continue
            step = int(record["step"])
            num_steps, previous = step - previous, max(previous, step)
            if num_steps <= 0 or rolled_back:  # not advancing: a duplicate, or edited
                rolled_back = False
                continue
            step_time, checkpoint = _finite(record["step_time_s"]), _checkpoint_s(record, num_steps)
            if step_time is not None and checkpoint is not None:
                value = _positive(step_time - checkpoint / num_steps)
                if value is not None:
                    seconds.append(value)
    return seconds


def _checkpoint_s(record: Mapping[str, Any], num_steps: int) -> float | None:
    """Checkpoint-phase seconds over a record's interval of ``num_steps`` steps.

    ``checkpoint_s`` is a mean over the interval's unsynced steps; on CUDA the synced ones
    (``synced_steps``) have theirs apart, as ``synced_checkpoint_s``.
    """
    num_synced = min(num_steps, int(_finite(record.get("synced_steps")) or 0))
    synced, unsynced = _finite(record.get("synced_checkpoint_s", 0.0)), 0.0
    if num_steps > num_synced:
        unsynced = _finite(record.get("checkpoint_s")) or 0.0
    if synced is None:
        return None
    return synced * num_synced + unsynced * (num_steps - num_synced)


def _restart_seconds(event: Mapping[str, Any]) -> float | None:
    """A recovery's restart: from the failed attempt's last logged record when torchrun's
    agent restarted the group (``total_s``); from the process start when the command was run
    again (the wait before it is no cost of the job)."""
    if event.get("restart"):
        return _positive(event.get("total_s"))
    parts = [_finite(event.get(part)) for part in _RESTART_PARTS]
    known = [part for part in parts if part is not None]
    return _positive(sum(known)) if known else None


def _median(values: Iterable[float | None]) -> float | None:
    measured = [value for value in values if value is not None]
    return statistics.median(measured) if measured else None


def _finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool); else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _positive(value: Any) -> float | None:
    number = _finite(value)
    return number if number is not None and number > 0 else None
