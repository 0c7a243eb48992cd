"""The agreed step decision (Contract 4): every rank's local signals, one all-reduce, one answer.

At each step boundary every rank packs its signals (a preemption signal arrived, its loss is
not finite, the gradient norm is not finite) into one small integer tensor. A single MAX
all-reduce gives every rank the same table, and a pure function of that table and of state
every rank shares (the run of non-finite steps, rollbacks so far) turns it into the same
decision everywhere: commit, skip or roll back the step, and whether to stop after it. No
rank ever raises, skips or stops on its own, which is the root of most distributed hangs.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

_PREEMPT, _LOSS_NONFINITE, _GRAD_NONFINITE = range(3)


class StepAction(enum.Enum):
    COMMIT = "commit"  # apply the optimizer step and count it
    SKIP = "skip"  # non-finite somewhere: drop the gradients, move past the data
    ROLL_BACK = "roll_back"  # non-finite too often in a row: back to the last good checkpoint


class StopReason(enum.Enum):
    """Why ``fit`` returned."""

    FINISHED = "finished"  # reached train.max_steps
    PREEMPTED = "preempted"  # a preemption signal: saved, run the same command again
    DIVERGED = "diverged"  # non-finite steps persisted with no rollback left


@dataclass(frozen=True)
class StepDecision:
    """What every rank does with the step it just computed."""

    action: StepAction
    stop: StopReason | None = None
    preempted_ranks: tuple[int, ...] = ()
    nonfinite_loss_ranks: tuple[int, ...] = ()
    gradient_nonfinite: bool = False
    consecutive_nonfinite: int = 0


class GuardCounters(Protocol):
    """Where the guard keeps its counts: saved with every checkpoint (the train state), so a
    restarted run decides exactly as an uninterrupted one would."""

    consecutive_nonfinite: int
    num_rollbacks: int


@dataclass
class FreshCounters:
    consecutive_nonfinite: int = 0
    num_rollbacks: int = 0


class StepGuard:
    """Decides each step from the agreed signals; its state is identical on every rank.

    Args:
        max_consecutive_nonfinite: skipped steps in a row before a rollback.
        max_rollbacks: rollbacks a run may take (across restarts) before it stops as
            diverged.
        counters: the run's counts of non-finite steps in a row and of rollbacks.
        world_size: ranks in the group; ``rank``: this one.
        inject_nonfinite_at: (step, rank) pairs whose loss is treated as NaN, for tests.
    """

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
        max_consecutive_nonfinite: int,
        max_rollbacks: int,
        counters: GuardCounters | None = None,
        inject_nonfinite_at: Iterable[tuple[int, int]] = (),
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.max_rollbacks = max_rollbacks
        self.counters: GuardCounters = counters if counters is not None else FreshCounters()
        self._injected_steps = {step for step, at_rank in inject_nonfinite_at if at_rank == rank}

    def decide(
        self,
        *,
        step: int,
        preempt_requested: bool,
        loss: torch.Tensor,
        grad_norm: torch.Tensor,
    ) -> StepDecision:
        """The decision for ``step`` (a collective: every rank calls it once per step).

        ``loss`` and ``grad_norm`` stay on the device until the one host sync below.
        """
        if step in self._injected_steps:  # fault injection (fault.inject_nonfinite_at)
            loss = loss * float("nan")
        signals = torch.zeros((3, self.world_size), dtype=torch.int32, device=self.device)
        signals[_PREEMPT, self.rank] = int(preempt_requested)
        signals[_LOSS_NONFINITE, self.rank] = ~torch.isfinite(loss)
        signals[_GRAD_NONFINITE, self.rank] = ~torch.isfinite(grad_norm)
        if dist.is_initialized() and dist.get_world_size() > 1:
            # The extra collective of every step: 3 × world_size int32 values.
            dist.all_reduce(signals, op=dist.ReduceOp.MAX)
        table = signals.tolist()  # host sync: the one per step the decision costs
        return self.decide_from(table)

    def decide_from(self, table: list[list[int]]) -> StepDecision:
        """The decision for an agreed signal table (rows: preempt, loss, gradient)."""
        preempted = tuple(rank for rank, flag in enumerate(table[_PREEMPT]) if flag)
        loss_ranks = tuple(rank for rank, flag in enumerate(table[_LOSS_NONFINITE]) if flag)
        gradient_nonfinite = any(table[_GRAD_NONFINITE])
        stop = StopReason.PREEMPTED if preempted else None
        counters = self.counters
        if not (loss_ranks or gradient_nonfinite):
            counters.consecutive_nonfinite = 0
            return StepDecision(StepAction.COMMIT, stop=stop, preempted_ranks=preempted)
        counters.consecutive_nonfinite += 1
        action = StepAction.SKIP
        if counters.consecutive_nonfinite >= self.max_consecutive_nonfinite:
            if counters.num_rollbacks >= self.max_rollbacks:
                stop = StopReason.DIVERGED
            else:
                action = StepAction.ROLL_BACK
        return StepDecision(
            action,
            stop=stop,
            preempted_ranks=preempted,
            nonfinite_loss_ranks=loss_ranks,
            gradient_nonfinite=gradient_nonfinite,
            consecutive_nonfinite=counters.consecutive_nonfinite,
        )

    def rolled_back(self, *, rollbacks_before: int) -> None:
        """A rollback happened (on every rank) and restored older counters: count it, from
        ``rollbacks_before``, and start a fresh run of steps."""
        self.counters.num_rollbacks = rollbacks_before + 1
        self.counters.consecutive_nonfinite = 0
