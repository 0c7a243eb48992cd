"""The training loop. ``fit`` reads as the pseudocode of one step (Contract 1):

    fetch micro-batches -> host-to-device -> forward -> backward (all-reduce overlaps the last
    micro-step's backward; earlier micro-steps skip it with no_sync) -> clip -> optimizer
    step -> scheduler step -> commit (sampler position, counters, ledger) -> observe

Host/device sync points in the hot loop are marked "host sync".
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from steadytrain.checkpoint import (
    CheckpointContents,
    Checkpointer,
    CheckpointStorage,
    Restored,
    RunIdentity,
    SaveOutcome,
)
from steadytrain.config import EXIT_DIVERGED, EXIT_OK, EXIT_REQUEUE, BatchLayout, Config
from steadytrain.data import GlobalPositionSampler, MicroBatch, StepBatches
from steadytrain.distributed import (
    ParallelModel,
    Runtime,
    mean_across_ranks,
    start_rows_from_all,
)
from steadytrain.fault import (
    GraceDeadline,
    PreemptionSignals,
    StepAction,
    StepDecision,
    StepGuard,
    StopReason,
)
from steadytrain.model import LossFn
from steadytrain.telemetry import (
    PHASES,
    EventLog,
    IntervalStats,
    MetricSink,
    PhaseTimer,
    Progress,
    RunWatch,
    Straggler,
    WatchReading,
    comparable_seconds,
    find_stragglers,
    headline_signals,
    interval_record,
)
from steadytrain.train.rollback import roll_back, skip_nonfinite_step
from steadytrain.train.state import TrainState


class Ledger(Protocol):
    """What the loop needs of a consumption ledger (``ConsumptionLedger`` or ``NullLedger``)."""

    def begin_attempt(self, *, attempt: str, start_step: int, reason: str = "start") -> None: ...

    def record(
        self, *, step: int, epoch: int, sample_ids: list[int], skipped: bool = False
    ) -> None: ...

    def close(self) -> None: ...


@dataclass
class TrainingParts:
    """Everything ``fit`` uses, built and injected by ``session.build_parts``.

    ``state``, with the model, optimizer, scheduler and sampler, is what the checkpointer
    saves (``session.checkpoint_contents``); ``fit`` advances it in place.
    """

    config: Config
    runtime: Runtime
    layout: BatchLayout
    model: ParallelModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_fn: LossFn
    sampler: GlobalPositionSampler
    batches: StepBatches
    val_batches: list[MicroBatch]
    tokens_per_sample: int
    state: TrainState
    identity: RunIdentity
    storage: CheckpointStorage
    ledger: Ledger
    checkpointer: Checkpointer
    metrics: MetricSink
    events: EventLog
    timer: PhaseTimer
    progress: Progress
    contents: CheckpointContents
    guard: StepGuard
    preemption: PreemptionSignals
    watch: RunWatch
    hosts: list[str]  # every rank's host name, in rank order
    restored: Restored | None = None  # the checkpoint ``state`` was restored from, if any
    restore_seconds: float = 0.0  # finding, reading and verifying it


@dataclass
class FitResult:
    state: TrainState
    stop_reason: StopReason = StopReason.FINISHED
    first_loss: float | None = None
    last_loss: float | None = None
    val_loss: float | None = None  # of the final weights (None without validation data)
    last_save: SaveOutcome | None = None
    resumed_from: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    signalled_ranks: tuple[int, ...] = ()  # ranks a preemption signal reached

    def add_record(self, record: dict[str, Any]) -> None:
        """A logged step's metrics record: kept in ``history``, its loss noted."""
        self.history.append(record)
        if record["loss"] is not None:
            if self.first_loss is None:
                self.first_loss = record["loss"]
            self.last_loss = record["loss"]

    @property
    def exit_code(self) -> int:
        """The documented exit code of how training stopped (README "Exit codes")."""
        return {
            StopReason.FINISHED: EXIT_OK,
            StopReason.PREEMPTED: EXIT_REQUEUE,
            StopReason.DIVERGED: EXIT_DIVERGED,
        }[self.stop_reason]


