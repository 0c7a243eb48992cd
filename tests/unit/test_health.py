"""The health score, the straggler rule and the run watch, on hand-computed cases."""

from __future__ import annotations

import threading
import time

import pytest

from steadytrain.telemetry import (
    HealthInputs,
    RunWatch,
    Straggler,
    Usage,
    comparable_seconds,
    earlier_usage,
    find_stragglers,
    goodput_fields,
    health_score,
    own_seconds,
    resumes_since_fresh_start,
)


def healthy(**changes: object) -> HealthInputs:
    fields: dict[str, object] = {
        "step_time_s": 0.1,
        "grad_sync_share": 0.10,
        "data_wait_share": 0.01,
        "seconds_since_checkpoint": 30.0,
        "checkpoint_interval_s": 60.0,
        "restarts": 0,
        "skipped_steps": 0,
    }
    fields.update(changes)
    return HealthInputs(**fields)  # type: ignore[arg-type]


def test_a_healthy_run_scores_100_with_no_reasons() -> None:
    assert health_score(healthy()) == (100, [])


def test_each_penalty_follows_the_documented_formula() -> None:
    assert health_score(healthy(grad_sync_share=0.41)) == (84, ["grad sync 41% of step time"])
    assert health_score(healthy(grad_sync_share=0.95))[0] == 70  # bounded at 30
    assert health_score(healthy(data_wait_share=0.25)) == (85, ["data wait 25% of step time"])
    # 38 min without a checkpoint at a 60 s interval: 38 intervals, 2 allowed, bounded at 25.
    assert health_score(healthy(seconds_since_checkpoint=38 * 60.0)) == (
        75,
        ["no checkpoint for 38 min"],
    )
    # 3 intervals: (3 - 2) × 10.
    assert health_score(healthy(seconds_since_checkpoint=180.0))[0] == 90
    assert health_score(healthy(seconds_since_checkpoint=None)) == (85, ["checkpointing is off"])
    assert health_score(healthy(restarts=2)) == (90, ["2 restarts"])
    assert health_score(healthy(restarts=9))[0] == 85
    assert health_score(healthy(skipped_steps=1)) == (90, ["1 non-finite step(s) skipped"])
    slow = Straggler(
        rank=3, host="n1", ratio=1.8, phase="data_wait", own_s=0.18, others_median_s=0.1
    )
    reason = "rank 3 slow (data_wait, 1.8× the others)"
    assert health_score(healthy(stragglers=[slow])) == (90, [reason])


def test_reasons_come_largest_first_and_a_stall_is_zero() -> None:
    score, reasons = health_score(healthy(grad_sync_share=0.30, restarts=3, skipped_steps=1))
    assert score == 100 - 5 - 15 - 10
    assert reasons == ["3 restarts", "1 non-finite step(s) skipped", "grad sync 30% of step time"]
    assert health_score(healthy(stalled_s=95.0)) == (0, ["no step for 95 s"])


def phases(**seconds: float) -> dict[str, float]:
    base = {"data_wait_s": 0.01, "h2d_s": 0.0, "forward_s": 0.04, "backward_s": 0.06}
    return {**base, "optimizer_s": 0.01, "grad_sync_s": 0.02, **seconds}


def test_own_time_leaves_out_the_wait_in_the_gradient_all_reduce() -> None:
    assert own_seconds(phases()) == pytest.approx(0.01 + 0.04 + 0.06 + 0.01 - 0.02)


def test_the_slow_rank_is_named_with_its_slowest_phase_not_the_ranks_waiting_for_it() -> None:
    # Ranks 0, 1, 3 wait 0.08 s for rank 2 inside backward's all-reduce: same step time.
    waiting = phases(backward_s=0.14, grad_sync_s=0.10)
    slow = {**phases(data_wait_s=0.09), "host": "node-b"}
    per_rank = [{**waiting, "host": "node-a"}] * 2 + [slow] + [{**waiting, "host": "node-a"}]
    [straggler] = find_stragglers(per_rank, ratio=1.3)
    assert (straggler.rank, straggler.host, straggler.phase) == (2, "node-b", "data_wait")
    assert straggler.ratio == pytest.approx(0.18 / 0.10)


