"""``train.compile``: one compiled 2-rank run of the small job, resumed from the eager
reference's checkpoint and resumed from in turn by an eager run.

Compilation is slow on a few CPU cores, so this one run carries every check: it finishes, its
losses follow the eager run's, the watchdog stays quiet through a compile that lasts longer
than its timeout, its checkpoints verify and keep the eager parameter names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from steadytrain.fault.watchdog import CONFIRM_BEATS
from tests.e2e.jobs import MAX_STEPS, assert_audit_ok, train
from tests.helpers import events, read_jsonl, run_steadytrain

pytestmark = pytest.mark.slow
COMPILED_FROM = MAX_STEPS - 8  # the eager reference's checkpoint the compiled run resumes
EAGER_FROM = MAX_STEPS - 4  # the compiled run's checkpoint the eager run resumes
HANG_TIMEOUT_S = 2.0  # far below the compile, far above a step of this job (tens of ms)
# Measured here: compiled and eager losses differ by ~1e-7 relative over the 24 steps
# (inductor fuses and reorders float sums); 1e-4 leaves room without hiding a wrong graph.
LOSS_RTOL = 1e-4


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def tensor_names(checkpoint_dir: Path) -> dict[str, list[str]]:
    return {
        path.name: sorted(load_file(path)) for path in sorted(checkpoint_dir.glob("*.safetensors"))
    }


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """The last logged loss of every step (a resumed run appends to metrics.jsonl)."""
    return {
        row["step"]: row["loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row
    }


def test_compiled_run_matches_eager_and_their_checkpoints_resume_each_other(
    reference: Path, overrides: list[str], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "final")
    compiled = train(
        run_dir,
        [*overrides, "train.compile=true", f"fault.hang_timeout_s={HANG_TIMEOUT_S}"],
        "--resume-from",
        checkpoint(run_dir, COMPILED_FROM),
        # A cache of its own: the graphs are built from scratch, as on a first run.
        env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")},
        timeout=900,
    )
    assert compiled.returncode == 0, compiled.output
    changes = events(run_dir, "config_changed")[-1]["changes"]
    assert any(change.startswith("train.compile: ") for change in changes), changes

    # The watchdog: the compiling first forward outlasted what it tolerates outside the
    # warm-up allowance (hang_timeout_s, then a beat per confirmation); the allowance held.
    assert not events(run_dir, "hang")
    logged = read_jsonl(run_dir / "metrics.jsonl")
    first = [row for row in logged if row.get("step") == COMPILED_FROM + 1 and "loss" in row][-1]
    assert first["forward_s"] > HANG_TIMEOUT_S + CONFIRM_BEATS, first

    # The same math as eager, step by step, up to float rounding.
    eager_losses, compiled_losses = losses_by_step(reference), losses_by_step(run_dir)
    for step in range(COMPILED_FROM + 1, MAX_STEPS + 1):
        assert compiled_losses[step] == pytest.approx(eager_losses[step], rel=LOSS_RTOL), step
    expected = load_file(reference / "final" / "model.safetensors")
    for name, tensor in load_file(run_dir / "final" / "model.safetensors").items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-3, atol=1e-4)

    # Its checkpoints: the eager run's file and tensor names, no `_orig_mod.`, verified.
    saved = checkpoint(run_dir, MAX_STEPS)
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["operational"]["train.compile"] is True
    names = tensor_names(saved)
    assert names == tensor_names(checkpoint(reference, MAX_STEPS))
    assert not [n for listed in names.values() for n in listed if "_orig_mod" in n], names
    assert "_orig_mod" not in str(sorted(load_file(run_dir / "final" / "model.safetensors")))
    listing = run_steadytrain("checkpoints", "verify", run_dir)
    assert listing.returncode == 0 and listing.stdout.count("good") == 3, listing.output

    # And back: an eager run resumes the compiled checkpoint and ends where eager training does.
    eager = train(run_dir, overrides, "--resume-from", checkpoint(run_dir, EAGER_FROM))
    assert eager.returncode == 0, eager.output
    resume = events(run_dir, "resume")[-1]
    assert resume["step"] == EAGER_FROM, resume
    assert_audit_ok(run_dir)
    resumed_losses = losses_by_step(run_dir)
    for step in range(EAGER_FROM + 1, MAX_STEPS + 1):
        assert resumed_losses[step] == pytest.approx(eager_losses[step], rel=LOSS_RTOL), step
    for name, tensor in load_file(run_dir / "final" / "model.safetensors").items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-3, atol=1e-4)
