"""The dynamic batcher: bounded queues of pending requests, and the rules a batch forms by.

Timing rules (PRIOR-ART.md, Serving): the model's thread blocks until a first request
arrives, then waits at most ``max_wait_s`` counted from *that* request's arrival (not from
the previous batch) for the batch to fill; with a wait of 0 it takes whatever is queued.
Requests whose client has gone, or whose deadline has passed, are dropped before a batch
forms, and a request that is dropped is answered once, never after its client has gone.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

Clock = Callable[[], float]


class Reply(Protocol):
    """Where a request's outcome goes; called from the model's thread."""

    def token(self, token: int) -> None:
        """One new token of a generation (streaming)."""

    def finish(self, result: Any) -> None:
        """The request's result; nothing after it."""

    def fail(self, error: ServeFailure) -> None:
        """The request failed; nothing after it."""


class ServeFailure(Exception):
    """A request that could not be answered: its HTTP status and one line saying why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class QueueFull(Exception):
    """No room for another request: the client should retry later (503 + Retry-After)."""


class BatcherClosed(Exception):
    """The server is draining or its model thread has stopped: no new requests."""


@dataclass(eq=False)
class Pending:
    """One request waiting for, or in, a batch."""

    kind: str  # "forward" or "generate"
    payload: Any
    reply: Reply
    deadline: float  # on the batcher's clock
    enqueued_at: float = 0.0
    started_at: float | None = None
    gone: bool = False  # the client disconnected or gave up: never answer it

    def expired(self, now: float) -> bool:
        return now >= self.deadline


@dataclass
class Dropped:
    """What the batcher dropped before forming a batch, by reason."""

    gone: list[Pending] = field(default_factory=list)
    expired: list[Pending] = field(default_factory=list)


class Batcher:
    """Bounded queues of pending requests, one per kind, shared by the server's handlers
    (which put) and the model's thread (which takes).

    Thread-safe; ``put`` never blocks, so the event loop stays free.
    """

    def __init__(
        self, *, max_queue: int, kinds: tuple[str, ...], clock: Clock = time.monotonic
    ) -> None:
        self.max_queue = max_queue
        self.clock = clock
        self._queues: dict[str, collections.deque[Pending]] = {
            kind: collections.deque() for kind in kinds
        }
        self._changed = threading.Condition()
        self._closed: str | None = None

    def put(self, pending: Pending) -> None:
        """Queue ``pending``.

        Raises:
            QueueFull: ``max_queue`` requests of its kind are waiting already.
            BatcherClosed: the batcher was closed (its reason is the message).
        """
        with self._changed:
            if self._closed is not None:
                raise BatcherClosed(self._closed)
            queue = self._queues[pending.kind]
            if len(queue) >= self.max_queue:
                raise QueueFull(f"{len(queue)} {pending.kind} requests are queued already")
            pending.enqueued_at = self.clock()
            queue.append(pending)
            self._changed.notify_all()

    def discard(self, pending: Pending) -> None:
        """Its client has gone: mark it, and free its place in the queue at once."""
        pending.gone = True
        with self._changed:
            queue = self._queues[pending.kind]
            if pending in queue:
                queue.remove(pending)
                self._changed.notify_all()

    def queued(self, kind: str | None = None) -> int:
        with self._changed:
            kinds = self._queues if kind is None else [kind]
            return sum(len(self._queues[name]) for name in kinds)

    def wait_for_requests(self, *, timeout: float | None = None) -> bool:
        """Block until some request is queued (True), the batcher closes or ``timeout``
        passes (False)."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self._closed is not None or any(self._queues.values()), timeout=timeout
            ) and any(self._queues.values())

    def take(self, kind: str, *, limit: int, max_wait_s: float) -> tuple[list[Pending], Dropped]:
        """Up to ``limit`` live requests of ``kind``, oldest first, and those dropped.

        Waits while fewer than ``limit`` are live, at most until ``max_wait_s`` after the
        oldest live one arrived (never when ``max_wait_s`` is 0, or once closed). Returns
        at once with none when none is queued.
        """
        dropped = Dropped()
        if not self._queues[kind]:  # read without the lock (atomic): the common case, cheap
            return [], dropped
        with self._changed:
            queue = self._queues[kind]
            self._drop_dead(queue, dropped)
            if queue:
                first_arrival = queue[0].enqueued_at
                while self._closed is None and len(queue) < limit:
                    remaining = first_arrival + max_wait_s - self.clock()
                    if remaining <= 0:
                        break
                    self._changed.wait(remaining)
                    self._drop_dead(queue, dropped)
            taken = [queue.popleft() for _ in range(min(limit, len(queue)))]
            if taken:
                self._changed.notify_all()
        return taken, dropped

    def _drop_dead(self, queue: collections.deque[Pending], dropped: Dropped) -> None:
        now = self.clock()
        for pending in list(queue):
            if pending.gone:
                dropped.gone.append(pending)
            elif pending.expired(now):
                dropped.expired.append(pending)
            else:
                continue
            queue.remove(pending)

    def close(self, reason: str) -> list[Pending]:
        """Refuse new requests with ``reason``; returns (and forgets) every queued one."""
        with self._changed:
            if self._closed is None:
                self._closed = reason
            left = [pending for queue in self._queues.values() for pending in queue]
            for queue in self._queues.values():
                queue.clear()
            self._changed.notify_all()
        return left

    @property
    def closed(self) -> str | None:
        return self._closed
