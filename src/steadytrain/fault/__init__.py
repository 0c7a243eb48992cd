"""Failure handling: preemption signals, the agreed step decision, the hang watchdog."""

from steadytrain.fault.chaos import (
    FAULT_KINDS,
    ChaosReport,
    Fault,
    plan_faults,
    run_chaos,
    same_weights,
)
from steadytrain.fault.decision import (
    GuardCounters,
    StepAction,
    StepDecision,
    StepGuard,
    StopReason,
)
from steadytrain.fault.heartbeat import Heartbeat, HeartbeatBoard, Suspect, name_suspect
from steadytrain.fault.preemption import GraceDeadline, PreemptionSignals
from steadytrain.fault.watchdog import (
    HangReport,
    HangWatchdog,
    exit_on_hang,
    hang_dump_dir,
    hang_watchdog,
)

__all__ = [
    "FAULT_KINDS",
    "ChaosReport",
    "Fault",
    "GraceDeadline",
    "GuardCounters",
    "HangReport",
    "HangWatchdog",
    "Heartbeat",
    "HeartbeatBoard",
    "PreemptionSignals",
    "StepAction",
    "StepDecision",
    "StepGuard",
    "StopReason",
    "Suspect",
    "exit_on_hang",
    "hang_dump_dir",
    "hang_watchdog",
    "name_suspect",
    "plan_faults",
    "run_chaos",
    "same_weights",
]
