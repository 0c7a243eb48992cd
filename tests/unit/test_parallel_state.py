"""Model and optimizer state by parameter name (state format 2), and format 1's positions."""

from __future__ import annotations

import json

import pytest
import torch

from steadytrain.checkpoint.sharded import Chunk, ShardedTensor, index_problems, resolve_shards
from steadytrain.checkpoint.sharded import _storage_metadata as storage_metadata
from steadytrain.checkpoint.tensorfile import Entry
from steadytrain.config import load_config
from steadytrain.distributed import ModelState, OptimizerState
from steadytrain.model.gpt import GPT
from steadytrain.train.optim import build_optimizer
from tests.helpers import TINY_CONFIG


def trained_pair() -> tuple[GPT, torch.optim.AdamW]:
    torch.manual_seed(0)
    model = GPT(num_layers=1, width=16, num_heads=2, max_seq_len=8)
    optimizer = build_optimizer(model, load_config(TINY_CONFIG).train)
    tokens = torch.randint(0, 256, (2, 8))
    model(tokens).logsumexp(-1).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def fresh_pair() -> tuple[GPT, torch.optim.AdamW]:
    model = GPT(num_layers=1, width=16, num_heads=2, max_seq_len=8)
    return model, build_optimizer(model, load_config(TINY_CONFIG).train)


def test_optimizer_state_is_keyed_by_parameter_name() -> None:
    model, optimizer = trained_pair()
    state = OptimizerState(model, optimizer).state_dict()
    names = [name for name, _ in model.named_parameters()]
    assert sorted(state["state"]) == sorted(names)
    grouped = [name for group in state["param_groups"] for name in group["params"]]
    assert sorted(grouped) == sorted(names)
    assert set(ModelState(model).state_dict()) == set(model.state_dict())


def test_format_1_positions_and_format_2_names_load_the_same_state() -> None:
    model, optimizer = trained_pair()
    by_position = optimizer.state_dict()  # what state format 1 saved
    by_name = OptimizerState(model, optimizer).state_dict()
    loaded = []
    for saved in (by_position, by_name):
        target_model, target = fresh_pair()
        OptimizerState(target_model, target).load_state_dict(saved)
        loaded.append(target.state_dict())
    for position, entry in by_position["state"].items():
        for key, value in entry.items():
            for state in loaded:
                assert torch.equal(state["state"][position][key], value), (position, key)
    assert loaded[0]["param_groups"] == loaded[1]["param_groups"] == by_position["param_groups"]


def test_a_fresh_optimizers_load_template_is_its_parameters_without_a_step() -> None:
    model, optimizer = fresh_pair()
    template = OptimizerState(model, optimizer).load_template()
    assert not optimizer.state, "a template must not create optimizer state"
    assert all(p.grad is None for p in model.parameters())
    # Each parameter stands for all of its state: a load lays every moment out like it.
    assert list(template["state"]) == [name for name, _ in model.named_parameters()]
    for name, parameter in model.named_parameters():
        assert template["state"][name] is parameter, name


def test_optimizer_state_of_another_shape_is_refused_not_loaded_into_the_wrong_parameter() -> None:
    _, optimizer = trained_pair()
    by_position = optimizer.state_dict()
    shapes = {position: entry["exp_avg"].shape for position, entry in by_position["state"].items()}
    first = next(position for position, shape in shapes.items() if len(shape) == 2)
    other = next(position for position, shape in shapes.items() if shape != shapes[first])
    swapped = dict(by_position["state"])
    swapped[first], swapped[other] = swapped[other], swapped[first]
    target_model, target = fresh_pair()
    with pytest.raises(ValueError, match=r"exp_avg for parameter .* has shape"):
        OptimizerState(target_model, target).load_state_dict({**by_position, "state": swapped})
    assert not target.state


def test_shards_that_overlap_or_leave_a_hole_do_not_tile_the_tensor() -> None:
    stored = ShardedTensor(shape=(4, 3), dtype=torch.float32)
    halves = [Chunk(offset=(0, 0), shape=(2, 3)), Chunk(offset=(2, 0), shape=(2, 3))]
    assert storage_metadata("w", stored, halves).size == torch.Size([4, 3])
    empty = Chunk(offset=(4, 0), shape=(0, 3))  # a rank with nothing of this tensor
    assert len(storage_metadata("w", stored, [*halves, empty]).chunks) == 3
    twice_the_first = [halves[0], halves[0]]  # the same count of elements, and a hole
    with pytest.raises(ValueError, match="do not tile"):
        storage_metadata("w", stored, twice_the_first)
    with pytest.raises(TypeError, match="cannot be saved"):
        ShardedTensor(shape=(2,), dtype=torch.complex128).describe()


