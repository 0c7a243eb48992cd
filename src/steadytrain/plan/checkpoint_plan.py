"""``plan checkpoints``: both modes' optima by formula and by simulation, and goodput against
interval around them (docs/planning.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from steadytrain.config import ConfigError
from steadytrain.plan.checkpoint_inputs import PlanInputs
from steadytrain.plan.checkpoints import (
    DEFAULT_NUM_FAILURES,
    async_interval,
    daly_interval,
    young_interval,
)

# The simulated optimum is searched over [optimum / SEARCH_SPAN, optimum × SEARCH_SPAN].
SEARCH_SPAN = 3.0
SEARCH_POINTS = 25
MAX_FAILURES = 10**6  # simulated per interval: beyond it, memory and minutes, no precision


@dataclass(frozen=True)
class ModePlan:
    """One mode's optimum, by formula and by simulation, with its goodput."""

    young_interval_s: float  # Young's, with the cost that blocks (asynchronously: the stall)
    daly_interval_s: float  # Daly's, with the same cost
    optimal_interval_s: float  # Daly's; asynchronously never below the write
    goodput: float  # exact, at optimal_interval_s
    simulated_optimal_interval_s: float
    simulated_goodput: float  # at simulated_optimal_interval_s


@dataclass(frozen=True)
class IntervalGoodput:
    """Goodput at one interval in one mode: exact, and simulated with its standard error."""

    goodput: float
    simulated: float
    standard_error: float


@dataclass(frozen=True)
class SweepPoint:
    interval_s: float
    sync: IntervalGoodput
    asynchronous: IntervalGoodput | None  # None: the stall is unknown

    def mode(self, *, asynchronous: bool) -> IntervalGoodput | None:
        return self.asynchronous if asynchronous else self.sync

    def to_dict(self) -> dict[str, Any]:
        return {
            "interval_s": self.interval_s,
            "sync": asdict(self.sync),
            "async": asdict(self.asynchronous) if self.asynchronous else None,
        }


@dataclass(frozen=True)
class CheckpointPlan:
    inputs: PlanInputs
    sync: ModePlan
    asynchronous: ModePlan | None  # None: the stall is unknown
    sweep: list[SweepPoint]  # intervals around both optima
    current: SweepPoint | None  # at the run's own interval, when a run gave one
    seed: int
    num_failures: int

    @property
    def chosen(self) -> ModePlan:
        """The plan of the mode the recommendation is for."""
        if self.inputs.asynchronous:
            assert self.asynchronous is not None
            return self.asynchronous
        return self.sync

    @property
    def optimal_every_steps(self) -> int | None:
        """The chosen optimum in steps of the run (None without a run's step time)."""
        step_s = self.inputs.step_s
        return max(1, round(self.chosen.optimal_interval_s / step_s)) if step_s else None

    @property
    def current_goodput(self) -> IntervalGoodput | None:
        """Goodput at the run's own interval in the mode the run saved in (None without a
        run's interval, or for an asynchronous run whose stall is unknown)."""
        run_mode = self.inputs.run_asynchronous
        if self.current is None or run_mode is None:
            return None
        return self.current.mode(asynchronous=run_mode)

    def to_dict(self) -> dict[str, Any]:
        """The plan as one JSON-ready dict (the ``--json`` output)."""
        inputs, chosen = self.inputs, self.chosen
        return {
            "mode": _mode_name(inputs.asynchronous),
            "run_mode": _mode_name(inputs.run_asynchronous),
            "optimal_interval_s": chosen.optimal_interval_s,
            "optimal_every_steps": self.optimal_every_steps,
            "goodput_at_optimum": chosen.goodput,
            "simulated_optimal_interval_s": chosen.simulated_optimal_interval_s,
            "simulated_goodput_at_optimum": chosen.simulated_goodput,
            "system_mtbf_s": inputs.mtbf_s,
            "node_mtbf_hours": inputs.node_mtbf_hours,
            "nodes": inputs.num_nodes,
            "checkpoint_s": inputs.checkpoint_s,
            "stall_s": inputs.stall_s,
            "restart_s": inputs.restart_s,
            "step_s": inputs.step_s,
            "current_interval_s": inputs.current_interval_s,
            "sources": dict(inputs.sources),
            "sync": asdict(self.sync),
            "async": asdict(self.asynchronous) if self.asynchronous else None,
            "current": self.current.to_dict() if self.current else None,
            "current_goodput": asdict(current) if (current := self.current_goodput) else None,
            "sweep": [point.to_dict() for point in self.sweep],
            "simulation": {"seed": self.seed, "failures": self.num_failures},
        }


