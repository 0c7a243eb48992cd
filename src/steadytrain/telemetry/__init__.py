"""Phase timers, metric and event sinks, progress display, the run summary, and what a run's
files say it cost (its saves, restarts and steps)."""

from steadytrain.telemetry.goodput import Usage, earlier_usage, goodput_fields
from steadytrain.telemetry.health import (
    HealthInputs,
    RunWatch,
    Straggler,
    WatchReading,
    comparable_seconds,
    find_stragglers,
    format_duration,
    headline_signals,
    health_score,
    own_seconds,
    resumes_since_fresh_start,
)
from steadytrain.telemetry.mlflow_tracking import MlflowTracker, resolve_tracking_uri
from steadytrain.telemetry.observers import StepObserver, StepObservers
from steadytrain.telemetry.progress import (
    ConsoleProgress,
    IntervalStats,
    NullProgress,
    Progress,
    interval_record,
)
from steadytrain.telemetry.prometheus import PrometheusSink
from steadytrain.telemetry.recovery import LastProgress, RecoveryReport, last_logged_progress
from steadytrain.telemetry.report import Report, write_report
from steadytrain.telemetry.resources import process_start_time
from steadytrain.telemetry.run_costs import RunCosts, measure_run_costs
from steadytrain.telemetry.sinks import (
    EventLog,
    FanOutSink,
    JsonlSink,
    MetricSink,
    NullSink,
    read_jsonl,
)
from steadytrain.telemetry.status import run_status
from steadytrain.telemetry.tensorboard import TensorBoardSink
from steadytrain.telemetry.timers import PHASES, PhaseTimer

__all__ = [
    "PHASES",
    "ConsoleProgress",
    "EventLog",
    "FanOutSink",
    "HealthInputs",
    "IntervalStats",
    "JsonlSink",
    "LastProgress",
    "MetricSink",
    "MlflowTracker",
    "NullProgress",
    "NullSink",
    "PhaseTimer",
    "Progress",
    "PrometheusSink",
    "RecoveryReport",
    "Report",
    "RunCosts",
    "RunWatch",
    "StepObserver",
    "StepObservers",
    "Straggler",
    "TensorBoardSink",
    "Usage",
    "WatchReading",
    "comparable_seconds",
    "earlier_usage",
    "find_stragglers",
    "format_duration",
    "goodput_fields",
    "headline_signals",
    "health_score",
    "interval_record",
    "last_logged_progress",
    "measure_run_costs",
    "own_seconds",
    "process_start_time",
    "read_jsonl",
    "resolve_tracking_uri",
    "resumes_since_fresh_start",
    "run_status",
    "write_report",
]
