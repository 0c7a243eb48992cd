"""Checkpoint codec: state dicts to safetensors + JSON and back, never via pickle."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from steadytrain.checkpoint import (
    ManifestError,
    decode_parts,
    encode_parts,
    host_buffers_like,
    rank_stem,
    snapshot_parts,
)
from steadytrain.checkpoint.codec import join_tensors, split_tensors
from steadytrain.checkpoint.tensorfile import TensorFileError, tensor_file, tensors_from_bytes
from steadytrain.distributed import capture_rng_state, restore_rng_state
from steadytrain.train.optim import WarmupCosine


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
    data = b"".join(tensor_file(tensors).chunks())
    return join_tensors(json.loads(text), tensors_from_bytes(data))


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
    with pytest.raises(TensorFileError):
        decode_parts(read, stem="shared")
    (directory / "optimizer.safetensors").write_bytes(files["optimizer.safetensors"])
    document = json.loads(read("shared.json"))
    document["tensor_files"]["model"] = "model.pt"  # the JSON itself points at the pickle
    (directory / "shared.json").write_text(json.dumps(document))
    with pytest.raises(TensorFileError, match="not a safetensors file"):
        decode_parts(read, stem="shared")

    assert not marker.exists()


def test_snapshots_copy_into_the_previous_snapshot_and_sync_ones_copy_nothing() -> None:
    model = small_model()
    optimizer = adamw_for(model)
    train_steps(model, optimizer, num_steps=1)

    first = snapshot_parts({"model": model.state_dict()}, stem="shared")
    weight = first.tensors["model"]["0.weight"]
    assert weight.data_ptr() != model[0].weight.data_ptr()  # a copy, training may go on
    train_steps(model, optimizer, num_steps=1)
    second = snapshot_parts({"model": model.state_dict()}, stem="shared", reuse=first)

    assert second.tensors["model"]["0.weight"].data_ptr() == weight.data_ptr()  # no new memory
    assert_identical(second.tensors["model"], dict(model.state_dict()))
    grown = snapshot_parts({"model": {"0.weight": torch.zeros(9, 4)}}, stem="shared", reuse=second)
    assert grown.tensors["model"]["0.weight"].data_ptr() != weight.data_ptr()  # shape changed

    live = snapshot_parts({"model": model.state_dict()}, stem="shared", copy=False)
    assert live.tensors["model"]["0.weight"].data_ptr() == model[0].weight.data_ptr()


def test_host_memory_staged_from_a_template_takes_the_first_snapshot() -> None:
    model = small_model()
    state = {"model": model.state_dict()}
    template = snapshot_parts(state, stem="shared", copy=False, host=False)
    assert template.tensors["model"]["0.weight"].data_ptr() == model[0].weight.data_ptr()

    staged = host_buffers_like(template)
    buffer = staged.tensors["model"]["0.weight"]
    assert buffer.data_ptr() != model[0].weight.data_ptr() and not buffer.any()

    snapshot = snapshot_parts(state, stem="shared", reuse=staged)
    assert snapshot.tensors["model"]["0.weight"].data_ptr() == buffer.data_ptr()
    assert_identical(snapshot.tensors["model"], dict(model.state_dict()))