def fit(parts: TrainingParts) -> FitResult:
    """Train from ``parts.state`` to ``train.max_steps``, or until every rank agrees to stop.

    Returns the final state, the losses, and why training stopped (``stop_reason``).
    """
    config, timer, state = parts.config, parts.timer, parts.state
    result = FitResult(state=state)
    interval = IntervalStats()
    interval_loss = torch.zeros((), device=parts.runtime.device)
    evaluated_at: int | None = None
    shared: SharedInterval | None = None  # a log step's record, its collective in flight
    parts.model.module.train()
    while state.step < config.train.max_steps:
        step = state.step
        timer.start_step(step)
        with timer.phase("data_wait"):
            micro_batches = parts.batches.next_step()
        step_loss = train_micro_batches(parts, micro_batches)
        with timer.phase("optimizer"):
            decision, grad_norm = decide_step(parts, step_loss)
        stop = act_on(parts, decision, micro_batches, grad_norm) or decision.stop  # one branch
        with timer.phase("checkpoint"):
            save = save_after_step(parts, stop=stop)
        if save is not None:
            result.last_save = save
        synced = timer.sampling  # this step's phase times are exact device times (CUDA)
        step_seconds, phase_seconds = timer.end_step()
        timer.observers.step_ended(step=step, action=decision.action.value, seconds=step_seconds)
        committed = decision.action is StepAction.COMMIT
        interval.add(step_seconds, phase_seconds, committed=committed, synced=synced)
        if committed:
            interval_loss += step_loss
        if shared is not None:  # the previous log step's, done during this step
            result.add_record(finish_observing(parts, shared))
            shared = None
        at_end = state.step >= config.train.max_steps or stop is not None
        if state.step % config.log.every_steps == 0 or at_end:
            shared = start_observing(parts, state, interval, interval_loss)
            if at_end:
                result.add_record(finish_observing(parts, shared))
                shared = None
            interval, interval_loss = IntervalStats(), torch.zeros_like(interval_loss)
        if stop is not None:
            result.stop_reason, result.signalled_ranks = stop, decision.preempted_ranks
            return result
        if config.train.eval_every and state.step % config.train.eval_every == 0:
            result.val_loss, evaluated_at = evaluate(parts, state), state.step
    with timer.phase("checkpoint"):
        save = parts.checkpointer.finish()  # a background save still in flight
    if save is not None:
        result.last_save = save
    if evaluated_at != state.step:
        # The final validation loss is of the final weights, whatever eval_every is.
        result.val_loss = evaluate(parts, state)
    return result


def decide_step(parts: TrainingParts, step_loss: torch.Tensor) -> tuple[StepDecision, torch.Tensor]:
    """The step's agreed decision from the global gradient norm (read on the host: the only
    host sync per step besides logging) and, at signal checks, every rank's preemption flag
    (``StepGuard``), so every rank commits, skips, rolls back or stops together. Also returns
    the norm (on the device), which clipping reuses."""
    grad_norm = parts.model.gradient_norm()
    decision = parts.guard.decide(
        step=parts.state.step,
        preempt_requested=parts.preemption.requested,
        loss=step_loss,
        grad_norm=grad_norm,
    )
    return decision, grad_norm


def act_on(
    parts: TrainingParts,
    decision: StepDecision,
    micro_batches: list[MicroBatch],
    grad_norm: torch.Tensor,
) -> StopReason | None:
    """Carry out the agreed decision; a rollback with nothing to roll back to stops."""
    match decision.action:
        case StepAction.COMMIT:
            with parts.timer.phase("optimizer"):
                apply_optimizer_step(parts, grad_norm)
            commit_step(parts, parts.state, micro_batches)
            return None
        case StepAction.SKIP:
            skip_nonfinite_step(parts, decision, micro_batches)
            return None
        case StepAction.ROLL_BACK:
            with parts.timer.phase("checkpoint"):
                return roll_back(parts, decision)


def save_after_step(parts: TrainingParts, *, stop: StopReason | None) -> SaveOutcome | None:
    """The periodic save if one is due; on preemption, a save now, within the grace."""
    step, final = parts.state.step, parts.state.step == parts.config.train.max_steps
    if stop is not StopReason.PREEMPTED:
        return parts.checkpointer.after_step(step=step, final=final)
    deadline = GraceDeadline(
        grace_s=parts.config.fault.preempt_grace_s,
        since=parts.preemption.received_at,
        on_expiry=lambda: parts.events.emit(
            "preempt_save_abandoned",
            step=step,
            grace_s=parts.config.fault.preempt_grace_s,
            note="the previous checkpoint stays the newest good one",
        ),
    )
    try:
        return parts.checkpointer.after_step(step=step, final=final, now=True)
    finally:
        deadline.cancel()


