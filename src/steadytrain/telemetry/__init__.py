"""Phase timers, metric and event sinks, progress display and the run summary."""

from steadytrain.telemetry.observers import StepObserver, StepObservers
from steadytrain.telemetry.progress import (
    ConsoleProgress,
    IntervalStats,
    NullProgress,
    Progress,
    interval_record,
)
from steadytrain.telemetry.recovery import LastProgress, RecoveryReport, last_logged_progress
from steadytrain.telemetry.resources import process_start_time
from steadytrain.telemetry.sinks import EventLog, JsonlSink, MetricSink, NullSink, read_jsonl
from steadytrain.telemetry.timers import PHASES, PhaseTimer

__all__ = [
    "PHASES",
    "ConsoleProgress",
    "EventLog",
    "IntervalStats",
    "JsonlSink",
    "LastProgress",
    "MetricSink",
    "NullProgress",
    "NullSink",
    "PhaseTimer",
    "Progress",
    "RecoveryReport",
    "StepObserver",
    "StepObservers",
    "interval_record",
    "last_logged_progress",
    "process_start_time",
    "read_jsonl",
]