def plan_checkpoints(
    inputs: PlanInputs,
    *,
    num_points: int = 15,
    num_failures: int = DEFAULT_NUM_FAILURES,
    seed: int = 0,
) -> CheckpointPlan:
    """Both modes' optima (by formula and simulated) and goodput at ``num_points`` intervals,
    evenly spaced in log from a quarter of the shorter optimum to four times the longer.

    One seed gives every interval and both modes the same failures, so differences between
    them are the intervals' and the modes', not the draws'.

    Raises:
        ConfigError: fewer than 100 failures to simulate or more than ``MAX_FAILURES``, or a
            negative seed.
    """
    if not 100 <= num_failures <= MAX_FAILURES:
        raise ConfigError(f"--failures must be from 100 to {MAX_FAILURES:,}, got {num_failures}")
    if seed < 0:
        raise ConfigError(f"--seed must be 0 or more, got {seed}")
    sync = _mode_plan(inputs, asynchronous=False, num_failures=num_failures, seed=seed)
    asynchronous = (
        _mode_plan(inputs, asynchronous=True, num_failures=num_failures, seed=seed)
        if inputs.stall_s is not None
        else None
    )
    optima = [plan.optimal_interval_s for plan in (sync, asynchronous) if plan is not None]
    intervals = np.geomspace(min(optima) / 4, max(optima) * 4, num_points)
    current = inputs.current_interval_s
    return CheckpointPlan(
        inputs=inputs,
        sync=sync,
        asynchronous=asynchronous,
        sweep=[
            _sweep_point(inputs, float(interval), num_failures=num_failures, seed=seed)
            for interval in intervals
        ],
        current=_sweep_point(inputs, current, num_failures=num_failures, seed=seed)
        if current
        else None,
        seed=seed,
        num_failures=num_failures,
    )


def goodput_curve(
    plan: CheckpointPlan, *, num_points: int = 200
) -> tuple[list[float], list[float], list[float] | None]:
    """Exact goodput over the plan's sweep, densely: the intervals, sync, async (or None)."""
    first, last = plan.sweep[0].interval_s, plan.sweep[-1].interval_s
    intervals = [float(x) for x in np.geomspace(first, last, num_points)]
    inputs = plan.inputs
    sync = [inputs.goodput(x, asynchronous=False) for x in intervals]
    if inputs.stall_s is None:
        return intervals, sync, None
    return intervals, sync, [inputs.goodput(x, asynchronous=True) for x in intervals]


def _mode_plan(inputs: PlanInputs, *, asynchronous: bool, num_failures: int, seed: int) -> ModePlan:
    mtbf_s = inputs.mtbf_s
    cost = inputs.stall_s if asynchronous and inputs.stall_s is not None else inputs.checkpoint_s
    daly = daly_interval(cost, mtbf_s)
    optimal = (
        async_interval(stall_s=cost, write_s=inputs.checkpoint_s, mtbf_s=mtbf_s)
        if asynchronous
        else daly
    )
    search = [
        float(x) for x in np.geomspace(optimal / SEARCH_SPAN, optimal * SEARCH_SPAN, SEARCH_POINTS)
    ]

    def simulated(interval_s: float) -> float:
        return inputs.simulate(
            interval_s, asynchronous=asynchronous, num_failures=num_failures, seed=seed
        ).goodput

    best = _peak(search, [simulated(x) for x in search])
    return ModePlan(
        young_interval_s=young_interval(cost, mtbf_s),
        daly_interval_s=daly,
        optimal_interval_s=optimal,
        goodput=inputs.goodput(optimal, asynchronous=asynchronous),
        simulated_optimal_interval_s=best,
        simulated_goodput=simulated(best),
    )


def _peak(intervals: Sequence[float], goodputs: Sequence[float]) -> float:
    """The interval of the highest goodput, refined by a parabola through it and its two
    neighbours in log(interval) (the grid is even in log)."""
    best = int(np.argmax(goodputs))
    if best in (0, len(goodputs) - 1):
        return intervals[best]
    low, mid, high = goodputs[best - 1], goodputs[best], goodputs[best + 1]
    curvature = low - 2 * mid + high
    if curvature >= 0:  # flat: nothing to refine
        return intervals[best]
    offset = 0.5 * (low - high) / curvature  # in grid steps, within [-0.5, 0.5]
    return intervals[best] * math.exp(offset * math.log(intervals[best + 1] / intervals[best]))


def _sweep_point(
    inputs: PlanInputs, interval_s: float, *, num_failures: int, seed: int
) -> SweepPoint:
    def at_interval(asynchronous: bool) -> IntervalGoodput:
        simulated = inputs.simulate(
            interval_s, asynchronous=asynchronous, num_failures=num_failures, seed=seed
        )
        exact = inputs.goodput(interval_s, asynchronous=asynchronous)
        return IntervalGoodput(exact, simulated.goodput, simulated.standard_error)

    return SweepPoint(
        interval_s, at_interval(False), at_interval(True) if inputs.stall_s is not None else None
    )


def _mode_name(asynchronous: bool | None) -> str | None:
    return None if asynchronous is None else "async" if asynchronous else "sync"
