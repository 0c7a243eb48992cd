"""Model and optimizer state keyed by parameter name, the same under DDP, FSDP and one rank.

Under FSDP the tensors are DTensors (this rank's shards); the checkpoint writes every rank's
shards and lays a load out like these states. A full (plain) tensor loaded for a sharded
parameter is cut into this rank's shard here, without communication: every rank has it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor


def laid_out_like(value: Any, like: Any) -> Any:
    """``value`` as a shard of ``like``'s layout when ``like`` is a DTensor and ``value`` a
    full tensor of its global shape; otherwise ``value``."""
    if not isinstance(like, DTensor) or isinstance(value, DTensor):
        return value
    if not isinstance(value, torch.Tensor) or value.shape != like.shape:
        return value
    # src_data_rank=None: each rank cuts its own shard from the full tensor it holds.
    return distribute_tensor(
        value.to(like.device), like.device_mesh, like.placements, src_data_rank=None
    )


def same_shards(state: dict[str, Any], own: dict[str, Any]) -> list[tuple[DTensor, DTensor]] | None:
    """``(own, loaded)`` for every key when both states have the same keys and every value
    is a DTensor of its own value's layout (global shape, dtype, mesh, placements), so that
    their local shards match element for element; otherwise None."""
    if own.keys() != state.keys():
        return None
    pairs = []
    for name, value in state.items():
        target = own[name]
        if not (isinstance(value, DTensor) and isinstance(target, DTensor)):
            return None
        same_mesh = (
            value.device_mesh is target.device_mesh or value.device_mesh == target.device_mesh
        )
        if not (
            same_mesh
            and value.shape == target.shape
            and value.dtype == target.dtype
            and value.placements == target.placements
            and value.to_local().shape == target.to_local().shape
        ):
            return None
        pairs.append((target, value))
    return pairs


class ModelState:
    """A model's weights by parameter name (``state_dict`` / ``load_state_dict``)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        return dict(get_model_state_dict(self.module))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        own = get_model_state_dict(self.module)
        shards = same_shards(state, own)
        if shards is not None:
            # Every value is this rank's shard in the parameter's own layout (a sharded
            # resume at the same world size): copied shard to shard, without DTensor's
            # dispatch, which set_model_state_dict's copies pay per parameter.
            with torch.no_grad():
                for target, value in shards:
                    target.to_local().copy_(value.to_local())
            return
        laid_out = {
            name: laid_out_like(value, own[name]) if name in own else value
            for name, value in state.items()
        }
        set_model_state_dict(self.module, laid_out)


class OptimizerState:
    """An optimizer's state keyed by parameter name instead of PyTorch's positions.

    Names make a checkpoint independent of how the model is wrapped; checkpoints of state
    format 1 (keyed by position, in the optimizer's parameter order) still load.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module = module
        self.optimizer = optimizer

    def _names(self) -> list[str]:
        """Parameter names in the optimizer's order (PyTorch's positions)."""
        names = {id(parameter): name for name, parameter in self.module.named_parameters()}
        return [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        names = self._names()
        state = self.optimizer.state_dict()
        return {
            "state": {names[position]: value for position, value in state["state"].items()},
            "param_groups": [
                {**group, "params": [names[position] for position in group["params"]]}
                for group in state["param_groups"]
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = self._names()
        positions = {name: position for position, name in enumerate(names)}

        def position_of(key: Any) -> int:
            if isinstance(key, int):  # state format 1
                return key
            if key not in positions:
                raise KeyError(f"the optimizer has no parameter {key!r}")
            return positions[key]

        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        by_position: dict[int, Any] = {}
        for key, entry in state["state"].items():
            position = position_of(key)
            like = parameters[position]
            for field, value in entry.items():
                # Per-parameter state (Adam's moments) has the parameter's shape: a mismatch
                # means the state is not this parameter's (PyTorch would load it anyway).
                misfit = isinstance(value, torch.Tensor) and value.dim() > 0
                if misfit and tuple(value.shape) != tuple(like.shape):
                    raise ValueError(
                        f"the optimizer's {field} for parameter {names[position]!r} has "
                        f"shape {list(value.shape)}, the parameter {list(like.shape)}"
                    )
            by_position[position] = {k: laid_out_like(v, like) for k, v in entry.items()}
        groups = [
            {**group, "params": [position_of(key) for key in group["params"]]}
            for group in state["param_groups"]
        ]
        self.optimizer.load_state_dict({"state": by_position, "param_groups": groups})

    def load_template(self) -> dict[str, Any]:
        """The state a load fills, showing how its tensors are laid out, even before the
        first step.

        An optimizer that has not stepped has no state tensors yet. Its per-parameter state
        (Adam's moments, momentum) is created like each parameter, so the template gives
        each parameter for all of that parameter's state (a tensor standing for a subtree):
        nothing is allocated and no step is taken, where PyTorch's
        ``get_optimizer_state_dict`` would create the state with a step at learning rate 0.
        """
        if self.optimizer.state:
            return self.state_dict()
        return {"state": dict(self.module.named_parameters())}
