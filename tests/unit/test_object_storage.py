"""Object-store checkpoints on fsspec's in-memory file system: the manifest is the commit."""

from __future__ import annotations

import uuid

import pytest
import torch

from steadytrain.checkpoint import Manifest, find_restorable, save_checkpoint, verify_checkpoint
from steadytrain.checkpoint.object_store import ObjectStorage, redact_url
from steadytrain.checkpoint.protocol import encode_parts
from steadytrain.checkpoint.storage import BytesPayload, StorageError
from steadytrain.config import dump_config, load_config, operational_fields
from steadytrain.config.models import REDACTED, redact_secrets, usable_storage_options
from tests.helpers import TINY_CONFIG, RecordingEvents


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


def test_read_into_reports_data_once_after_a_retried_download(storage: ObjectStorage) -> None:
    storage.write_file(f"{storage._root}/step_00000001", "blob", BytesPayload(b"HEAD0123456789"))
    attempts = {"count": 0}
    read_once = storage._read_into

    def flaky(path: str, buffers: list[memoryview], offset: int) -> None:
        attempts["count"] += 1
        read_once(path, buffers, offset)
        if attempts["count"] == 1:
            raise ConnectionError("reset after the data arrived")

    storage._read_into = flaky  # type: ignore[method-assign]
    buffers = [memoryview(bytearray(4)), memoryview(bytearray(6))]
    seen: list[bytes] = []

    storage.read_into(
        "step_00000001", "blob", buffers, offset=4, on_data=lambda v: seen.append(bytes(v))
    )

    assert attempts["count"] == 2
    assert [bytes(buffer) for buffer in buffers] == [b"0123", b"456789"]
    assert seen == [b"0123", b"456789"]  # each byte once, despite two downloads
    with pytest.raises(StorageError, match="its manifest says 9"):
        storage.read_into("step_00000001", "blob", [memoryview(bytearray(5))], offset=4)


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


def test_transient_errors_are_retried_and_permanent_ones_are_not() -> None:
    storage = ObjectStorage("memory://retry/run", max_attempts=3, first_backoff_s=0.0)
    calls = {"count": 0}

    def flaky() -> str:
        calls["count"] += 1
        if calls["count"] < 3:
            raise ConnectionError("connection reset")
        return "ok"

    assert storage._retry(flaky) == "ok" and calls["count"] == 3

    def always_down() -> None:
        raise TimeoutError("timed out")

    with pytest.raises(StorageError, match="gave up after 3 attempts"):
        storage._retry(always_down)
    calls["count"] = 0

    def denied() -> None:
        calls["count"] += 1
        raise PermissionError("access denied")

    with pytest.raises(StorageError, match="access denied"):
        storage._retry(denied)
    assert calls["count"] == 1


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
