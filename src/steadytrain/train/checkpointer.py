"""When to checkpoint: every N steps and at the end, synchronously or in the background."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from steadytrain.checkpoint import CheckpointStorage, SaveOutcome, prune_checkpoints
from steadytrain.checkpoint.protocol import PartsSnapshot, host_buffers_like
from steadytrain.config import Config
from steadytrain.distributed import side_group
from steadytrain.train.checkpointing import (
    TrainingSnapshot,
    snapshot_training_state,
    write_snapshot,
)
from steadytrain.train.state import TrainState


class Checkpointer(Protocol):
    """What the loop needs: a chance to save after each committed step, and a final flush."""

    def after_step(self, parts: Any, state: TrainState, *, final: bool) -> SaveOutcome | None:
        """Save if one is due; returns the outcome of a save that completed, if any."""
        ...

    def finish(self) -> SaveOutcome | None:
        """Wait for a save still in flight; returns its outcome."""
        ...


class NoCheckpoints:
    """Checkpointing off (``checkpoint.every_steps: 0``)."""

    def after_step(self, parts: Any, state: TrainState, *, final: bool) -> SaveOutcome | None:
        return None

    def finish(self) -> SaveOutcome | None:
        return None


class PeriodicCheckpointer:
    """Saves every ``checkpoint.every_steps`` steps and at the end, then prunes old ones.

    With ``checkpoint.async_save`` training blocks only for the host-memory snapshot; a
    background thread writes and commits it, with its collectives on a group of its own. At
    most one save is in flight: the next one first waits for it, which bounds host memory to
    one snapshot, and copies into that snapshot's memory. That memory is allocated once, by
    the background thread after the first step, so no save allocates while training waits.
    """

    def __init__(self, storage: CheckpointStorage, config: Config, *, is_main: bool) -> None:
        self.storage = storage
        self.config = config
        self.is_main = is_main
        self.last_committed_step: int | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._group: Any = None
        self._in_flight: Future[SaveOutcome] | None = None
        self._spare: list[PartsSnapshot] | None = None  # host memory for the next snapshot
        self._staging: Future[list[PartsSnapshot]] | None = None
        self._events: Any = None
        if config.checkpoint.async_save:
            self._group = side_group()  # collective: every rank builds its checkpointer
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="steadytrain-checkpoint")

    def after_step(self, parts: Any, state: TrainState, *, final: bool) -> SaveOutcome | None:
        every = self.config.checkpoint.every_steps
        due = state.step % every == 0 or (final and self.config.checkpoint.at_end)
        if not due or state.step == self.last_committed_step:
            if self._executor is not None and self._spare is None and self._staging is None:
                self._stage_host_memory(parts, state)
            return None
        started = time.perf_counter()
        self._events = parts.events
        completed = self.finish()  # at most one in flight
        if self._staging is not None:
            staging, self._staging = self._staging, None
            # Staging is an optimization: if it failed, the snapshot allocates for itself.
            self._spare = None if staging.exception() is not None else staging.result()
        # A synchronous save writes from the live tensors (training waits for it); an async
        # one needs its own copy.
        asynchronous = self._executor is not None
        snapshot = snapshot_training_state(parts, state, copy=asynchronous, reuse=self._spare)
        blocked = time.perf_counter() - started
        if self._executor is None:
            return self._write(snapshot, blocked)
        self._spare = snapshot.parts  # reused only after finish(): its write is done by then
        self._in_flight = self._executor.submit(self._write, snapshot, blocked)
        return completed

    def _stage_host_memory(self, parts: Any, state: TrainState) -> None:
        """Have the background thread allocate (and touch) the first snapshot's host memory.

        The template only names each tensor's key, shape and dtype; nothing is copied.
        """
        assert self._executor is not None
        template = snapshot_training_state(parts, state, copy=False, host=False)
        self._staging = self._executor.submit(
            lambda: [host_buffers_like(part) for part in template.parts]
        )

    def finish(self) -> SaveOutcome | None:
        if self._in_flight is None:
            return None
        in_flight, self._in_flight = self._in_flight, None
        return in_flight.result()

    def _write(self, snapshot: TrainingSnapshot, blocked: float) -> SaveOutcome:
        started = time.perf_counter()
        try:
            outcome = write_snapshot(self.storage, snapshot, events=self._events, group=self._group)
        except Exception as error:
            # Errors of this rank's files are agreed inside write_snapshot; what gets here is
            # a failed collective (a peer died), which the training loop meets next as well.
            self._events.emit("checkpoint_failed", step=snapshot.step, reason=repr(error))
            return SaveOutcome(
                step=snapshot.step,
                committed=False,
                location="",
                seconds_blocked=blocked,
                error=repr(error),
            )
        outcome.seconds_blocked = blocked + (
            0.0 if self._executor else time.perf_counter() - started
        )
        if outcome.committed:
            self.last_committed_step = snapshot.step
            if self.is_main:
                outcome.pruned = prune_checkpoints(
                    self.storage,
                    keep_last=self.config.checkpoint.keep_last,
                    keep_every=self.config.checkpoint.keep_every,
                    newest_good=Path(outcome.location).name,
                )
        return outcome


def build_checkpointer(
    config: Config, storage: CheckpointStorage, *, is_main: bool
) -> Checkpointer:
    if config.checkpoint.every_steps == 0:
        return NoCheckpoints()
    return PeriodicCheckpointer(storage, config, is_main=is_main)
