"""Checkpoints you can trust, tested the way failures happen: kill -9, corruption, a changed
world size, a changed config, a planted pickle."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from steadytrain.checkpoint.manifest import checksum_of
from tests.e2e.jobs import MAX_STEPS, assert_audit_ok, final_weights, train
from tests.helpers import (
    TINY_CONFIG,
    as_set_args,
    events,
    run_steadytrain,
    start_steadytrain,
    wait_for_staging,
    wait_for_step,
    wait_until_gone,
    worker_pids,
)

pytestmark = pytest.mark.slow
SEED_VARIABLE = "STEADYTRAIN_TEST_SEED"
REFERENCES = {"ddp": "reference", "fsdp": "fsdp_reference"}  # the uninterrupted runs


@pytest.fixture
def seed() -> int:
    """The seed of a test's random choices (when to kill, whom): ``$STEADYTRAIN_TEST_SEED``
    if set, to reproduce a failure, else a fresh one; printed, so a failure report shows it."""
    chosen = os.environ.get(SEED_VARIABLE, "")
    if chosen and not chosen.isdigit():
        pytest.fail(f"{SEED_VARIABLE} must be a non-negative integer, not {chosen!r}")
    value = int(chosen) if chosen else random.randrange(2**32)
    print(f"random choices from seed {value}; rerun with {SEED_VARIABLE}={value} to repeat them")
    return value


@pytest.mark.parametrize("victim", ["rank0", "rank1", "launcher"])
def test_kill9_then_same_command_resumes_bit_identical(
    victim: str, reference: Path, overrides: list[str], tmp_path: Path, seed: int
) -> None:
    kill_at = random.Random(seed).randrange(5, MAX_STEPS - 4)
    process = start_steadytrain(
        "train", TINY_CONFIG, "--nproc", "2", "--run-dir", tmp_path, *as_set_args(overrides)
    )
    try:
        wait_for_step(tmp_path, kill_at, process)
        workers = worker_pids(process)
        target = {"rank0": workers[0], "rank1": workers[-1], "launcher": process.pid}[victim]
        os.kill(target, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0, f"seed {seed}: the run finished before the kill"
    if victim == "launcher":  # orphaned workers die at once (and may have finished)
        assert wait_until_gone(workers, timeout=10), f"workers {workers} outlived the launcher"
    else:
        assert not (tmp_path / "final").exists(), f"seed {seed}: finished despite the kill"

    resumed = train(tmp_path, overrides)
    assert resumed.returncode == 0, f"seed {seed}, step {kill_at}: {resumed.output}"
    assert events(tmp_path, "resume"), f"seed {seed}: did not resume"
    assert final_weights(tmp_path) == final_weights(reference), f"seed {seed}, step {kill_at}"
    assert_audit_ok(tmp_path)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_kill9_during_saves_never_leaves_a_bad_checkpoint(
    strategy: str,
    request: pytest.FixtureRequest,
    overrides: list[str],
    tmp_path: Path,
    seed: int,
) -> None:
    """Kill a rank the moment a save's staging directory appears: mid-save by construction.
    Under FSDP every rank writes its shards, so any rank's death leaves a half."""
    reference = request.getfixturevalue(REFERENCES[strategy])
    every_step = [*overrides, f"parallel.strategy={strategy}", "checkpoint.every_steps=1"]
    checkpoints = tmp_path / "checkpoints"
    rng = random.Random(seed)
    kills_mid_save = 0
    for _ in range(3):
        process = start_steadytrain(
            "train", TINY_CONFIG, "--nproc", "2", "--run-dir", tmp_path, *as_set_args(every_step)
        )
        try:
            seen = (
                wait_for_step(tmp_path, 0, process) if (tmp_path / "metrics.jsonl").exists() else 0
            )
            wait_for_step(tmp_path, seen + rng.randrange(1, 4), process)
            victim = rng.choice(worker_pids(process))
            wait_for_staging(checkpoints, process)
            os.kill(victim, signal.SIGKILL)
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
        kills_mid_save += bool(list(checkpoints.glob(".step_*.partial-*")))
        verify = run_steadytrain("checkpoints", "verify", tmp_path)
        # Every visible checkpoint is good.
        assert verify.returncode == 0, f"seed {seed}: {verify.output}"
    # Usually all three; the save may commit between seeing the directory and the kill.
    assert kills_mid_save >= 1, f"seed {seed}: no kill landed while a save was in progress"
    resumed = train(tmp_path, every_step)
    assert resumed.returncode == 0, f"seed {seed}: {resumed.output}"
    assert events(tmp_path, "checkpoint_debris_removed"), (
        f"seed {seed}: the killed saves' debris was not reported"
    )
    assert final_weights(tmp_path) == final_weights(reference), f"seed {seed}"
    assert_audit_ok(tmp_path)


