"""Assemble a training run from its config and run it: the library entry point of ``train``."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from steadytrain.checkpoint import (
    BytesPayload,
    CheckpointContents,
    CheckpointStorage,
    Restored,
    ResumeRequest,
    RunIdentity,
    build_checkpointer,
    check_free_space,
    checkpoint_storage,
    replace_durably,
    restore_checkpoint,
)
from steadytrain.config import (
    BatchLayout,
    Config,
    ConfigError,
    UserError,
    batch_layout,
    dump_config,
    identity_fields,
    identity_fingerprint,
    operational_fields,
)
from steadytrain.data import (
    ConsumptionLedger,
    Datasets,
    GlobalPositionSampler,
    MicroBatch,
    NullLedger,
    StepBatches,
    build_datasets,
    ensure_corpus,
    new_attempt_id,
    reads_ahead,
    sample_order,
    step_lookahead,
    validation_batches,
    with_data_metrics,
)
from steadytrain.distributed import (
    ModelState,
    OptimizerState,
    ParallelModel,
    ProcessRng,
    Runtime,
    barrier,
    broadcast_from_main,
    check_compile,
    check_gradient_sync,
    first_failure,
    gather_from_all,
    keep_until_exit,
    rank_seed,
    seed_all,
    start_runtime,
    stop_runtime,
    use_deterministic_kernels,
)
from steadytrain.fault import (
    HangWatchdog,
    PreemptionSignals,
    StepGuard,
    hang_watchdog,
)
from steadytrain.model import build_model, resolve_loss_fn
from steadytrain.telemetry import (
    ConsoleProgress,
    EventLog,
    FanOutSink,
    JsonlSink,
    MetricSink,
    MlflowTracker,
    NullProgress,
    NullSink,
    PhaseTimer,
    Progress,
    PrometheusSink,
    RunWatch,
    StepObservers,
    TensorBoardSink,
    earlier_usage,
    process_start_time,
    read_jsonl,
    resumes_since_fresh_start,
    write_report,
)
from steadytrain.train.loop import FitResult, Ledger, TrainingParts, fit
from steadytrain.train.optim import apply_hyperparameters, build_optimizer, build_scheduler
from steadytrain.train.report import recovery_report, report_end, run_facts
from steadytrain.train.state import TrainState

T = TypeVar("T")


def run_training(config: Config, *, resume: ResumeRequest | None = None) -> FitResult:
    """Join the process group, resume if asked, train to ``train.max_steps``, save the weights.

    Training may also stop early, on every rank together: preempted (a checkpoint saved) or
    diverged; ``FitResult.stop_reason`` says which, and only a finished run saves final
    weights.

    Raises:
        UserError: for problems with the config, data or user code found while setting up;
            every rank raises, and only the rank that found it has ``reported_elsewhere``
            unset.
    """
    # First: from here on a preemption signal is a flag the loop acts on, not a death.
    preemption = PreemptionSignals(list(config.fault.preempt_signals))
    imports_done = time.time()
    runtime = start_runtime(config)
    parts: TrainingParts | None = None
    try:
        use_deterministic_kernels(config.deterministic)
        parts = build_parts(config, runtime, resume=resume, preemption=preemption)
        if runtime.is_distributed:
            keep_until_exit(parts)  # its gloo groups must not be destroyed (see there)
        if parts.restored is not None and runtime.is_main:
            parts.timer.observers.observers.append(
                recovery_report(parts, imports_done=imports_done)
            )
        if runtime.is_main:
            # Only now: a refused resume must leave the run's own config.yaml as it was.
            write_run_config(config)
        started = time.perf_counter()
        if runtime.is_main:
            parts.events.emit("train_start", step=parts.state.step, **run_facts(parts))
        result = fit(parts)
        parts.watch.close()  # no stall alarm while the run ends (saves, barrier)
        result.resumed_from = parts.restored.location if parts.restored is not None else None
        report_end(parts, result, seconds=time.perf_counter() - started)
        parts.ledger.close()
        parts.batches.close()
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
        if parts is not None:
            _stop_watchers(parts)
            parts.progress.close()
        preemption.restore()
        stop_runtime()


def _stop_watchers(parts: TrainingParts) -> None:
    for observer in parts.timer.observers.observers:
        if isinstance(observer, HangWatchdog):
            observer.stop()
    parts.watch.close()


def build_parts(
    config: Config,
    runtime: Runtime,
    *,
    resume: ResumeRequest | None = None,
    preemption: PreemptionSignals | None = None,
) -> TrainingParts:
    """Build every component, checkpointing and ledger included, at the step training goes on
    from: the newest good checkpoint's (``resume``, default: automatic), or 0. Preemption
    signals reach the loop through ``preemption`` (default: none are handled).

    A setup error on any rank stops all ranks before a collective.

    Raises:
        UserError: a problem with the config, data or user code; ``CheckpointRefused`` when
            the checkpoint to resume cannot be restored into this run.
    """
    run_dir = Path(config.run_dir)
    layout = _agreed(lambda: batch_layout(config, world_size=runtime.world_size), runtime)
    _agreed(
        lambda: check_gradient_sync(config.parallel, backend=runtime.backend, layout=layout),
        runtime,
    )
    _agreed(lambda: check_compile(config, device_type=runtime.device.type), runtime)
    seed_all(config.seed)  # same model init on every rank
    model = _agreed(lambda: build_model(config), runtime)
    loss_fn = _agreed(lambda: resolve_loss_fn(config), runtime)
    datasets, sampler = _data(config, runtime, layout)
    seed_all(rank_seed(config.seed, rank=runtime.rank))  # per-rank streams (dropout)
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    state = TrainState()  # the comm hook reads its step (PowerSGD starts at one)
    parallel_model = ParallelModel(
        model, runtime=runtime, config=config, current_step=lambda: state.step
    )
    optimizer = build_optimizer(parallel_model.unwrapped, config.train)
    scheduler = build_scheduler(optimizer, config.train)
    # Before the resume, as a fresh start does it: a dataset that draws random numbers
    # (augmentation) draws them here either way, not from the restored streams.
    batches = StepBatches(
        datasets.train,
        sampler,
        layout,
        rank=runtime.rank,
        num_workers=config.data.num_workers,
        pin_memory=runtime.device.type == "cuda",
        read_ahead=reads_ahead(config.data.read_ahead, device=runtime.device),
        end_step=config.train.max_steps,  # nothing is read or fetched ahead past it
        lookahead=step_lookahead(
            datasets,
            sampler,
            layout,
            rank=runtime.rank,
            prefetch_shards=config.data.prefetch_shards,
            end_step=config.train.max_steps,
        ),
    )
    # Agreed: a streamed corpus's validation shards are fetched here.
    val_batches = _agreed(lambda: _validation_batches(datasets, config, runtime, layout), runtime)
    progress = _progress(config, runtime)
    progress.say(f"data: {datasets.description}")
    observers = StepObservers()
    events = EventLog(JsonlSink(run_dir / "events.jsonl"), rank=runtime.rank, observers=observers)
    # After the event log it reports hangs to; its thread starts with the first step.
    watchdog = hang_watchdog(
        config.fault,
        rank=runtime.rank,
        num_ranks=runtime.world_size,
        run_dir=run_dir,
        emit=events.emit,
    )
    if watchdog is not None:
        observers.observers.append(watchdog)
    identity = RunIdentity(
        config=config, world_size=runtime.world_size, global_batch_size=layout.global_batch_size
    )
    contents = checkpoint_contents(
        model=parallel_model.unwrapped,
        optimizer=optimizer,
        scheduler=scheduler,
        sampler=sampler,
        state=state,
        sharded=parallel_model.sharded,
    )
    storage = _agreed(lambda: checkpoint_storage(config), runtime)
    if config.checkpoint.every_steps:
        _check_free_space(storage, parallel_model.unwrapped, config, runtime, events)
    checkpointer = build_checkpointer(
        storage, contents, identity=identity, rank=runtime.rank, events=events
    )
    restore_started = time.perf_counter()
    restored = restore_checkpoint(
        storage,
        contents,
        identity=identity,
        request=resume or ResumeRequest(),
        rank=runtime.rank,
        events=events,
    )
    restore_seconds = time.perf_counter() - restore_started
    if restored is not None:
        _follow_restored(restored, config, runtime, optimizer, scheduler, state, events)
    # A streamed corpus's first shards, fetched now: a store that cannot serve them stops
    # every rank with one line before training (later failures are each rank's own).
    _agreed(batches.prepare_first_step, runtime)
    # Earlier attempts of this run (rank 0 reports them): read back once, at the start.
    started = process_start_time() or time.time()
    history = restored is not None and runtime.is_main
    earlier_events = read_jsonl(run_dir / "events.jsonl") if history else []
    earlier_metrics = read_jsonl(run_dir / "metrics.jsonl") if history else []
    watch = RunWatch(
        emit=events.emit,
        stall_after_s=config.telemetry.stall_after_s,
        restarts=resumes_since_fresh_start(earlier_events),
        world_size=runtime.world_size,
        earlier=earlier_usage(earlier_events, earlier_metrics, before=started),
        process_started=started,
    )
    observers.observers.append(watch)
    return TrainingParts(
        config=config,
        runtime=runtime,
        layout=layout,
        model=parallel_model,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=loss_fn,
        sampler=sampler,
        batches=batches,
        val_batches=val_batches,
        tokens_per_sample=datasets.tokens_per_sample,
        state=state,
        identity=identity,
        storage=storage,
        # After the resume: it says where this attempt starts, and a checkpoint of another
        # identity is refused with its differences before a ledger of other settings is.
        ledger=_open_ledger(config, runtime, sampler, start_step=state.step),
        checkpointer=checkpointer,
        metrics=_agreed(
            lambda: with_data_metrics(_metrics_sink(config, runtime, watch, events), datasets),
            runtime,
        ),
        events=events,
        timer=PhaseTimer(device=runtime.device, observers=observers),
        progress=progress,
        contents=contents,
        guard=StepGuard(
            rank=runtime.rank,
            world_size=runtime.world_size,
            device=runtime.device,
            max_consecutive_nonfinite=config.fault.max_consecutive_nonfinite,
            max_rollbacks=config.fault.max_rollbacks,
            counters=state,
            signal_check_s=config.fault.signal_check_s,
            inject_nonfinite_at=config.fault.inject_nonfinite_at,
        ),
        preemption=preemption or PreemptionSignals([]),
        watch=watch,
        hosts=gather_from_all(socket.gethostname()),
        restored=restored,
        restore_seconds=restore_seconds,
    )


def _data(
    config: Config, runtime: Runtime, layout: BatchLayout
) -> tuple[Datasets, GlobalPositionSampler]:
    """The datasets (the corpus prepared first if need be) and the global-position sampler."""
    if config.data.dataset_factory is None:
        # One process per machine prepares the corpus; the others wait for its verdict.
        _agreed(lambda: ensure_corpus(config.data) if runtime.local_rank == 0 else None, runtime)
    datasets = _agreed(lambda: build_datasets(config), runtime)
    sampler = _agreed(
        lambda: GlobalPositionSampler(
            num_samples=len(datasets.train),  # type: ignore[arg-type]
            global_batch_size=layout.global_batch_size,
            seed=config.seed,
            order=sample_order(config.data, datasets.train),
        ),
        runtime,
    )
    return datasets, sampler


def _validation_batches(
    datasets: Datasets, config: Config, runtime: Runtime, layout: BatchLayout
) -> list[MicroBatch]:
    if datasets.val is None:
        return []
    return validation_batches(
        datasets.val,
        world_size=runtime.world_size,
        rank=runtime.rank,
        micro_batch_size=layout.micro_batch_size,
        max_batches=config.train.eval_batches,
    )


def checkpoint_contents(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    sampler: GlobalPositionSampler,
    state: TrainState,
    sharded: bool = False,
) -> CheckpointContents:
    """What a checkpoint holds (Contract 3): model and optimizer (by parameter name), schedule,
    data position and counters (replicated under DDP: one copy is everyone's; the model and
    optimizer ``sharded`` under FSDP), and each rank's RNG streams."""
    return CheckpointContents(
        replicated={
            "model": ModelState(model),
            "optimizer": OptimizerState(model, optimizer),
            "scheduler": scheduler,
            "sampler": sampler,
            "train": state,
        },
        per_rank={"rng": ProcessRng()},
        sharded=sharded,
    )


