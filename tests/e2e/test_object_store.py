"""Checkpoints in an S3-protocol object store: a real moto server on loopback (``tests/s3.py``).

Credentials and the endpoint come from the standard AWS environment variables, as users set
them; a fault-injecting HTTP proxy in front of the server returns real 503 SlowDown errors.
"""

from __future__ import annotations

import os
import shutil
import signal
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from steadytrain.checkpoint import (
    Manifest,
    StorageError,
    read_parts,
    save_checkpoint,
    snapshot_parts,
    verify_checkpoint,
)
from steadytrain.checkpoint.object_store import ObjectStorage
from tests.e2e.jobs import MAX_STEPS, final_weights, train
from tests.helpers import (
    TINY_CONFIG,
    RecordingEvents,
    as_set_args,
    events,
    run_steadytrain,
    start_steadytrain,
    wait_for_step,
    worker_pids,
)
from tests.s3 import SECRET, SLOW_DOWN, FaultProxy, aws_env, s3fs_for, storage_options

pytestmark = pytest.mark.slow


def train_s3(run_dir: Path, overrides: list[str], uri: str, endpoint: str, *extra: str):
    overrides = [*overrides, f"checkpoint.uri={uri}"]
    return train(run_dir, overrides, *extra, env=aws_env(endpoint))


@pytest.fixture(scope="module")
def s3_reference(tmp_path_factory, overrides, bucket, s3_endpoint) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("s3-reference")
    uri = f"s3://{bucket}/reference"
    result = train_s3(run_dir, overrides, uri, s3_endpoint)
    assert result.returncode == 0, result.output
    return run_dir, uri


