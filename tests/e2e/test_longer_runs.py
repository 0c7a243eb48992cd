"""Training a finished run for longer: ``--allow-change`` for identity fields, the schedule
that follows, and the final validation loss of the final weights. One small run serves all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import TINY_CONFIG, as_set_args, run_steadytrain

pytestmark = pytest.mark.slow
LR, MIN_LR_RATIO = 0.003, 0.1


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def events(run_dir: Path, kind: str) -> list[dict]:
    return [record for record in read_jsonl(run_dir / "events.jsonl") if record["event"] == kind]


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
    ("field", "reason"),
    [
        ("train.micro_batch_size", "not an identity field"),
        ("train.max_step", "no such identity field"),
    ],
)
def test_allow_change_names_an_identity_field(
    field: str, reason: str, finished_run: Path, settings: list[str]
) -> None:
    result = train(finished_run, [*settings, "train.max_steps=12"], "--allow-change", field)
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


def test_allow_change_trains_a_finished_run_for_longer(
    finished_run: Path, settings: list[str]
) -> None:
    result = train(
        finished_run, [*settings, "train.max_steps=12"], "--allow-change", "train.max_steps"
    )
    assert result.returncode == 0, result.output

    (override,) = events(finished_run, "identity_override")
    change = {"step": 8, "field": "train.max_steps", "old": 8, "new": 12}
    assert override["changes"] == [change]
    assert events(finished_run, "resume")[-1]["step"] == 8
    assert events(finished_run, "train_end")[-1]["step"] == 12
    manifest = json.loads(
        (finished_run / "checkpoints" / "step_00000012" / "manifest.json").read_text()
    )
    assert manifest["identity_overrides"] == [change]
    assert manifest["identity"]["train.max_steps"] == 12
    # The decay had ended at step 8; the extra steps go on at the minimum, no new warmup.
    rates = {r["step"]: r["lr"] for r in read_jsonl(finished_run / "metrics.jsonl") if "lr" in r}
    assert [rates[step] for step in range(9, 13)] == pytest.approx([LR * MIN_LR_RATIO] * 4)
    audit = run_steadytrain("audit", finished_run)
    assert audit.returncode == 0, audit.output
    # The run's identity is now the longer one: the same command resumes without the flag.
    again = train(finished_run, [*settings, "train.max_steps=12"])
    assert again.returncode == 0, again.output
