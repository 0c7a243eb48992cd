"""The checkpoint-interval planner: Young's and Daly's formulas on hand-computed cases, the
simulator against the exact closed form, the inputs' precedence and ranges, and
``steadytrain plan checkpoints`` in process (tests/e2e/test_planners.py runs it on a real
run)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from steadytrain.cli.app import app
from steadytrain.config import ConfigError
from steadytrain.plan import (
    DEFAULT_RESTART_S,
    RunFigures,
    Schedule,
    async_interval,
    async_schedule,
    daly_interval,
    exact_goodput,
    plan_checkpoints,
    plan_inputs,
    simulate_goodput,
    sync_schedule,
    system_mtbf_seconds,
    young_interval,
)
from steadytrain.plan.checkpoint_plan import _peak

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The simulator is held to the closed form within 1% relative, with 20,000 failures at seed 0
# (80,000 where failures come every few checkpoints or restarts are long). Each case also
# checks that the simulation's own standard error is at most 0.25% of the goodput, so 1% is at
# least four standard errors: a correct simulator misses it for fewer than 1 seed in 10,000.
# What it catches: a restart that failures could not interrupt is 10% off in the slow-restart
# regime; one checkpoint too many kept per life is 0.5-89% off (all cases but the 0.5% fail);
# a wrong schedule (the asynchronous exposure forgotten) fails the hand-walked timeline.
TOLERANCE = 0.01
MAX_STANDARD_ERROR = 0.0025


def test_system_mtbf_is_the_node_mtbf_over_the_nodes() -> None:
    # 1000 h per node over 100 nodes: 10 h = 36,000 s.
    assert system_mtbf_seconds(1000.0, num_nodes=100) == pytest.approx(36_000.0)


def test_young_and_daly_on_hand_computed_cases() -> None:
    # C = 50 s, M = 10,000 s: √(2·50·10,000) = √1,000,000 = 1000 s.
    assert young_interval(50.0, 10_000.0) == pytest.approx(1000.0)
    # Daly: C/2M = 0.0025, √ = 0.05; 1000·(1 + 0.05/3 + 0.0025/9) − 50 = 966.944… s.
    assert daly_interval(50.0, 10_000.0) == pytest.approx(1000 * (1 + 0.05 / 3 + 0.0025 / 9) - 50)
    assert daly_interval(50.0, 10_000.0) == pytest.approx(966.9444, abs=1e-4)
    # C ≥ 2M: Daly's interval is M itself (Young's would be √(2·30,000·10,000) = 24,495 s).
    assert daly_interval(30_000.0, 10_000.0) == 10_000.0
    assert daly_interval(20_000.0, 10_000.0) == 10_000.0
    assert young_interval(30_000.0, 10_000.0) == pytest.approx(24_494.9, abs=0.1)


def test_the_async_optimum_is_daly_with_the_stall_but_never_below_the_write() -> None:
    # Stall 50 s: Daly's 966.9 s, above a 600 s write.
    assert async_interval(stall_s=50.0, write_s=600.0, mtbf_s=10_000.0) == pytest.approx(
        966.9444, abs=1e-4
    )
    # A 2000 s write: a shorter interval would only wait for the write in flight.
    assert async_interval(stall_s=50.0, write_s=2000.0, mtbf_s=10_000.0) == 2000.0


def test_a_write_longer_than_the_mtbf_sets_the_async_optimum_to_the_mtbf() -> None:
    # Write 50,000 s, M = 10,000 s: goodput below the write grows as τ·e^(−τ/M), up to τ = M.
    assert async_interval(stall_s=5.0, write_s=50_000.0, mtbf_s=10_000.0) == 10_000.0


def test_exact_goodput_is_dalys_wall_clock_formula_for_a_synchronous_schedule() -> None:
    # Daly's expected wall time for W of work saved every τ: M·e^(R/M)·(e^((τ+C)/M) − 1)·W/τ.
    # τ = 1000 s, C = 50 s, R = 100 s, M = 10,000 s, W = 100,000 s (100 segments): per
    # segment 10,000·e^0.01·(e^0.105 − 1) = 10,000 × 1.010050 × 0.110711 = 1118.24 s.
    wall = 100 * 10_000 * math.exp(0.01) * math.expm1(0.105)
    assert wall == pytest.approx(111_824, abs=1)
    schedule = sync_schedule(1000.0, checkpoint_s=50.0)
    assert exact_goodput(schedule, mtbf_s=10_000.0, restart_s=100.0) == pytest.approx(
        100_000.0 / wall, rel=1e-12
    )


def test_the_parabola_refinement_finds_the_top_of_a_parabola_between_grid_points() -> None:
    # A parabola in log(interval) peaking at 1234 s, sampled on a log grid that misses it.
    grid = [float(x) for x in np.geomspace(100.0, 10_000.0, 25)]
    top = math.log(1234.0)
    goodputs = [0.9 - (math.log(x) - top) ** 2 for x in grid]
    assert 1234.0 not in grid
    assert _peak(grid, goodputs) == pytest.approx(1234.0, rel=1e-9)
    # At an end of the grid, or where the three points are not concave: the grid point.
    rising = [float(i) for i in range(25)]
    assert _peak(grid, rising) == grid[-1]
    flat = [0.5] * 25
    assert _peak(grid, flat) == grid[0]


def test_async_schedule_follows_the_checkpointers_timeline() -> None:
    # τ = 10, S = 1, C = 15 (the write outlasts the interval): snapshot 1 ends at 11 and is
    # durable at 26; snapshot 2 waits for it, runs 26 → 27, durable at 42.
    slow = async_schedule(10.0, stall_s=1.0, write_s=15.0)
    assert (slow.first_durable_s, slow.period_s) == (26.0, 42.0 - 26.0)
    # C = 5: durable at 11 + 5 = 16; snapshot 2 at 21 → 22, durable at 27.
    fast = async_schedule(10.0, stall_s=1.0, write_s=5.0)
    assert (fast.first_durable_s, fast.period_s) == (16.0, 27.0 - 16.0)
    # An instant write is a synchronous save that costs the stall.
    instant = async_schedule(10.0, stall_s=1.0, write_s=0.0)
    assert instant == sync_schedule(10.0, checkpoint_s=1.0)


MODERATE = {"checkpoint_s": 60.0, "stall_s": 5.0, "restart_s": 120.0, "mtbf_s": 36_000.0}
FREQUENT = {"checkpoint_s": 600.0, "stall_s": 10.0, "restart_s": 300.0, "mtbf_s": 3_600.0}
# Restarts half the MTBF long: failures during them add 30% to their mean (e^0.5 − 1 vs 0.5).
SLOW_RESTARTS = {"checkpoint_s": 60.0, "stall_s": 5.0, "restart_s": 1800.0, "mtbf_s": 3_600.0}


@pytest.mark.parametrize(
    ("regime", "factor", "num_failures"),
    [
        (MODERATE, 0.3, 20_000),
        (MODERATE, 1.0, 20_000),
        (MODERATE, 3.0, 20_000),
        (FREQUENT, 0.3, 80_000),
        (FREQUENT, 1.0, 80_000),
        (SLOW_RESTARTS, 1.0, 80_000),
    ],
)
@pytest.mark.parametrize("asynchronous", [False, True])
def test_the_simulator_matches_the_closed_form(
    regime: dict[str, float], factor: float, num_failures: int, asynchronous: bool
) -> None:
    mtbf_s, restart_s, write_s = regime["mtbf_s"], regime["restart_s"], regime["checkpoint_s"]
    if asynchronous:
        interval = factor * async_interval(
            stall_s=regime["stall_s"], write_s=write_s, mtbf_s=mtbf_s
        )
        schedule = async_schedule(interval, stall_s=regime["stall_s"], write_s=write_s)
    else:
        schedule = sync_schedule(factor * daly_interval(write_s, mtbf_s), checkpoint_s=write_s)
    exact = exact_goodput(schedule, mtbf_s=mtbf_s, restart_s=restart_s)
    simulated = simulate_goodput(
        schedule, mtbf_s=mtbf_s, restart_s=restart_s, num_failures=num_failures, seed=0
    )
    assert simulated.standard_error <= MAX_STANDARD_ERROR * exact
    assert simulated.goodput == pytest.approx(exact, rel=TOLERANCE)


def test_the_reported_standard_error_is_the_spread_over_seeds() -> None:
    schedule = async_schedule(2000.0, stall_s=10.0, write_s=600.0)
    runs = [
        simulate_goodput(schedule, mtbf_s=36_000.0, restart_s=300.0, num_failures=5000, seed=seed)
        for seed in range(40)
    ]
    spread = statistics.stdev(run.goodput for run in runs)
    reported = statistics.mean(run.standard_error for run in runs)
    # 40 seeds estimate a standard deviation to about ±11% (1/√(2·39)); allow a wide band.
    assert 0.65 * reported < spread < 1.5 * reported


def test_the_simulated_optimum_is_near_the_analytic_one() -> None:
    inputs = plan_inputs(node_mtbf_hours=10.0, checkpoint_s=60.0, stall_s=5.0, restart_s=120.0)
    plan = plan_checkpoints(inputs, seed=0)
    assert plan.asynchronous is not None
    for mode in (plan.sync, plan.asynchronous):
        # The curve is flat at its top: 10% off the optimum costs ~0.03% of goodput, about
        # the simulation's standard error there, so 10% is the resolution at this size.
        assert mode.simulated_optimal_interval_s == pytest.approx(mode.optimal_interval_s, rel=0.1)
        assert mode.simulated_goodput == pytest.approx(mode.goodput, rel=TOLERANCE)
    # Daly's formula is the closed form's own maximum, found here on a fine grid.
    grid = np.geomspace(plan.sync.optimal_interval_s / 2, plan.sync.optimal_interval_s * 2, 4001)
    exact = [inputs.goodput(float(x), asynchronous=False) for x in grid]
    assert float(grid[int(np.argmax(exact))]) == pytest.approx(plan.sync.daly_interval_s, rel=0.002)


def test_async_beats_sync_when_the_stall_is_much_shorter_than_the_write() -> None:
    inputs = plan_inputs(node_mtbf_hours=10.0, checkpoint_s=600.0, stall_s=10.0, restart_s=300.0)
    plan = plan_checkpoints(inputs, seed=0)
    assert plan.asynchronous is not None
    assert plan.asynchronous.simulated_goodput > plan.sync.simulated_goodput + 0.05
    assert plan.asynchronous.optimal_interval_s < plan.sync.optimal_interval_s / 3
    for point in plan.sweep:
        assert point.asynchronous is not None
        if point.interval_s >= inputs.checkpoint_s:  # below the write, async waits for it
            assert point.asynchronous.simulated > point.sync.simulated
    # The exposure is modelled: the same stall with an instant write would do better still.
    interval = plan.asynchronous.optimal_interval_s
    exposed = async_schedule(interval, stall_s=10.0, write_s=600.0)
    unexposed = async_schedule(interval, stall_s=10.0, write_s=0.0)
    for goodput in (exact_goodput, _simulated):
        assert goodput(exposed, mtbf_s=36_000.0, restart_s=300.0) < goodput(
            unexposed, mtbf_s=36_000.0, restart_s=300.0
        )


def _simulated(schedule: Schedule, *, mtbf_s: float, restart_s: float) -> float:
    return simulate_goodput(schedule, mtbf_s=mtbf_s, restart_s=restart_s, seed=0).goodput


def test_a_seed_reproduces_a_simulation() -> None:
    schedule = sync_schedule(2000.0, checkpoint_s=60.0)

    def run(seed: int) -> tuple[float, float]:
        result = simulate_goodput(schedule, mtbf_s=36_000.0, restart_s=120.0, seed=seed)
        return result.goodput, result.standard_error

    assert run(7) == run(7)
    assert run(7) != run(8)
    inputs = plan_inputs(node_mtbf_hours=10.0, checkpoint_s=60.0, stall_s=5.0)
    assert plan_checkpoints(inputs, seed=3).to_dict() == plan_checkpoints(inputs, seed=3).to_dict()


def a_run(**figures: object) -> RunFigures:
    """What ``plan checkpoints --run`` passes: an asynchronous run's measured figures."""
    settings: dict[str, object] = {
        "name": "runs/x",
        "asynchronous": True,
        "every_steps": 100,
        "step_s": 0.5,
        "checkpoint_s": 30.0,
        "stall_s": 2.0,
        "restart_s": 50.0,
        "sources": {
            "checkpoint_s": "runs/x: median background write of 4 save(s)",
            "stall_s": "runs/x: median snapshot of 4 asynchronous save(s)",
            "restart_s": "runs/x: median of 1 recovery event(s)",
            "mode": "runs/x: checkpoint.async_save in config.yaml",
        },
        **figures,
    }
    return RunFigures(**settings)  # type: ignore[arg-type]


