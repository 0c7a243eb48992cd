"""Phase timers, metric and event sinks, progress display and the run summary."""

from steadytrain.telemetry.observers import StepObserver, StepObservers
from steadytrain.telemetry.progress import (
    ConsoleProgress,
    IntervalStats,
    NullProgress,
    Progress,
    interval_record,
)
from steadytrain.telemetry.sinks import EventLog, JsonlSink, MetricSink, NullSink, read_jsonl
from steadytrain.telemetry.timers import PHASES, PhaseTimer

__all__ = [
    "PHASES",
    "ConsoleProgress",
    "EventLog",
    "IntervalStats",
    "JsonlSink",
    "MetricSink",
    "NullProgress",
    "NullSink",
    "PhaseTimer",
    "Progress",
    "StepObserver",
    "StepObservers",
    "interval_record",
    "read_jsonl",
]
