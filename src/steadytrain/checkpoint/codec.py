"""Turn training state into tensors + JSON and back, so loading never unpickles.

Tensors go to safetensors files (``tensorfile``); everything else (optimizer
hyper-parameters, scheduler and sampler state, counters, Python/NumPy RNG states) goes to
JSON. Nested state dicts are flattened with dotted keys and a JSON "skeleton" that records
where each tensor goes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

TENSOR_MARK = "__tensor__"


def split_tensors(
    state: Any,
    *,
    prefix: str = "",
    copy: bool = True,
    reuse: Mapping[str, torch.Tensor] | None = None,
    host: bool = True,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Replace every tensor in a nested dict/list structure by a reference.

    Returns the JSON-able skeleton and the tensors by dotted key, in host memory: copies
    (a snapshot that stays as it is while training goes on), or with ``copy=False`` the
    CPU tensors themselves (device tensors are always copied to the host). A copy goes into
    the tensor of the same key, dtype and shape in ``reuse`` (an earlier snapshot no longer
    needed) when there is one, so repeated snapshots allocate no new memory. ``host=False``
    (with ``copy=False``) leaves every tensor where it is: only its key, shape and dtype are
    wanted.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            if key in tensors:
                raise ValueError(f"two tensors map to the checkpoint key {key!r}; rename one")
            spare = (reuse or {}).get(key)
            tensors[key] = host_copy(value.detach(), spare, copy=copy, host=host)
            return {TENSOR_MARK: key}
        if isinstance(value, dict):
            return {
                "__dict__": [
                    [_key_to_json(k), walk(v, f"{key}.{k}" if key else str(k))]
                    for k, v in value.items()
                ]
            }
        if isinstance(value, (list, tuple)):
            items = [walk(v, f"{key}.{i}" if key else str(i)) for i, v in enumerate(value)]
            return {"__tuple__": items} if isinstance(value, tuple) else items
        if isinstance(value, np.ndarray):
            return {
                "__ndarray__": value.tolist(),
                "dtype": str(value.dtype),
                "shape": list(value.shape),
            }
        if isinstance(value, (np.integer, np.floating)):
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot checkpoint a value of type {type(value).__name__} at {key!r}")

    return walk(state, prefix), tensors


def host_copy(
    value: torch.Tensor, spare: torch.Tensor | None, *, copy: bool, host: bool
) -> torch.Tensor:
    """``value`` in host memory (see ``split_tensors``), copied into ``spare`` if it fits."""
    if not copy and (value.device.type == "cpu" or not host):
        return value
    if (
        spare is not None
        and (spare.dtype, spare.shape) == (value.dtype, value.shape)
        and spare.is_contiguous()
    ):
        return spare.copy_(value)
    return value.to("cpu", copy=True, memory_format=torch.contiguous_format)


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``split_tensors``."""
    if isinstance(skeleton, dict):
        if TENSOR_MARK in skeleton:
            return tensors[skeleton[TENSOR_MARK]]
        if "__dict__" in skeleton:
            return {_key_from_json(k): join_tensors(v, tensors) for k, v in skeleton["__dict__"]}
        if "__tuple__" in skeleton:
            return tuple(join_tensors(v, tensors) for v in skeleton["__tuple__"])
        if "__ndarray__" in skeleton:
            array = np.asarray(skeleton["__ndarray__"], dtype=skeleton["dtype"])
            return array.reshape(skeleton.get("shape", array.shape))
        raise ValueError(f"unknown skeleton node {sorted(skeleton)}")
    if isinstance(skeleton, list):
        return [join_tensors(v, tensors) for v in skeleton]
    return skeleton


def _key_to_json(key: Any) -> Any:
    # Optimizer state is keyed by int parameter ids: keep the type through JSON.
    if isinstance(key, int):
        return {"int": key}
    if isinstance(key, str):
        return key
    raise TypeError(f"cannot checkpoint a dict key of type {type(key).__name__}")


def _key_from_json(key: Any) -> Any:
    return key["int"] if isinstance(key, dict) else key
