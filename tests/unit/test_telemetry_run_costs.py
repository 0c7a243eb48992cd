"""What a run's files say its saves, restarts and steps cost (``measure_run_costs``), read from
run directories written here in the formats the run writes: ``config.yaml`` by
``dump_config``, events as ``EventLog.emit`` writes them (``time``, ``event``, ``rank`` and the
fields), metrics records as the loop's ``interval_record`` fields and the save timings as
``save_checkpoint`` writes them."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest

from steadytrain.config import ConfigError, dump_config, load_config
from steadytrain.telemetry import measure_run_costs
from tests.helpers import TINY_CONFIG


def write_run(
    run_dir: Path,
    *,
    events: list[dict[str, Any]],
    metrics: list[dict[str, Any]],
    overrides: tuple[str, ...] = (),
) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    config = load_config(TINY_CONFIG, overrides=[f"run_dir={run_dir}", *overrides])
    (run_dir / "config.yaml").write_text(dump_config(config))
    (run_dir / "events.jsonl").write_text(
        "".join(json.dumps({"rank": 0, **event}) + "\n" for event in events)
    )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in metrics))
    return run_dir


def start(time: float, step: int = 0) -> dict[str, Any]:
    return {"time": time, "event": "train_start", "step": step, "world_size": 1}


def saved(time: float, step: int, **timings: Any) -> dict[str, Any]:
    return {
        "time": time,
        "event": "checkpoint_saved",
        "step": step,
        "location": f"checkpoints/step_{step:08d}",
        "num_files": 6,
        **timings,
    }


def interval(time: float, step: int, step_time_s: float, **phases: Any) -> dict[str, Any]:
    return {"step": step, "time": time, "step_time_s": step_time_s, **phases}


ASYNC = ("checkpoint.every_steps=2", "checkpoint.async_save=true", "log.every_steps=2")


def test_save_costs_are_the_medians_of_the_checkpointers_own_timings(tmp_path: Path) -> None:
    timed = dict(async_save=True)
    events = [
        start(0.0),
        saved(2.0, 2, **timed, waited_s=0.0, blocked_s=0.010, write_s=1.0),
        saved(4.0, 4, **timed, waited_s=0.3, blocked_s=0.020, write_s=2.0),
        saved(6.0, 6, **timed, waited_s=0.0, blocked_s=0.500, write_s=3.0),
        # A save on preemption is synchronous even in an async run: not this run's mode.
        saved(7.0, 7, async_save=False, waited_s=0.0, blocked_s=9.0, write_s=9.0),
        # Written before saves were timed, or not durations: not timed.
        saved(8.0, 8),
        saved(9.0, 9, **timed, waited_s=0.0, blocked_s=-1.0, write_s=1.0),
        saved(9.5, 10, **timed, waited_s=0.0, blocked_s=0.01, write_s="fast"),
    ]
    run = write_run(tmp_path / "run", events=events, metrics=[], overrides=ASYNC)
    costs = measure_run_costs(run)
    assert costs.asynchronous and costs.every_steps == 2
    assert (costs.blocked_s, costs.waited_s, costs.write_s) == (0.020, 0.0, 2.0)
    assert (costs.checkpoint_s, costs.stall_s) == (2.0, 0.020)  # C is the write, S the stall
    assert (costs.num_saves, costs.num_untimed_saves) == (3, 3)
    assert costs.source("checkpoint_s") == f"{run}: median background write of 3 save(s)"
    assert costs.source("stall_s") == f"{run}: median snapshot of 3 asynchronous save(s)"
    # A synchronous run's save is all blocking, and it has no stall to measure.
    sync_events = [
        start(0.0),
        saved(2.0, 2, async_save=False, waited_s=0.0, blocked_s=4.0, write_s=3.9),
    ]
    sync = measure_run_costs(write_run(tmp_path / "sync", events=sync_events, metrics=[]))
    assert (sync.checkpoint_s, sync.stall_s) == (4.0, None)
    assert sync.source("stall_s").endswith(
        "saved synchronously, so it measured no asynchronous stall"
    )


def test_a_run_written_before_saves_were_timed_measures_none(tmp_path: Path) -> None:
    events = [start(0.0), saved(2.0, 2), saved(4.0, 4)]
    metrics = [interval(2.0, 2, 0.5, checkpoint_s=0.1), interval(4.0, 4, 0.5, checkpoint_s=0.1)]
    run = write_run(tmp_path / "old", events=events, metrics=metrics, overrides=ASYNC)
    costs = measure_run_costs(run)
    assert (costs.checkpoint_s, costs.stall_s, costs.num_untimed_saves) == (None, None, 2)
    assert costs.source("checkpoint_s") == (
        f"{run}: its 2 checkpoint_saved event(s) hold no save timings (an earlier steadytrain "
        "wrote them)"
    )
    assert costs.step_s == pytest.approx(0.5 - 0.1)  # the step time is still measured


def test_a_restart_by_torchrun_is_its_total_and_a_run_again_its_own_parts(tmp_path: Path) -> None:
    parts = {"imports_s": 3.0, "setup_s": 2.0, "checkpoint_read_s": 1.0, "first_step_s": 4.0}
    by_agent = {"time": 50.0, "event": "recovery", "restart": 1, "total_s": 42.0, **parts}
    events = [start(0.0), start(45.0, step=4), by_agent]
    run = write_run(tmp_path / "agent", events=events, metrics=[])
    costs = measure_run_costs(run)
    # From the failed attempt's last logged record: total_s, not the new process's parts.
    assert (costs.restart_s, costs.num_recoveries, costs.num_agent_restarts) == (42.0, 1, 1)
    assert "by torchrun's agent" in costs.source("restart_s")
    assert "up to log.every_steps (25) steps of lost computing" in costs.source("restart_s")
    run_again = {"time": 90.0, "event": "recovery", "restart": 0, "total_s": 900.0, **parts}
    events += [start(80.0, step=4), run_again]
    both = measure_run_costs(write_run(tmp_path / "both", events=events, metrics=[]))
    # Run again: from the new process's start (3 + 2 + 1 + 4 s); the wait before is no cost.
    assert both.restart_s == pytest.approx(statistics.median([42.0, 10.0]))
    nothing = measure_run_costs(write_run(tmp_path / "none", events=[start(0.0)], metrics=[]))
    assert nothing.restart_s is None
    assert nothing.source("restart_s") == f"{tmp_path / 'none'} has no recovery event"


def test_the_step_time_leaves_out_the_checkpoint_phase_and_intervals_with_a_rollback(
    tmp_path: Path,
) -> None:
    events = [
        start(0.0),
        {"time": 5.0, "event": "rolled_back", "step": 5, "to_step": 2, "skipped_steps": [2]},
    ]
    metrics = [
        interval(2.0, 2, 1.0, checkpoint_s=0.25),  # 1.0 − 0.25 s of saving per step
        interval(9.0, 6, 3.0, checkpoint_s=0.0),  # holds the rollback: restoring is not a step
        interval(11.0, 8, 1.2, checkpoint_s=0.0),
    ]
    costs = measure_run_costs(write_run(tmp_path / "run", events=events, metrics=metrics))
    assert costs.num_intervals == 2
    assert costs.step_s == pytest.approx((0.75 + 1.2) / 2)


def test_synced_steps_on_cuda_have_their_checkpoint_phase_apart(tmp_path: Path) -> None:
    # Four steps, the synced one saved: the unsynced mean is 0, the synced one's 2 s.
    synced = interval(4.0, 4, 1.0, checkpoint_s=0.0, synced_steps=1, synced_checkpoint_s=2.0)
    costs = measure_run_costs(write_run(tmp_path / "run", events=[start(0.0)], metrics=[synced]))
    assert costs.step_s == pytest.approx(1.0 - 2.0 / 4)


def test_each_attempt_begins_at_its_train_start_and_a_fresh_start_forgets(tmp_path: Path) -> None:
    events = [start(0.0), start(20.0, step=4), start(40.0, step=0), start(60.0, step=4)]
    metrics = [
        interval(2.0, 2, 9.0),  # before the fresh start at 40 s: not this run's any more
        interval(22.0, 6, 9.0),
        interval(42.0, 2, 1.0, checkpoint_s=0.5),  # 2 steps from step 0: 0.5 s per step saving
        interval(63.0, 7, 2.0, checkpoint_s=0.3),  # 3 steps from the restart's step 4
    ]
    costs = measure_run_costs(write_run(tmp_path / "run", events=events, metrics=metrics))
    assert costs.num_intervals == 2
    assert costs.step_s == pytest.approx(((1.0 - 0.5) + (2.0 - 0.3)) / 2)


def test_records_that_are_not_numbers_are_passed_over(tmp_path: Path) -> None:
    metrics = [interval(2.0, 2, math.inf), interval(4.0, 4, 0.1, checkpoint_s=0.2)]
    run = write_run(tmp_path / "run", events=[start(0.0)], metrics=metrics)
    with (run / "events.jsonl").open("a") as file:
        file.write('[1, 2]\n{"time": "soon", "event": "recovery"}\n{"torn": \n')
    costs = measure_run_costs(run)
    assert costs.step_s is None and costs.num_intervals == 0  # negative or infinite
    assert costs.restart_s is None


def test_a_directory_that_is_not_a_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a run directory"):
        measure_run_costs(tmp_path)
