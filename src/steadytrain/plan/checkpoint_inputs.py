"""The inputs of ``plan checkpoints``: each figure given, else measured by a run, else (the
restart, the mode) its default; each checked to be in range (docs/planning.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from steadytrain.config import ConfigError
from steadytrain.plan.checkpoints import (
    Schedule,
    SimulatedGoodput,
    async_schedule,
    exact_goodput,
    simulate_goodput,
    sync_schedule,
    system_mtbf_seconds,
)

# A restart when nothing measured one: failure detection, the agent's respawn, imports,
# process-group set-up and a checkpoint read on a cluster node (docs/planning.md).
DEFAULT_RESTART_S = 120.0
# The ranges a plan is computed over: wide enough for any job, narrow enough that no
# exponential over- or underflows (docs/planning.md).
MTBF_HOURS_RANGE = (1e-3, 1e7)  # 3.6 s to 1,141 years per node
MAX_NODES = 10**7
SECONDS_RANGE = (1e-6, 1e9)  # a save or stall: a microsecond to 31 years
FIGURE_FLAGS = {
    "checkpoint_s": "--checkpoint-seconds",
    "stall_s": "--stall-seconds",
    "restart_s": "--restart-seconds",
}


@dataclass(frozen=True)
class RunFigures:
    """What a run measured, as plain numbers (``steadytrain.telemetry.measure_run_costs``
    reads them from its files); None where it measured nothing."""

    name: str  # the run directory, as messages name it
    asynchronous: bool  # the mode the run saved in (its checkpoint.async_save)
    every_steps: int  # its checkpoint.every_steps
    step_s: float | None  # its seconds per step, the checkpoint phase left out
    checkpoint_s: float | None  # C, its save until durable
    stall_s: float | None  # S, what its asynchronous saves blocked
    restart_s: float | None  # R, its restarts
    sources: Mapping[str, str] = field(default_factory=dict)  # per figure: how, or why not


@dataclass(frozen=True)
class PlanInputs:
    """The figures a plan is computed from, and where each came from (``sources``)."""

    node_mtbf_hours: float
    num_nodes: int
    checkpoint_s: float  # C: a save's write, from its start until durable
    stall_s: float | None  # S: what an asynchronous save blocks (its snapshot); None: unknown
    restart_s: float  # R: from a failure until training again
    asynchronous: bool  # the mode the recommendation is for
    sources: dict[str, str]  # per figure: "given", "default", or what a run measured
    step_s: float | None = None  # a run's seconds per step, its checkpoint phase left out
    current_every_steps: int | None = None  # a run's checkpoint.every_steps
    run_asynchronous: bool | None = None  # the mode the run saved in (None: no run)

    @property
    def mtbf_s(self) -> float:
        return system_mtbf_seconds(self.node_mtbf_hours, num_nodes=self.num_nodes)

    @property
    def current_interval_s(self) -> float | None:
        """A run's own interval in seconds of computing (None without a run, or with
        checkpointing off)."""
        if not self.current_every_steps or not self.step_s:
            return None
        return self.current_every_steps * self.step_s

    def schedule(self, interval_s: float, *, asynchronous: bool) -> Schedule:
        if not asynchronous:
            return sync_schedule(interval_s, checkpoint_s=self.checkpoint_s)
        assert self.stall_s is not None
        return async_schedule(interval_s, stall_s=self.stall_s, write_s=self.checkpoint_s)

    def goodput(self, interval_s: float, *, asynchronous: bool) -> float:
        """The exact goodput at ``interval_s``."""
        schedule = self.schedule(interval_s, asynchronous=asynchronous)
        return exact_goodput(schedule, mtbf_s=self.mtbf_s, restart_s=self.restart_s)

    def simulate(
        self, interval_s: float, *, asynchronous: bool, num_failures: int, seed: int
    ) -> SimulatedGoodput:
        """The simulated goodput at ``interval_s``."""
        return simulate_goodput(
            self.schedule(interval_s, asynchronous=asynchronous),
            mtbf_s=self.mtbf_s,
            restart_s=self.restart_s,
            num_failures=num_failures,
            seed=seed,
        )


def plan_inputs(
    *,
    node_mtbf_hours: float,
    num_nodes: int = 1,
    checkpoint_s: float | None = None,
    stall_s: float | None = None,
    restart_s: float | None = None,
    asynchronous: bool | None = None,
    run: RunFigures | None = None,
) -> PlanInputs:
    """The inputs of a plan: each figure as given, else as ``run`` measured it, else (the
    restart, the mode: synchronous) its default. Only a figure the plan needs must be known:
    C always, S for an asynchronous plan.

    Raises:
        ConfigError: a figure is out of range, or needed and neither given nor measured.
    """
    _check_range("--mtbf-hours", node_mtbf_hours, *MTBF_HOURS_RANGE)
    if not 1 <= num_nodes <= MAX_NODES:
        raise ConfigError(f"--nodes must be from 1 to {MAX_NODES:,}, got {num_nodes}")
    sources: dict[str, str] = {}
    given = {"checkpoint_s": checkpoint_s, "stall_s": stall_s, "restart_s": restart_s}
    resolved = {
        name: _given_or_measured(name, value, run, sources) for name, value in given.items()
    }
    if resolved["restart_s"] is None:
        resolved["restart_s"], sources["restart_s"] = DEFAULT_RESTART_S, "default"
    if asynchronous is not None:
        mode, sources["mode"] = asynchronous, "given"
    elif run is not None:
        mode, sources["mode"] = run.asynchronous, run.sources.get("mode", run.name)
    else:
        mode, sources["mode"] = False, "default"
    checkpoint = resolved["checkpoint_s"]
    if checkpoint is None:
        raise ConfigError(_missing("checkpoint_s", run))
    if mode and resolved["stall_s"] is None:
        raise ConfigError(_missing("stall_s", run))
    restart = resolved["restart_s"]
    assert restart is not None
    mtbf_s = system_mtbf_seconds(node_mtbf_hours, num_nodes=num_nodes)
    if restart >= mtbf_s:
        raise ConfigError(
            f"the restart ({restart:g} s, {sources['restart_s']}) is not shorter than the "
            f"system MTBF ({mtbf_s:g} s, --mtbf-hours / --nodes): such a job hardly ever gets "
            "going; check both, or give --restart-seconds"
        )
    return PlanInputs(
        node_mtbf_hours=node_mtbf_hours,
        num_nodes=num_nodes,
        checkpoint_s=checkpoint,
        stall_s=resolved["stall_s"],
        restart_s=restart,
        asynchronous=mode,
        sources=sources,
        step_s=run.step_s if run else None,
        current_every_steps=run.every_steps if run else None,
        run_asynchronous=run.asynchronous if run else None,
    )


def _given_or_measured(
    name: str, given: float | None, run: RunFigures | None, sources: dict[str, str]
) -> float | None:
    """The flag's value if given, else the run's measurement (None: neither), in range."""
    flag = FIGURE_FLAGS[name]
    low = 0.0 if name == "restart_s" else SECONDS_RANGE[0]
    if given is not None:
        _check_range(flag, given, low, SECONDS_RANGE[1])
        sources[name] = "given"
        return given
    measured = getattr(run, name) if run is not None else None
    if measured is None or run is None:
        return None
    source = run.sources.get(name, run.name)
    _check_range(flag, measured, low, SECONDS_RANGE[1], measured_by=source)
    sources[name] = source
    return float(measured)


def _check_range(
    flag: str, value: float, low: float, high: float, *, measured_by: str | None = None
) -> None:
    if low <= value <= high:  # False for NaN
        return
    bounds = f"from {low:g} to {high:g}"
    if measured_by is not None:
        raise ConfigError(
            f"{measured_by} measured {value:g} s, not {bounds} s; give {flag} instead"
        )
    raise ConfigError(f"{flag} must be a number {bounds}, got {value:g}")


def _missing(name: str, run: RunFigures | None) -> str:
    """What to give for ``name`` (C, or S for an asynchronous plan) that nothing supplied."""
    flag = FIGURE_FLAGS[name]
    if name == "checkpoint_s":
        if run is None:
            return f"give {flag} (what a save takes), or --run RUN_DIR to measure it"
        return f"{run.sources.get(name, run.name)}; give {flag}"
    if run is None:
        return f"--async needs {flag} (what an asynchronous save blocks training for)"
    return f"{run.sources.get(name, run.name)}; give {flag}, or --sync"
