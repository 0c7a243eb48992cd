"""Bad input: one line naming the field and the fix, exit code 2, no traceback.

Also under ``--nproc 2``, where an error raised inside the workers must not surface as the
launcher's multi-page failure report.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.helpers import TINY_CONFIG, as_set_args, run_steadytrain

pytestmark = pytest.mark.slow


def assert_one_line_error(result, *, mentions: list[str]) -> None:
    assert result.returncode == 2, result.output
    assert "Traceback" not in result.output, result.output
    assert "ChildFailedError" not in result.output and "Root Cause" not in result.output
    error_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1, result.stderr
    for text in mentions:
        assert text in error_lines[0], error_lines[0]


@pytest.fixture
def malformed_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "broken.yaml"
    path.write_text("seed: 1\ntrain:\n  max_steps: [1, 2\n")
    return path


CASES = {
    "unknown key": (["train.max_stepz=3"], ["train.max_stepz", "unknown key", "max_steps"]),
    "wrong type": (["train.lr=fast"], ["train.lr", "fast"]),
    "negative batch": (["train.global_batch_size=-8"], ["train.global_batch_size", "greater"]),
    "indivisible batch": (
        ["train.global_batch_size=30"],
        ["train.global_batch_size", "not divisible", "multiple of 16"],
    ),
    "missing corpus": (["data.corpus=/no/such/corpus"], ["data.corpus", "/no/such/corpus"]),
    "unimportable factory": (
        ["model.factory=no_such_package.models:build"],
        ["model.factory", "no_such_package.models", "PYTHONPATH"],
    ),
    "factory not a module": (
        ["model.factory=user_plugins:not_a_module"],
        ["model.factory", "not a torch.nn.Module"],
    ),
    "bad model kwargs": (
        ["model.kwargs={width: 64, depth: 9}"],
        ["model.factory", "depth", "model.kwargs"],
    ),
    "override without =": (["train.lr"], ["--set", "key=value"]),
}


@pytest.mark.parametrize("nproc", [None, 2], ids=["single", "nproc2"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_override_is_one_line_exit_2(case: str, nproc: int | None, tmp_path: Path) -> None:
    overrides, mentions = CASES[case]
    overrides = [*overrides, f"data.cache_dir={tmp_path / 'cache'}"]
    launch = ["--nproc", str(nproc)] if nproc else []
    result = run_steadytrain(
        "train", TINY_CONFIG, *launch, "--run-dir", tmp_path / "run", *as_set_args(overrides)
    )
    if case == "indivisible batch" and nproc is None:
        mentions = ["train.global_batch_size", "not divisible", "multiple of 8"]
    assert_one_line_error(result, mentions=mentions)
    assert not (tmp_path / "run" / "final").exists()


def test_malformed_yaml(malformed_yaml: Path) -> None:
    result = run_steadytrain("train", malformed_yaml, "--nproc", "2")
    assert_one_line_error(result, mentions=[str(malformed_yaml), "malformed YAML", "line 3"])


def test_missing_config_file(tmp_path: Path) -> None:
    result = run_steadytrain("train", tmp_path / "absent.yaml")
    assert_one_line_error(result, mentions=["absent.yaml", "not found"])


def test_error_raised_inside_workers_is_one_line(
    small_overrides: list[str], tmp_path: Path
) -> None:
    """The preflight cannot see this: the dataset factory only fails when workers call it."""
    overrides = [
        *small_overrides,
        "data.dataset_factory=user_plugins:make_regression",
        "data.dataset_kwargs={no_such_argument: 1}",
        "model.factory=user_plugins:build_regressor",
        "model.kwargs={dim: 8}",
        "train.loss_fn=user_plugins:mse_loss",
    ]
    result = run_steadytrain(
        "train", TINY_CONFIG, "--nproc", "2", "--run-dir", tmp_path, *as_set_args(overrides)
    )
    assert_one_line_error(result, mentions=["data.dataset_factory", "no_such_argument"])


def test_validate_accepts_and_refuses_by_world_size() -> None:
    good = run_steadytrain("validate", TINY_CONFIG, "--nproc", "2")
    assert good.returncode == 0, good.output
    assert "valid for 2 rank(s)" in good.stdout
    assert "2 rank(s) × 8 micro-batch × 2 accumulation = 32" in good.stdout
    bad = run_steadytrain("validate", TINY_CONFIG, "--nproc", "3")
    assert_one_line_error(bad, mentions=["train.global_batch_size", "multiple of 24"])


def test_validate_applies_overrides() -> None:
    result = run_steadytrain("validate", TINY_CONFIG, "--set", "train.micro_batch_size=0")
    assert_one_line_error(result, mentions=["train.micro_batch_size"])


def test_a_busy_prometheus_port_is_one_line(small_overrides: list[str], tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_steadytrain(
            "train",
            TINY_CONFIG,
            "--nproc",
            "2",
            "--run-dir",
            tmp_path,
            *as_set_args([*small_overrides, f"telemetry.prometheus_port={port}"]),
        )
    assert_one_line_error(result, mentions=["telemetry.prometheus_port", f"127.0.0.1:{port}"])
