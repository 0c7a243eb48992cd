"""``steadytrain plan checkpoints --run`` on one real training run, and both planners' bad input
as a user meets it: one line on stderr, exit code 2."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest

from steadytrain.plan import async_interval, daly_interval
from steadytrain.telemetry import measure_run_costs
from tests.helpers import TINY_CONFIG, as_set_args, events, read_jsonl, run_steadytrain

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def async_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run saving asynchronously every 2 steps, trained on for two more steps once, so
    that its resume writes a ``recovery`` event."""
    run_dir = tmp_path_factory.mktemp("plan") / "run"
    settings = ["checkpoint.every_steps=2", "checkpoint.async_save=true", "log.every_steps=2"]
    settings += ["log.console=false", "train.eval_every=0"]
    for max_steps, extra in ((4, []), (6, ["--allow-change", "train.max_steps"])):
        overrides = as_set_args([*settings, f"train.max_steps={max_steps}"])
        result = run_steadytrain("train", TINY_CONFIG, "--run-dir", run_dir, *overrides, *extra)
        assert result.returncode == 0, result.output
    return run_dir


def test_run_costs_are_the_checkpointers_timings(async_run: Path) -> None:
    costs = measure_run_costs(async_run)
    saves = events(async_run, "checkpoint_saved")
    assert [save["step"] for save in saves] == [2, 4, 6]
    assert all(save["async_save"] is True for save in saves)
    assert costs.asynchronous and costs.every_steps == 2 and costs.num_saves == 3
    assert costs.write_s == pytest.approx(statistics.median(s["write_s"] for s in saves))
    assert costs.stall_s == pytest.approx(statistics.median(s["blocked_s"] for s in saves))
    assert costs.waited_s == pytest.approx(statistics.median(s["waited_s"] for s in saves))
    (recovery,) = events(async_run, "recovery")
    assert recovery["restart"] == 0  # run again: the restart is the new process's own time
    parts = ("imports_s", "setup_s", "checkpoint_read_s", "first_step_s")
    assert costs.restart_s == pytest.approx(sum(recovery[part] for part in parts))
    records = [r for r in read_jsonl(async_run / "metrics.jsonl") if "step_time_s" in r]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert costs.step_s == pytest.approx(
        statistics.median(r["step_time_s"] - r["checkpoint_s"] for r in records)
    )


def test_cli_plans_from_a_run_in_its_own_mode(async_run: Path) -> None:
    base = ["plan", "checkpoints", "--run", async_run, "--mtbf-hours", "1000", "--nodes", "8"]
    result = run_steadytrain(*base, "--failures", "1000", "--json")
    assert result.returncode == 0, result.output
    report = json.loads(result.stdout)
    costs = measure_run_costs(async_run)
    assert costs.stall_s is not None and costs.write_s is not None and costs.step_s is not None
    mtbf_s = 1000 * 3600 / 8
    assert report["mode"] == report["run_mode"] == "async"  # checkpoint.async_save of the run
    assert (report["checkpoint_s"], report["stall_s"]) == (costs.write_s, costs.stall_s)
    assert str(async_run) in report["sources"]["restart_s"]
    optimal = async_interval(stall_s=costs.stall_s, write_s=costs.write_s, mtbf_s=mtbf_s)
    assert report["optimal_interval_s"] == pytest.approx(optimal)
    assert report["optimal_every_steps"] == max(1, round(optimal / costs.step_s))
    assert report["current_interval_s"] == pytest.approx(2 * costs.step_s)
    assert report["plot"] == str(async_run / "checkpoint-plan.png")
    assert (async_run / "checkpoint-plan.png").read_bytes()[:8] == PNG_MAGIC
    # Planned for synchronous saves, the run itself is still priced as it saves: async.
    forced = run_steadytrain(*base, "--sync", "--no-plot", "--failures", "1000")
    assert forced.returncode == 0, forced.output
    assert "recommended: synchronous saves every" in forced.stdout
    assert "the run now: asynchronous saves every" in forced.stdout
    as_json = run_steadytrain(*base, "--sync", "--no-plot", "--failures", "1000", "--json")
    synchronous = json.loads(as_json.stdout)
    assert (synchronous["mode"], synchronous["run_mode"], synchronous["plot"]) == (
        "sync",
        "async",
        None,
    )
    assert synchronous["optimal_interval_s"] == pytest.approx(daly_interval(costs.write_s, mtbf_s))
    assert synchronous["current_goodput"] == synchronous["current"]["async"]


def test_a_run_without_save_timings_takes_the_flags(async_run: Path, tmp_path: Path) -> None:
    old = tmp_path / "old-run"
    shutil.copytree(async_run, old)
    timing_fields = ("async_save", "waited_s", "blocked_s", "write_s")
    lines = []
    for record in read_jsonl(old / "events.jsonl"):
        if record["event"] == "checkpoint_saved":
            record = {key: value for key, value in record.items() if key not in timing_fields}
        lines.append(json.dumps(record) + "\n")
    (old / "events.jsonl").write_text("".join(lines))
    base = ["plan", "checkpoints", "--run", old, "--mtbf-hours", "10", "--no-plot"]
    refused = run_steadytrain(*base)
    assert refused.returncode == 2, refused.output
    assert refused.stderr.strip().splitlines() == [
        f"steadytrain: error: {old}: its 3 checkpoint_saved event(s) hold no save timings (an "
        "earlier steadytrain wrote them); give --checkpoint-seconds"
    ]
    given = run_steadytrain(
        *base, "--checkpoint-seconds", "30", "--stall-seconds", "2", "--failures", "1000", "--json"
    )
    assert given.returncode == 0, given.output
    report = json.loads(given.stdout)
    assert (report["checkpoint_s"], report["stall_s"], report["mode"]) == (30.0, 2.0, "async")


@pytest.mark.parametrize(
    "args",
    [
        ["memory", "--params", "7e9", "--world-size", "8", "--gpu-memory-gb", "1e300"],
        [
            "memory",
            "--params",
            "7e9",
            "--world-size",
            "8",
            "--gpu-memory-gb",
            "80",
            "--headroom",
            "1e308",
        ],
        ["checkpoints", "--mtbf-hours", "1e300", "--checkpoint-seconds", "5", "--no-plot"],
        ["checkpoints", "--mtbf-hours", "10", "--run", "no/such/run", "--no-plot"],
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args: list[str]) -> None:
    result = run_steadytrain("plan", *args, timeout=60)
    assert result.returncode == 2, result.output
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("steadytrain: error: ")
