"""Console progress: step lines, the run summary (paths printed whole) and the null progress."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from steadytrain.telemetry import (
    PHASES,
    ConsoleProgress,
    IntervalStats,
    NullProgress,
    Progress,
    interval_record,
)

WIDTH = 80
RUN_DIR = (
    "/mnt/shared/experiments/"
    + "/".join(f"sweep-{i:02d}-lr3e-4-warmup" for i in range(5))
    + "/run-2406-ab"
)
CHECKPOINT_URL = (
    "s3://training-checkpoints-eu-west-1/experiments/lm-1b/sweep-04/[bold]/step-00000007/"
)
RECORD = {
    "step": 3,
    "loss": 1.5,
    "lr": 1e-3,
    "step_time_s": 0.0125,
    "tokens_per_second": 12345.0,
    "grad_sync_share": 0.1,
}


def console_progress(*, max_steps: int = 10) -> tuple[ConsoleProgress, io.StringIO]:
    buffer = io.StringIO()
    console = Console(file=buffer, width=WIDTH, force_terminal=False, color_system=None)
    return ConsoleProgress(max_steps=max_steps, console=console), buffer


def run_summary(*, run_dir: str = RUN_DIR) -> dict[str, str]:
    """The keys and kinds of values ``train.session`` passes."""
    return {
        "steps": "7 (224 samples, 28,672 tokens)",
        "val loss": "2.3456",
        "resumed from": "nothing (fresh start)",
        "last checkpoint": f"step 7 -> {CHECKPOINT_URL} (0.12 s)",
        "run dir": run_dir,
        "weights": f"{run_dir}/final/model.safetensors",
    }


def test_the_test_paths_are_long() -> None:
    assert len(RUN_DIR) == 150
    assert len(CHECKPOINT_URL) > WIDTH


def test_summary_prints_long_paths_whole_on_their_own_lines() -> None:
    progress, buffer = console_progress()
    summary = run_summary()
    progress.summary(summary)
    output = buffer.getvalue()
    lines = output.splitlines()

    assert "…" not in output
    for key in ("last checkpoint", "run dir", "weights"):
        assert summary[key] in output
        assert f"{key}: {summary[key]}" in lines
    assert CHECKPOINT_URL in output  # brackets in a path are not read as rich markup


def test_summary_keeps_short_values_in_the_table() -> None:
    progress, buffer = console_progress()
    progress.summary(run_summary())
    lines = buffer.getvalue().splitlines()

    assert lines[0].strip() == "steadytrain run summary"
    table_rows = [line for line in lines if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in table_rows] == [
        "steps",
        "val loss",
        "resumed from",
    ]
    assert "7 (224 samples, 28,672 tokens)" in table_rows[0]
    below_table = ("last checkpoint: ", "run dir: ", "weights: ")
    assert all(len(line) <= WIDTH for line in lines if not line.startswith(below_table))


@pytest.mark.parametrize("length", range(40, 90))
def test_summary_never_cuts_a_value_near_the_table_width(length: int) -> None:
    run_dir = "/" + "d" * (length - 2) + "z"  # the last character shows any cut
    progress, buffer = console_progress()
    progress.summary({"steps": "7", "run dir": run_dir})
    output = buffer.getvalue()

    assert run_dir in output
    assert "…" not in output
    lines = output.splitlines()
    assert all(len(line) <= WIDTH for line in lines if not line.startswith("run dir: "))


def test_summary_formats_values_that_are_not_strings() -> None:
    progress, buffer = console_progress()
    progress.summary({"steps": 7, "val loss": None})
    table_rows = [line for line in buffer.getvalue().splitlines() if line.startswith("│")]
    assert [row.split("│")[2].strip() for row in table_rows] == ["7", "None"]


def test_step_prints_one_line() -> None:
    progress, buffer = console_progress(max_steps=10)
    progress.step(RECORD)
    assert buffer.getvalue() == (
        "step  3/10  loss 1.5000  lr 1.00e-03    12.5 ms/step     12,345 tok/s  sync 10.0%\n"
    )


def test_say_prints_the_message_as_is() -> None:
    progress, buffer = console_progress()
    progress.say("data: [red]shards[/red] in " + RUN_DIR)
    assert buffer.getvalue() == "data: [red]shards[/red] in " + RUN_DIR + "\n"


def test_console_progress_prints_to_stdout_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    progress = ConsoleProgress(max_steps=10)
    progress.step(RECORD)
    progress.summary(run_summary())
    out = capsys.readouterr().out
    assert "step  3/10" in out
    assert RUN_DIR in out


def test_null_progress_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    progress: Progress = NullProgress()
    progress.say("data: 5 shards")
    progress.step(RECORD)
    progress.summary(run_summary())
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ""


def test_summary_table_prints_brackets_as_text() -> None:
    progress, buffer = console_progress()
    progress.summary({"resumed from": "s3://bucket/[bold]/step-3"})
    assert "│ s3://bucket/[bold]/step-3 │" in buffer.getvalue()


def test_summary_on_a_narrow_console_prints_every_value_below_the_title() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, width=20, force_terminal=False, color_system=None)
    ConsoleProgress(max_steps=10, console=console).summary({"steps": "7 (224 samples)"})
    assert buffer.getvalue().splitlines() == ["steadytrain run summary", "steps: 7 (224 samples)"]


def terminal_progress(
    monkeypatch: pytest.MonkeyPatch, *, ci: bool
) -> tuple[ConsoleProgress, io.StringIO]:
    if ci:
        monkeypatch.setenv("CI", "true")
    else:
        monkeypatch.delenv("CI", raising=False)
    buffer = io.StringIO()
    console = Console(file=buffer, width=120, force_terminal=True, color_system=None)
    return ConsoleProgress(max_steps=10, console=console), buffer


def test_a_terminal_shows_a_bar_with_eta_loss_tokens_and_health(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    progress, buffer = terminal_progress(monkeypatch, ci=False)
    progress.say("data: 5 shards")
    progress.step({**RECORD, "health_score": 84})
    progress.step({**RECORD, "step": 6, "loss": 1.25, "health_score": 90})
    progress.summary({"steps": "10"})
    output = buffer.getvalue()
    assert "data: 5 shards" in output
    last_bar = [line for line in output.replace("\r", "\n").splitlines() if "step 6/10" in line]
    assert last_bar, output
    assert "loss 1.2500" in last_bar[-1] and "12,345 tok/s" in last_bar[-1]
    assert "health 90" in last_bar[-1]
    assert "━" in last_bar[-1]  # the bar itself
    assert "│ steps │ 10 │" in output  # the summary, after the bar it closed
    assert "ms/step" not in output  # no plain step lines in a terminal


def test_under_ci_a_terminal_gets_plain_lines_with_health(monkeypatch: pytest.MonkeyPatch) -> None:
    progress, buffer = terminal_progress(monkeypatch, ci=True)
    progress.step({**RECORD, "health_score": 84})
    progress.close()
    [line] = buffer.getvalue().splitlines()
    assert line.startswith("step  3/10  loss 1.5000") and line.endswith("health 84")


def test_synced_phase_samples_are_reported_apart_from_host_timed_steps() -> None:
    stats = IntervalStats()
    host = {name: 0.001 for name in PHASES}
    exact = {name: 0.010 for name in PHASES}
    for _ in range(3):
        stats.add(0.02, host)
    stats.add(0.05, exact, synced=True)
    record = interval_record(stats, samples_per_step=8, tokens_per_sample=10)
    assert record["step_time_s"] == pytest.approx((3 * 0.02 + 0.05) / 4)  # every step's wall time
    assert record["forward_s"] == pytest.approx(0.001)  # host-timed steps only
    assert record["synced_steps"] == 1
    assert record["synced_forward_s"] == pytest.approx(0.010)  # the exact sample, on its own


def test_an_interval_without_synced_steps_has_no_synced_fields() -> None:
    stats = IntervalStats()
    stats.add(0.02, {name: 0.002 for name in PHASES})
    record = interval_record(stats, samples_per_step=8, tokens_per_sample=10)
    assert record["backward_s"] == pytest.approx(0.002)
    assert not [key for key in record if key.startswith("synced_")]
