"""Checkpoint manifest, local storage, commit protocol, verification and inspection.

Single process: the collectives of saving and loading are no-ops without a process group.
"""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from steadytrain.checkpoint import (
    MANIFEST_NAME,
    CorruptCheckpoint,
    FileEntry,
    LocalStorage,
    Manifest,
    ManifestError,
    SaveOutcome,
    checkpoint_name,
    checkpoint_storage,
    decode_parts,
    encode_parts,
    find_restorable,
    inspect_checkpoints,
    prune_checkpoints,
    rank_stem,
    read_parts,
    save_checkpoint,
    step_of,
    verify_checkpoint,
)
from steadytrain.checkpoint.manifest import checksum_of
from steadytrain.checkpoint.storage import READ_CHUNK_BYTES
from steadytrain.config import (
    Config,
    ConfigError,
    dump_config,
    identity_fields,
    identity_fingerprint,
    load_config,
    operational_fields,
)
from tests.helpers import TINY_CONFIG, RecordingEvents

# --- manifest ----------------------------------------------------------------------------------


def make_manifest(step: int, *, identity: dict[str, Any] | None = None) -> Manifest:
    return Manifest(
        step=step,
        time=1_700_000_000.5,
        identity_fingerprint="0123456789abcdef",
        identity=identity if identity is not None else {"seed": 1234, "train.lr": 0.003},
        world_size=2,
        global_batch_size=8,
        versions={"steadytrain": "0", "torch": torch.__version__, "python": "3"},
        operational={"log.every_steps": 10},
    )


def test_manifest_json_round_trip() -> None:
    manifest = make_manifest(12)
    manifest.files = {"model.safetensors": FileEntry(size=10, checksum=checksum_of([b"x"]))}
    assert Manifest.from_json(manifest.to_json()) == manifest


def manifest_payload() -> dict[str, Any]:
    return json.loads(make_manifest(3).to_json())


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a steadytrain checkpoint manifest"),
        (json.dumps({**manifest_payload(), "format": "other"}), "not a steadytrain"),
        (json.dumps({**manifest_payload(), "version": 99}), "unsupported manifest version"),
        (json.dumps({k: v for k, v in manifest_payload().items() if k != "step"}), "missing"),
        (json.dumps({**manifest_payload(), "files": ["a"]}), "malformed"),
        (json.dumps({**manifest_payload(), "files": {"a": {"size": "big"}}}), "malformed"),
        (json.dumps({**manifest_payload(), "step": None}), "malformed"),
        (
            json.dumps({**manifest_payload(), "files": {"a": {"size": 1, "checksum": "md5:00"}}}),
            "unknown checksum algorithm",
        ),
    ],
    ids=[
        "garbage",
        "list",
        "format",
        "version",
        "no-step",
        "files-list",
        "bad-entry",
        "null",
        "unknown-checksum",
    ],
)
def test_bad_manifests_raise_manifest_error(text: str, problem: str) -> None:
    with pytest.raises(ManifestError, match=problem):
        Manifest.from_json(text)


def test_checkpoint_names_and_steps() -> None:
    assert checkpoint_name(42) == "step_00000042"
    assert step_of(checkpoint_name(42)) == 42
    assert step_of(checkpoint_name(123_456_789)) == 123_456_789
    for not_a_checkpoint in ["step_", "step_abc", "step_-1", ".step_00000001.partial-ab", "x"]:
        assert step_of(not_a_checkpoint) is None, not_a_checkpoint


def test_step_of_ignores_non_ascii_digits() -> None:
    assert step_of("step_²") is None  # "²".isdigit() is True, but int("²") raises


# --- LocalStorage and the commit protocol ------------------------------------------------------


def state_files(step: int) -> dict[str, bytes]:
    shared = {
        "model": {"weight": torch.arange(12.0).reshape(3, 4) + step},
        "train": {"version": 1, "step": step},
    }
    rng = {"rng": {"torch_cpu": torch.tensor([step % 256], dtype=torch.uint8)}}
    return encode_parts(shared, stem="shared") | encode_parts(rng, stem=rank_stem(0))