def test_even_ranks_and_a_single_rank_name_no_straggler() -> None:
    assert find_stragglers([phases(), phases(forward_s=0.045)], ratio=1.3) == []
    assert find_stragglers([phases(forward_s=10.0)], ratio=1.3) == []


def synced(**seconds: float) -> dict[str, float]:
    return {f"synced_{key}": value for key, value in phases(**seconds).items()}


def test_on_cuda_only_synced_samples_are_compared_and_launch_times_are_not() -> None:
    # Launch times say rank 1 is fast; its synced (device) times say it is 2x slower.
    ranks = [
        {"host": "a", **phases(), **synced()},
        {"host": "b", **phases(forward_s=0.001), **synced(forward_s=0.18)},
    ]
    exact = comparable_seconds(ranks, exact_only=True)
    assert exact is not None
    assert exact[1] == {"host": "b", **phases(forward_s=0.18)}
    [straggler] = find_stragglers(exact, ratio=1.3)
    assert (straggler.rank, straggler.host, straggler.phase) == (1, "b", "forward")
    # On CPU the measured phases are compared as they are (rank 1's 0.001 s forward).
    as_measured = comparable_seconds(ranks, exact_only=False) or []
    assert [s.rank for s in find_stragglers(as_measured, ratio=1.3)] == [0]
    # An interval in which a rank has no synced sample cannot be judged on CUDA.
    assert comparable_seconds([ranks[0], phases()], exact_only=True) is None


def test_the_watch_keeps_the_last_verdict_for_an_interval_it_cannot_judge() -> None:
    watch = RunWatch(emit=lambda kind, **fields: None, stall_after_s=60.0, restarts=0)
    slow = Straggler(rank=1, host="b", ratio=2.0, phase="forward", own_s=0.2, others_median_s=0.1)
    assert watch.confirm([slow], checks=2) == ([], [])
    assert watch.confirm([slow], checks=2) == ([slow], [slow])
    assert watch.last_confirmed() == [slow]
    assert watch.confirm([], checks=2) == ([], [])
    assert watch.last_confirmed() == []
    watch.close()


def test_restarts_count_resumes_since_the_last_fresh_start_and_not_rollbacks() -> None:
    events = [
        {"event": "train_start", "step": 0},
        {"event": "resume", "step": 4},
        {"event": "train_start", "step": 4},
        {"event": "resume", "step": 8},
        {"event": "rolled_back", "step": 10},
        {"event": "resume", "step": 8},
    ]
    assert resumes_since_fresh_start(events) == 2
    assert resumes_since_fresh_start([*events, {"event": "train_start", "step": 0}]) == 0


def test_posture_counts_from_the_last_committed_checkpoint() -> None:
    now = [100.0]
    watch = RunWatch(emit=lambda *a, **k: None, stall_after_s=0, restarts=0, clock=lambda: now[0])
    now[0] = 130.0
    assert watch.posture(step=7, resumed_step=4) == (30.0, 3)  # since the resume, from step 4
    watch.event("checkpoint_saved", {"time": 125.0, "step": 6})
    assert watch.posture(step=7, resumed_step=4) == (5.0, 1)


def test_the_stall_alarm_fires_once_after_the_first_step_and_clears_with_the_next() -> None:
    emitted: list[tuple[str, dict]] = []
    fired = threading.Event()

    def emit(kind: str, **fields: object) -> None:
        emitted.append((kind, fields))
        fired.set()

    watch = RunWatch(emit=emit, stall_after_s=0.2, restarts=0)
    try:
        time.sleep(0.4)
        assert emitted == []  # not armed before the first step: setup is not a stall
        watch.step_ended(step=0, action="commit", seconds=0.1)
        assert fired.wait(timeout=10)
        time.sleep(0.4)
        [(kind, fields)] = emitted  # once per stall
        assert kind == "stall" and fields["step"] == 1 and fields["seconds_without_step"] >= 0.2
        watch.step_ended(step=1, action="commit", seconds=2.0)
        assert emitted[-1] == ("stall_cleared", {"step": 2})
    finally:
        watch.close()