def _follow_restored(
    restored: Restored,
    config: Config,
    runtime: Runtime,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    state: TrainState,
    events: EventLog,
) -> None:
    """What a resume implies beyond loading the parts: new settings, fresh RNG streams."""
    if restored.identity_changes:
        # The restored optimizer and schedule carry the old settings; the config wins.
        apply_hyperparameters(optimizer, scheduler, config.train, changed=restored.identity_changes)
    if not restored.per_rank_restored:
        # Per-rank streams cannot be mapped onto another world size: reseed reproducibly.
        seed_all(rank_seed(config.seed + state.step, rank=runtime.rank))
        if runtime.is_main:
            events.emit(
                "rng_reseeded",
                reason="world size changed",
                saved_world_size=restored.saved_world_size,
                world_size=runtime.world_size,
            )


def write_run_config(config: Config) -> Path:
    """Write ``RUN_DIR/config.yaml`` (the resolved config, secrets redacted) atomically."""
    target = Path(config.run_dir) / "config.yaml"
    replace_durably(target, BytesPayload(dump_config(config).encode()))
    return target


def _metrics_sink(
    config: Config, runtime: Runtime, watch: RunWatch, events: EventLog
) -> MetricSink:
    """``metrics.jsonl`` on rank 0, and TensorBoard, MLflow and Prometheus beside it when
    configured; if one cannot start, those already open are closed and the error is raised."""
    if not runtime.is_main:
        return NullSink()
    sinks: list[MetricSink] = [JsonlSink(Path(config.run_dir) / "metrics.jsonl")]
    try:
        if config.telemetry.tensorboard:
            sinks.append(TensorBoardSink(Path(config.run_dir) / "tensorboard"))
        if config.telemetry.mlflow_tracking_uri is not None:
            sinks.append(_mlflow_tracker(config, events))
        if config.telemetry.prometheus_port is not None:
            sinks.append(_prometheus_sink(config, runtime, watch, events))
    except ConfigError:
        for sink in sinks:
            sink.close()
        raise
    return sinks[0] if len(sinks) == 1 else FanOutSink(sinks)


