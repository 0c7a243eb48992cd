"""Assemble a training run from its config and run it: the library entry point of ``train``."""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

import steadytrain
from steadytrain.checkpoint.storage import BytesPayload, replace_durably
from steadytrain.checkpoint.tensorfile import tensor_file
from steadytrain.config import (
    Config,
    UserError,
    batch_layout,
    dump_config,
    identity_fields,
    identity_fingerprint,
)
from steadytrain.data import (
    ConsumptionLedger,
    GlobalPositionSampler,
    NullLedger,
    StepBatches,
    build_datasets,
    ensure_corpus,
    new_attempt_id,
    validation_batches,
)
from steadytrain.distributed import (
    ParallelModel,
    Runtime,
    barrier,
    broadcast_from_main,
    first_failure,
    rank_seed,
    seed_all,
    start_runtime,
    stop_runtime,
    use_deterministic_kernels,
)
from steadytrain.model import build_model, resolve_loss_fn
from steadytrain.telemetry import ConsoleProgress, EventLog, JsonlSink, NullSink, PhaseTimer
from steadytrain.train.checkpointer import NoCheckpoints, build_checkpointer
from steadytrain.train.checkpointing import (
    ResumeRequest,
    check_free_space,
    open_storage,
    restore_training_state,
)
from steadytrain.train.loop import FitResult, TrainingParts, fit
from steadytrain.train.optim import build_optimizer, build_scheduler
from steadytrain.train.state import TrainState

T = TypeVar("T")
FINAL_WEIGHTS = Path("final") / "model.safetensors"


def run_training(config: Config, *, resume: ResumeRequest | None = None) -> FitResult:
    """Join the process group, train to ``train.max_steps``, save the final weights.

    Raises:
        UserError: for problems with the config, data or user code found while setting up;
            every rank raises, and only the rank that found it has ``reported_elsewhere``
            unset.
    """
    runtime = start_runtime(config)
    try:
        use_deterministic_kernels(config.deterministic)
        parts = build_parts(config, runtime)
        state = TrainState()
        storage = _agreed(lambda: open_storage(config), runtime)
        resumed_from = restore_training_state(
            storage, parts, state, request=resume or ResumeRequest()
        )
        if runtime.is_main:
            # Only now: a refused resume must leave the run's own config.yaml as it was.
            write_run_config(config)
        if config.checkpoint.every_steps:
            warning = _agreed(lambda: check_free_space(storage, parts), runtime)
            if warning and runtime.is_main:
                print(f"steadytrain: warning: {warning}", file=sys.stderr)
                parts.events.emit("checkpoint_space_low", message=warning)
        parts.checkpointer = build_checkpointer(config, storage, is_main=runtime.is_main)
        parts.ledger = _open_ledger(config, runtime, parts.sampler, start_step=state.step)
        started = time.perf_counter()
        if runtime.is_main:
            parts.events.emit("train_start", step=state.step, **_run_facts(config, runtime, parts))
        result = fit(parts, state)
        result.resumed_from = resumed_from
        elapsed = time.perf_counter() - started
        if runtime.is_main:
            weights = save_final_weights(parts.model.unwrapped, Path(config.run_dir).resolve())
            parts.events.emit(
                "train_end",
                step=state.step,
                seconds=elapsed,
                weights=str(weights),
                loss=result.last_loss,
                val_loss=result.val_loss,
            )
            parts.progress.summary(_summary(config, parts, result, elapsed, weights))
        parts.ledger.close()
        parts.metrics.close()
        parts.events.close()
        # Leave together: a rank tearing down gloo while a peer still uses it can abort the peer.
        barrier()
        return result
    except UserError:
        # User errors are agreed by every rank, so all are here: leave the group together
        # (a rank tearing gloo down under a peer can abort that peer).
        barrier(timeout_s=30.0)
        raise
    finally:
        stop_runtime()