def copy_run(reference: tuple[Path, str], tmp_path: Path, endpoint: str) -> tuple[Path, str]:
    """A copy of the reference run dir and of its checkpoint prefix, minus final weights."""
    run_dir, uri = reference
    copy_dir = tmp_path / "run"
    shutil.copytree(run_dir, copy_dir)
    shutil.rmtree(copy_dir / "final")
    copy_uri = f"{uri}-copy-{uuid.uuid4().hex[:6]}"
    s3fs_for(endpoint).copy(
        uri.removeprefix("s3://"), copy_uri.removeprefix("s3://"), recursive=True
    )
    saved = yaml.safe_load((copy_dir / "config.yaml").read_text())
    saved["checkpoint"]["uri"] = copy_uri  # as the copy's own training run would have saved
    (copy_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    return copy_dir, copy_uri


def test_kill9_resume_through_s3_is_bit_identical(
    s3_reference, overrides, bucket, s3_endpoint, tmp_path: Path
) -> None:
    uri = f"s3://{bucket}/killed"
    process = start_steadytrain(
        "train",
        TINY_CONFIG,
        "--nproc",
        "2",
        "--run-dir",
        tmp_path,
        *as_set_args([*overrides, f"checkpoint.uri={uri}"]),
        env=aws_env(s3_endpoint),
    )
    try:
        wait_for_step(tmp_path, MAX_STEPS // 2 + 1, process)
        os.kill(worker_pids(process)[-1], signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    resumed = train_s3(tmp_path, overrides, uri, s3_endpoint)
    assert resumed.returncode == 0, resumed.output
    assert events(tmp_path, "resume")[-1]["checkpoint"].startswith(uri)
    assert final_weights(tmp_path) == final_weights(s3_reference[0])
    audit = run_steadytrain("audit", tmp_path)
    assert audit.returncode == 0, audit.output


def test_corrupt_newest_object_falls_back(s3_reference, overrides, s3_endpoint, tmp_path):
    run_dir, uri = copy_run(s3_reference, tmp_path, s3_endpoint)
    fs = s3fs_for(s3_endpoint)
    newest = f"{uri.removeprefix('s3://')}/step_{MAX_STEPS:08d}/model.safetensors"
    data = bytearray(fs.cat(newest))
    data[len(data) // 2] ^= 0xFF
    fs.pipe(newest, bytes(data))

    verify = run_steadytrain("checkpoints", "verify", run_dir, env=aws_env(s3_endpoint))
    assert verify.returncode == 4 and "checksum mismatch" in verify.stdout, verify.output
    resumed = train_s3(run_dir, overrides, uri, s3_endpoint)
    assert resumed.returncode == 0, resumed.output
    assert events(run_dir, "checkpoint_rejected")[-1]["checkpoint"] == f"step_{MAX_STEPS:08d}"
    assert events(run_dir, "resume")[-1]["step"] == MAX_STEPS - 4
    assert final_weights(run_dir) == final_weights(s3_reference[0])


def test_large_files_stream_as_multipart_uploads_and_failed_ones_are_aborted(
    bucket: str, s3_endpoint: str
) -> None:
    storage = ObjectStorage(
        f"s3://{bucket}/multipart-{uuid.uuid4().hex[:6]}",
        storage_options=storage_options(s3_endpoint),
        first_backoff_s=0.0,
        max_attempts=2,
        upload_part_bytes=5 * 2**20,  # S3's smallest part: 12 MiB of weights make 3 parts
    )
    weight = torch.randn(3 * 2**20)
    snapshot = snapshot_parts({"model": {"weight": weight}}, stem="shared", copy=False)
    outcome = save_checkpoint(
        storage,
        step=1,
        rank=0,
        files=snapshot.to_files(),
        manifest=Manifest(
            step=1,
            time=0.0,
            identity_fingerprint="f",
            identity={},
            world_size=1,
            global_batch_size=1,
            versions={},
        ),
        events=RecordingEvents(),
    )
    assert outcome.committed, outcome.error
    manifest, problems = verify_checkpoint(storage, "step_00000001")
    assert manifest is not None and problems == []
    restored = read_parts(storage, "step_00000001", manifest, stem="shared")
    assert torch.equal(restored["model"]["weight"], weight)

    class Interrupted:
        """A payload whose source fails after two parts went up."""

        size = 12 * 2**20

        def chunks(self):
            yield memoryview(bytes(11 * 2**20))
            raise ConnectionError("connection reset while uploading")

    location = storage.staging_location("step_00000002", token="t")
    with pytest.raises(StorageError, match="gave up after 2 attempts"):
        storage.write_file(location, "model.safetensors", Interrupted())
    assert storage.file_size("step_00000002", "model.safetensors") is None
    uploads = s3fs_for(s3_endpoint).call_s3("list_multipart_uploads", Bucket=bucket)
    assert not uploads.get("Uploads"), "an aborted upload was left behind"


def test_partial_upload_is_never_visible_as_committed(
    s3_reference, overrides, s3_endpoint, tmp_path
) -> None:
    run_dir, uri = copy_run(s3_reference, tmp_path, s3_endpoint)
    fs = s3fs_for(s3_endpoint)
    prefix = uri.removeprefix("s3://")
    # A newer save that died after uploading some files: no manifest.
    fs.pipe(f"{prefix}/step_{MAX_STEPS + 4:08d}/model.safetensors", b"\0" * 1000)
    listing = run_steadytrain("checkpoints", "list", run_dir, env=aws_env(s3_endpoint))
    assert f"step_{MAX_STEPS + 4:08d}  INCOMPLETE" in listing.stdout, listing.output
    # Resuming picks the newest committed checkpoint (the run is already complete there).
    resumed = train_s3(run_dir, overrides, uri, s3_endpoint)
    assert resumed.returncode == 0, resumed.output
    assert events(run_dir, "resume")[-1]["step"] == MAX_STEPS
    assert not fs.exists(f"{prefix}/step_{MAX_STEPS + 4:08d}")  # cleaned at start
    rejected = events(run_dir, "checkpoint_rejected")[-1]
    assert rejected["checkpoint"] == f"step_{MAX_STEPS + 4:08d}", rejected
    assert "never committed" in rejected["problems"][0] and rejected["action"] == "removed"
    assert final_weights(run_dir) == final_weights(s3_reference[0])


def test_credentials_never_written(s3_reference, overrides, s3_endpoint, tmp_path) -> None:
    run_dir, uri = copy_run(s3_reference, tmp_path, s3_endpoint)
    options = f"{{key: steadytrain-test, secret: {SECRET}}}"
    resumed = train_s3(
        run_dir,
        [*overrides, f"checkpoint.storage_options={options}"],
        uri,
        s3_endpoint,
        "--no-resume",
    )
    assert resumed.returncode == 0, resumed.output
    assert SECRET not in resumed.output
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    fs = s3fs_for(s3_endpoint)
    for key in fs.find(uri.removeprefix("s3://")):
        assert SECRET.encode() not in fs.cat(key), key


def test_missing_bucket_is_reported_and_training_goes_on(overrides, s3_endpoint, tmp_path):
    result = train_s3(tmp_path, overrides, "s3://no-such-bucket-here/run", s3_endpoint)
    assert result.returncode == 0, result.output
    failures = events(tmp_path, "checkpoint_failed")
    assert failures, "a save to a missing bucket must be reported"
    assert "bucket does not exist" in failures[0]["reason"], failures[0]["reason"]
    assert "gave up after" not in failures[0]["reason"]  # permanent: reported at once, not retried
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_transient_errors_are_retried(
    s3_reference, overrides, bucket, s3_endpoint, fault_proxy: FaultProxy, tmp_path
) -> None:
    fault_proxy.fail(SLOW_DOWN, every=4)
    result = train_s3(tmp_path, overrides, f"s3://{bucket}/throttled", fault_proxy.url)
    assert result.returncode == 0, result.output
    assert fault_proxy.injected > 10, fault_proxy.injected
    assert not events(tmp_path, "checkpoint_failed")
    verify = run_steadytrain("checkpoints", "verify", tmp_path, env=aws_env(s3_endpoint))
    assert verify.returncode == 0, verify.output
    assert final_weights(tmp_path) == final_weights(s3_reference[0])