def save(
    storage: LocalStorage,
    step: int,
    *,
    files: dict[str, bytes] | None = None,
    manifest: Manifest | None = None,
    events: RecordingEvents | None = None,
) -> SaveOutcome:
    return save_checkpoint(
        storage,
        step=step,
        rank=0,
        files=state_files(step) if files is None else files,
        manifest=manifest or make_manifest(step),
        events=events or RecordingEvents(),
    )


def debris(root: Path) -> list[str]:
    return sorted(entry.name for entry in root.iterdir() if entry.name.startswith("."))


def test_save_commits_a_manifest_that_lists_every_file(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "checkpoints")
    events = RecordingEvents()
    files = state_files(5)

    outcome = save(storage, 5, files=files, events=events)

    assert outcome.committed and outcome.error is None
    directory = storage.root / "step_00000005"
    assert outcome.location == str(directory)
    manifest = Manifest.from_json((directory / MANIFEST_NAME).read_text())
    assert set(manifest.files) == set(files)
    for filename, entry in manifest.files.items():
        data = (directory / filename).read_bytes()
        assert data == files[filename]
        assert (entry.size, entry.checksum) == (len(data), checksum_of([data]))
        assert entry.checksum.startswith("xxh3-128:")
    assert sorted(p.name for p in directory.iterdir()) == sorted([*files, MANIFEST_NAME])
    assert debris(storage.root) == []
    assert storage.checkpoint_names() == ["step_00000005"]
    assert verify_checkpoint(storage, "step_00000005") == (manifest, [])
    (saved,) = events.of_kind("checkpoint_saved")
    write_s = saved.pop("write_s")  # from the call to the commit (no checkpointer: no more)
    assert saved == {"step": 5, "location": str(directory), "num_files": len(files)}
    assert 0 < write_s < 60


def flip_byte(path: Path, *, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-3])


