"""Object-store checkpoints: the manifest is the commit, and transient errors are retried.

Most tests run on fsspec's in-memory file system; the retry tests on a real S3 server (moto on
loopback) behind a proxy that answers real S3 errors (``tests/s3.py``).
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import Callable

import pytest
import torch

from steadytrain.checkpoint import (
    Manifest,
    encode_parts,
    find_restorable,
    save_checkpoint,
    verify_checkpoint,
)
from steadytrain.checkpoint.object_store import ObjectStorage
from steadytrain.checkpoint.storage import READ_CHUNK_BYTES, BytesPayload, StorageError
from steadytrain.config import dump_config, load_config, operational_fields, redact_url
from steadytrain.config.models import REDACTED, redact_secrets, usable_storage_options
from tests.helpers import TINY_CONFIG, RecordingEvents
from tests.s3 import (
    ACCESS_DENIED,
    INTERNAL_ERROR,
    FaultProxy,
    S3Error,
    s3fs_for,
    storage_options,
)


def manifest(step: int) -> Manifest:
    return Manifest(
        step=step,
        time=0.0,
        identity_fingerprint="f",
        identity={"seed": 1},
        world_size=1,
        global_batch_size=8,
        versions={},
    )


@pytest.fixture
def storage() -> ObjectStorage:
    return ObjectStorage(f"memory://bucket-{uuid.uuid4().hex[:6]}/run", first_backoff_s=0.0)


def save(storage: ObjectStorage, step: int, events: RecordingEvents) -> None:
    files = encode_parts({"model": {"w": torch.full((4,), float(step))}}, stem="shared")
    outcome = save_checkpoint(
        storage, step=step, rank=0, files=files, manifest=manifest(step), events=events
    )
    assert outcome.committed, outcome.error


def test_save_verify_and_list(storage: ObjectStorage) -> None:
    events = RecordingEvents()
    save(storage, 4, events)
    save(storage, 8, events)
    assert storage.checkpoint_names() == ["step_00000004", "step_00000008"]
    manifest_found, problems = verify_checkpoint(storage, "step_00000008")
    assert manifest_found is not None and not problems
    assert storage.describe("step_00000008").startswith("memory://")


def test_an_upload_cut_short_is_never_restorable_and_is_cleaned(storage: ObjectStorage) -> None:
    events = RecordingEvents()
    save(storage, 4, events)
    location = storage.staging_location("step_00000008", token="t")
    storage.write_file(location, "model.safetensors", BytesPayload(b"partial upload"))
    found = find_restorable(storage, events=events, emit=True)
    assert found is not None and found[0] == "step_00000004"
    assert events.emitted[-1][0] == "checkpoint_rejected"
    assert storage.remove_leftovers() == ["step_00000008"]
    assert storage.checkpoint_names() == ["step_00000004"]


def test_resaving_a_step_uncommits_the_old_copy_first(storage: ObjectStorage) -> None:
    events = RecordingEvents()
    save(storage, 4, events)
    storage.staging_location("step_00000004", token="again")
    assert storage.file_size("step_00000004", "manifest.json") is None


def test_delete_removes_the_manifest_first(storage: ObjectStorage) -> None:
    events = RecordingEvents()
    save(storage, 4, events)
    storage.delete("step_00000004")
    assert storage.checkpoint_names() == []


def test_secrets_never_reach_saved_config_or_manifest_fields() -> None:
    options = "{key: AKIAEXAMPLE, secret: hunter2, client_kwargs: {endpoint_url: http://x}}"
    config = load_config(TINY_CONFIG, overrides=[f"checkpoint.storage_options={options}"])
    dumped = dump_config(config)
    assert "hunter2" not in dumped and "AKIAEXAMPLE" not in dumped
    assert "http://x" in dumped  # not a secret
    assert "checkpoint.storage_options" not in operational_fields(config)
    reloaded = usable_storage_options({"key": REDACTED, "client_kwargs": {"token": REDACTED}})
    assert reloaded == {"client_kwargs": {}}
    assert redact_secrets({"aws_session_token": "t", "region": "r"}) == {
        "aws_session_token": REDACTED,
        "region": "r",
    }
    assert redact_url("s3://user:pw@bucket/prefix") == "s3://bucket/prefix"


# Retries, against a real S3 server behind a proxy that answers real S3 errors. botocore is told
# to send each request once (see ``tests.s3.storage_options``), so every retry the proxy sees is
# one of ObjectStorage's own and the requests can be counted exactly.

BACKOFF_S = 0.02
STEP = "step_00000002"
WEIGHTS = b"the weights of step 2"


def s3_storage(endpoint: str, url: str, *, max_attempts: int = 3) -> ObjectStorage:
    return ObjectStorage(
        url,
        storage_options=storage_options(endpoint, botocore_retries=False),
        max_attempts=max_attempts,
        first_backoff_s=BACKOFF_S,
    )


@pytest.fixture
def s3_url(bucket: str) -> str:
    return f"s3://{bucket}/unit-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def saved_location(s3_endpoint: str, s3_url: str) -> str:
    """Where ``STEP`` lies in ``s3_url``, holding ``model.safetensors``; stored directly."""
    storage = s3_storage(s3_endpoint, s3_url)
    location = storage.staging_location(STEP, token="t")
    storage.write_file(location, "model.safetensors", BytesPayload(WEIGHTS))
    return location


def test_a_download_cut_off_midway_is_retried_and_reports_each_byte_once(
    s3_endpoint: str, fault_proxy: FaultProxy, s3_url: str
) -> None:
    # fsspec reads one block (READ_CHUNK_BYTES) ahead of a read: the first read fetches the
    # first two buffers, so the last one takes a second GET.
    sizes = [1024, READ_CHUNK_BYTES, 1024]
    offset = 4
    blob = random.Random(0).randbytes(offset + sum(sizes))
    writer = s3_storage(s3_endpoint, s3_url)
    writer.write_file(writer.staging_location(STEP, token="t"), "blob", BytesPayload(blob))
    storage = s3_storage(fault_proxy.url, s3_url)
    fault_proxy.fail(INTERNAL_ERROR, method="GET", after=1, times=1)
    buffers = [memoryview(bytearray(size)) for size in sizes]
    seen: list[bytes] = []

    storage.read_into(
        STEP, "blob", buffers, offset=offset, on_data=lambda view: seen.append(bytes(view))
    )

    gets = [(r.status, r.byte_range or "") for r in fault_proxy.requests if r.method == "GET"]
    assert [status for status, _ in gets[:3]] == [206, 500, 206], gets  # cut after data came
    assert gets[2][1].startswith(f"bytes={offset}-"), gets  # the retry downloads it all again
    assert [len(view) for view in seen] == sizes
    assert b"".join(seen) == blob[offset:]  # every byte once, in order, despite two downloads
    assert b"".join(bytes(buffer) for buffer in buffers) == blob[offset:]


def test_a_size_that_differs_from_the_manifest_is_a_verdict_not_retried(
    fault_proxy: FaultProxy, s3_url: str, saved_location: str
) -> None:
    storage = s3_storage(fault_proxy.url, s3_url)
    with pytest.raises(StorageError, match=f"its manifest says {4 + len(WEIGHTS) - 1}"):
        storage.read_into(
            STEP, "model.safetensors", [memoryview(bytearray(len(WEIGHTS) - 1))], offset=4
        )
    assert [request.method for request in fault_proxy.requests] == ["HEAD"]


OPERATIONS: dict[str, Callable[[ObjectStorage, str], object]] = {
    "write_file": lambda storage, location: storage.write_file(
        location, "optimizer.safetensors", BytesPayload(WEIGHTS)
    ),
    "read_file": lambda storage, _: storage.read_file(STEP, "model.safetensors"),
    "file_size": lambda storage, _: storage.file_size(STEP, "model.safetensors"),
    "checkpoint_names": lambda storage, _: storage.checkpoint_names(),
}
RESULTS = {
    "write_file": None,
    "read_file": WEIGHTS,
    "file_size": len(WEIGHTS),
    "checkpoint_names": [STEP],
}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_transient_errors_are_retried_with_backoff_until_the_last_attempt_succeeds(
    operation: str,
    s3_endpoint: str,
    fault_proxy: FaultProxy,
    s3_url: str,
    saved_location: str,
) -> None:
    storage = s3_storage(fault_proxy.url, s3_url, max_attempts=4)
    fault_proxy.fail(INTERNAL_ERROR, times=3)

    assert OPERATIONS[operation](storage, saved_location) == RESULTS[operation]

    attempts = fault_proxy.requests[:4]  # each failed attempt ends at its first request
    assert [request.status for request in attempts] == [500, 500, 500, 200], attempts
    waits = [later.arrived_s - earlier.arrived_s for earlier, later in itertools.pairwise(attempts)]
    assert all(wait >= BACKOFF_S * 2**index for index, wait in enumerate(waits)), waits
    if operation == "write_file":
        written = s3fs_for(s3_endpoint).cat(f"{saved_location}/optimizer.safetensors")
        assert written == WEIGHTS


@pytest.mark.parametrize("operation", ["write_file", "read_file"])
def test_a_server_that_never_recovers_is_given_up_on_after_max_attempts(
    operation: str, fault_proxy: FaultProxy, s3_url: str, saved_location: str
) -> None:
    storage = s3_storage(fault_proxy.url, s3_url, max_attempts=3)
    fault_proxy.fail(INTERNAL_ERROR)
    with pytest.raises(StorageError, match="gave up after 3 attempts"):
        OPERATIONS[operation](storage, saved_location)
    assert fault_proxy.injected == len(fault_proxy.requests) == 3, fault_proxy.requests


@pytest.mark.parametrize(
    ("operation", "error", "bucket_name", "reported"),
    [
        ("write_file", ACCESS_DENIED, None, "PermissionError: Access Denied"),
        ("read_file", ACCESS_DENIED, None, "PermissionError"),
        ("write_file", None, "no-such-bucket", "FileNotFoundError: The specified bucket"),
    ],
    ids=["write-access-denied", "read-access-denied", "write-missing-bucket"],
)
def test_permanent_errors_fail_at_once_without_retries(
    operation: str,
    error: S3Error | None,
    bucket_name: str | None,
    reported: str,
    fault_proxy: FaultProxy,
    s3_url: str,
    saved_location: str,
) -> None:
    if bucket_name is not None:
        s3_url = f"s3://{bucket_name}-{uuid.uuid4().hex[:8]}/run"
    storage = s3_storage(fault_proxy.url, s3_url, max_attempts=3)
    location = storage.staging_location(STEP, token="t")  # relayed: no fault yet
    fault_proxy.fail(error)
    with pytest.raises(StorageError, match=reported) as raised:
        OPERATIONS[operation](storage, location)
    assert "gave up" not in str(raised.value)
    assert len(fault_proxy.requests) == 1, fault_proxy.requests
    assert fault_proxy.requests[0].status == (error.status if error else 404)
