"""Failure handled by the job itself: preemption signals, crashes under --max-restarts, and
non-finite steps on one rank only. Each test checks final weights and the audit, not only
exit codes."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from steadytrain.config import EXIT_DIVERGED, EXIT_REQUEUE, BatchLayout
from steadytrain.data import GlobalPositionSampler, audit_ledger
from tests.e2e.jobs import (
    MAX_STEPS,
    assert_audit_ok,
    final_weights,
    start_training,
    train,
)
from tests.helpers import (
    TINY_CONFIG,
    as_set_args,
    cli_env,
    events,
    run_steadytrain,
    wait_for_step,
    worker_pids,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("target", ["rank1", "launcher"])
def test_sigterm_saves_at_the_next_step_and_the_same_command_loses_nothing(
    target: str, reference: Path, overrides: list[str], tmp_path: Path
) -> None:
    process = start_training(tmp_path, overrides)
    try:
        wait_for_step(tmp_path, 6, process)
        victim = worker_pids(process)[-1] if target == "rank1" else process.pid
        os.kill(victim, signal.SIGTERM)
        assert process.wait(timeout=60) == EXIT_REQUEUE
    finally:
        if process.poll() is None:
            process.kill()
    [preempted] = events(tmp_path, "preempted")
    step = preempted["step"]
    assert 6 <= step < MAX_STEPS
    # The signalled rank is named; the launcher passes SIGTERM to every worker.
    assert preempted["signalled_ranks"] == ([1] if target == "rank1" else [0, 1])
    assert preempted["checkpoint"].endswith(f"step_{step:08d}")
    assert (Path(preempted["checkpoint"]) / "manifest.json").is_file()
    assert not (tmp_path / "final").exists()  # not finished: no final weights

    resumed = train(tmp_path, overrides)
    assert resumed.returncode == 0, resumed.output
    [resume] = events(tmp_path, "resume")
    assert resume["step"] == step  # zero completed steps lost
    assert final_weights(tmp_path) == final_weights(reference)
    assert_audit_ok(tmp_path)


def test_save_past_the_grace_commits_nothing_and_keeps_the_last_checkpoint(
    reference: Path, overrides: list[str], tmp_path: Path
) -> None:
    process = start_training(
        tmp_path, [*overrides, "fault.preempt_grace_s=0.001", "fault.signal_check_s=0"]
    )
    try:
        wait_for_step(tmp_path, 9, process)  # past the checkpoint of step 8
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=60) == EXIT_REQUEUE
    finally:
        if process.poll() is None:
            process.kill()
    abandoned = events(tmp_path, "preempt_save_abandoned")
    assert abandoned, "the grace was spent, the save had to be abandoned"
    committed = sorted(path.name for path in (tmp_path / "checkpoints").glob("step_*"))
    steps = [int(name.removeprefix("step_")) for name in committed]
    assert steps and all(step % 4 == 0 for step in steps), committed  # periodic ones only
    verify = run_steadytrain("checkpoints", "verify", tmp_path)
    assert verify.returncode == 0, verify.output

    resumed = train(tmp_path, overrides)
    assert resumed.returncode == 0, resumed.output
    assert events(tmp_path, "resume")[0]["step"] == steps[-1]
    assert final_weights(tmp_path) == final_weights(reference)
    assert_audit_ok(tmp_path)


def start_under_torchrun(run_dir: Path, overrides: list[str]) -> subprocess.Popen[str]:
    """Plain ``torchrun --max-restarts 2`` (its agent shares its store with the workers)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "--max-restarts=2",
        "-m",
        "steadytrain",
        "train",
        str(TINY_CONFIG),
        "--run-dir",
        str(run_dir),
        *as_set_args(overrides),
    ]
    return subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, env=cli_env()
    )


@pytest.mark.parametrize("launcher", ["steadytrain", "torchrun"])
def test_kill9_under_max_restarts_recovers_by_itself(
    launcher: str, reference: Path, overrides: list[str], tmp_path: Path
) -> None:
    kill_at = random.Random(os.environ.get("STEADYTRAIN_TEST_SEED")).randrange(5, MAX_STEPS - 6)
    if launcher == "steadytrain":
        process = start_training(tmp_path, overrides, "--max-restarts", "2")
    else:
        process = start_under_torchrun(tmp_path, overrides)
    try:
        wait_for_step(tmp_path, kill_at, process)
        os.kill(worker_pids(process)[-1], signal.SIGKILL)
        assert process.wait(timeout=180) == 0
    finally:
        if process.poll() is None:
            process.kill()
    [recovery] = events(tmp_path, "recovery")
    assert recovery["restart"] == 1
    # --nproc forks restarted workers from its forkserver, torch already imported.
    assert recovery["warm_start"] is (launcher == "steadytrain")
    shown = run_steadytrain("status", tmp_path, "--json")
    assert shown.returncode == 0, shown.output
    status = json.loads(shown.stdout)
    assert status["state"] == "finished" and status["restarts"] == 1
    assert [r["restart"] for r in status["recoveries"]] == [1]
    # Logged every step, so exact: each step once, and the recomputed ones twice.
    usage = status["usage"]
    assert usage["steps_computed"] == MAX_STEPS + recovery["steps_recomputed"]
    assert usage["useful_steps"] == MAX_STEPS
    assert usage["goodput"] == MAX_STEPS / usage["steps_computed"]
    assert usage["device_hours"] > 0 and usage["cost"] is None
    for part in ("process_start_s", "imports_s", "checkpoint_read_s", "first_step_s"):
        assert recovery[part] >= 0, recovery
    assert recovery["steps_recomputed"] >= 0
    assert final_weights(tmp_path) == final_weights(reference)
    assert_audit_ok(tmp_path)