def test_inputs_come_given_then_measured_then_by_default() -> None:
    bare = plan_inputs(node_mtbf_hours=10.0, checkpoint_s=60.0)
    assert (bare.restart_s, bare.sources["restart_s"]) == (DEFAULT_RESTART_S, "default")
    assert (bare.asynchronous, bare.stall_s, bare.run_asynchronous) == (False, None, None)
    from_run = plan_inputs(node_mtbf_hours=10.0, run=a_run())
    assert (from_run.checkpoint_s, from_run.stall_s, from_run.restart_s) == (30.0, 2.0, 50.0)
    assert from_run.asynchronous and from_run.current_interval_s == 50.0
    assert from_run.sources["checkpoint_s"] == "runs/x: median background write of 4 save(s)"
    given = plan_inputs(node_mtbf_hours=10.0, run=a_run(), restart_s=10.0, asynchronous=False)
    assert (given.restart_s, given.sources["restart_s"], given.asynchronous) == (
        10.0,
        "given",
        False,
    )
    assert given.run_asynchronous is True  # the run's own mode, whatever the plan's


def test_a_figure_the_run_did_not_measure_is_taken_from_its_flag() -> None:
    why = "runs/x: its 3 checkpoint_saved event(s) hold no save timings"
    untimed = a_run(checkpoint_s=None, stall_s=None, sources={"checkpoint_s": why, "stall_s": why})
    inputs = plan_inputs(node_mtbf_hours=10.0, run=untimed, checkpoint_s=60.0, stall_s=5.0)
    assert (inputs.checkpoint_s, inputs.stall_s) == (60.0, 5.0)
    assert inputs.sources["checkpoint_s"] == inputs.sources["stall_s"] == "given"
    with pytest.raises(ConfigError) as missing:
        plan_inputs(node_mtbf_hours=10.0, run=untimed)
    assert str(missing.value) == f"{why}; give --checkpoint-seconds"
    # The run saved asynchronously, so the default plan needs its stall; --sync does not.
    with pytest.raises(ConfigError) as no_stall:
        plan_inputs(node_mtbf_hours=10.0, run=untimed, checkpoint_s=60.0)
    assert str(no_stall.value) == f"{why}; give --stall-seconds, or --sync"
    synchronous = plan_inputs(
        node_mtbf_hours=10.0, run=untimed, checkpoint_s=60.0, asynchronous=False
    )
    assert synchronous.stall_s is None and not synchronous.asynchronous


