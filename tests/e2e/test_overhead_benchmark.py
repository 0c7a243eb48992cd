"""``benchmarks/overhead_paired.py`` end to end at its smallest: both loops take turns in the
same two ranks, and every figure the write-up quotes comes out of the JSON, computed as the
docstring says (each fit() block against the mean of the hand loop's turns around it)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, cli_env

pytestmark = pytest.mark.slow

SMALL_MODEL = [
    "model.kwargs={num_layers: 1, width: 32, num_heads: 2}",
    "data.seq_len=32",
    "train.global_batch_size=16",
    "train.micro_batch_size=8",
]


def test_the_paired_benchmark_brackets_each_block_with_the_hand_loops_turns(
    tmp_path: Path,
) -> None:
    out = tmp_path / "paired.json"
    command = [sys.executable, str(REPO / "benchmarks" / "overhead_paired.py")]
    command += ["--pairs", "4", "--block", "10", "--warmup", "10", "--variant", "ledger_on"]
    command += ["--work-dir", str(tmp_path / "work"), "--json", str(out)]
    command += [arg for setting in SMALL_MODEL for arg in ("--set", setting)]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=cli_env(), cwd=REPO
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "median ratio" in completed.stdout
    summary = json.loads(out.read_text())
    variant = summary["variants"]["ledger_on"]
    pairs = variant["pairs"]
    assert [pair["pair"] for pair in pairs] == [1, 2, 3, 4]
    # fit()'s blocks are steps 11-20, 21-30, … after the 10 warm-up steps.
    assert [(pair["first_step"], pair["last_step"]) for pair in pairs] == [
        (10 + 10 * n, 20 + 10 * n) for n in range(4)
    ]
    raw = json.loads((tmp_path / "work" / "ledger_on.json").read_text())
    turns = raw["baseline_blocks"]
    assert len(turns) == 5  # H0 S1 H1 … S4 H4
    for number, pair in enumerate(pairs):
        around = (turns[number]["seconds"] + turns[number + 1]["seconds"]) / 2
        assert pair["baseline"]["seconds"] == pytest.approx(around)
        assert pair["wall_ratio"] == pytest.approx(pair["steadytrain"]["seconds"] / around)
        cpu_around = (turns[number]["cpu_seconds"] + turns[number + 1]["cpu_seconds"]) / 2
        # The training thread's CPU time: positive, and never more than its wall time.
        assert 0 < pair["steadytrain"]["cpu_seconds"] <= pair["steadytrain"]["seconds"]
        assert pair["cpu_ratio"] == pytest.approx(pair["steadytrain"]["cpu_seconds"] / cpu_around)
    assert variant["median_wall_ratio"] == pytest.approx(
        statistics.median(pair["wall_ratio"] for pair in pairs)
    )
    low, high = variant["median_wall_ratio_95"]
    assert low <= variant["median_wall_ratio"] <= high
    assert variant["median_cpu_ratio"] == pytest.approx(
        statistics.median(pair["cpu_ratio"] for pair in pairs)
    )
    assert raw["world_size"] == 2 and raw["grad_accum_steps"] == 1
    # steadytrain really trained: its run directory has the ledger of every committed step.
    rank_files = sorted((tmp_path / "work" / "ledger_on").rglob("rank-0000?.jsonl"))
    assert [len(path.read_text().splitlines()) for path in rank_files] == [50, 50]
