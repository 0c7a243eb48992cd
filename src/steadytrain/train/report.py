"""What a run tells about itself: the facts of ``train_start``, the recovery report of a
resume, and how it ended (final weights, the closing event and summary)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

import steadytrain
from steadytrain.checkpoint import save_final_weights
from steadytrain.config import Config, identity_fields, identity_fingerprint
from steadytrain.distributed import started_warm
from steadytrain.fault import StopReason
from steadytrain.telemetry import RecoveryReport, last_logged_progress, process_start_time
from steadytrain.train.loop import FitResult, TrainingParts

FINAL_WEIGHTS = Path("final") / "model.safetensors"


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


def report_end(parts: TrainingParts, result: FitResult, *, seconds: float) -> None:
    """Rank 0: the final weights (a finished run only), the closing event and the summary.

    Every rank calls it: under FSDP the final weights are gathered from all ranks.
    """
    config = parts.config
    finished = result.stop_reason is StopReason.FINISHED
    # Gathering FSDP's shards is a collective that every rank joins (rank 0 receives them);
    # under DDP rank 0 holds all the weights, and another rank would copy them for nothing.
    gathers = parts.runtime.is_main or parts.model.sharded
    weights = parts.model.full_state_dict() if finished and gathers else {}
    if not parts.runtime.is_main:
        return
    if not finished:
        save = result.last_save
        parts.events.emit(
            result.stop_reason.value,
            step=parts.state.step,
            seconds=seconds,
            signal=parts.preemption.received,
            signalled_ranks=list(result.signalled_ranks),
            checkpoint=save.location if save is not None and save.committed else None,
            skipped_steps=parts.state.num_skipped_steps,
            rollbacks=parts.state.num_rollbacks,
            exit_code=result.exit_code,
        )
        parts.progress.say(stop_line(result, parts))
        return
    weights_path = save_final_weights(weights, Path(config.run_dir).resolve() / FINAL_WEIGHTS)
    parts.events.emit(
        "train_end",
        step=parts.state.step,
        seconds=seconds,
        weights=str(weights_path),
        loss=result.last_loss,
        val_loss=result.val_loss,
        skipped_steps=parts.state.num_skipped_steps,
        rollbacks=parts.state.num_rollbacks,
    )
    parts.progress.summary(summary(config, parts, result, seconds, weights_path))


def recovery_report(parts: TrainingParts, *, imports_done: float) -> RecoveryReport:
    """The observer that reports this resume's recovery time when its first step ends."""
    assert parts.restored is not None
    return RecoveryReport(
        emit=parts.events.emit,
        metrics=parts.metrics,
        restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
        resumed_step=parts.restored.step,
        timeline={
            "process_started": process_start_time(),
            "imports_done": imports_done,
            "setup_done": time.time(),
            "checkpoint_read_s": parts.restore_seconds,
        },
        last_progress=last_logged_progress(Path(parts.config.run_dir) / "metrics.jsonl"),
        warm_start=started_warm(),
    )


def stop_line(result: FitResult, parts: TrainingParts) -> str:
    step = parts.state.step
    if result.stop_reason is StopReason.PREEMPTED:
        save = result.last_save
        saved = (
            f"checkpoint {save.location}"
            if save is not None and save.committed
            else "no new checkpoint (the newest good one stays)"
        )
        return (
            f"preempted at step {step}: {saved}; run the same command again to resume "
            f"(exit code {result.exit_code})"
        )
    return (
        f"stopped at step {step}: non-finite loss or gradients persisted after "
        f"{parts.state.num_rollbacks} rollback(s) (exit code {result.exit_code})"
    )
