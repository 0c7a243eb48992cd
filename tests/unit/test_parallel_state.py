"""Model and optimizer state by parameter name (state format 2), and format 1's positions."""

from __future__ import annotations

import torch

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


def test_a_load_template_leaves_a_fresh_optimizer_fresh() -> None:
    model, optimizer = fresh_pair()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    template = OptimizerState(model, optimizer).load_template()
    assert not optimizer.state, "the template's zero step must not count as a step"
    assert all(p.grad is None for p in model.parameters())
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name  # learning rate 0: nothing moved
        assert template["state"][name]["exp_avg"].shape == parameter.shape