def test_the_chunk_index_check_names_each_fault_of_a_sharded_checkpoint() -> None:
    shared = {"sharded": {"model": {"w": {"shape": [5, 3], "dtype": "F32"}}}}  # uneven: 3 + 2

    def rank_document(rank: int, offset: list[int], shape: list[int]) -> dict[str, object]:
        return {
            "tensor_files": {"model": f"rank-0000{rank}-model.safetensors"},
            "chunks": {"model": {"w": {"offset": offset, "shape": shape}}},
        }

    headers: dict[str, dict[str, Entry]] = {
        "rank-00000-model.safetensors": {"w": (torch.float32, [3, 3], 0, 36)},
        "rank-00001-model.safetensors": {"w": (torch.float32, [2, 3], 0, 24)},
    }
    good = {
        "rank-00000.json": rank_document(0, [0, 0], [3, 3]),
        "rank-00001.json": rank_document(1, [3, 0], [2, 3]),
    }
    assert index_problems(shared, good, headers.get) == []

    overlapping = {**good, "rank-00001.json": rank_document(1, [2, 0], [2, 3])}
    assert index_problems(shared, overlapping, headers.get) == [
        "model w: the chunks ([0, 0]+[3, 3], [2, 0]+[2, 3]) do not tile its shape [5, 3]"
    ]

    unlisted = index_problems(shared, good, lambda name: headers.get(name.replace("1", "9")))
    assert unlisted == [
        "rank-00001.json: model shards in 'rank-00001-model.safetensors', not in the manifest",
        "model w: the chunks ([0, 0]+[3, 3]) do not tile its shape [5, 3]",
    ]
    other_shape = {**headers, "rank-00001-model.safetensors": {"w": (torch.float16, [2, 3], 0, 12)}}
    assert index_problems(shared, good, other_shape.get) == [
        "rank-00001.json: model w: rank-00001-model.safetensors holds F16 [2, 3], the index "
        "F32 [2, 3]"
    ]
    unknown = {**good, "rank-00001.json": rank_document(1, [3, 0], [2, 3]) | {"tensor_files": {}}}
    assert "not in the manifest" in index_problems(shared, unknown, headers.get)[0]
    assert index_problems(shared, {"rank-00000.json": {}}, headers.get)[0].startswith(
        "chunk index unreadable"
    )


def test_a_rank_whose_own_chunks_are_its_parts_reads_only_its_own_index_and_files() -> None:
    full = torch.arange(12.0).reshape(4, 3)
    documents = {  # rank 0 saved all of w, rank 1 none of it (a valid, uneven tiling)
        0: {
            "tensor_files": {"model": "rank-00000-model.safetensors"},
            "chunks": {"model": {"w": {"offset": [0, 0], "shape": [4, 3]}}},
        },
        1: {"tensor_files": {}, "chunks": {}},
    }
    asked: list[str] = []

    def rank_document(rank: int) -> bytes:
        asked.append(f"rank-0000{rank}.json")
        return json.dumps(documents[rank]).encode()

    def read_tensor_file(filename: str) -> dict[str, torch.Tensor]:
        asked.append(filename)
        return {"w": full.clone()}

    def resolve(own_rank: int | None) -> torch.Tensor:
        asked.clear()
        states = {"model": {"w": ShardedTensor(shape=(4, 3), dtype=torch.float32)}}
        resolved = resolve_shards(
            states,
            templates=dict,  # no layout: w is wanted in full, which rank 0's chunk is
            rank_document=rank_document,
            num_ranks=2,
            read_tensor_file=read_tensor_file,
            own_rank=own_rank,
        )
        return resolved["model"]["w"]

    assert torch.equal(resolve(0), full)
    assert asked == ["rank-00000.json", "rank-00000-model.safetensors"]
    # Without a rank of its own, or with one that holds none of it: every index, then the
    # file that holds the chunk; each read once.
    assert torch.equal(resolve(None), full)
    assert asked == ["rank-00000.json", "rank-00001.json", "rank-00000-model.safetensors"]
    assert torch.equal(resolve(1), full)
    assert asked == ["rank-00001.json", "rank-00000.json", "rank-00000-model.safetensors"]
