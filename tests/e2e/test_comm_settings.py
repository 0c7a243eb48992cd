"""DDP communication settings at the command line: what validate reports, and settings that
cannot work refused as one line with exit 2 before training starts (tests/e2e/test_bad_input.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.e2e.test_bad_input import assert_one_line_error
from tests.helpers import TINY_CONFIG, as_set_args, run_steadytrain, run_torchrun

pytestmark = pytest.mark.slow

STATIC_GRAPH_WITH_ACCUMULATION = ["parallel.static_graph=true"]  # tiny: 2 micro-steps at 2 ranks
CASES = {
    "static graph with accumulation": (
        STATIC_GRAPH_WITH_ACCUMULATION,
        ["parallel.static_graph", "accumulates 2 micro-steps", "train.micro_batch_size=16"],
    ),
    "unknown hook": (["parallel.comm_hook=int8"], ["parallel.comm_hook", "'powersgd'"]),
    "empty buckets": (["parallel.bucket_cap_mb=0"], ["parallel.bucket_cap_mb", "greater than 0"]),
    "rank 0": (["parallel.powersgd_rank=0"], ["parallel.powersgd_rank", "greater than or equal"]),
    "DDP hook under FSDP": (
        ["parallel.strategy=fsdp", "parallel.comm_hook=powersgd"],
        ["parallel.comm_hook", "parallel.strategy is 'fsdp'", "parallel.strategy=ddp"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_settings_that_cannot_work_are_one_line_exit_2(case: str, tmp_path: Path) -> None:
    overrides, mentions = CASES[case]
    overrides = [*overrides, f"data.cache_dir={tmp_path / 'cache'}"]
    result = run_steadytrain(
        "train", TINY_CONFIG, "--nproc", "2", "--run-dir", tmp_path / "run", *as_set_args(overrides)
    )
    assert_one_line_error(result, mentions=mentions)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_workers_refuse_without_the_launchers_preflight(tmp_path: Path) -> None:
    """Under torchrun nothing checks before the workers start: they refuse together, before
    the first step, and one of them says why."""
    steadytrain = Path(sys.executable).parent / "steadytrain"
    overrides = [*STATIC_GRAPH_WITH_ACCUMULATION, f"data.cache_dir={tmp_path / 'cache'}"]
    result = run_torchrun(
        steadytrain, "train", TINY_CONFIG, "--run-dir", tmp_path / "run", *as_set_args(overrides)
    )
    assert result.returncode != 0, result.output
    assert result.output.count("parallel.static_graph: ") == 1, result.output
    assert "exitcode  : 2" in result.output, result.output  # the usage exit code, not a crash
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_validate_describes_the_gradient_sync() -> None:
    result = run_steadytrain(
        "validate",
        TINY_CONFIG,
        "--nproc",
        "2",
        *as_set_args(
            [
                "parallel.static_graph=true",
                "train.micro_batch_size=16",  # no accumulation at 2 ranks
                "parallel.bucket_cap_mb=4",
                "parallel.comm_hook=powersgd",
                "parallel.powersgd_rank=4",
            ]
        ),
    )
    assert result.returncode == 0, result.output
    assert (
        "gradient sync: DDP, PowerSGD rank 4 from step 20, 4 MiB buckets, static graph"
        in result.stdout
    ), result.stdout
    fsdp = run_steadytrain(
        "validate",
        TINY_CONFIG,
        "--nproc",
        "2",
        *as_set_args(["parallel.strategy=fsdp", "parallel.activation_checkpointing=true"]),
    )
    assert fsdp.returncode == 0, fsdp.output
    assert (
        "gradient sync: FSDP2, parameters, gradients and optimizer state sharded over 2 ranks, "
        "reduce-scatter, fp32, activation checkpointing" in fsdp.stdout
    ), fsdp.stdout
    single = run_steadytrain("validate", TINY_CONFIG, "--nproc", "1")
    assert "gradient sync: none with 1 rank" in single.stdout, single.output