def train_micro_batches(parts: TrainingParts, micro_batches: list[MicroBatch]) -> torch.Tensor:
    """Forward and backward each micro-batch; gradients sync on the last one only.

    Each micro-step's backward starts from 1 / (number of micro-steps) — the guard's seed, NaN
    for a non-finite loss — and DDP averages over ranks, so the gradient is that of the mean
    loss over the global batch however it is split. The phases here run once per micro-step:
    each costs a few Python calls, no more.
    """
    timer, runtime, step = parts.timer, parts.runtime, parts.state.step
    scale = 1.0 / len(micro_batches)
    step_loss = torch.zeros((), device=runtime.device)
    mixed = autocast(runtime.device, enabled=parts.config.train.precision == "bf16")
    last = len(micro_batches) - 1
    for micro_step, micro in enumerate(micro_batches):
        with timer.phase("h2d"):
            batch = to_device(micro.batch, runtime.device)
        with parts.model.gradient_sync(enabled=micro_step == last):
            with timer.phase("forward"), mixed:
                loss = parts.loss_fn(parts.model.module, batch)
                seed = parts.guard.backward_seed(loss, step=step, scale=scale)  # NaN: NaN grads
            with timer.phase("backward"):
                loss.backward(seed)  # the gradient of loss × scale
        step_loss.addcmul_(loss.detach(), seed)
    timer.add("grad_sync", parts.model.grad_sync_clock.take_seconds())
    return step_loss


def autocast(device: torch.device, *, enabled: bool) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast on ``device`` when enabled; otherwise a context that does nothing."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def apply_optimizer_step(parts: TrainingParts, grad_norm: torch.Tensor) -> None:
    """Clip to the global gradient norm, step the optimizer and the schedule, clear grads."""
    if parts.config.train.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(
            parts.model.unwrapped.parameters(), parts.config.train.grad_clip, grad_norm
        )
    parts.optimizer.step()
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)


def commit_step(parts: TrainingParts, state: TrainState, micro_batches: list[MicroBatch]) -> None:
    """The step is done: move the global position, count it, and record what it consumed."""
    epoch = parts.sampler.epoch
    finished_epoch = parts.sampler.advance()
    state.commit_step(
        num_samples=parts.layout.global_batch_size,
        num_tokens=parts.layout.global_batch_size * parts.tokens_per_sample,
    )
    sample_ids = torch.cat([micro.sample_ids for micro in micro_batches]).tolist()
    parts.ledger.record(step=state.step - 1, epoch=epoch, sample_ids=sample_ids)
    if finished_epoch and parts.runtime.is_main:
        parts.events.emit(
            "epoch_end",
            epoch=epoch,
            step=state.step,
            tail_samples=parts.sampler.tail_size,
            note="tail samples could not fill a global batch and were not consumed",
        )


# Each rank's per-step seconds of an interval, shared at every log step for the straggler
# check and the per-rank metrics (synced ones exist on CUDA only: NaN where absent).
RANK_SECONDS = ("step_time_s", *(f"{p}_s" for p in PHASES), *(f"synced_{p}_s" for p in PHASES))


@dataclass
class SharedInterval:
    """A log step's metrics record, waiting for its cross-rank part (``share_interval``)."""

    record: dict[str, Any]
    num_committed: int  # committed steps in the interval, whose losses the record averages
    useful_steps: int  # committed steps of the run at the log step
    table: Callable[[], torch.Tensor]  # waits for the collective; every rank's row
    reading: WatchReading | None  # the watch at the log step (rank 0's record only)


def start_observing(
    parts: TrainingParts, state: TrainState, interval: IntervalStats, interval_loss: torch.Tensor
) -> SharedInterval:
    """Begin a log step's metrics record: this rank's figures now, and the collective that
    shares the loss and every rank's seconds started without waiting for it.

    ``finish_observing`` completes the record, after the next step: the collective (about a
    millisecond of gloo latency on CPU, and the wait for the slowest rank) runs meanwhile
    instead of adding to every logged step.
    """
    record: dict[str, Any] = {
        "step": state.step,
        "time": time.time(),
        "epoch": parts.sampler.epoch,
        "samples_seen": state.samples_seen,
        "tokens_seen": state.tokens_seen,
        "loss": None,  # once the ranks have shared it
        "lr": parts.scheduler.get_last_lr()[0],
    }
    record.update(
        interval_record(
            interval,
            samples_per_step=parts.layout.global_batch_size,
            tokens_per_sample=parts.tokens_per_sample,
        )
    )
    table = share_interval(interval, interval_loss, record, device=parts.runtime.device)
    resumed_step = parts.restored.step if parts.restored is not None else 0
    return SharedInterval(
        record=record,
        num_committed=interval.num_committed,
        useful_steps=state.step - state.num_skipped_steps,
        table=table,
        reading=(
            parts.watch.reading(step=state.step, resumed_step=resumed_step)
            if parts.runtime.is_main
            else None
        ),
    )


