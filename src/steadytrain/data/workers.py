"""DataLoader workers that die with the training process that started them.

torch's own check in a worker compares ``os.getppid()`` with the parent it started with, so
it only notices the death of the process the worker was forked from. Under the ``--nproc``
launcher a training worker is itself a forkserver's child, so its DataLoader uses the
forkserver start method too: the workers' parent is a second forkserver, which the training
process started and which lives as long as any of its children holds its "alive" pipe, as
the workers do. A training process killed by ``kill -9`` would leave its workers and that
forkserver behind for good, waiting on their queues. Each worker therefore waits, in a
daemon thread, for the training process itself to exit (through a pidfd), and kills itself
then; once the workers are gone, nothing holds the forkserver's pipe and it exits too. This
holds for every start method (fork, forkserver, spawn).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

POLL_SECONDS = 0.2  # where the kernel has no pidfds (Linux before 5.3)


@dataclass(frozen=True)
class DieWithTrainer:
    """A DataLoader ``worker_init_fn``: the worker dies when process ``trainer_pid`` exits
    (its start time ``trainer_started`` tells it from a later process given the same pid);
    then ``then``, a user's own ``worker_init_fn``, runs as it would have alone."""

    trainer_pid: int
    trainer_started: str | None
    then: Callable[[int], None] | None = None

    def __call__(self, worker_id: int) -> None:
        threading.Thread(target=self._watch, name="steadytrain-trainer-watch", daemon=True).start()
        if self.then is not None:
            self.then(worker_id)

    def _watch(self) -> None:
        _wait_for_exit_of(self.trainer_pid, started=self.trainer_started)
        os.kill(os.getpid(), signal.SIGKILL)


def die_with_this_process(then: Callable[[int], None] | None = None) -> DieWithTrainer:
    """The ``worker_init_fn`` that ties a DataLoader's workers to this (the training)
    process, calling ``then`` (a user's ``worker_init_fn``) after."""
    return DieWithTrainer(
        trainer_pid=os.getpid(), trainer_started=start_time_of(os.getpid()), then=then
    )


def start_time_of(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, ``/proc/PID/stat`` field 22);
    None if it does not run, or there is no ``/proc``."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _wait_for_exit_of(pid: int, *, started: str | None) -> None:
    """Return once process ``pid`` of start time ``started`` has exited (a zombie counts),
    or at once if it already has; wait forever where that cannot be known (no ``/proc``)."""
    if started is None:
        threading.Event().wait()
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfds: poll
        while start_time_of(pid) == started and not _is_zombie(pid):
            time.sleep(POLL_SECONDS)
        return
    try:
        if start_time_of(pid) != started:  # exited before the pidfd was opened
            return
        select.select([handle], [], [])  # readable once the process has exited
    finally:
        with contextlib.suppress(OSError):
            os.close(handle)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] in "ZX"
    except (OSError, IndexError):
        return True
