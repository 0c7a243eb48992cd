"""When to checkpoint: every N steps and at the end, synchronously or in the background."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from torch.distributed import ProcessGroup

from steadytrain.checkpoint.contents import CheckpointContents, EventSink, RunIdentity
from steadytrain.checkpoint.discovery import prune_checkpoints
from steadytrain.checkpoint.save import SaveOutcome, SaveTimings, write_snapshot
from steadytrain.checkpoint.snapshot import (
    CheckpointSnapshot,
    PartsSnapshot,
    host_buffers_like,
    take_snapshot,
)
from steadytrain.checkpoint.storage import CheckpointStorage
from steadytrain.distributed import side_group


class Checkpointer(Protocol):
    """What the loop needs: a chance to save after each step, and a final flush."""

    def after_step(self, *, step: int, final: bool, now: bool = False) -> SaveOutcome | None:
        """Save if one is due (``now``: save whatever the interval, synchronously, e.g. on
        preemption); returns the outcome of a save that completed, if any."""
        ...

    def finish(self) -> SaveOutcome | None:
        """Wait for a save still in flight; returns its outcome."""
        ...


class NoCheckpoints:
    """Checkpointing off (``checkpoint.every_steps: 0``)."""

    def after_step(self, *, step: int, final: bool, now: bool = False) -> SaveOutcome | None:
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

    Each save is timed in three parts, which its ``checkpoint_saved`` event holds: waiting
    for the save in flight (``waited_s``), the snapshot (``blocked_s``, with a synchronous
    save's write) and the write and commit (``write_s``, in the background when async).
    """

    def __init__(
        self,
        storage: CheckpointStorage,
        contents: CheckpointContents,
        *,
        identity: RunIdentity,
        rank: int,
        events: EventSink,
    ) -> None:
        self.storage = storage
        self.contents = contents
        self.identity = identity
        self.settings = identity.config.checkpoint
        self.rank = rank
        self.events = events
        self.last_committed_step: int | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._group: ProcessGroup | None = None
        self._in_flight: Future[SaveOutcome] | None = None
        self._spare: list[PartsSnapshot] | None = None  # host memory for the next snapshot
        self._staging: Future[list[PartsSnapshot]] | None = None
        if self.settings.async_save:
            # Collective: every rank builds its checkpointer. A dead peer fails the
            # background commit after dist.timeout_s, as it fails the training loop.
            self._group = side_group(timeout_s=identity.config.dist.timeout_s)
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="steadytrain-checkpoint")

    def after_step(self, *, step: int, final: bool, now: bool = False) -> SaveOutcome | None:
        if now:
            return self._save_now(step)
        due = step % self.settings.every_steps == 0 or (final and self.settings.at_end)
        if not due or step == self.last_committed_step:
            if self._executor is not None and self._spare is None and self._staging is None:
                self._stage_host_memory(step)
            return None
        started = time.perf_counter()
        completed = self.finish()  # at most one in flight
        waited = time.perf_counter() - started
        if self._staging is not None:
            staging, self._staging = self._staging, None
            # Staging is an optimization: if it failed, the snapshot allocates for itself.
            self._spare = None if staging.exception() is not None else staging.result()
        # A synchronous save writes from the live tensors (training waits for it); an async
        # one needs its own copy.
        asynchronous = self._executor is not None
        snapshot = self._snapshot(step, copy=asynchronous, reuse=self._spare)
        timings = SaveTimings(
            asynchronous=asynchronous,
            waited_s=waited,
            snapshot_s=time.perf_counter() - started - waited,
        )
        if self._executor is None:
            return self._write(snapshot, timings)
        self._spare = snapshot.parts  # reused only after finish(): its write is done by then
        self._in_flight = self._executor.submit(self._write, snapshot, timings)
        return completed

    def _save_now(self, step: int) -> SaveOutcome:
        """Wait for a save in flight, then save ``step`` synchronously (training waits)."""
        started = time.perf_counter()
        self.finish()
        waited = time.perf_counter() - started
        snapshot = self._snapshot(step, copy=False)
        timings = SaveTimings(
            asynchronous=False,
            waited_s=waited,
            snapshot_s=time.perf_counter() - started - waited,
        )
        return self._write(snapshot, timings)

    def finish(self) -> SaveOutcome | None:
        if self._in_flight is None:
            return None
        in_flight, self._in_flight = self._in_flight, None
        return in_flight.result()

    def _snapshot(
        self, step: int, *, copy: bool, reuse: list[PartsSnapshot] | None = None, host: bool = True
    ) -> CheckpointSnapshot:
        return take_snapshot(
            self.contents,
            rank=self.rank,
            manifest=self.identity.manifest(step=step),
            copy=copy,
            reuse=reuse,
            host=host,
        )

    def _stage_host_memory(self, step: int) -> None:
        """Have the background thread allocate (and touch) the first snapshot's host memory.

        The template only names each tensor's key, shape and dtype; nothing is copied.
        """
        assert self._executor is not None
        template = self._snapshot(step, copy=False, host=False)
        self._staging = self._executor.submit(
            lambda: [host_buffers_like(part) for part in template.parts]
        )

    def _write(self, snapshot: CheckpointSnapshot, timings: SaveTimings) -> SaveOutcome:
        """Write and commit ``snapshot``: in the background for an async save, while training
        waits for a synchronous one (whose write then blocked training too)."""
        started = time.perf_counter()
        blocked = timings.waited_s + timings.snapshot_s
        try:
            outcome = write_snapshot(
                self.storage, snapshot, events=self.events, group=self._group, timings=timings
            )
        except Exception as error:
            # Errors of this rank's files are agreed inside write_snapshot; what gets here is
            # a failed collective (a peer died), which the training loop meets next as well.
            self.events.emit("checkpoint_failed", step=snapshot.step, reason=repr(error))
            return SaveOutcome(
                step=snapshot.step,
                committed=False,
                location="",
                seconds_blocked=blocked,
                error=repr(error),
            )
        outcome.seconds_blocked = blocked + (
            0.0 if timings.asynchronous else time.perf_counter() - started
        )
        if outcome.committed:
            self.last_committed_step = snapshot.step
            if self.rank == 0:
                outcome.pruned = prune_checkpoints(
                    self.storage,
                    keep_last=self.settings.keep_last,
                    keep_every=self.settings.keep_every,
                    newest_good=Path(outcome.location).name,
                )
        return outcome


def build_checkpointer(
    storage: CheckpointStorage,
    contents: CheckpointContents,
    *,
    identity: RunIdentity,
    rank: int,
    events: EventSink,
) -> Checkpointer:
    """The checkpointer ``checkpoint.every_steps`` asks for (a collective with async saves)."""
    if identity.config.checkpoint.every_steps == 0:
        return NoCheckpoints()
    return PeriodicCheckpointer(storage, contents, identity=identity, rank=rank, events=events)
