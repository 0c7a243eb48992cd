"""What a run tells about itself: the facts of ``train_start`` and the closing summary."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

import steadytrain
from steadytrain.config import Config, identity_fields, identity_fingerprint
from steadytrain.train.loop import FitResult, TrainingParts


def run_facts(parts: TrainingParts) -> dict[str, Any]:
    config, runtime = parts.config, parts.runtime
    return {
        "world_size": runtime.world_size,
        "backend": runtime.backend,
        "device": str(runtime.device),
        "micro_batch_size": parts.layout.micro_batch_size,
        "grad_accum_steps": parts.layout.grad_accum_steps,
        "global_batch_size": parts.layout.global_batch_size,
        "steps_per_epoch": parts.sampler.steps_per_epoch,
        "tail_samples_per_epoch": parts.sampler.tail_size,
        "identity_fingerprint": identity_fingerprint(config),
        "identity": identity_fields(config),
        "versions": {
            "steadytrain": steadytrain.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }


def summary(
    config: Config, parts: TrainingParts, result: FitResult, elapsed: float, weights: Path
) -> dict[str, str]:
    state = result.state
    num_params = sum(p.numel() for p in parts.model.unwrapped.parameters())
    history = result.history
    mean_sync = sum(r["grad_sync_share"] for r in history) / len(history) if history else 0.0
    loss_line = (
        f"{result.first_loss:.4f} (first logged) -> {result.last_loss:.4f} (last)"
        if result.first_loss is not None and result.last_loss is not None
        else "n/a"
    )
    return {
        "steps": f"{state.step} ({state.samples_seen:,} samples, {state.tokens_seen:,} tokens)",
        "layout": (
            f"{parts.runtime.world_size} rank(s) × {parts.layout.micro_batch_size} micro-batch × "
            f"{parts.layout.grad_accum_steps} accumulation = {parts.layout.global_batch_size}"
        ),
        "epoch": (
            f"{parts.sampler.epoch} + {parts.sampler.samples_consumed:,} samples "
            f"({parts.sampler.steps_per_epoch} steps/epoch, tail {parts.sampler.tail_size})"
        ),
        "model": f"{config.model.factory} ({num_params:,} parameters)",
        "train loss": loss_line,
        "val loss": f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a",
        "wall time": f"{elapsed:.1f} s ({state.tokens_seen / max(elapsed, 1e-9):,.0f} tokens/s)",
        "grad sync share": f"{mean_sync * 100:.1f}% of step time",
        "resumed from": result.resumed_from or "nothing (fresh start)",
        "last checkpoint": _describe_save(result),
        "run dir": str(Path(config.run_dir).resolve()),
        "weights": str(weights),
    }


def _describe_save(result: FitResult) -> str:
    save = result.last_save
    if save is None:
        return "none this run"
    if save.committed:
        return f"step {save.step} -> {save.location} ({save.seconds_blocked:.2f} s)"
    return f"step {save.step} FAILED: {save.error}"
