"""Training a finished run for longer: ``--allow-change`` for identity fields, the schedule
that follows, and the final validation loss of the final weights. One small run serves all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import TINY_CONFIG, as_set_args, events, read_jsonl, run_steadytrain

pytestmark = pytest.mark.slow
LR, MIN_LR_RATIO = 0.003, 0.1


def train(run_dir: Path, settings: list[str], *extra: str):
    return run_steadytrain(
        "train", TINY_CONFIG, "--run-dir", run_dir, *extra, *as_set_args(settings)
    )


@pytest.fixture(scope="module")
def settings(text_corpus: Path, data_cache: Path) -> list[str]:
    return [
        f"data.corpus={text_corpus}",
        f"data.cache_dir={data_cache}",
        "data.seq_len=32",
        "data.ledger=true",
        "model.kwargs={num_layers: 1, width: 32, num_heads: 2}",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.warmup_steps=2",
        f"train.lr={LR}",
        f"train.min_lr_ratio={MIN_LR_RATIO}",
        "train.eval_every=5",  # does not divide max_steps
        "train.eval_batches=2",
        "checkpoint.every_steps=4",
        "log.every_steps=1",
        "log.console=false",
        "deterministic=true",
    ]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, settings: list[str]) -> Path:
    run_dir = tmp_path_factory.mktemp("finished")
    result = train(run_dir, [*settings, "train.max_steps=8"])
    assert result.returncode == 0, result.output
    return run_dir


def test_the_final_validation_loss_is_of_the_final_weights(finished_run: Path) -> None:
    evaluated = {
        r["step"]: r["val_loss"]
        for r in read_jsonl(finished_run / "metrics.jsonl")
        if "val_loss" in r
    }
    assert set(evaluated) == {5, 8}, evaluated  # every eval_every steps, and at the end
    (end,) = events(finished_run, "train_end")
    assert end["val_loss"] == evaluated[8] != evaluated[5]


def test_a_longer_run_is_refused_without_allow_change(
    finished_run: Path, settings: list[str]
) -> None:
    result = train(finished_run, [*settings, "train.max_steps=12"])
    assert result.returncode == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    assert "train.max_steps: 8 -> 12" in lines[0] and "--allow-change FIELD" in lines[0]


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        (["--allow-change", "train.micro_batch_size"], "not an identity field"),
        (["--allow-change", "train.max_step"], "no such identity field"),
        (["--allow-change", "train.max_steps", "--no-resume"], "drop one of them"),
    ],
    ids=["operational", "unknown", "no-resume"],
)
def test_allow_change_names_an_identity_field_of_a_resume(
    arguments: list[str], reason: str, finished_run: Path, settings: list[str]
) -> None:
    result = train(finished_run, [*settings, "train.max_steps=12"], *arguments)
    assert result.returncode == 2, result.output
    assert reason in result.stderr and "Traceback" not in result.output, result.stderr


def test_an_allowed_change_that_cannot_apply_is_one_clear_line(
    finished_run: Path, settings: list[str], tmp_path: Path
) -> None:
    wider = [
        *settings,
        "train.max_steps=8",
        "model.kwargs={num_layers: 1, width: 64, num_heads: 2}",
    ]
    result = train(finished_run, wider, "--allow-change", "model.kwargs")
    assert result.returncode == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    assert "model state does not fit this run" in lines[0], lines[0]


def extended_copy(finished_run: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    return run_dir


def test_allow_change_trains_a_finished_run_for_longer(
    finished_run: Path, settings: list[str], tmp_path: Path
) -> None:
    run_dir = extended_copy(finished_run, tmp_path)
    longer = [*settings, "train.max_steps=12"]
    result = train(run_dir, longer, "--allow-change", "train.max_steps")
    assert result.returncode == 0, result.output

    (override,) = events(run_dir, "identity_override")
    change = {"step": 8, "field": "train.max_steps", "old": 8, "new": 12}
    assert override["changes"] == [change]
    assert events(run_dir, "resume")[-1]["step"] == 8
    assert events(run_dir, "train_end")[-1]["step"] == 12
    manifest = json.loads((run_dir / "checkpoints" / "step_00000012" / "manifest.json").read_text())
    assert manifest["identity_overrides"] == [change]
    assert manifest["identity"]["train.max_steps"] == 12
    # The decay had ended at step 8; the extra steps go on at the minimum, no new warmup.
    rates = {r["step"]: r["lr"] for r in read_jsonl(run_dir / "metrics.jsonl") if "lr" in r}
    assert [rates[step] for step in range(9, 13)] == pytest.approx([LR * MIN_LR_RATIO] * 4)
    assert run_steadytrain("audit", run_dir).returncode == 0
    # Checkpoints from before the change are still good: the change is on record.
    verify = run_steadytrain("checkpoints", "verify", run_dir)
    assert verify.returncode == 0, verify.output
    extended_weights = (run_dir / "final" / "model.safetensors").read_bytes()

    # The same settings resume without the flag, also when that means falling back to a
    # checkpoint from before the change (the newest is corrupt): same final weights.
    newest = run_dir / "checkpoints" / "step_00000012" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF
    newest.write_bytes(bytes(data))
    again = train(run_dir, longer)
    assert again.returncode == 0, again.output
    assert events(run_dir, "resume")[-1]["step"] == 8
    assert len(events(run_dir, "identity_override")) == 1  # not a new change
    assert (run_dir / "final" / "model.safetensors").read_bytes() == extended_weights
    manifest = json.loads((run_dir / "checkpoints" / "step_00000012" / "manifest.json").read_text())
    assert manifest["identity_overrides"] == [change]


def test_a_run_extended_mid_decay_decays_to_the_new_end(
    finished_run: Path, settings: list[str], tmp_path: Path
) -> None:
    from steadytrain.train import WarmupCosine

    run_dir = extended_copy(finished_run, tmp_path)
    step_4 = run_dir / "checkpoints" / "step_00000004"
    result = train(
        run_dir,
        [*settings, "train.max_steps=12"],
        "--resume-from",
        step_4,
        "--allow-change",
        "train.max_steps",
    )
    assert result.returncode == 0, result.output
    expected = WarmupCosine(warmup_steps=2, max_steps=8, min_ratio=MIN_LR_RATIO)
    expected.respan(at_step=4, max_steps=12)
    records = read_jsonl(run_dir / "metrics.jsonl")
    resumed = [r for r in records if "lr" in r][-8:]  # steps 5..12 of the resumed attempt
    assert [r["step"] for r in resumed] == list(range(5, 13))
    assert [r["lr"] for r in resumed] == pytest.approx([LR * expected(s) for s in range(5, 13)])
    assert resumed[3]["lr"] > LR * MIN_LR_RATIO * 1.5  # step 8: far from the old end
