"""Checkpoints (Contract 3): codec, manifest, commit protocol, verification, retention, inspection.

Single process: the collectives in ``checkpoint.protocol`` are no-ops without a process group.
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from torch import nn

from steadytrain.checkpoint import (
    MANIFEST_NAME,
    FileEntry,
    LocalStorage,
    Manifest,
    ManifestError,
    SaveOutcome,
    checkpoint_name,
    decode_parts,
    encode_parts,
    find_restorable,
    prune_checkpoints,
    rank_stem,
    save_checkpoint,
    step_of,
    verify_checkpoint,
)
from steadytrain.checkpoint.codec import (
    join_tensors,
    split_tensors,
    tensors_from_bytes,
    tensors_to_bytes,
)
from steadytrain.checkpoint.manifest import sha256_of
from steadytrain.config import (
    Config,
    ConfigError,
    dump_config,
    identity_fields,
    identity_fingerprint,
    load_config,
    operational_fields,
)
from steadytrain.dist import capture_rng_state, restore_rng_state
from steadytrain.train.checkpointing import open_storage
from steadytrain.train.inspection import inspect_checkpoints
from steadytrain.train.optim import WarmupCosine

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = REPO_ROOT / "examples" / "tiny.yaml"


class RecordingEvents:
    """An event sink (a Protocol boundary) that remembers what was emitted."""

    def __init__(self) -> None:
        self.emitted: list[tuple[str, dict[str, Any]]] = []

    def emit(self, kind: str, **fields: Any) -> None:
        self.emitted.append((kind, fields))

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [fields for emitted_kind, fields in self.emitted if emitted_kind == kind]


def assert_identical(actual: Any, expected: Any, path: str = "state") -> None:
    """Same structure, same types, same keys in the same order, bit-identical tensors.

    Any mapping may come back as a plain dict (a model's OrderedDict loads the same).
    """
    expected_type = dict if isinstance(expected, dict) else type(expected)
    assert type(actual) is expected_type, f"{path}: {type(actual)} != {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), path
        assert torch.equal(actual, expected), path
    elif isinstance(expected, np.ndarray):
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), path
        assert np.array_equal(actual, expected), path
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{path}: keys {list(actual)} != {list(expected)}"
        for key, value in expected.items():
            assert_identical(actual[key], value, f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
            assert_identical(got, want, f"{path}[{index}]")
    else:
        assert actual == expected, path


def round_trip(state: Any) -> Any:
    """What loading sees: the skeleton through JSON text, the tensors through safetensors."""
    skeleton, tensors = split_tensors(state)
    text = json.dumps(skeleton)
    return join_tensors(json.loads(text), tensors_from_bytes(tensors_to_bytes(tensors)))


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def adamw_for(model: nn.Module) -> torch.optim.AdamW:
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95))


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, *, num_steps: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(num_steps):
        inputs = torch.randn(5, 4, generator=generator)
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()


# --- codec -------------------------------------------------------------------------------------


def test_adamw_state_round_trips_bit_exactly_and_resumes_identically() -> None:
    model = small_model()
    optimizer = adamw_for(model)
    train_steps(model, optimizer, num_steps=2)
    state = optimizer.state_dict()
    assert isinstance(state["state"][0]["step"], torch.Tensor)  # what makes this a real test
    assert state["param_groups"][0]["betas"] == (0.9, 0.95)

    restored = round_trip(state)

    assert_identical(restored, state)
    assert all(isinstance(key, int) for key in restored["state"])
    assert isinstance(restored["param_groups"][0]["betas"], tuple)
    # The restored state drives a fresh optimizer to the very same next step.
    twin = small_model()
    twin.load_state_dict(model.state_dict())
    twin_optimizer = adamw_for(twin)
    twin_optimizer.load_state_dict(restored)
    train_steps(model, optimizer, num_steps=1)
    train_steps(twin, twin_optimizer, num_steps=1)
    for mine, theirs in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(mine, theirs)


def test_warmup_cosine_scheduler_state_round_trips() -> None:
    def build() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        optimizer = torch.optim.AdamW(small_model().parameters(), lr=3e-3)
        schedule = WarmupCosine(warmup_steps=3, max_steps=20, min_ratio=0.1)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)

    optimizer, scheduler = build()
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()

    restored = round_trip(state)

    assert_identical(restored, state)
    twin_optimizer, twin = build()
    twin.load_state_dict(restored)
    twin_optimizer.load_state_dict(optimizer.state_dict())
    for _ in range(3):
        for each_optimizer, each_scheduler in ((optimizer, scheduler), (twin_optimizer, twin)):
            each_optimizer.step()
            each_scheduler.step()
        assert twin.get_last_lr() == scheduler.get_last_lr()


def test_rng_state_round_trip_reproduces_the_next_draws() -> None:
    def draw() -> tuple[float, list[float], list[float]]:
        return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()

    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    draw()  # move every stream away from its seed
    state = capture_rng_state()
    skeleton, _ = split_tensors(state)
    json.dumps(skeleton)
    restored = round_trip(state)
    assert_identical(restored, state)

    expected = draw()
    draw()  # and further along, so the restore has something to undo
    restore_rng_state(restored)

    assert draw() == expected


def test_nested_structures_keep_int_keys_tuples_and_scalars() -> None:
    state = {
        1: {2: "two", "three": [3, (4.5, None, True)]},
        "ints": {0: torch.tensor([1, 2], dtype=torch.int64)},
        "bf16": torch.linspace(0, 1, 5, dtype=torch.bfloat16),
        "flags": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5),
        "empty": {},
        "numbers": [np.int64(7), np.float64(0.25)],
        "matrix": np.arange(6, dtype=np.uint32).reshape(2, 3),
    }

    restored = round_trip(state)

    assert list(restored) == [1, "ints", "bf16", "flags", "scalar", "empty", "numbers", "matrix"]
    assert list(restored[1]) == [2, "three"]
    assert restored[1]["three"] == [3, (4.5, None, True)]
    assert list(restored["ints"]) == [0]
    assert_identical(restored["ints"][0], state["ints"][0])
    assert_identical(restored["bf16"], state["bf16"])
    assert_identical(restored["flags"], state["flags"])
    assert_identical(restored["scalar"], state["scalar"])
    assert restored["empty"] == {}
    assert restored["numbers"] == [7, 0.25]
    assert_identical(restored["matrix"], state["matrix"])


def test_empty_ndarray_keeps_its_shape() -> None:
    state = {"empty": np.zeros((0, 3), dtype=np.float32)}
    assert_identical(round_trip(state), state)


def test_colliding_dotted_keys_never_corrupt_silently() -> None:
    # "a.b" and {"a": {"b": ...}} both flatten to tensor key "a.b".
    state = {"a.b": torch.ones(2), "a": {"b": torch.zeros(2)}}
    try:
        restored = round_trip(state)
    except ValueError:
        return  # refusing is fine; returning the wrong tensor is not
    assert_identical(restored, state)


@pytest.mark.parametrize(
    "state",
    [
        {"value": object()},
        {"value": {1, 2}},
        {"value": b"bytes"},
        {"value": 1 + 2j},
        {1.5: "float key"},
        {(1, 2): "tuple key"},
        [{"nested": {"deeper": lambda: None}}],
    ],
    ids=["object", "set", "bytes", "complex", "float-key", "tuple-key", "nested-function"],
)
def test_unsupported_values_raise_type_error(state: Any) -> None:
    with pytest.raises(TypeError):
        split_tensors(state)


def test_tied_weights_model_encodes_and_restores() -> None:
    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    model = TiedLM()
    files = encode_parts({"model": model.state_dict()}, stem="shared")
    restored = decode_parts(files.__getitem__, stem="shared")["model"]

    twin = TiedLM()
    twin.load_state_dict(restored)
    assert torch.equal(twin.embed.weight, model.embed.weight)


# --- encode_parts / decode_parts ---------------------------------------------------------------


def test_encode_decode_round_trip_and_file_names() -> None:
    model = small_model()
    optimizer = adamw_for(model)
    train_steps(model, optimizer, num_steps=2)
    shared_state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "train": {"version": 1, "step": 2, "samples_seen": 10, "tokens_seen": 40},
    }
    rng_state = {"rng": capture_rng_state()}

    shared = encode_parts(shared_state, stem="shared")
    per_rank = encode_parts(rng_state, stem=rank_stem(3))

    assert set(shared) == {"shared.json", "model.safetensors", "optimizer.safetensors"}
    assert rank_stem(3) == "rank-00003"
    assert set(per_rank) == {"rank-00003.json", "rank-00003-rng.safetensors"}
    assert_identical(decode_parts(shared.__getitem__, stem="shared"), shared_state)
    assert_identical(decode_parts(per_rank.__getitem__, stem="rank-00003"), rng_state)


def test_decode_refuses_an_unknown_state_version() -> None:
    files = encode_parts({"train": {"step": 1}}, stem="shared")
    files["shared.json"] = json.dumps({"version": 99, "tensor_files": {}, "parts": {}}).encode()
    with pytest.raises(ManifestError, match="unsupported state version"):
        decode_parts(files.__getitem__, stem="shared")


class _Booby:
    """Unpickling this creates ``marker`` (stands in for arbitrary code execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_decoding_never_unpickles(tmp_path: Path) -> None:
    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(_Booby(armed)))  # the payload really does go off when unpickled
    assert armed.exists()
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"weight": _Booby(marker)})
    model = small_model()
    optimizer = adamw_for(model)
    train_steps(model, optimizer, num_steps=1)
    files = encode_parts(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, stem="shared"
    )
    directory = tmp_path / "ckpt"
    directory.mkdir()
    for filename, data in files.items():
        (directory / filename).write_bytes(data)
    (directory / "model.pt").write_bytes(payload)

    def read(filename: str) -> bytes:
        return (directory / filename).read_bytes()

    assert set(decode_parts(read, stem="shared")) == {"model", "optimizer"}  # model.pt ignored
    (directory / "optimizer.safetensors").write_bytes(payload)  # a tensor file swapped
    with pytest.raises(SafetensorError):
        decode_parts(read, stem="shared")
    (directory / "optimizer.safetensors").write_bytes(files["optimizer.safetensors"])
    document = json.loads(read("shared.json"))
    document["tensor_files"]["model"] = "model.pt"  # the JSON itself points at the pickle
    (directory / "shared.json").write_text(json.dumps(document))
    with pytest.raises(SafetensorError):
        decode_parts(read, stem="shared")

    assert not marker.exists()


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
    manifest.files = {"model.safetensors": FileEntry(size=10, sha256=sha256_of(b"x"))}
    assert Manifest.from_json(manifest.to_json()) == manifest


