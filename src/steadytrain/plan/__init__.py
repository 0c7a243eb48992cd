"""Planners: per-rank memory under DDP and FSDP, and the checkpoint interval with a failure
simulator. Pure calculations over numbers the caller supplies (the CLI counts a config's
parameters on the meta device, and passes what telemetry measured of a run)."""

from steadytrain.plan.checkpoint_inputs import (
    DEFAULT_RESTART_S,
    PlanInputs,
    RunFigures,
    plan_inputs,
)
from steadytrain.plan.checkpoint_plan import (
    CheckpointPlan,
    IntervalGoodput,
    ModePlan,
    SweepPoint,
    goodput_curve,
    plan_checkpoints,
)
from steadytrain.plan.checkpoints import (
    DEFAULT_NUM_FAILURES,
    Schedule,
    SimulatedGoodput,
    async_interval,
    async_schedule,
    daly_interval,
    exact_goodput,
    simulate_goodput,
    sync_schedule,
    system_mtbf_seconds,
    young_interval,
)
from steadytrain.plan.gpt_memory import GPTShape
from steadytrain.plan.memory import (
    DEFAULT_HEADROOM,
    GB,
    MemoryPlan,
    Strategy,
    StrategyMemory,
    format_against,
    format_gb,
    plan_memory,
)

__all__ = [
    "DEFAULT_HEADROOM",
    "DEFAULT_NUM_FAILURES",
    "DEFAULT_RESTART_S",
    "GB",
    "CheckpointPlan",
    "GPTShape",
    "IntervalGoodput",
    "MemoryPlan",
    "ModePlan",
    "PlanInputs",
    "RunFigures",
    "Schedule",
    "SimulatedGoodput",
    "Strategy",
    "StrategyMemory",
    "SweepPoint",
    "async_interval",
    "async_schedule",
    "daly_interval",
    "exact_goodput",
    "format_against",
    "format_gb",
    "goodput_curve",
    "plan_checkpoints",
    "plan_inputs",
    "plan_memory",
    "simulate_goodput",
    "sync_schedule",
    "system_mtbf_seconds",
    "young_interval",
]