def test_the_run_now_is_priced_in_the_runs_own_mode() -> None:
    # An asynchronous run planned for synchronous saves: its current interval (100 steps of
    # 0.5 s) still saves asynchronously, stalling 2 s, not blocking for the 30 s write.
    inputs = plan_inputs(node_mtbf_hours=10.0, run=a_run(), asynchronous=False)
    plan = plan_checkpoints(inputs, num_failures=1000, seed=0)
    assert plan.current is not None and plan.current.asynchronous is not None
    assert plan.current_goodput == plan.current.asynchronous
    assert plan.current_goodput != plan.current.sync
    report = plan.to_dict()
    assert (report["mode"], report["run_mode"]) == ("sync", "async")
    assert report["current_goodput"]["goodput"] == pytest.approx(
        inputs.goodput(50.0, asynchronous=True)
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"node_mtbf_hours": 1e300, "checkpoint_s": 5.0}, "--mtbf-hours must be a number from"),
        ({"node_mtbf_hours": float("nan"), "checkpoint_s": 5.0}, "--mtbf-hours must be"),
        ({"node_mtbf_hours": 10.0, "checkpoint_s": 1e300}, "--checkpoint-seconds must be"),
        ({"node_mtbf_hours": 10.0, "checkpoint_s": float("inf")}, "--checkpoint-seconds must"),
        ({"node_mtbf_hours": 10.0, "checkpoint_s": 5.0, "stall_s": 0.0}, "--stall-seconds must"),
        ({"node_mtbf_hours": 10.0, "checkpoint_s": 5.0, "restart_s": -1.0}, "--restart-seconds"),
        ({"node_mtbf_hours": 10.0, "checkpoint_s": 5.0, "num_nodes": 0}, "--nodes must be"),
        ({"node_mtbf_hours": 10.0, "run": a_run(checkpoint_s=float("nan"))}, "runs/x: median"),
    ],
)
def test_inputs_out_of_range_are_refused(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_inputs(**settings)  # type: ignore[arg-type]


def test_the_widest_inputs_give_a_finite_plan() -> None:
    # The ends of every range: no overflow, no NaN, strict JSON.
    for hours, seconds in ((1e7, 1e-6), (1e-3, 1e9)):
        inputs = plan_inputs(
            node_mtbf_hours=hours, num_nodes=1, checkpoint_s=seconds, stall_s=seconds, restart_s=0.0
        )
        report = plan_checkpoints(inputs, num_failures=100, seed=0).to_dict()
        json.dumps(report, allow_nan=False)


# The command line, in process ---------------------------------------------------------


def plan(*args: str | Path) -> object:
    return CliRunner().invoke(app, ["plan", "checkpoints", *map(str, args)])


def test_cli_json_table_and_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the plot's default place is the working directory
    args = ["--checkpoint-seconds", "60", "--mtbf-hours", "100", "--nodes", "10"]
    args += ["--stall-seconds", "5", "--failures", "1000"]
    result: Any = plan(*args, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # 100 h per node over 10 nodes: M = 36,000 s.
    assert report["system_mtbf_s"] == pytest.approx(36_000.0)
    assert report["mode"] == "sync" and report["run_mode"] is None
    assert report["optimal_interval_s"] == pytest.approx(daly_interval(60.0, 36_000.0))
    assert report["async"]["optimal_interval_s"] == pytest.approx(daly_interval(5.0, 36_000.0))
    assert report["restart_s"] == DEFAULT_RESTART_S
    assert report["simulation"] == {"seed": 0, "failures": 1000}
    assert len(report["sweep"]) == 15
    assert report["plot"] == "checkpoint-plan.png"
    assert (tmp_path / "checkpoint-plan.png").read_bytes()[:8] == PNG_MAGIC
    custom = tmp_path / "plots" / "interval.png"
    custom.parent.mkdir()
    shown: Any = plan(*args, "--async", "--plot", custom)
    assert shown.exit_code == 0, shown.output
    assert "optimal checkpoint interval" in shown.stdout
    assert "goodput against interval" in shown.stdout
    assert "recommended: asynchronous saves every" in shown.stdout
    assert custom.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mtbf-hours", "10"], "give --checkpoint-seconds"),
        (["--mtbf-hours", "10", "--checkpoint-seconds", "0"], "--checkpoint-seconds must be"),
        (["--mtbf-hours", "-1", "--checkpoint-seconds", "5"], "--mtbf-hours must be"),
        (["--mtbf-hours", "1e300", "--checkpoint-seconds", "5"], "--mtbf-hours must be"),
        (["--mtbf-hours", "10", "--checkpoint-seconds", "5", "--async"], "--stall-seconds"),
        (["--mtbf-hours", "10", "--checkpoint-seconds", "5", "--nodes", "0"], "--nodes"),
        (["--mtbf-hours", "10", "--checkpoint-seconds", "5", "--failures", "99"], "--failures"),
        (["--mtbf-hours", "10", "--run", "no/such/run"], "is not a run directory"),
        (["--mtbf-hours", "10", "--checkpoint-seconds", "5", "--plot", "no/dir/p.png"], "plot"),
    ],
)
def test_cli_bad_input_is_a_config_error(args: list[str], message: str, tmp_path: Path) -> None:
    result: Any = plan(*args, "--plot", tmp_path / "p.png") if "--plot" not in args else plan(*args)
    assert isinstance(result.exception, ConfigError), result.output
    assert message in str(result.exception)
    assert "\n" not in str(result.exception)
