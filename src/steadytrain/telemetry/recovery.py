"""How long a recovery took, part by part, reported when the first step after a resume ends.

The parts: ``process_start_s`` (from the last logged progress of the attempt that failed to
this process starting: failure detection, the agent's restart, the spawn), ``imports_s``
(interpreter and imports), ``setup_s`` (process group, data, model), ``checkpoint_read_s``
(finding, reading and verifying the checkpoint) and ``first_step_s`` (the first step after
it). The failed attempt's progress is known only as well as ``metrics.jsonl`` logged it, so
``process_start_s`` and ``steps_recomputed`` are exact with ``log.every_steps: 1`` and
otherwise lower bounds.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steadytrain.telemetry.observers import QuietObserver
from steadytrain.telemetry.sinks import MetricSink


@dataclass(frozen=True)
class LastProgress:
    step: int
    time: float


def last_logged_progress(metrics_path: Path, *, tail_bytes: int = 65536) -> LastProgress | None:
    """The newest training record of ``metrics.jsonl`` (read from its tail only)."""
    try:
        with open(metrics_path, "rb") as metrics:
            metrics.seek(max(0, metrics.seek(0, os.SEEK_END) - tail_bytes))
            lines = metrics.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # torn by the crash, or cut by the tail
        if isinstance(record, dict) and "time" in record and "loss" in record:
            return LastProgress(step=int(record["step"]), time=float(record["time"]))
    return None


class RecoveryReport(QuietObserver):
    """A step observer: at the end of the first step after a resume, writes one ``recovery``
    event and one metrics record with the parts of the recovery time.

    ``timeline`` holds ``time.time()`` stamps: ``process_started`` (may be None),
    ``imports_done``, ``setup_done``, and ``checkpoint_read_s``, the restore's seconds.
    ``warm_start``: the process was forked with torch already imported.
    """

    def __init__(
        self,
        *,
        emit: Callable[..., None],
        metrics: MetricSink,
        restart: int,
        resumed_step: int,
        timeline: dict[str, float | None],
        last_progress: LastProgress | None,
        warm_start: bool = False,
    ) -> None:
        self._emit = emit
        self._metrics = metrics
        self._restart = restart
        self._resumed_step = resumed_step
        self._timeline = timeline
        self._last_progress = last_progress
        self._warm_start = warm_start
        self._reported = False

    def step_ended(self, *, step: int, action: str, seconds: float) -> None:
        if self._reported:
            return
        self._reported = True
        report = self.parts(first_step_done=time.time())
        self._emit("recovery", **report)
        self._metrics.write({"step": step + 1, "time": time.time(), "recovery": report})

    def parts(self, *, first_step_done: float) -> dict[str, Any]:
        timeline, last = self._timeline, self._last_progress
        started = timeline["process_started"]
        imports_done, setup_done = timeline["imports_done"], timeline["setup_done"]
        assert imports_done is not None and setup_done is not None
        checkpoint_read = timeline["checkpoint_read_s"] or 0.0
        return {
            "restart": self._restart,
            "resumed_step": self._resumed_step,
            "warm_start": self._warm_start,
            "steps_recomputed": max(0, last.step - self._resumed_step) if last else None,
            "process_start_s": started - last.time if started and last else None,
            "imports_s": imports_done - started if started else None,
            "setup_s": setup_done - imports_done - checkpoint_read,
            "checkpoint_read_s": checkpoint_read,
            "first_step_s": first_step_done - setup_done,
            "total_s": first_step_done - (last.time if last else started or imports_done),
            "process_started_at": started,
            "first_step_done_at": first_step_done,
        }
