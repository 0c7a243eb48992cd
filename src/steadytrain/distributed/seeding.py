"""Seeding, deterministic kernels, and capture/restore of every RNG a step can touch."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

RNG_STATE_VERSION = 1


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) with one value."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, *, rank: int) -> int:
    """A distinct, reproducible seed for ``rank``'s own random streams (e.g. dropout)."""
    return (seed * 1_000_003 + rank * 7919 + 1) % 2**63


def use_deterministic_kernels(enabled: bool) -> None:
    """Make reruns bit-identical at some speed cost (kernels that cannot be so will raise)."""
    if enabled:
        # cuBLAS needs a fixed workspace to be deterministic; must be set before first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=False)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states: python, numpy, torch CPU and each CUDA device."""
    state: dict[str, Any] = {
        "version": RNG_STATE_VERSION,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what ``capture_rng_state`` returned."""
    if state.get("version") != RNG_STATE_VERSION:
        raise ValueError(f"unsupported RNG state version {state.get('version')!r}")
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        # Per device, for the devices both sides have: a restart may see fewer GPUs (another
        # CUDA_VISIBLE_DEVICES), and setting a state on a device that is not there raises.
        for index, device_state in enumerate(state["torch_cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)


class ProcessRng:
    """This process's RNG streams as a resumable object (``state_dict`` / ``load_state_dict``)."""

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng_state(state)