def manifest_payload() -> dict[str, Any]:
    return json.loads(make_manifest(3).to_json())


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a steadytrain checkpoint manifest"),
        (json.dumps({**manifest_payload(), "format": "other"}), "not a steadytrain"),
        (json.dumps({**manifest_payload(), "version": 2}), "unsupported manifest version"),
        (json.dumps({k: v for k, v in manifest_payload().items() if k != "step"}), "missing"),
        (json.dumps({**manifest_payload(), "files": ["a"]}), "malformed"),
        (json.dumps({**manifest_payload(), "files": {"a": {"size": "big"}}}), "malformed"),
        (json.dumps({**manifest_payload(), "step": None}), "malformed"),
    ],
    ids=["garbage", "list", "format", "version", "no-step", "files-list", "bad-entry", "null"],
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
        assert (entry.size, entry.sha256) == (len(data), sha256_of(data))
    assert sorted(p.name for p in directory.iterdir()) == sorted([*files, MANIFEST_NAME])
    assert debris(storage.root) == []
    assert storage.checkpoint_names() == ["step_00000005"]
    assert verify_checkpoint(storage, "step_00000005") == (manifest, [])
    assert events.of_kind("checkpoint_saved") == [
        {"step": 5, "location": str(directory), "num_files": len(files)}
    ]


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
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
    config = load_config(TINY_YAML, overrides=[f"run_dir={json.dumps(setting)}"])
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(config))
    return config


