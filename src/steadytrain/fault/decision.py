"""The agreed step decision (Contract 4): every rank's local signals, one answer for all.

Two kinds of signal, agreed in two ways:

- **Non-finite loss or gradients** are agreed through the gradient all-reduce itself. A rank
  whose loss is not finite starts its backward from a NaN gradient (``backward_seed``), so its
  gradients are NaN; the all-reduce spreads them to every rank, and the global gradient norm,
  computed from the same reduced gradients on every rank (the premise DDP already rests on:
  every rank holds identical gradients after the sync), is non-finite everywhere. Every step
  reads that norm once on the host (``decide``'s one host sync) and no extra collective is
  needed.
- **Preemption signals** arrive on any rank at any time. Ranks agree on them in a small MAX
  all-reduce of a ``4 × world_size`` int32 table (preempted, non-finite loss, non-finite
  gradient, next check), held at *signal checks*: at the first step, then about every
  ``fault.signal_check_s`` seconds of training (every step when steps are longer), on a
  schedule every rank derives from the table itself, and at every non-finite step (where
  the table also names the ranks whose loss was not finite). A blocking all-reduce costs
  milliseconds on a loaded host (about 2 ms here, 2 ranks on 2 cores), which a per-step
  check would add to every short step.

A pure function of the table and of state every rank shares (the run of non-finite steps,
rollbacks so far) then gives the same decision everywhere: commit, skip or roll back the
step, and whether to stop after it. No rank ever raises, skips or stops on its own, which is
the root of most distributed hangs.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

_PREEMPT, _LOSS_NONFINITE, _GRAD_NONFINITE, _NEXT_CHECK = range(4)
# The most steps between two signal checks, however short the steps.
MAX_STEPS_BETWEEN_CHECKS = 1000


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
        signal_check_s: about how many seconds of training between two signal checks (0:
            every step).
        inject_nonfinite_at: (step, rank) pairs whose loss is made NaN, for tests.
        clock: seconds, for the check schedule (``time.monotonic``; tests pass their own).
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
        signal_check_s: float = 0.0,
        inject_nonfinite_at: Iterable[tuple[int, int]] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.max_rollbacks = max_rollbacks
        self.counters: GuardCounters = counters if counters is not None else FreshCounters()
        self.signal_check_s = signal_check_s
        self._injected_steps = {step for step, at_rank in inject_nonfinite_at if at_rank == rank}
        self._clock = clock
        self._next_check: int | None = None  # the step of the next signal check (None: now)
        self._last_check: tuple[int, float] | None = None  # its step and time

    def backward_seed(self, loss: torch.Tensor, *, step: int, scale: float) -> torch.Tensor:
        """The gradient to start ``loss.backward`` from: ``scale`` when the loss is finite,
        NaN when it is not, so every gradient of this rank turns NaN and the gradient
        all-reduce carries the verdict to all ranks. Seeding the backward, rather than
        multiplying the loss, adds no node to the graph. On the device: no host sync."""
        if step in self._injected_steps:  # fault injection (fault.inject_nonfinite_at)
            return torch.full_like(loss, float("nan"), requires_grad=False)
        finite = torch.isfinite(loss.detach())
        return torch.where(finite, scale, float("nan")).to(loss.dtype)

    def decide(
        self,
        *,
        step: int,
        preempt_requested: bool,
        loss: torch.Tensor,
        grad_norm: torch.Tensor,
    ) -> StepDecision:
        """The decision for ``step`` (a collective: every rank calls it once per step).

        ``grad_norm`` is the global norm of the synced gradients (the same on every rank);
        ``loss`` this rank's loss of the step. Both stay on the device until the host sync
        below; the table is all-reduced only at a signal check or a non-finite step, which
        every rank reaches at the same steps.
        """
        gradient_nonfinite = not math.isfinite(grad_norm.item())  # host sync: one per step
        if not (gradient_nonfinite or self._check_due(step)):
            self.counters.consecutive_nonfinite = 0
            return StepDecision(StepAction.COMMIT)
        signals = torch.zeros((4, self.world_size), dtype=torch.int32, device=self.device)
        signals[_PREEMPT, self.rank] = int(preempt_requested)
        signals[_LOSS_NONFINITE, self.rank] = ~torch.isfinite(loss)
        signals[_GRAD_NONFINITE, self.rank] = int(gradient_nonfinite)
        now = self._clock()
        # Under MAX the largest entry wins, and zeros fill the other ranks' slots: send
        # (most - proposal), so the fewest steps proposed by any rank is what comes back.
        most = MAX_STEPS_BETWEEN_CHECKS
        signals[_NEXT_CHECK, self.rank] = most - self._steps_to_next_check(step, now)
        if dist.is_initialized() and dist.get_world_size() > 1:
            # 4 × world_size int32 values, at signal checks and non-finite steps only.
            dist.all_reduce(signals, op=dist.ReduceOp.MAX)
        table = signals.tolist()  # host sync
        self._next_check = step + most - max(table[_NEXT_CHECK])
        self._last_check = (step, now)
        return self.decide_from(table[:_NEXT_CHECK])

    def _check_due(self, step: int) -> bool:
        return self._next_check is None or step >= self._next_check

    def _steps_to_next_check(self, step: int, now: float) -> int:
        """This rank's proposal: the steps that take about ``signal_check_s`` at the pace
        since the last check (1 at the first check, or with ``signal_check_s`` 0)."""
        if self.signal_check_s <= 0 or self._last_check is None:
            return 1
        last_step, last_time = self._last_check
        if step <= last_step or now <= last_time:
            return 1
        pace = (now - last_time) / (step - last_step)  # seconds per step
        return max(1, min(MAX_STEPS_BETWEEN_CHECKS, int(self.signal_check_s / pace)))

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
        self._next_check = self._last_check = None  # the step went back: check at the next