# A user's regression job whose loss turns NaN on the rank that reads a poisoned sample.
POISON_JOB = [
    "data.dataset_factory=user_plugins:make_poisoned_regression",
    "model.factory=user_plugins:build_regressor",
    "model.kwargs={dim: 8}",
    "train.loss_fn=user_plugins:poisonable_mse",
    "train.global_batch_size=16",
    "train.micro_batch_size=4",
    "train.max_steps=20",
    "train.lr=0.03",
    "train.warmup_steps=2",
    "train.eval_batches=2",
    "data.ledger=true",
    "checkpoint.every_steps=4",
    "fault.max_consecutive_nonfinite=2",
    "log.every_steps=1",
    "log.console=false",
    "deterministic=true",
]


def rank1_samples(*, steps: list[int]) -> list[int]:
    """The ids rank 1 of 2 reads at ``steps`` of epoch 0 (512 samples, global batch 16: the
    whole run stays in epoch 0, so no poisoned sample comes back)."""
    sampler = GlobalPositionSampler(num_samples=512, global_batch_size=16, seed=1234)
    layout = BatchLayout(world_size=2, micro_batch_size=4, grad_accum_steps=2)
    return [
        sample
        for step in steps
        for micro in sampler.rank_micro_batches(layout, rank=1, epoch=0, step_in_epoch=step)
        for sample in micro
    ]


def test_nonfinite_on_one_rank_is_skipped_then_rolled_back_past_the_data(
    tmp_path: Path,
) -> None:
    # Steps 9 and 10 poison rank 1 twice in a row (rollback to step 8, then steps 8-10 are
    # passed over); step 13 once (a skip).
    poison = rank1_samples(steps=[9, 10, 13])
    job = [*POISON_JOB, f"data.dataset_kwargs={{num_samples: 512, poison_ids: {poison}}}"]
    result = run_steadytrain(
        "train", TINY_CONFIG, "--nproc", "2", "--run-dir", tmp_path, *as_set_args(job)
    )
    assert result.returncode == 0, result.output
    skipped = events(tmp_path, "nonfinite_step_skipped")
    assert [(e["step"], e["loss_ranks"]) for e in skipped] == [(9, [1]), (13, [1])]
    [rollback] = events(tmp_path, "rolled_back")
    assert (rollback["step"], rollback["to_step"]) == (10, 8)
    assert rollback["skipped_steps"] == [8, 9, 10]
    [end] = events(tmp_path, "train_end")
    assert (end["skipped_steps"], end["rollbacks"]) == (4, 1)
    weights = load_file(tmp_path / "final" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert math.isfinite(end["loss"])

    audit = run_steadytrain("audit", tmp_path)
    assert audit.returncode == 0, audit.output
    assert "skipped by the guard (4 step(s))" in audit.stdout
    assert (
        "steps skipped by the non-finite guard (update dropped, data passed over): 8, 9, 10, 13"
        in audit.stdout
    )
    [epoch] = audit_ledger(tmp_path).epochs
    assert len(epoch.skipped_by_guard) == 4 * 16 and set(poison) <= set(epoch.skipped_by_guard)
    assert f"{4 * 16} samples skipped by the non-finite guard" in audit.stdout


def test_nonfinite_with_no_rollback_left_stops_as_diverged(tmp_path: Path) -> None:
    poison = rank1_samples(steps=[5, 6])
    job = [
        *POISON_JOB,
        f"data.dataset_kwargs={{num_samples: 512, poison_ids: {poison}}}",
        "fault.max_rollbacks=0",
    ]
    result = run_steadytrain(
        "train", TINY_CONFIG, "--nproc", "2", "--run-dir", tmp_path, *as_set_args(job)
    )
    assert result.returncode == EXIT_DIVERGED, result.output
    [diverged] = events(tmp_path, "diverged")
    # Step 5 skipped, step 6 the second in a row with no rollback left: stop after 7 steps.
    assert (diverged["step"], diverged["rollbacks"]) == (7, 0)
    assert not (tmp_path / "final").exists()
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] is None or math.isfinite(r["loss"]) for r in metrics if "loss" in r)