def corrupt(checkpoint: Path, how: str) -> None:
    model = checkpoint / "model.safetensors"
    if how == "flipped byte":
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0xFF
        model.write_bytes(bytes(data))
    elif how == "truncated":
        model.write_bytes(model.read_bytes()[:-100])
    elif how == "missing file":
        (checkpoint / "optimizer.safetensors").unlink()
    elif how == "missing manifest":
        (checkpoint / "manifest.json").unlink()
    elif how == "flipped byte only rank 1 reads":
        rng = checkpoint / "rank-00001-rng.safetensors"
        data = bytearray(rng.read_bytes())
        data[-1] ^= 0xFF
        rng.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "how",
    [
        "flipped byte",
        "truncated",
        "missing file",
        "missing manifest",
        "flipped byte only rank 1 reads",
    ],
)
def test_bad_newest_checkpoint_falls_back_to_previous_good(
    how: str, reference: Path, overrides: list[str], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "final")
    newest = run_dir / "checkpoints" / f"step_{MAX_STEPS:08d}"
    corrupt(newest, how)

    verify = run_steadytrain("checkpoints", "verify", run_dir)
    assert verify.returncode == 4 and "PROBLEM" in verify.stdout, verify.output

    resumed = train(run_dir, overrides)
    assert resumed.returncode == 0, resumed.output
    rejected = events(run_dir, "checkpoint_rejected")
    assert rejected and rejected[-1]["checkpoint"] == newest.name, rejected
    if how.startswith("flipped byte"):  # found while reading, by the rank that read it
        rank = 1 if "rank 1" in how else 0
        assert rejected[-1]["problems"][0].startswith(f"rank {rank}: "), rejected
        assert "checksum mismatch" in rejected[-1]["problems"][0], rejected
    assert events(run_dir, "resume")[-1]["step"] == MAX_STEPS - 4
    assert final_weights(run_dir) == final_weights(reference)
    assert_audit_ok(run_dir)


# Under FSDP a pickle replaces a shard only rank 1 reads, and the stray one has the name of
# DCP's own (pickled) metadata file, which a DCP FileSystemReader would unpickle.
PLANTED = {
    "ddp": ("optimizer.safetensors", "model.pt"),
    "fsdp": ("rank-00001-optimizer.safetensors", ".metadata"),
}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_planted_pickle_never_runs(
    strategy: str, request: pytest.FixtureRequest, overrides: list[str], tmp_path: Path
) -> None:
    reference = request.getfixturevalue(REFERENCES[strategy])
    overrides = [*overrides, f"parallel.strategy={strategy}"]
    replaced, stray = PLANTED[strategy]
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "final")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps(Exploit())
    newest = run_dir / "checkpoints" / f"step_{MAX_STEPS:08d}"
    # The newest: a pickle in place of a real file, with the manifest forged to match it.
    (newest / replaced).write_bytes(payload)
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["files"][replaced] = {
        "size": len(payload),
        "checksum": checksum_of([payload]),
    }
    (newest / "manifest.json").write_text(json.dumps(manifest))
    # The previous one: intact, with a stray pickle beside its files.
    previous = run_dir / "checkpoints" / f"step_{MAX_STEPS - 4:08d}"
    (previous / stray).write_bytes(payload)

    resumed = train(run_dir, overrides)
    assert resumed.returncode == 0, resumed.output
    assert not marker.exists(), "a pickle from the checkpoint directory was executed"
    reasons = " ".join(
        " ".join(event["problems"]) for event in events(run_dir, "checkpoint_rejected")
    )
    assert "not a safetensors file" in reasons
    assert events(run_dir, "resume")[-1]["step"] == MAX_STEPS - 4
    assert final_weights(run_dir) == final_weights(reference)


