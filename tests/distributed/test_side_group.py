"""The background commit's process group gives up after ``dist.timeout_s``, not the default."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import run_torchrun

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("worker_side_group.py")


def test_a_side_group_collective_gives_up_after_its_timeout() -> None:
    # Rank 1 stays away for 12 s; with the backend's default (30 min) rank 0 would wait until
    # rank 1 left. It must give up after about timeout_s = 2.
    result = run_torchrun(WORKER, "2", "12", timeout=120)
    assert result.returncode == 0, result.output
    waited = re.search(r"gave up after ([\d.]+) s", result.stdout)
    assert waited is not None, result.output
    assert 1.5 <= float(waited.group(1)) < 8, result.output
