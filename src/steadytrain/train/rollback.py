"""What the non-finite guard's decisions do: skip a step, or roll back and pass over data.

A skipped step keeps the weights and optimizer state, drops its gradients, and moves the
data position and the learning-rate schedule on as a committed step would; the ledger
records its samples as *skipped by the guard*. When steps keep failing, the weights
themselves are suspect: training rolls back to the newest good checkpoint and passes over
the data from that checkpoint to the failing step (the window that led there), so neither
the weights nor the batches that poisoned them come back.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from steadytrain.checkpoint import ResumeRequest, restore_checkpoint
from steadytrain.data import MicroBatch, new_attempt_id
from steadytrain.distributed import broadcast_from_main
from steadytrain.fault import StepDecision, StopReason

if TYPE_CHECKING:
    from steadytrain.train.loop import TrainingParts


def skip_nonfinite_step(
    parts: TrainingParts, decision: StepDecision, micro_batches: list[MicroBatch]
) -> None:
    """Drop this step's update on every rank (agreed) and pass over its data."""
    parts.optimizer.zero_grad(set_to_none=True)
    parts.model.forget_dropped_gradients()  # PowerSGD's error feedback holds them too
    sample_ids = [int(i) for micro in micro_batches for i in micro.sample_ids.tolist()]
    step = parts.state.step
    _pass_over_step(parts, sample_ids)
    if parts.runtime.is_main:
        parts.events.emit(
            "nonfinite_step_skipped",
            step=step,
            loss_ranks=list(decision.nonfinite_loss_ranks),
            gradient_nonfinite=decision.gradient_nonfinite,
            consecutive=decision.consecutive_nonfinite,
            limit=parts.config.fault.max_consecutive_nonfinite,
        )


def roll_back(parts: TrainingParts, decision: StepDecision) -> StopReason | None:
    """Restore the newest good checkpoint and pass over the data up to the failing step.

    Every rank runs this (the decision is agreed); the checkpoint choice is rank 0's,
    broadcast. Returns ``DIVERGED`` when there is no checkpoint to roll back to.
    """
    failing_step, rollbacks_before = parts.state.step, parts.state.num_rollbacks
    parts.optimizer.zero_grad(set_to_none=True)
    parts.model.forget_dropped_gradients()
    parts.checkpointer.finish()  # a background save must land before we read storage
    restored = restore_checkpoint(
        parts.storage,
        parts.contents,
        identity=parts.identity,
        request=ResumeRequest(),
        rank=parts.runtime.rank,
        events=parts.events,
    )
    if restored is None:  # nothing to roll back to
        return StopReason.DIVERGED
    # The restored counters predate this rollback.
    parts.guard.rolled_back(rollbacks_before=rollbacks_before)
    window = list(range(parts.state.step, failing_step + 1))
    attempt = broadcast_from_main(new_attempt_id() if parts.runtime.is_main else "")
    parts.ledger.begin_attempt(attempt=attempt, start_step=parts.state.step, reason="rollback")
    for _ in window:
        sampler = parts.sampler
        ids = sampler.rank_micro_batches(
            parts.layout,
            rank=parts.runtime.rank,
            epoch=sampler.epoch,
            step_in_epoch=sampler.step_in_epoch,
        )
        _pass_over_step(parts, [sample for micro in ids for sample in micro])
    if parts.runtime.is_main:
        parts.events.emit(
            "rolled_back",
            step=failing_step,
            to_step=window[0],
            checkpoint=restored.location,
            skipped_steps=window,
            rollbacks=parts.state.num_rollbacks,
            limit=parts.config.fault.max_rollbacks,
            loss_ranks=list(decision.nonfinite_loss_ranks),
        )
    return None


def _pass_over_step(parts: TrainingParts, sample_ids: list[int]) -> None:
    """Count the step as skipped: data position, schedule and counters move on."""
    epoch = parts.sampler.epoch
    parts.ledger.record(step=parts.state.step, epoch=epoch, sample_ids=sample_ids, skipped=True)
    parts.sampler.advance()
    with warnings.catch_warnings():
        # The schedule is a function of the step number, stepped or skipped.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        parts.scheduler.step()
    parts.state.skip_step()