def test_inspect_checkpoints_reports_good_corrupt_foreign_and_uncommitted(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    config = make_run_dir(run_dir)
    storage = open_storage(config)
    for step in (2, 4, 6):
        save(storage, step, manifest=config_manifest(config, step))
    other_seed = load_config(TINY_YAML, overrides=[f"run_dir={run_dir}", "seed=99"])
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
    save(open_storage(config), 1, manifest=config_manifest(config, 1))

    (status,) = inspect_checkpoints(Path("2024"), verify=True)

    assert status.good, status.problems


def test_inspect_checkpoints_needs_a_run_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no config\.yaml"):
        inspect_checkpoints(tmp_path, verify=False)


def test_open_storage_defaults_to_the_run_dir(tmp_path: Path) -> None:
    config = load_config(TINY_YAML, overrides=[f"run_dir={tmp_path}"])
    storage = open_storage(config)
    assert isinstance(storage, LocalStorage)
    assert storage.root == tmp_path / "checkpoints"

    uri = f"file://{tmp_path / 'elsewhere'}"
    config = load_config(TINY_YAML, overrides=[f"run_dir={tmp_path}", f"checkpoint.uri={uri}"])
    assert open_storage(config).describe("step_00000001") == str(
        tmp_path / "elsewhere" / "step_00000001"
    )


def test_open_storage_opens_object_stores_and_refuses_unknown_ones(tmp_path: Path) -> None:
    from steadytrain.checkpoint.object_store import ObjectStorage

    config = load_config(TINY_YAML, overrides=["checkpoint.uri=memory://bucket/checkpoints"])
    assert isinstance(open_storage(config), ObjectStorage)
    unknown = load_config(TINY_YAML, overrides=["checkpoint.uri=nosuchproto://bucket/x"])
    with pytest.raises(ConfigError, match=r"checkpoint\.uri"):
        open_storage(unknown)


def test_a_storage_root_that_does_not_exist_yet_lists_nothing(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "not-yet")
    assert storage.checkpoint_names() == []
    free = storage.free_bytes()
    assert free is not None and free > 0
