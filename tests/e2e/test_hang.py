"""A hung rank, made with a real SIGSTOP: the live rank's watchdog names it, dumps its own
stacks and exits 76; torchrun's agent restarts the group, which resumes and finishes with the
weights of a run that never hung."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from steadytrain.config import EXIT_HANG
from tests.e2e.jobs import (
    assert_audit_ok,
    final_weights,
)
from tests.helpers import (
    TINY_CONFIG,
    as_set_args,
    events,
    start_steadytrain,
    wait_for_step,
    worker_pids,
)

pytestmark = pytest.mark.slow
HANG_TIMEOUT_S = 4
HANG_WARMUP_S = 30
# The agent gives workers preempt_grace_s + 15 s to leave after SIGTERM before SIGKILL, and a
# stopped process cannot leave: keep that wait short.
WATCHDOG_SETTINGS = [
    f"fault.hang_timeout_s={HANG_TIMEOUT_S}",
    f"fault.hang_warmup_s={HANG_WARMUP_S}",
    "fault.preempt_grace_s=1",
]


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (None once it is gone): tells a pid's reuse."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return int(fields[19])


def wait_for_event(run_dir: Path, kind: str, process: subprocess.Popen[str], timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "events.jsonl").exists() and (found := events(run_dir, kind)):
            return found[0]
        if process.poll() is not None:
            raise AssertionError(f"training exited ({process.returncode}) without a {kind!r}")
        time.sleep(0.05)
    raise AssertionError(f"no {kind!r} event in {timeout} s")


def test_sigstopped_rank_is_named_dumped_around_and_the_group_restarts_bit_identical(
    reference: Path, overrides: list[str], tmp_path: Path
) -> None:
    process = start_steadytrain(
        "train",
        TINY_CONFIG,
        "--nproc",
        "2",
        "--max-restarts",
        "1",
        "--run-dir",
        tmp_path,
        *as_set_args([*overrides, *WATCHDOG_SETTINGS]),
    )
    rank1, rank1_started = 0, None
    try:
        wait_for_step(tmp_path, 6, process)  # past the checkpoint of step 4
        assert (tmp_path / "checkpoints" / "step_00000004" / "manifest.json").is_file()
        rank1 = worker_pids(process)[1]
        rank1_started = start_time(rank1)
        os.kill(rank1, signal.SIGSTOP)
        stopped_at = time.time()
        # The live rank waits in a collective; the allowance is the timeout, or the warm-up
        # on top if it waits inside a checkpoint; then a few beats to confirm the freeze.
        hang = wait_for_event(
            tmp_path, "hang", process, timeout=HANG_TIMEOUT_S + HANG_WARMUP_S + 30
        )
        assert process.wait(timeout=180) == 0
        stopped_one_left = start_time(rank1) == rank1_started
    finally:
        if rank1_started is not None and start_time(rank1) == rank1_started:  # no leftovers
            with contextlib.suppress(ProcessLookupError):
                os.kill(rank1, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)

    # Named: the frozen rank, by its stale heartbeat, where it was last seen.
    assert (hang["rank"], hang["suspect_rank"], hang["suspect_reason"]) == (
        0,
        1,
        "heartbeat stale",
    )
    # Last seen: its last heartbeat, up to a second (here a few steps) before the stop.
    assert 0 <= hang["suspect_step"] <= hang["step"] and hang["suspect_phase"] != "setup"
    assert hang["exit_code"] == EXIT_HANG
    allowance = HANG_TIMEOUT_S + (HANG_WARMUP_S if hang["phase"] == "checkpoint" else 0)
    assert allowance <= hang["seconds_stalled"] <= allowance + 6
    assert hang["time"] - stopped_at <= allowance + 6
    # Dumped: rank 0's own stacks, every thread, the training thread inside steadytrain.
    dumps = sorted((tmp_path / "hangs").glob("rank-*.txt"))
    assert [dump.name.split("-restart-")[0] for dump in dumps] == ["rank-0"]
    assert hang["dump"] == str(dumps[0]) and "-restart-0-" in dumps[0].name
    stacks = dumps[0].read_text()
    assert "suspect: rank 1 (heartbeat stale)" in stacks
    assert "Current thread" in stacks and stacks.count("Thread 0x") >= 2  # and the others
    assert "steadytrain/train/loop.py" in stacks and "in fit" in stacks
    # Restarted: the agent killed the stopped worker and started a group that resumed.
    assert not stopped_one_left
    [resume] = events(tmp_path, "resume")
    assert resume["step"] >= 4 and len(events(tmp_path, "train_start")) == 2
    # Nothing lost, nothing repeated.
    assert final_weights(tmp_path) == final_weights(reference)
    assert_audit_ok(tmp_path)
