"""The chaos harness, bounded: four faults of every kind, then the proof of recovery."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import TINY_CONFIG, as_set_args, events, run_steadytrain

pytestmark = pytest.mark.slow
# Seed 4 draws one fault of each kind for 24 steps over 2 ranks: a NaN on rank 0 at step 5,
# kill -9 of rank 0 while a checkpoint is written, SIGSTOP of rank 0, SIGTERM to the launcher.
DEFAULT_SEED = "4"


def test_chaos_with_every_kind_of_fault_ends_bit_identical(
    overrides: list[str], tmp_path: Path
) -> None:
    seed = os.environ.get("STEADYTRAIN_TEST_SEED", DEFAULT_SEED)
    result = run_steadytrain(
        "chaos",
        TINY_CONFIG,
        "--kills",
        "4",
        "--seed",
        seed,
        "--nproc",
        "2",
        "--run-dir",
        tmp_path,
        # Agree on signals every step: after a warm restart the last steps take a few ms
        # each, and the launcher's SIGTERM must reach a step, not the end of the run.
        *as_set_args([*overrides, "fault.signal_check_s=0"]),
        timeout=600,
    )
    assert result.returncode == 0, result.output
    assert "chaos OK" in result.stdout
    assert "bit-identical" in result.stdout
    if seed != DEFAULT_SEED:
        return
    chaos = tmp_path / "chaos"
    assert [e["step"] for e in events(chaos, "nonfinite_step_skipped")] == [5]
    assert events(chaos, "preempted")
    # Rank 0 serves the group's store, so its peer finds the store frozen along with it.
    assert {(e["suspect_rank"], e["suspect_reason"]) for e in events(chaos, "hang")} == {
        (0, "store unreachable")
    }
    recoveries = events(chaos, "recovery")
    assert len(recoveries) >= 3  # kill, stop and term each end in a resume
    assert "faults injected  │ 4 (kill ×1, term ×1, stop ×1, nan ×1)" in result.stdout