CORRUPTIONS = {
    "truncated": (lambda d: truncate(d / "model.safetensors"), "model.safetensors: "),
    "flipped-byte": (lambda d: flip_byte(d / "model.safetensors"), "checksum mismatch"),
    "missing-file": (lambda d: (d / "rank-00000.json").unlink(), "rank-00000.json: missing"),
    "no-manifest": (lambda d: (d / MANIFEST_NAME).unlink(), "no manifest.json"),
    "garbage-manifest": (
        lambda d: (d / MANIFEST_NAME).write_bytes(b"\xff\xfe not json"),
        "manifest.json unreadable",
    ),
    "invalid-manifest": (
        lambda d: (d / MANIFEST_NAME).write_text('{"format": "x"}'),
        "manifest.json unreadable",
    ),
    "step-mismatch": (
        lambda d: d.rename(d.with_name("step_00000009")),
        "manifest says step 7, directory says 9",
    ),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_verify_detects_each_corruption(tmp_path: Path, corruption: str) -> None:
    storage = LocalStorage(tmp_path)
    save(storage, 7)
    assert verify_checkpoint(storage, "step_00000007")[1] == []
    corrupt, problem = CORRUPTIONS[corruption]

    corrupt(tmp_path / "step_00000007")
    (name,) = storage.checkpoint_names()
    manifest, problems = verify_checkpoint(storage, name)

    assert len(problems) == 1 and problem in problems[0], problems
    assert (manifest is None) == ("manifest" in corruption)
    if corruption == "flipped-byte":
        assert (tmp_path / name / "model.safetensors").stat().st_size == len(
            state_files(7)["model.safetensors"]
        )


def test_find_restorable_falls_back_past_bad_checkpoints(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    events = RecordingEvents()
    assert find_restorable(storage, events=events, emit=True) is None
    for step in (1, 2, 3, 4):
        save(storage, step)
    flip_byte(tmp_path / "step_00000003" / "model.safetensors")
    (tmp_path / "step_00000004" / MANIFEST_NAME).unlink()
    (tmp_path / ".step_00000005.partial-deadbeef").mkdir()  # a crashed save's staging

    found = find_restorable(storage, events=events, emit=True)

    assert found is not None
    name, manifest = found
    assert (name, manifest.step) == ("step_00000002", 2)
    state = decode_parts(lambda filename: storage.read_file(name, filename), stem="shared")
    assert torch.equal(state["model"]["weight"], torch.arange(12.0).reshape(3, 4) + 2)
    rejected = events.of_kind("checkpoint_rejected")
    assert [event["checkpoint"] for event in rejected] == ["step_00000004", "step_00000003"]
    assert "no manifest.json" in rejected[0]["problems"][0]
    assert "checksum mismatch" in rejected[1]["problems"][0]
    quiet = RecordingEvents()
    assert find_restorable(storage, events=quiet, emit=False) == found
    assert quiet.emitted == []


def test_read_parts_reads_each_file_once_into_tensors_of_their_own(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    save(storage, 6)
    name = "step_00000006"
    manifest, _ = verify_checkpoint(storage, name)
    assert manifest is not None

    shared = read_parts(storage, name, manifest, stem="shared")

    weight = shared["model"]["weight"]
    assert torch.equal(weight, torch.arange(12.0).reshape(3, 4) + 6)
    assert weight.untyped_storage().nbytes() == weight.nbytes  # not a view of a file buffer
    assert shared["train"] == {"version": 1, "step": 6}
    rng = read_parts(storage, name, manifest, stem=rank_stem(0))["rng"]
    assert rng["torch_cpu"].tolist() == [6]


READ_CORRUPTIONS = {
    "flipped data byte": (
        lambda d: flip_last_byte(d / "model.safetensors"),
        "model.safetensors: checksum mismatch",
    ),
    "flipped header byte": (
        lambda d: flip_byte(d / "model.safetensors", at=12),
        "model.safetensors",
    ),
    "truncated": (lambda d: truncate(d / "model.safetensors"), "shorter than"),
    "grown": (lambda d: append(d / "model.safetensors"), "longer than"),
    "missing": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors"),
    "document changed": (
        lambda d: (d / "shared.json").write_text((d / "shared.json").read_text() + " "),
        "shared.json: checksum mismatch",
    ),
}


def flip_last_byte(path: Path) -> None:
    flip_byte(path, at=path.stat().st_size - 1)


def append(path: Path) -> None:
    with open(path, "ab") as handle:
        handle.write(b"\0")


@pytest.mark.parametrize("corruption", READ_CORRUPTIONS)
def test_read_parts_refuses_what_does_not_match_the_manifest(
    tmp_path: Path, corruption: str
) -> None:
    storage = LocalStorage(tmp_path)
    save(storage, 6)
    name = "step_00000006"
    manifest, _ = verify_checkpoint(storage, name)
    assert manifest is not None
    corrupt, problem = READ_CORRUPTIONS[corruption]

    corrupt(tmp_path / name)

    with pytest.raises(CorruptCheckpoint, match=problem):
        read_parts(storage, name, manifest, stem="shared")


def test_read_parts_refuses_a_file_the_manifest_does_not_list(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    save(storage, 6)
    manifest, _ = verify_checkpoint(storage, "step_00000006")
    assert manifest is not None
    del manifest.files["model.safetensors"]
    with pytest.raises(CorruptCheckpoint, match=r"model\.safetensors: not listed"):
        read_parts(storage, "step_00000006", manifest, stem="shared")


def test_read_parts_lets_storage_errors_that_are_not_corruption_through(tmp_path: Path) -> None:
    class FailingDisk(LocalStorage):
        def read_into(self, *args: Any, **kwargs: Any) -> None:
            raise OSError(errno.EIO, "Input/output error")

    save(LocalStorage(tmp_path), 6)
    storage = FailingDisk(tmp_path)
    manifest, _ = verify_checkpoint(storage, "step_00000006", read_files=False)
    assert manifest is not None

    with pytest.raises(OSError, match="Input/output error") as raised:
        read_parts(storage, "step_00000006", manifest, stem="shared")
    assert not isinstance(raised.value, CorruptCheckpoint)


def test_a_rank_whose_files_cannot_be_prepared_fails_the_save_for_all(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    events = RecordingEvents()

    outcome = save_checkpoint(
        storage,
        step=3,
        rank=0,
        files={},
        manifest=make_manifest(3),
        events=events,
        failure="model: dtype torch.complex128 cannot be checkpointed",
    )

    assert not outcome.committed
    assert outcome.error == "rank 0: model: dtype torch.complex128 cannot be checkpointed"
    assert storage.checkpoint_names() == [] and debris(tmp_path) == []


def test_a_payload_that_fails_midway_commits_nothing(tmp_path: Path) -> None:
    class Broken:
        size = 10

        def chunks(self) -> Iterator[memoryview]:
            yield memoryview(b"12345")
            raise RuntimeError("tensor freed under the writer")

    storage = LocalStorage(tmp_path)
    outcome = save(storage, 4, files={**state_files(4), "model.safetensors": Broken()})  # type: ignore[dict-item]

    assert not outcome.committed and "tensor freed under the writer" in (outcome.error or "")
    assert storage.checkpoint_names() == [] and debris(tmp_path) == []


def test_version_1_manifests_with_sha256_still_verify_and_load(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    save(storage, 6)
    directory = tmp_path / "step_00000006"
    payload = json.loads((directory / MANIFEST_NAME).read_text())
    payload["version"] = 1
    payload["files"] = {
        filename: {
            "size": entry["size"],
            "sha256": hashlib.sha256((directory / filename).read_bytes()).hexdigest(),
        }
        for filename, entry in payload["files"].items()
    }
    (directory / MANIFEST_NAME).write_text(json.dumps(payload))

    manifest, problems = verify_checkpoint(storage, "step_00000006")
    assert manifest is not None and problems == []
    assert manifest.files["model.safetensors"].checksum.startswith("sha256:")
    shared = read_parts(storage, "step_00000006", manifest, stem="shared")
    assert torch.equal(shared["model"]["weight"], torch.arange(12.0).reshape(3, 4) + 6)
    flip_last_byte(directory / "model.safetensors")
    assert "checksum mismatch" in verify_checkpoint(storage, "step_00000006")[1][0]


def test_find_restorable_without_reading_files_checks_manifests_and_sizes(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    for step in (1, 2, 3):
        save(storage, step)
    flip_last_byte(tmp_path / "step_00000003" / "model.safetensors")
    events = RecordingEvents()

    quick = find_restorable(storage, events=events, emit=True, read_files=False)
    assert quick is not None and quick[0] == "step_00000003"  # found later, by read_parts
    older = find_restorable(storage, events=events, emit=True, read_files=False, older_than=3)
    assert older is not None and older[0] == "step_00000002"
    assert events.emitted == []
    full = find_restorable(storage, events=events, emit=True)
    assert full is not None and full[0] == "step_00000002"


@pytest.mark.parametrize("parallel", [False, True], ids=["one-thread", "threads"])
def test_read_into_fills_buffers_and_reports_data_in_file_order(
    tmp_path: Path, parallel: bool
) -> None:
    # Reads of at least parallel_read_bytes go to read_threads threads.
    storage = LocalStorage(tmp_path, read_threads=3, parallel_read_bytes=0 if parallel else 2**40)
    data = bytes(range(256)) * (20 * 2**20 // 256 + 7)  # three pieces and a bit
    (tmp_path / "step_00000001").mkdir()
    (tmp_path / "step_00000001" / "blob").write_bytes(b"HEAD" + data)
    buffers = [memoryview(bytearray(n)) for n in (5, 9 * 2**20, len(data) - 9 * 2**20 - 5)]
    seen: list[bytes] = []

    storage.read_into(
        "step_00000001", "blob", buffers, offset=4, on_data=lambda view: seen.append(bytes(view))
    )

    assert b"".join(bytes(buffer) for buffer in buffers) == data
    assert b"".join(seen) == data
    assert max(len(piece) for piece in seen) <= READ_CHUNK_BYTES
    assert LocalStorage(tmp_path).read_range("step_00000001", "blob", 2, 4) == b"AD\x00\x01"


def test_a_save_that_cannot_create_its_staging_commits_nothing(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    storage = LocalStorage(tmp_path / "a-file" / "checkpoints")
    events = RecordingEvents()

    outcome = save(storage, 3, events=events)

    assert not outcome.committed
    assert outcome.error is not None and outcome.error.startswith("rank 0:")
    assert events.of_kind("checkpoint_failed") == [{"step": 3, "reason": outcome.error}]
    assert events.of_kind("checkpoint_saved") == []
    assert storage.checkpoint_names() == []


def test_a_save_whose_write_fails_leaves_no_checkpoint_and_no_staging(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    save(storage, 1)
    events = RecordingEvents()
    files = state_files(2) | {"no-such-dir/extra.bin": b"unwritable"}

    outcome = save(storage, 2, files=files, events=events)

    assert not outcome.committed and "cannot write" in (outcome.error or "")
    assert [kind for kind, _ in events.emitted] == ["checkpoint_failed"]
    assert storage.checkpoint_names() == ["step_00000001"]
    assert debris(tmp_path) == []
    assert find_restorable(storage, events=events, emit=True) is not None


def test_committing_an_existing_step_replaces_it(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    save(storage, 5)
    flip_byte(tmp_path / "step_00000005" / "model.safetensors")
    (tmp_path / "step_00000005" / "stale.bin").write_bytes(b"from the old save")
    new_files = state_files(50)

    outcome = save(storage, 5, files=new_files)

    assert outcome.committed
    assert verify_checkpoint(storage, "step_00000005")[1] == []
    directory = tmp_path / "step_00000005"
    assert sorted(p.name for p in directory.iterdir()) == sorted([*new_files, MANIFEST_NAME])
    assert (directory / "model.safetensors").read_bytes() == new_files["model.safetensors"]
    assert storage.checkpoint_names() == ["step_00000005"]
    assert debris(tmp_path) == []


def test_remove_leftovers_removes_staging_debris_only(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    assert LocalStorage(tmp_path / "absent").remove_leftovers() == []
    save(storage, 1)
    leftovers = [".step_00000002.partial-0badc0de", ".step_00000001.replaced-12345678"]
    for leftover in leftovers:
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "model.safetensors").write_bytes(b"half written")
    (tmp_path / ".keep-me").mkdir()

    removed = storage.remove_leftovers()

    assert sorted(removed) == sorted(leftovers)
    assert debris(tmp_path) == [".keep-me"]
    assert storage.checkpoint_names() == ["step_00000001"]
    assert verify_checkpoint(storage, "step_00000001")[1] == []


@pytest.mark.parametrize(
    ("keep_last", "keep_every", "newest_good", "kept"),
    [
        (3, 0, 8, [6, 7, 8]),
        (2, 4, 8, [4, 7, 8]),
        (2, 0, 5, [5, 7, 8]),
        (1, 3, 2, [2, 3, 6, 8]),
    ],
)
def test_prune_keeps_newest_milestones_and_the_newest_good(
    tmp_path: Path, keep_last: int, keep_every: int, newest_good: int, kept: list[int]
) -> None:
    storage = LocalStorage(tmp_path)
    for step in range(1, 9):
        save(storage, step, files={"tiny.bin": bytes([step])})
    names = storage.checkpoint_names()

    pruned = prune_checkpoints(
        storage,
        keep_last=keep_last,
        keep_every=keep_every,
        newest_good=checkpoint_name(newest_good),
    )

    assert storage.checkpoint_names() == [checkpoint_name(step) for step in kept]
    assert sorted(pruned) == sorted(set(names) - set(storage.checkpoint_names()))
    assert debris(tmp_path) == []


def test_prune_counts_only_committed_checkpoints(tmp_path: Path) -> None:
    """Directories without a manifest never crowd good checkpoints out of keep_last."""
    storage = LocalStorage(tmp_path)
    for step in (1, 2, 3, 5):
        save(storage, step, files={"tiny.bin": bytes([step])})
    for step in (4, 6):  # never committed: files, no manifest
        (tmp_path / checkpoint_name(step)).mkdir()
        (tmp_path / checkpoint_name(step) / "tiny.bin").write_bytes(b"x")

    pruned = prune_checkpoints(storage, keep_last=2, keep_every=0, newest_good=checkpoint_name(5))

    # Two committed kept (3, 5); the uncommitted 4 is older than the newest good and goes;
    # 6 is newer (it could be a save in flight elsewhere) and stays.
    assert storage.checkpoint_names() == [checkpoint_name(step) for step in (3, 5, 6)]
    assert sorted(pruned) == [checkpoint_name(step) for step in (1, 2, 4)]


# --- inspection and open_storage ---------------------------------------------------------------


def config_manifest(config: Config, step: int) -> Manifest:
    return Manifest(
        step=step,
        time=1_700_000_000.0,
        identity_fingerprint=identity_fingerprint(config),
        identity=identity_fields(config),
        world_size=1,
        global_batch_size=config.train.global_batch_size,
        versions={"torch": torch.__version__},
        operational=operational_fields(config),
    )


def make_run_dir(run_dir: Path, run_dir_setting: str | None = None) -> Config:
    """A run directory as ``train`` leaves it: config.yaml plus checkpoints."""
    setting = run_dir_setting or str(run_dir)
    config = load_config(TINY_CONFIG, overrides=[f"run_dir={json.dumps(setting)}"])
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(config))
    return config


def test_inspect_checkpoints_reports_good_corrupt_foreign_and_uncommitted(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    config = make_run_dir(run_dir)
    storage = checkpoint_storage(config)
    for step in (2, 4, 6):
        save(storage, step, manifest=config_manifest(config, step))
    other_seed = load_config(TINY_CONFIG, overrides=[f"run_dir={run_dir}", "seed=99"])
    save(storage, 8, manifest=config_manifest(other_seed, 8))
    save(storage, 10, manifest=config_manifest(config, 10))
    checkpoints = run_dir / "checkpoints"
    flip_byte(checkpoints / "step_00000004" / "model.safetensors")
    (checkpoints / "step_00000010" / MANIFEST_NAME).unlink()

    verified = inspect_checkpoints(run_dir, verify=True)

    assert [status.step for status in verified] == [2, 4, 6, 8, 10]
    assert [status.good for status in verified] == [True, False, True, False, False]
    good = verified[0]
    assert good.location == str(checkpoints / "step_00000002")
    assert good.manifest is not None
    assert good.total_bytes == sum(len(data) for data in state_files(2).values())
    assert "checksum mismatch" in verified[1].problems[0]
    (identity_problem,) = verified[3].problems
    assert "identity differs" in identity_problem and "seed: 99 -> 1234" in identity_problem
    assert verified[4].manifest is None and "no manifest.json" in verified[4].problems[0]

    listed = inspect_checkpoints(run_dir, verify=False)  # manifests only: no checksums
    assert [status.good for status in listed] == [True, True, True, True, False]


def test_inspect_checkpoints_of_a_relative_numeric_run_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = make_run_dir(tmp_path / "2024", run_dir_setting="2024")
    save(checkpoint_storage(config), 1, manifest=config_manifest(config, 1))

    (status,) = inspect_checkpoints(Path("2024"), verify=True)

    assert status.good, status.problems


def test_inspect_checkpoints_needs_a_run_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no config\.yaml"):
        inspect_checkpoints(tmp_path, verify=False)


def test_open_storage_defaults_to_the_run_dir(tmp_path: Path) -> None:
    config = load_config(TINY_CONFIG, overrides=[f"run_dir={tmp_path}"])
    storage = checkpoint_storage(config)
    assert isinstance(storage, LocalStorage)
    assert storage.root == tmp_path / "checkpoints"

    uri = f"file://{tmp_path / 'elsewhere'}"
    config = load_config(TINY_CONFIG, overrides=[f"run_dir={tmp_path}", f"checkpoint.uri={uri}"])
    assert checkpoint_storage(config).describe("step_00000001") == str(
        tmp_path / "elsewhere" / "step_00000001"
    )


def test_open_storage_opens_object_stores_and_refuses_unknown_ones(tmp_path: Path) -> None:
    from steadytrain.checkpoint.object_store import ObjectStorage

    config = load_config(TINY_CONFIG, overrides=["checkpoint.uri=memory://bucket/checkpoints"])
    assert isinstance(checkpoint_storage(config), ObjectStorage)
    unknown = load_config(TINY_CONFIG, overrides=["checkpoint.uri=nosuchproto://bucket/x"])
    with pytest.raises(ConfigError, match=r"checkpoint\.uri"):
        checkpoint_storage(unknown)


def test_a_storage_root_that_does_not_exist_yet_lists_nothing(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "not-yet")
    assert storage.checkpoint_names() == []
    free = storage.free_bytes()
    assert free is not None and free > 0
