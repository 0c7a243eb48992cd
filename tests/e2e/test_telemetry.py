"""The headline signals, stragglers and the stall alarm, on real 2-rank runs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from steadytrain.telemetry import read_jsonl
from tests.e2e.jobs import train
from tests.helpers import (
    TINY_CONFIG,
    as_set_args,
    events,
    prometheus_samples,
    run_steadytrain,
    start_steadytrain,
    wait_for_step,
    worker_pids,
)

# 12 steps, logged (and checked for stragglers) every 4: each check averages 4 steps.
TELEMETRY_JOB = [
    "train.max_steps=12",
    "log.every_steps=4",
    "checkpoint.every_steps=4",
    "telemetry.price_per_device_hour=2.5",
]


def status_of(run_dir: Path) -> dict:
    shown = run_steadytrain("status", run_dir, "--json")
    assert shown.returncode == 0, shown.output
    return json.loads(shown.stdout)


def logged_steps(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "health_score" in r]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return prometheus_samples(f"http://127.0.0.1:{port}/metrics")


def scrape_while_training(run_dir: Path, process: subprocess.Popen[str]) -> list[dict]:
    """Scrapes of the run's endpoint, one per newly logged step, until the run ends."""
    scrapes: list[dict] = []
    while process.poll() is None:
        log = run_dir / "events.jsonl"
        started = events(run_dir, "prometheus_started") if log.exists() else []
        if started:
            with contextlib.suppress(OSError):
                sample = scrape(started[0]["port"])
                step = sample[("steadytrain_step", ())]
                if step >= 4 and (not scrapes or step > scrapes[-1][("steadytrain_step", ())]):
                    scrapes.append(sample)
        time.sleep(0.1)
    return scrapes


def test_a_slowed_rank_is_named_the_straggler_and_an_even_run_names_none(
    overrides: list[str], tmp_path: Path
) -> None:
    even, slowed = tmp_path / "even", tmp_path / "slowed"
    assert train(even, [*overrides, *TELEMETRY_JOB, "telemetry.tensorboard=true"]).returncode == 0
    slow_job = [
        *overrides,
        *TELEMETRY_JOB,
        "train.max_steps=24",
        "train.loss_fn=user_plugins:next_token_loss_slow_on_rank1",
        "telemetry.prometheus_port=0",
    ]
    process = start_steadytrain(
        "train", TINY_CONFIG, "--nproc", "2", "--run-dir", slowed, *as_set_args(slow_job)
    )
    try:
        scrapes = scrape_while_training(slowed, process)
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
    [started] = events(slowed, "prometheus_started")
    assert started["host"] == "127.0.0.1"  # loopback unless configured otherwise
    assert len(scrapes) >= 2, "the endpoint was never scraped twice during the run"
    first, last = scrapes[0], scrapes[-1]
    assert last[("steadytrain_step", ())] > first[("steadytrain_step", ())]
    assert last[("steadytrain_samples_per_second", ())] > 0
    assert 0 <= last[("steadytrain_health_score", ())] <= 100
    assert last[("steadytrain_restarts_total", ())] == 0
    assert last[("steadytrain_straggler", (("rank", "1"),))] == 1
    assert last[("steadytrain_straggler", (("rank", "0"),))] == 0
    host = socket.gethostname()
    own = [last[("steadytrain_rank_own_seconds", (("host", host), ("rank", r)))] for r in "01"]
    assert own[1] > 1.3 * own[0]
    assert last[("steadytrain_seconds_since_last_step", ())] >= 0

    assert not events(even, "straggler")
    # The same records as TensorBoard scalars, read back with TensorBoard's own reader.
    scalars = EventAccumulator(str(even / "tensorboard"))
    scalars.Reload()
    loss = scalars.Scalars("steadytrain/loss")
    assert [event.step for event in loss] == [4, 8, 12]
    logged_loss = [r["loss"] for r in logged_steps(even)]
    assert [event.value for event in loss] == pytest.approx(logged_loss)
    assert [e.step for e in scalars.Scalars("rank_own_s/rank1")] == [4, 8, 12]
    shown = status_of(even)
    assert shown["state"] == "finished"
    assert (shown["progress"]["step"], shown["progress"]["max_steps"]) == (12, 12)
    assert shown["checkpoint"]["step"] == 12 and shown["restarts"] == 0
    assert shown["health"]["score"] == logged_steps(even)[-1]["health_score"]
    screen = run_steadytrain("status", even)
    assert screen.returncode == 0, screen.output
    assert f"{even}: finished" in screen.stdout and "step 12/12 (100%)" in screen.stdout
    records = logged_steps(even)
    assert [r["step"] for r in records] == [4, 8, 12]
    for record in records:
        assert record["stragglers"] == []
        assert record["steps_per_second"] > 0
        assert 0 <= record["health_score"] <= 100
        assert 0 <= record["steps_at_risk"] <= 4  # checkpoints every 4 steps
        assert record["seconds_since_checkpoint"] >= 0
        assert record["expected_lost_s"] == record["step_time_s"] * 4 / 2
        assert record["restarts"] == 0
        assert record["steps_computed"] == record["useful_steps"] == record["step"]
        assert record["goodput"] == 1.0
        assert record["cost"] == record["device_hours"] * 2.5 > 0

    [named] = events(slowed, "straggler")  # one event per spell, though every check sees it
    assert (named["rank"], named["phase"], named["host"]) == (1, "forward", socket.gethostname())
    assert named["ratio"] > 1.3
    assert named["step"] == 8  # over the ratio at 2 checks in a row (straggler_checks)
    first, *later = logged_steps(slowed)
    assert first["step"] == 4 and first["stragglers"] == []
    for record in later:
        assert record["stragglers"] == [1]
        assert any(reason.startswith("rank 1 slow (forward") for reason in record["health_reasons"])


def test_a_stopped_rank_raises_the_stall_alarm_and_its_return_clears_it(
    overrides: list[str], tmp_path: Path
) -> None:
    job = [
        *overrides,
        "train.max_steps=10",
        "telemetry.stall_after_s=2",
        "fault.hang_timeout_s=0",
        "checkpoint.every_steps=0",  # a save is waited out: the stop must land in a step
    ]
    process = start_steadytrain(
        "train", TINY_CONFIG, "--nproc", "2", "--run-dir", tmp_path, *as_set_args(job)
    )
    try:
        wait_for_step(tmp_path, 3, process)
        rank1 = worker_pids(process)[1]
        os.kill(rank1, signal.SIGSTOP)
        deadline = time.monotonic() + 60
        while not events(tmp_path, "stall") and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # status allows a logging interval (one 0.1 s step) beyond the 2 s
        stalled = status_of(tmp_path)
        os.kill(rank1, signal.SIGCONT)
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
    # The stopped rank cannot tell; its peer, blocked on it, can. (Once continued, rank 1 may
    # raise its own alarm before its next step ends: it did go 2 s without one.)
    assert stalled["state"].startswith("no step logged for"), stalled["state"]
    assert stalled["health"]["score"] == 0
    assert "stall" in [event["event"] for event in stalled["recent_events"]]
    stall = events(tmp_path, "stall")[0]
    assert stall["rank"] == 0 and stall["seconds_without_step"] > 2
    [cleared] = [event for event in events(tmp_path, "stall_cleared") if event["rank"] == 0]
    assert cleared["step"] >= stall["step"]
