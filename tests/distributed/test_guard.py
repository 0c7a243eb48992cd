"""Signal checks under two real ranks: the schedule is agreed even when the ranks' paces differ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import run_torchrun

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("worker_guard.py")


def test_ranks_at_different_paces_check_signals_at_the_same_steps(tmp_path: Path) -> None:
    result = run_torchrun(WORKER, tmp_path, timeout=120)
    assert result.returncode == 0, result.output
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1], ranks  # the same checks, the same stop
    checks = ranks[0]["checks"]
    # The first two steps, then the faster rank's proposal (0.25 s / (1/64 s) = 16 steps) loses
    # to the slower one's (0.25 s / (1/16 s) = 4 steps): a check every 4 steps.
    assert checks == [0, 1, *range(5, 60, 4)], checks
    # The signal reached rank 1 alone at step 30; both stop at the first check after it.
    assert ranks[0]["stopped_at"] == 33