def finish_observing(parts: TrainingParts, shared: SharedInterval) -> dict[str, Any]:
    """Complete the record with the ranks' mean loss, stragglers and headline signals, and
    write it (rank 0)."""
    record = shared.record
    mean_loss, timings = per_rank_seconds(parts.hosts, shared.table().tolist())  # host sync
    if shared.num_committed:
        record["loss"] = mean_loss
    if shared.reading is not None:  # rank 0
        telemetry = parts.config.telemetry
        compared = comparable_seconds(timings, exact_only=parts.runtime.device.type == "cuda")
        if compared is None:  # CUDA, no synced sample in this interval: the last verdict stands
            stragglers, named = parts.watch.last_confirmed(), list[Straggler]()
        else:
            stragglers, named = parts.watch.confirm(
                find_stragglers(compared, ratio=telemetry.straggler_ratio),
                checks=telemetry.straggler_checks,
            )
        for straggler in named:
            parts.events.emit("straggler", step=record["step"], **asdict(straggler))
        record.update(
            headline_signals(
                record,
                reading=shared.reading,
                per_rank=compared,
                hosts=parts.hosts,
                stragglers=stragglers,
                checkpoint_every_steps=parts.config.checkpoint.every_steps,
                useful_steps=shared.useful_steps,
                price_per_device_hour=telemetry.price_per_device_hour,
            )
        )
        parts.metrics.write(record)
        parts.progress.step(record)
    return record


def share_interval(
    interval: IntervalStats,
    interval_loss: torch.Tensor,
    record: dict[str, Any],
    *,
    device: torch.device,
) -> Callable[[], torch.Tensor]:
    """Start sharing the interval's loss (over its committed steps) and this rank's per-step
    seconds (``RANK_SECONDS``) with every rank: one collective of ``world_size × 16`` floats,
    log steps only. Returns what waits for the table of every rank's row."""
    # Skipped steps have non-finite losses: the interval's loss is over committed ones.
    seconds = [float(record.get(key, math.nan)) for key in RANK_SECONDS]
    row = torch.tensor([0.0, *seconds], dtype=torch.float64).to(device)
    row[0] = interval_loss / max(1, interval.num_committed)
    return start_rows_from_all(row)


def per_rank_seconds(
    hosts: list[str], table: list[list[float]]
) -> tuple[float, list[dict[str, Any]]]:
    """The mean loss over ranks, and each rank's host and seconds, from the shared table."""
    per_rank = []
    for host, values in zip(hosts, table, strict=True):
        pairs = zip(RANK_SECONDS, values[1:], strict=True)
        per_rank.append({"host": host, **{k: v for k, v in pairs if not math.isnan(v)}})
    return statistics.fmean(values[0] for values in table), per_rank


@torch.no_grad()
def evaluate(parts: TrainingParts, state: TrainState) -> float | None:
    """Mean validation loss over a fixed set of held-out micro-batches, averaged over ranks."""
    if not parts.val_batches:
        return None
    model: nn.Module = parts.model.unwrapped
    model.eval()
    total = torch.zeros((), device=parts.runtime.device)
    with parts.timer.phase("eval"):  # the watchdog gives evaluation the long allowance
        for micro in parts.val_batches:
            total += parts.loss_fn(model, to_device(micro.batch, parts.runtime.device)).float()
        val_loss = float(mean_across_ranks(total / len(parts.val_batches)).item())  # host sync
    model.train()
    if parts.runtime.is_main:
        parts.metrics.write({"step": state.step, "val_loss": val_loss})
        parts.events.emit("eval", step=state.step, val_loss=val_loss)
    return val_loss


def to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors (also inside lists, tuples and dicts) to ``device`` without blocking."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch
