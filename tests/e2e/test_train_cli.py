"""The CLI as a user runs it: --nproc 2 over gloo, plain torchrun, a single process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers import TINY_CONFIG, as_set_args, read_jsonl, run_steadytrain, run_torchrun

pytestmark = pytest.mark.slow

METRIC_KEYS = {
    "step",
    "loss",
    "lr",
    "step_time_s",
    "samples_per_second",
    "tokens_per_second",
    "data_wait_s",
    "h2d_s",
    "forward_s",
    "backward_s",
    "grad_sync_s",
    "optimizer_s",
    "checkpoint_s",
}


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory, text_corpus: Path, data_cache: Path):
    """One deterministic 2-rank run of the tiny config with the ledger on."""
    run_dir = tmp_path_factory.mktemp("run-a")
    overrides = [*_overrides(text_corpus, data_cache), "data.ledger=true", "train.max_steps=12"]
    result = run_steadytrain(
        "train", TINY_CONFIG, "--nproc", "2", "--run-dir", run_dir, *as_set_args(overrides)
    )
    assert result.returncode == 0, result.output
    return run_dir, overrides, result


def _overrides(text_corpus: Path, data_cache: Path) -> list[str]:
    return [
        f"data.corpus={text_corpus}",
        f"data.cache_dir={data_cache}",
        "data.seq_len=32",
        "model.kwargs={num_layers: 1, width: 32, num_heads: 2}",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.warmup_steps=2",
        "train.eval_every=6",
        "train.eval_batches=2",
        "log.every_steps=3",
        "log.console=false",
        "deterministic=true",
    ]


def test_run_dir_has_the_documented_files(two_rank_run) -> None:
    run_dir, _, _ = two_rank_run
    assert (run_dir / "config.yaml").is_file()
    metrics = [record for record in read_jsonl(run_dir / "metrics.jsonl") if "loss" in record]
    assert [record["step"] for record in metrics] == [3, 6, 9, 12]
    for record in metrics:
        assert record.keys() >= METRIC_KEYS
        assert record["step_time_s"] > 0 and record["tokens_per_second"] > 0
    assert any("val_loss" in record for record in read_jsonl(run_dir / "metrics.jsonl"))
    events = [record["event"] for record in read_jsonl(run_dir / "events.jsonl")]
    assert events[0] == "train_start" and events[-1] == "train_end"
    weights = load_file(run_dir / "final" / "model.safetensors")
    assert any(name.startswith("blocks.0.") for name in weights)


def test_train_start_event_records_layout_and_identity(two_rank_run) -> None:
    run_dir, _, _ = two_rank_run
    start = read_jsonl(run_dir / "events.jsonl")[0]
    assert start["world_size"] == 2
    assert start["grad_accum_steps"] == 2  # 8 = 2 ranks × 2 micro × 2 accumulation
    assert start["identity"]["train.global_batch_size"] == 8
    assert "log.every_steps" not in start["identity"]


def test_loss_falls(two_rank_run) -> None:
    run_dir, _, _ = two_rank_run
    losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses


def test_audit_proves_exactly_once(two_rank_run) -> None:
    run_dir, _, _ = two_rank_run
    result = run_steadytrain("audit", run_dir)
    assert result.returncode == 0, result.output
    assert "audit OK" in result.stdout


def test_audit_catches_a_replayed_sample(two_rank_run, tmp_path: Path) -> None:
    import shutil

    run_dir, _, _ = two_rank_run
    tampered = tmp_path / "tampered"
    shutil.copytree(run_dir, tampered)
    rank_file = tampered / "ledger" / "rank-00001.jsonl"
    records = read_jsonl(rank_file)
    # Rank 1 "re-reads" a sample that rank 0 consumed in step 0.
    stolen = read_jsonl(tampered / "ledger" / "rank-00000.jsonl")[0]["sample_ids"][0]
    records[3]["sample_ids"][0] = stolen
    rank_file.write_text("".join(json.dumps(record) + "\n" for record in records))
    result = run_steadytrain("audit", tampered)
    assert result.returncode == 3, result.output
    assert "more than once" in result.stdout and str(stolen) in result.stdout
    assert "never consumed" in result.stdout


def test_deterministic_reruns_are_bit_identical(two_rank_run, tmp_path: Path) -> None:
    run_dir, overrides, _ = two_rank_run
    rerun = tmp_path / "rerun"
    result = run_steadytrain(
        "train", TINY_CONFIG, "--nproc", "2", "--run-dir", rerun, *as_set_args(overrides)
    )
    assert result.returncode == 0, result.output
    first = (run_dir / "final" / "model.safetensors").read_bytes()
    assert (rerun / "final" / "model.safetensors").read_bytes() == first


def test_plain_torchrun_launch_matches_nproc(two_rank_run, tmp_path: Path) -> None:
    """Under torchrun the same command is a worker; same config, same weights."""
    run_dir, overrides, _ = two_rank_run
    result = run_torchrun(
        "-m", "steadytrain", "train", TINY_CONFIG, "--run-dir", tmp_path, *as_set_args(overrides)
    )
    assert result.returncode == 0, result.output
    expected = (run_dir / "final" / "model.safetensors").read_bytes()
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == expected


def test_single_process_without_launcher(small_overrides: list[str], tmp_path: Path) -> None:
    result = run_steadytrain(
        "train", TINY_CONFIG, "--run-dir", tmp_path, *as_set_args(small_overrides)
    )
    assert result.returncode == 0, result.output
    start = read_jsonl(tmp_path / "events.jsonl")[0]
    assert start["world_size"] == 1 and start["grad_accum_steps"] == 4
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_bf16_autocast_trains(small_overrides: list[str], tmp_path: Path) -> None:
    overrides = [*small_overrides, "train.precision=bf16", "train.max_steps=8"]
    result = run_steadytrain("train", TINY_CONFIG, "--run-dir", tmp_path, *as_set_args(overrides))
    assert result.returncode == 0, result.output
    losses = [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert all(loss == loss and loss < 10 for loss in losses), losses  # finite, sane
    assert losses[-1] < losses[0]