def _prometheus_sink(
    config: Config, runtime: Runtime, watch: RunWatch, events: EventLog
) -> PrometheusSink:
    host, port = config.telemetry.prometheus_host, config.telemetry.prometheus_port
    assert port is not None
    try:
        prometheus = PrometheusSink(
            host=host,
            port=port,
            run={
                "run_dir": str(config.run_dir),
                "identity_fingerprint": identity_fingerprint(config),
                "world_size": str(runtime.world_size),
            },
            seconds_since_step=watch.seconds_since_step,
            restarts=watch.restarts,
            stalled=watch.is_stalled,
            # A resumed run's rank 0 may find the port held a few seconds more by the exiting
            # processes of the attempt before (its loader workers inherit the socket).
            bind_retry_s=10.0 if watch.restarts else 0.0,
        )
    except OSError as error:
        raise ConfigError(
            f"telemetry.prometheus_port: cannot serve on {host}:{port} "
            f"({error.strerror or error}); choose a free port, or 0 for any"
        ) from None
    bound_host, bound_port = prometheus.address
    events.emit("prometheus_started", host=bound_host, port=bound_port)
    return prometheus


def _mlflow_tracker(config: Config, events: EventLog) -> MlflowTracker:
    """The MLflow run of this run directory, opened or reopened; it also observes events."""
    assert config.telemetry.mlflow_tracking_uri is not None
    tracker = MlflowTracker(
        tracking_uri=config.telemetry.mlflow_tracking_uri,
        experiment=config.telemetry.mlflow_experiment,
        run_dir=Path(config.run_dir),
        params={**identity_fields(config), **operational_fields(config)},
        tags={
            "steadytrain.run_dir": str(Path(config.run_dir).resolve()),
            "steadytrain.identity_fingerprint": identity_fingerprint(config),
        },
        emit=events.emit,
        save_file=lambda path, data: replace_durably(path, BytesPayload(data)),
        write_report=lambda run_dir: write_report(run_dir).directory,
    )
    events.observers.observers.append(tracker)
    return tracker


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
) -> Ledger:
    if not config.data.ledger:
        return NullLedger()
    # Every rank tags its records with the same attempt id, chosen by rank 0.
    attempt = broadcast_from_main(new_attempt_id() if runtime.is_main else "")  # collective
    return _agreed(
        lambda: ConsumptionLedger(
            Path(config.run_dir) / "ledger",
            attempt=attempt,
            rank=runtime.rank,
            world_size=runtime.world_size,
            start_step=start_step,
            num_samples=sampler.num_samples,
            global_batch_size=sampler.global_batch_size,
            seed=sampler.seed,
            order=sampler.order,
        ),
        runtime,
    )


def _check_free_space(
    storage: CheckpointStorage,
    model: torch.nn.Module,
    config: Config,
    runtime: Runtime,
    events: EventLog,
) -> None:
    """Refuse (every rank) when fewer than two checkpoints fit; warn below keep_last + 1."""
    # A checkpoint is about the weights plus AdamW's two moments, in their dtype.
    estimate = 3 * sum(p.numel() * p.element_size() for p in model.parameters()) + 2**20
    warning = _agreed(
        lambda: check_free_space(
            storage, checkpoint_bytes=estimate, keep_last=config.checkpoint.keep_last
        ),
        runtime,
    )
    if warning and runtime.is_main:
        print(f"steadytrain: warning: {warning}", file=sys.stderr)
        events.emit("checkpoint_space_low", message=warning)


def _progress(config: Config, runtime: Runtime) -> Progress:
    if runtime.is_main and config.log.console:
        return ConsoleProgress(max_steps=config.train.max_steps)
    return NullProgress()