def build_parts(config: Config, runtime: Runtime) -> TrainingParts:
    """Build every component; a setup error on any rank stops all ranks before a collective."""
    run_dir = Path(config.run_dir)
    layout = _agreed(lambda: batch_layout(config, world_size=runtime.world_size), runtime)
    seed_all(config.seed)  # same model init on every rank
    model = _agreed(lambda: build_model(config), runtime)
    loss_fn = _agreed(lambda: resolve_loss_fn(config), runtime)
    if config.data.dataset_factory is None:
        # One process per machine prepares the corpus; the others wait for its verdict.
        _agreed(lambda: ensure_corpus(config.data) if runtime.local_rank == 0 else None, runtime)
    datasets = _agreed(lambda: build_datasets(config), runtime)
    sampler = _agreed(
        lambda: GlobalPositionSampler(
            num_samples=len(datasets.train),  # type: ignore[arg-type]
            global_batch_size=layout.global_batch_size,
            seed=config.seed,
        ),
        runtime,
    )
    seed_all(rank_seed(config.seed, rank=runtime.rank))  # per-rank streams (dropout)
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    parallel_model = ParallelModel(model, runtime=runtime)
    optimizer = build_optimizer(parallel_model.unwrapped, config.train)
    val_batches = (
        validation_batches(
            datasets.val,
            world_size=runtime.world_size,
            rank=runtime.rank,
            micro_batch_size=layout.micro_batch_size,
            max_batches=config.train.eval_batches,
        )
        if datasets.val is not None
        else []
    )
    progress = ConsoleProgress(
        enabled=runtime.is_main and config.log.console, max_steps=config.train.max_steps
    )
    progress.say(f"data: {datasets.description}")
    return TrainingParts(
        config=config,
        runtime=runtime,
        layout=layout,
        model=parallel_model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, config.train),
        loss_fn=loss_fn,
        sampler=sampler,
        batches=StepBatches(
            datasets.train,
            sampler,
            layout,
            rank=runtime.rank,
            num_workers=config.data.num_workers,
            pin_memory=runtime.device.type == "cuda",
        ),
        val_batches=val_batches,
        tokens_per_sample=datasets.tokens_per_sample,
        ledger=NullLedger(),
        checkpointer=NoCheckpoints(),
        metrics=JsonlSink(run_dir / "metrics.jsonl") if runtime.is_main else NullSink(),
        events=EventLog(JsonlSink(run_dir / "events.jsonl"), rank=runtime.rank),
        timer=PhaseTimer(device=runtime.device),
        progress=progress,
    )


def save_final_weights(model: torch.nn.Module, run_dir: Path) -> Path:
    """Write ``RUN_DIR/final/model.safetensors`` durably: temp file, fsync, rename.

    A plain safetensors file (``format: pt`` metadata, as Hugging Face tools expect); tied
    weights are written under each of their names.
    """
    target = run_dir / FINAL_WEIGHTS
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: value.detach().cpu() for name, value in model.state_dict().items()}
    replace_durably(target, tensor_file(tensors, metadata={"format": "pt"}))
    return target


def write_run_config(config: Config) -> Path:
    """Write ``RUN_DIR/config.yaml`` (the resolved config, secrets redacted) atomically."""
    target = Path(config.run_dir) / "config.yaml"
    replace_durably(target, BytesPayload(dump_config(config).encode()))
    return target


def _agreed(build: Callable[[], T], runtime: Runtime) -> T:
    """Run ``build`` on every rank; if it fails with a user error anywhere, fail everywhere."""
    error: UserError | None = None
    value: Any = None
    try:
        value = build()
    except UserError as caught:
        error = caught
    failure = first_failure(str(error) if error is not None else None)  # collective
    if failure is None:
        return value
    failed_rank, message = failure
    # Exactly one line reaches the user: the lowest failing rank prints, the others exit quietly.
    if error is not None:
        error.reported_elsewhere = runtime.rank != failed_rank
        raise error
    raise UserError(f"rank {failed_rank}: {message}", reported_elsewhere=True)


def _open_ledger(
    config: Config, runtime: Runtime, sampler: GlobalPositionSampler, *, start_step: int
) -> ConsumptionLedger | NullLedger:
    if not config.data.ledger:
        return NullLedger()
    # Every rank tags its records with the same attempt id, chosen by rank 0.
    attempt = broadcast_from_main(new_attempt_id() if runtime.is_main else "")  # collective
    return ConsumptionLedger(
        Path(config.run_dir) / "ledger",
        attempt=attempt,
        rank=runtime.rank,
        world_size=runtime.world_size,
        start_step=start_step,
        num_samples=sampler.num_samples,
        global_batch_size=sampler.global_batch_size,
        seed=sampler.seed,
    )


def _run_facts(config: Config, runtime: Runtime, parts: TrainingParts) -> dict[str, Any]:
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


def _summary(
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