def test_changed_identity_is_refused_with_the_differences(
    reference: Path, overrides: list[str], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    saved_config = (run_dir / "config.yaml").read_bytes()
    result = train(run_dir, [*overrides, "seed=99", "train.lr=0.001"])
    assert result.returncode == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    assert "seed: 1234 -> 99" in lines[0] and "train.lr" in lines[0] and "--no-resume" in lines[0]
    # Nothing already saved changes: the run's config, and so its checkpoints' verdict.
    assert (run_dir / "config.yaml").read_bytes() == saved_config
    verify = run_steadytrain("checkpoints", "verify", run_dir)
    assert verify.returncode == 0, verify.output


def test_changed_operational_fields_are_accepted_and_logged(
    reference: Path, overrides: list[str], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "final")
    resume_from = run_dir / "checkpoints" / f"step_{MAX_STEPS - 8:08d}"
    result = train(run_dir, [*overrides, "log.every_steps=2"], "--resume-from", resume_from)
    assert result.returncode == 0, result.output
    changes = events(run_dir, "config_changed")[-1]["changes"]
    assert any(change.startswith("log.every_steps: 1 -> 2") for change in changes), changes
    assert final_weights(run_dir) == final_weights(reference)


@pytest.mark.parametrize(("first", "second"), [(2, 1), (1, 2)])
def test_resume_with_another_world_size_keeps_exactly_once(
    first: int, second: int, reference: Path, overrides: list[str], tmp_path: Path
) -> None:
    import torch

    first_run = train(tmp_path, overrides, nproc=first)
    assert first_run.returncode == 0, first_run.output
    resume_from = tmp_path / "checkpoints" / f"step_{MAX_STEPS - 8:08d}"
    resumed = train(tmp_path, overrides, "--resume-from", resume_from, nproc=second)
    assert resumed.returncode == 0, resumed.output
    assert events(tmp_path, "resume")[-1]["saved_world_size"] == first
    reseeded = events(tmp_path, "rng_reseeded")
    assert reseeded and reseeded[-1]["world_size"] == second, reseeded
    assert_audit_ok(tmp_path)
    expected = load_file(reference / "final" / "model.safetensors")
    for name, tensor in load_file(tmp_path / "final" / "model.safetensors").items():
        # Another world size sums in another order: equal up to float rounding, not bits.
        torch.testing.assert_close(tensor, expected[name], rtol=1e-3, atol=1e-4)


def test_no_resume_starts_fresh_and_bad_resume_from_is_refused(
    reference: Path, overrides: list[str], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    fresh = train(run_dir, overrides, "--no-resume")
    assert fresh.returncode == 0, fresh.output
    assert events(run_dir, "train_start")[-1]["step"] == 0
    assert final_weights(run_dir) == final_weights(reference)
    assert_audit_ok(run_dir)

    bogus = train(run_dir, overrides, "--resume-from", tmp_path / "nowhere" / "step_00000004")
    assert bogus.returncode == 2 and "--resume-from" in bogus.stderr, bogus.output
    assert "Traceback" not in bogus.output


def test_retention_keeps_the_newest(reference: Path) -> None:
    names = sorted(path.name for path in (reference / "checkpoints").iterdir())
    assert names == [f"step_{step:08d}" for step in (MAX_STEPS - 8, MAX_STEPS - 4, MAX_STEPS)]
    listing = run_steadytrain("checkpoints", "list", reference)
    assert listing.returncode == 0 and listing.stdout.count("good") == 3, listing.output


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real, small file system: a tmpfs of the given size (needs root, as in CI)."""
    import subprocess

    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()

    def mount(size: str) -> Path:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        return mount_point

    yield mount
    subprocess.run(["umount", str(mount_point)], capture_output=True)


def test_preflight_refuses_a_destination_too_small_for_two_checkpoints(
    small_disk, overrides: list[str], tmp_path: Path
) -> None:
    disk = small_disk("1M")
    result = train(tmp_path / "run", [*overrides, f"checkpoint.uri={disk}"])
    assert result.returncode == 2, result.output
    assert "less than two checkpoints" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_async_saves_are_byte_identical_to_sync_saves(
    strategy: str, request: pytest.FixtureRequest, overrides: list[str], tmp_path: Path
) -> None:
    reference = request.getfixturevalue(REFERENCES[strategy])
    result = train(
        tmp_path, [*overrides, f"parallel.strategy={strategy}", "checkpoint.async_save=true"]
    )
    assert result.returncode == 0, result.output
    for checkpoint in sorted((reference / "checkpoints").iterdir()):
        for path in sorted(checkpoint.iterdir()):
            if path.name == "manifest.json":
                continue  # holds the save time and the async_save setting itself
            twin = tmp_path / "checkpoints" / checkpoint.name / path.name
            assert twin.read_bytes() == path.read_bytes(), f"{checkpoint.name}/{path.name}"
    assert final_weights(tmp_path) == final_weights(reference)


def test_async_saves_keep_host_memory_bounded(overrides: list[str], tmp_path: Path) -> None:
    """One snapshot at most is alive: RSS must not grow with the number of saves."""
    steps = 60
    every_step = [
        *overrides,
        "checkpoint.async_save=true",
        "checkpoint.every_steps=1",
        f"train.max_steps={steps}",
    ]
    result = train(tmp_path, every_step)
    assert result.returncode == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rss = {r["step"]: r["host_rss_mb"] for r in records if "host_rss_mb" in r}
    early = max(rss[step] for step in range(10, 20))
    late = max(rss[step] for step in range(steps - 10, steps))
    snapshot_mb = (
        sum(
            path.stat().st_size
            for path in (tmp_path / "checkpoints" / f"step_{steps:08d}").iterdir()
        )
        / 2**20
    )
    # 40 more saves happened between the two windows; a leak of even a quarter of a
    # snapshot per save would add 10 snapshots.
    assert late - early < 10 * snapshot_mb, (early, late, snapshot_mb)
    saved = events(tmp_path, "checkpoint_saved")
    assert len(saved) == steps


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_disk_full_during_save_is_reported_and_training_is_unharmed(
    async_save: bool, small_disk, reference: Path, overrides: list[str], tmp_path: Path
) -> None:
    disk = small_disk("6M")
    run_dir = tmp_path / "run"
    result = train(
        run_dir,
        [*overrides, f"checkpoint.uri={disk}", f"checkpoint.async_save={str(async_save).lower()}"],
    )
    assert result.returncode == 0, result.output
    failures = events(run_dir, "checkpoint_failed")
    assert failures and "No space left" in failures[0]["reason"], failures
    assert events(run_dir, "checkpoint_space_low")
    assert final_weights(run_dir) == final_weights(reference)
    names = [path.name for path in disk.iterdir()]
    assert all(not name.startswith(".") for name in names), names  # no staging debris
    verify = run_steadytrain("checkpoints", "verify", run_dir)
    assert "BAD" not in verify.stdout and "INCOMPLETE" not in verify.stdout, verify.output
