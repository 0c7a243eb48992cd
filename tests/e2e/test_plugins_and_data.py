"""Bring your own model, dataset and loss; prepare data with the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from tests.helpers import TINY_CONFIG, as_set_args, run_steadytrain

pytestmark = pytest.mark.slow
# A user's own dataset, model and batch layout (tests/plugins/user_plugins.py).
REGRESSION_JOB = [
    "data.dataset_factory=user_plugins:make_regression",
    "model.factory=user_plugins:build_regressor",
    "model.kwargs={dim: 8}",
    "train.global_batch_size=16",
    "train.micro_batch_size=4",
]


def test_user_model_dataset_and_loss_train_over_two_ranks(tmp_path: Path) -> None:
    overrides = [
        *REGRESSION_JOB,
        "data.dataset_kwargs={num_samples: 256, dim: 8}",
        "data.ledger=true",
        "train.loss_fn=user_plugins:mse_loss",
        "train.max_steps=24",
        "train.lr=0.03",
        "train.warmup_steps=2",
        "train.eval_every=0",
        "train.eval_batches=2",
        "log.every_steps=4",
        "log.console=false",
    ]
    result = run_steadytrain(
        "train", TINY_CONFIG, "--nproc", "2", "--run-dir", tmp_path, *as_set_args(overrides)
    )
    assert result.returncode == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in records if "loss" in record]
    assert losses[-1] < losses[0] / 2, losses
    weights = load_file(tmp_path / "final" / "model.safetensors")
    assert set(weights) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    # 24 steps × 16 = 384 samples over a 256-sample dataset: one full epoch, then a partial.
    audit = run_steadytrain("audit", tmp_path)
    assert audit.returncode == 0, audit.output
    assert "epoch 0 (complete): 256 samples consumed" in audit.stdout
    assert "epoch 1 (partial): 128 samples consumed" in audit.stdout


def test_exception_in_user_code_prints_its_traceback_and_exits_1(tmp_path: Path) -> None:
    """A bug in user code is not bad input: the traceback is the report, exit code 1."""
    overrides = [*REGRESSION_JOB, "train.loss_fn=user_plugins:failing_loss", "log.console=false"]
    result = run_steadytrain(
        "train", TINY_CONFIG, "--nproc", "2", "--run-dir", tmp_path, *as_set_args(overrides)
    )
    assert result.returncode == 1, result.output
    assert "Traceback" in result.stderr and "this loss fails on purpose" in result.stderr
    assert "a worker failed (exit code 1)" in result.stderr
    assert not (tmp_path / "final").exists()


def test_user_token_model_on_the_default_data(small_overrides: list[str], tmp_path: Path) -> None:
    overrides = [
        *small_overrides,
        "model.factory=user_plugins:build_bigram",
        "model.kwargs={width: 8}",
    ]
    result = run_steadytrain("train", TINY_CONFIG, "--run-dir", tmp_path, *as_set_args(overrides))
    assert result.returncode == 0, result.output
    assert set(load_file(tmp_path / "final" / "model.safetensors")) == {
        "embed.weight",
        "out.weight",
        "out.bias",
    }


def test_data_prepare_cli_and_training_on_prepared_shards(
    text_corpus: Path, small_overrides: list[str], tmp_path: Path
) -> None:
    shards = tmp_path / "shards"
    result = run_steadytrain(
        "data",
        "prepare",
        "--corpus",
        f"{text_corpus}/*.py",
        "--output",
        shards,
        "--val-fraction",
        "0.1",
        "--shard-tokens",
        "65536",
    )
    assert result.returncode == 0, result.output
    index = json.loads((shards / "index.json").read_text())
    assert len(index["splits"]["train"]) > 1 and index["splits"]["val"]
    first = index["splits"]["train"][0]
    tokens = np.fromfile(shards / first["path"], dtype=np.uint8)
    assert tokens.size == first["num_tokens"]
    sources = b"".join(path.read_bytes() for path in sorted(text_corpus.glob("*.py")))
    assert tokens[:1000].tobytes() in sources  # byte-level: tokens are the text's bytes

    train = run_steadytrain(
        "train",
        TINY_CONFIG,
        "--run-dir",
        tmp_path / "run",
        *as_set_args([*small_overrides, f"data.corpus={shards}"]),
    )
    assert train.returncode == 0, train.output
    assert str(shards) in (tmp_path / "run" / "config.yaml").read_text()


def test_data_prepare_refuses_a_missing_corpus(tmp_path: Path) -> None:
    result = run_steadytrain(
        "data", "prepare", "--corpus", str(tmp_path / "nothing-here"), "--output", tmp_path / "o"
    )
    assert result.returncode == 2
    assert "matches no files" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()