def test_a_rank_is_named_after_consecutive_checks_and_once_per_spell() -> None:
    watch = RunWatch(emit=lambda *a, **k: None, stall_after_s=0, restarts=0)
    slow = Straggler(rank=1, host="a", ratio=2.0, phase="forward", own_s=0.2, others_median_s=0.1)
    assert watch.confirm([slow], checks=2) == ([], [])  # one check: maybe a noisy neighbour
    assert watch.confirm([slow], checks=2) == ([slow], [slow])  # named
    assert watch.confirm([slow], checks=2) == ([slow], [])  # still slow: no second event
    assert watch.confirm([], checks=2) == ([], [])  # recovered
    assert watch.confirm([slow], checks=2) == ([], [])  # a new spell starts from one check
    assert watch.confirm([slow], checks=1) == ([slow], [slow])


def test_earlier_attempts_count_their_device_time_and_every_step_they_computed() -> None:
    events = [
        {"time": 0.0, "event": "train_start", "step": 0, "world_size": 8},  # an older run
        {"time": 100.0, "event": "train_start", "step": 0, "world_size": 2},
        {"time": 150.0, "event": "train_start", "step": 10, "world_size": 4},
        {"time": 151.0, "event": "recovery", "process_started_at": 140.0},
        {"time": 131.0, "event": "checkpoint_saved", "step": 16},  # computed past the log
        # The next process starts at 140 (its recovery event says so): its startup events
        # must not stretch the first attempt over the time in between.
        {"time": 149.0, "event": "resume", "step": 10},
        {"time": 165.0, "event": "rolled_back", "step": 21, "to_step": 12},
        {"time": 175.0, "event": "resume", "step": 20},  # this process, after `before`
    ]
    metrics = [
        {"time": 110.0, "step": 5, "step_time_s": 1.0},
        {"time": 130.0, "step": 15, "step_time_s": 1.0},  # crash after 16; resumed from 10
        {"time": 160.0, "step": 20, "step_time_s": 1.0},
        {"time": 170.0, "step": 24, "step_time_s": 1.0},  # 20, 21 (failed), then 22..24
        {"time": 171.0, "step": 24, "val_loss": 1.0},  # not a training record
    ]
    usage = earlier_usage(events, metrics, before=172.0)
    # 2 ranks × 31 s, then 4 ranks × (170 − 140) s from the recovered process's start.
    assert usage.device_seconds == 2 * 31 + 4 * 30
    assert usage.steps_computed == 16 + (20 - 10) + (22 - 20) + (24 - 22)


def test_goodput_fields_follow_their_definitions() -> None:
    fields = goodput_fields(Usage(7200.0, 40), useful_steps=30, price_per_device_hour=3.0)
    assert fields == {
        "device_hours": 2.0,
        "steps_computed": 40,
        "useful_steps": 30,
        "goodput": 0.75,
        "cost": 6.0,
    }
    assert goodput_fields(Usage(), useful_steps=0, price_per_device_hour=None)["goodput"] is None
    # An earlier attempt's count is a lower bound: never fewer computed steps than useful ones.
    assert (
        goodput_fields(Usage(60.0, 18), useful_steps=20, price_per_device_hour=None)["goodput"]
        == 1.0
    )


def test_the_watch_adds_this_process_to_earlier_attempts() -> None:
    now = [1000.0]
    watch = RunWatch(
        emit=lambda *a, **k: None,
        stall_after_s=0,
        restarts=1,
        world_size=2,
        earlier=Usage(60.0, 15),
        process_started=990.0,
        clock=lambda: now[0],
    )
    for step in range(10, 13):
        watch.step_ended(step=step, action="commit", seconds=1.0)
    now[0] = 1005.0
    assert watch.usage() == Usage(60.0 + 2 * 15.0, 18)
