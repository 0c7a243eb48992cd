"""``steadytrain status RUN_DIR``: where a run stands, from its files alone.

Reads ``config.yaml``, ``metrics.jsonl`` and ``events.jsonl`` only (never a checkpoint), so it
answers while the run goes on, after it ended, and on a copy of the run directory elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from steadytrain.config import ConfigError
from steadytrain.telemetry.sinks import read_jsonl

RECENT_EVENTS = 8
# Events that end an attempt, and what they mean for the run.
_ENDINGS = {
    "train_end": "finished",
    "preempted": "preempted (exit 75: run the same command again)",
    "diverged": "diverged (exit 5)",
    "hang": "hung (exit 76: the agent restarts it, or run the same command again)",
}
_QUIET_EVENTS = {"eval", "checkpoint_debris_removed"}  # frequent, and shown elsewhere


def run_status(run_dir: Path, *, now: float | None = None) -> dict[str, Any]:
    """The run's progress, health, headline signals, checkpoint, restarts, stragglers and
    recent events, as one JSON-ready dict (the ``--json`` output)."""
    now = time.time() if now is None else now
    config_path, metrics_path = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    events_path = run_dir / "events.jsonl"
    if not config_path.is_file() and not events_path.is_file():
        raise ConfigError(
            f"{run_dir} is not a run directory (no config.yaml, no events.jsonl); give the "
            "directory a run was trained in (its --run-dir)"
        )
    config = yaml.safe_load(config_path.read_text()) or {} if config_path.is_file() else {}
    records = read_jsonl(metrics_path) if metrics_path.is_file() else []
    events = read_jsonl(events_path) if events_path.is_file() else []
    steps = [record for record in records if "step_time_s" in record]
    last = steps[-1] if steps else {}
    max_steps = int(config.get("train", {}).get("max_steps", 0))
    step = int(last.get("step", 0))
    stall_after = float(config.get("telemetry", {}).get("stall_after_s", 120.0))
    # Records come every log.every_steps steps: a healthy run is that long between them.
    log_every = int(config.get("log", {}).get("every_steps", 10))
    quiet_for = stall_after + log_every * float(last.get("step_time_s") or 0.0)
    age = now - float(last["time"]) if "time" in last else None
    rate = float(last.get("steps_per_second") or 0.0)
    checkpoint = _last_of(events, "checkpoint_saved")
    state = _state(events, age=age, stall_after_s=quiet_for if stall_after else 0.0)
    health = {"score": last.get("health_score"), "reasons": last.get("health_reasons", [])}
    if state.startswith("no step logged"):  # the score of a stall (docs/telemetry.md)
        health = {"score": 0, "reasons": [state.split(":")[0]]}
    return {
        "run_dir": str(run_dir),
        "state": state,
        "progress": {
            "step": step,
            "max_steps": max_steps,
            "fraction": step / max_steps if max_steps else None,
            "eta_s": (max_steps - step) / rate if rate > 0 and step < max_steps else None,
            "seconds_since_logged_step": age,
            "loss": last.get("loss"),
            "val_loss": _last_value(records, "val_loss"),
        },
        "health": health,
        "signals": {
            "steps_per_second": last.get("steps_per_second"),
            "samples_per_second": last.get("samples_per_second"),
            "tokens_per_second": last.get("tokens_per_second"),
            "grad_sync_share": last.get("grad_sync_share"),
            "data_wait_s": last.get("data_wait_s"),
            "seconds_since_checkpoint": last.get("seconds_since_checkpoint"),
            "steps_at_risk": last.get("steps_at_risk"),
            "expected_lost_s": last.get("expected_lost_s"),
        },
        "checkpoint": None
        if checkpoint is None
        else {
            "step": checkpoint.get("step"),
            "location": checkpoint.get("location"),
            "seconds_ago": now - float(checkpoint["time"]),
        },
        "usage": {
            key: last.get(key)
            for key in ("device_hours", "steps_computed", "useful_steps", "goodput", "cost")
        },
        # A streamed corpus's shard cache, as rank 0 and its DataLoader workers used it
        # (docs/data.md).
        "data_cache": {
            key.removeprefix("data_cache_"): value
            for key, value in last.items()
            if key.startswith("data_cache_")
        }
        or None,
        "restarts": last.get("restarts", 0),
        "recoveries": [
            {key: event.get(key) for key in ("restart", "resumed_step", "total_s", "warm_start")}
            for event in events
            if event.get("event") == "recovery"
        ],
        "stragglers": {
            "now": last.get("stragglers", []),
            "named": [
                {key: event.get(key) for key in ("step", "rank", "host", "phase", "ratio")}
                for event in events
                if event.get("event") == "straggler"
            ],
        },
        "recent_events": [
            {"event": event["event"], "step": event.get("step"), "seconds_ago": now - event["time"]}
            for event in [e for e in events if e.get("event") not in _QUIET_EVENTS][-RECENT_EVENTS:]
        ],
    }


def _state(events: Sequence[Mapping[str, Any]], *, age: float | None, stall_after_s: float) -> str:
    """finished / preempted / diverged / hung (by the attempt's last ending event), else
    training while steps are recent, else a warning with the time since the last one."""
    attempt = events
    for index in range(len(events) - 1, -1, -1):
        if events[index].get("event") == "train_start":
            attempt = events[index:]
            break
    for event in reversed(attempt):
        if event.get("event") in _ENDINGS:
            return _ENDINGS[str(event["event"])]
    if age is None:
        return "starting (no step logged yet)"
    if stall_after_s and age > stall_after_s:
        return f"no step logged for {age:.0f} s: stalled, or stopped without a word (crashed?)"
    return "training"


def _last_of(events: Sequence[Mapping[str, Any]], kind: str) -> Mapping[str, Any] | None:
    for event in reversed(events):
        if event.get("event") == kind:
            return event
    return None


def _last_value(records: Sequence[Mapping[str, Any]], key: str) -> Any:
    for record in reversed(records):
        if record.get(key) is not None:
            return record[key]
    return None
