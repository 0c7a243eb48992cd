"""Preemption signals: the handler only sets a flag; the loop acts at the next signal check.

Saving inside a signal handler can deadlock (the signal may arrive while the main thread
holds a lock the save needs), and a rank that acts on its own signal alone leaves its peers
waiting in a collective. So the handler records the signal and returns; the agreed step
decision turns one rank's flag into a stop on every rank.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from steadytrain.config import EXIT_REQUEUE


class PreemptionSignals:
    """Installs flag-setting handlers for ``names`` (e.g. ``["SIGTERM", "SIGUSR1"]``).

    Must be created in the main thread. ``restore()`` puts the previous handlers back.
    """

    def __init__(self, names: list[str]) -> None:
        self.received: str | None = None  # the first preemption signal's name
        self.received_at: float | None = None  # its time.monotonic()
        self._previous: dict[signal.Signals, object] = {}
        for name in names:
            number = signal.Signals[name]
            self._previous[number] = signal.signal(number, self._on_signal)

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _on_signal(self, number: int, frame: FrameType | None) -> None:
        if self.received is None:  # a second signal changes nothing: the first one's clock
            self.received = signal.Signals(number).name
            self.received_at = time.monotonic()

    def restore(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)  # type: ignore[arg-type]
        self._previous.clear()


class GraceDeadline:
    """Ends the process with ``EXIT_REQUEUE`` if the preemption save outlives its grace.

    Checkpoints commit manifest-last, so dying mid-save commits nothing and leaves the
    previous checkpoint the newest good one; the next start removes the leftovers. A
    scheduler would kill the process at its own deadline anyway, less predictably.
    """

    def __init__(
        self, *, grace_s: float, since: float | None, on_expiry: Callable[[], None]
    ) -> None:
        started = since if since is not None else time.monotonic()
        remaining = grace_s - (time.monotonic() - started)
        self._on_expiry = on_expiry
        if remaining <= 0:  # spent before the step ended: do not start a save at all
            self._expire()
        self._timer = threading.Timer(remaining, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        try:
            self._on_expiry()
        finally:
            os._exit(EXIT_REQUEUE)

    def cancel(self) -> None:
        self._timer.cancel()
