"""Sharded (FSDP) checkpoints behind the same manifest: what is on disk, verification, and
resuming into another world size or the other strategy with exactly-once consumption.

Kill -9 mid-save and the planted pickles run under FSDP too (tests/e2e/test_checkpoints.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from steadytrain.checkpoint.manifest import checksum_of
from tests.e2e.jobs import MAX_STEPS, assert_audit_ok, final_weights, train
from tests.helpers import events, run_steadytrain

pytestmark = pytest.mark.slow
NEWEST = f"step_{MAX_STEPS:08d}"
RESUME_AT = MAX_STEPS - 8


def relative_l2(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> float:
    difference = sum(float(((left[k] - right[k]).double() ** 2).sum()) for k in left)
    return (difference / sum(float((left[k].double() ** 2).sum()) for k in left)) ** 0.5


def test_fsdp_checkpoints_hold_each_ranks_shards_and_verify(
    fsdp_reference: Path, reference: Path
) -> None:
    checkpoint = fsdp_reference / "checkpoints" / NEWEST
    names = {path.name for path in checkpoint.iterdir()}
    for rank in (0, 1):
        assert {f"rank-0000{rank}-model.safetensors", f"rank-0000{rank}-optimizer.safetensors"} <= (
            names
        ), names
    assert "model.safetensors" not in names  # every weight is sharded: no full copy anywhere
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json"}  # every shard is checksummed
    shared = json.loads((checkpoint / "shared.json").read_text())
    full = load_file(fsdp_reference / "final" / "model.safetensors")
    head = shared["sharded"]["model"]["head.weight"]
    assert head["shape"] == list(full["head.weight"].shape), head
    chunks = [
        json.loads((checkpoint / f"rank-0000{rank}.json").read_text())["chunks"]["model"]
        for rank in (0, 1)
    ]
    rows = full["head.weight"].shape[0]
    assert [c["head.weight"]["offset"][0] for c in chunks] == [0, rows // 2], chunks
    shard = load_file(checkpoint / "rank-00001-model.safetensors")["head.weight"]
    assert shard.shape[0] == rows // 2

    listing = run_steadytrain("checkpoints", "verify", fsdp_reference)
    assert listing.returncode == 0 and listing.stdout.count("good") == 3, listing.output
    # The same job under DDP: FSDP sums gradients in another order, nothing more.
    assert relative_l2(full, load_file(reference / "final" / "model.safetensors")) < 1e-3


def test_a_corrupt_shard_fails_verify_and_resume_falls_back(
    fsdp_reference: Path, overrides: list[str], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(fsdp_reference, run_dir)
    shutil.rmtree(run_dir / "final")
    shard = run_dir / "checkpoints" / NEWEST / "rank-00001-model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))

    verify = run_steadytrain("checkpoints", "verify", run_dir)
    assert verify.returncode == 4 and "rank-00001-model.safetensors" in verify.stdout, verify.output

    resumed = train(run_dir, [*overrides, "parallel.strategy=fsdp"])
    assert resumed.returncode == 0, resumed.output
    rejected = events(run_dir, "checkpoint_rejected")[-1]
    assert rejected["checkpoint"] == NEWEST, rejected
    assert rejected["problems"][0].startswith("rank 1: "), rejected  # only rank 1 reads it
    assert "checksum mismatch" in rejected["problems"][0], rejected
    assert events(run_dir, "resume")[-1]["step"] == MAX_STEPS - 4
    assert final_weights(run_dir) == final_weights(fsdp_reference)
    assert_audit_ok(run_dir)


# (saved by, strategy, ranks) -> (resumed as, ranks). A single rank has nothing to shard:
# its checkpoints are the replicated layout, as DDP's are.
RESHARDS = {
    "fsdp 2 -> 1 rank": ("fsdp_reference", None, "fsdp", 1),
    "1 rank -> fsdp 2": (None, 1, "fsdp", 2),
    "ddp 2 -> fsdp 2": ("reference", None, "fsdp", 2),
    "fsdp 2 -> ddp 2": ("fsdp_reference", None, "ddp", 2),
}


@pytest.mark.parametrize("case", sorted(RESHARDS))
def test_resume_reshards_into_another_layout_keeping_exactly_once(
    case: str,
    request: pytest.FixtureRequest,
    reference: Path,
    overrides: list[str],
    tmp_path: Path,
) -> None:
    saved_by, first_ranks, strategy, ranks = RESHARDS[case]
    run_dir = tmp_path / "run"
    if saved_by is not None:
        shutil.copytree(request.getfixturevalue(saved_by), run_dir)
        shutil.rmtree(run_dir / "final")
    else:
        first = train(run_dir, [*overrides, "parallel.strategy=fsdp"], nproc=first_ranks)
        assert first.returncode == 0, first.output
    saved = json.loads(
        (run_dir / "checkpoints" / f"step_{RESUME_AT:08d}" / "manifest.json").read_text()
    )
    resume_from = run_dir / "checkpoints" / f"step_{RESUME_AT:08d}"
    resumed = train(
        run_dir,
        [*overrides, f"parallel.strategy={strategy}"],
        "--resume-from",
        resume_from,
        nproc=ranks,
    )
    assert resumed.returncode == 0, resumed.output
    resume = events(run_dir, "resume")[-1]
    assert (resume["step"], resume["world_size"]) == (RESUME_AT, ranks), resume
    assert resume["saved_world_size"] == saved["world_size"]
    if saved["operational"]["parallel.strategy"] != strategy:
        changes = events(run_dir, "config_changed")[-1]["changes"]
        assert any(change.startswith("parallel.strategy: ") for change in changes), changes
    assert_audit_ok(run_dir)
    expected = load_file(reference / "final" / "model.safetensors")
    for name, tensor in load_file(run_dir / "final" / "model.safetensors").items():
        # Another layout sums in another order: equal up to float rounding, not bits.
        torch.testing.assert_close(tensor, expected[name], rtol=1e-3, atol=1e-4)


def test_verify_checks_the_chunk_index_against_the_shards(
    fsdp_reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(fsdp_reference, run_dir)
    checkpoint = run_dir / "checkpoints" / NEWEST
    index_path = checkpoint / "rank-00001.json"
    index = json.loads(index_path.read_text())
    index["chunks"]["model"]["head.weight"]["offset"][0] = 0  # overlaps rank 0's rows
    index_path.write_text(json.dumps(index))
    # The manifest lists the edited file as written: only the index itself is wrong.
    manifest_path = checkpoint / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    data = index_path.read_bytes()
    manifest["files"]["rank-00001.json"] = {"size": len(data), "checksum": checksum_of([data])}
    manifest_path.write_text(json.dumps(manifest))

    verify = run_steadytrain("checkpoints", "verify", run_dir)
    assert verify.returncode == 4, verify.output
    assert "model head.weight: the chunks" in verify.stdout, verify.output
    assert "do not tile its shape" in verify.stdout, verify.output
    assert verify.stdout.count("good") == 2, verify.output  # the older two are intact


def test_uneven_and_empty_shards_save_verify_and_resume(
    overrides: list[str], tmp_path: Path
) -> None:
    # Width 1: the norms' and the projection's first dimension (1) is smaller than the world
    # size (rank 1 holds nothing of them), qkv's (3) is not divisible by it (2 + 1 rows).
    job = [
        *overrides,
        "parallel.strategy=fsdp",
        "model.kwargs={num_layers: 1, width: 1, num_heads: 1}",
        "train.max_steps=8",
    ]
    whole = tmp_path / "whole"
    first = train(whole, job)
    assert first.returncode == 0, first.output
    chunks = json.loads((whole / "checkpoints" / "step_00000004" / "rank-00001.json").read_text())
    assert "final_norm.weight" not in chunks["chunks"]["model"]  # nothing of it on rank 1
    assert chunks["chunks"]["model"]["blocks.0.attention.qkv.weight"]["shape"] == [1, 1]
    listing = run_steadytrain("checkpoints", "verify", whole)
    assert listing.returncode == 0 and listing.stdout.count("good") == 2, listing.output

    for ranks in (2, 1):
        run_dir = tmp_path / f"resumed-{ranks}"
        shutil.copytree(whole, run_dir)
        shutil.rmtree(run_dir / "final")
        resume_from = run_dir / "checkpoints" / "step_00000004"
        resumed = train(run_dir, job, "--resume-from", resume_from, nproc=ranks)
        assert resumed.returncode == 0, resumed.output
        assert events(run_dir, "resume")[-1]["step"] == 4
        if ranks == 2:  # the same layout: every shard back where it was, to the bit
            assert final_weights(run_dir) == final_weights(whole)
        else:  # resharded into one rank: sums in another order (LayerNorm of one value
            # amplifies rounding, so the whole-model bound, not per element)
            resumed_weights = load_file(run_dir / "final" / "model.safetensors")
            assert (
                relative_l2(resumed_weights, load_file(whole / "final" / "model.safetensors"))
                < 1e-3
            )
