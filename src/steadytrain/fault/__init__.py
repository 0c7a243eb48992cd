"""Failure handling: preemption signals, the agreed step decision, the hang watchdog."""

from steadytrain.fault.decision import StepAction, StepDecision, StepGuard, StopReason
from steadytrain.fault.preemption import GraceDeadline, PreemptionSignals

__all__ = [
    "GraceDeadline",
    "PreemptionSignals",
    "StepAction",
    "StepDecision",
    "StepGuard",
    "StopReason",
]
