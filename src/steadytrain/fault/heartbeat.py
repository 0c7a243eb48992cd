"""Heartbeats in torchrun's c10d store, and naming the rank a hang is blamed on."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")
STORE_TIMEOUT_S = 2.0  # the longest one store call may block the watchdog
RECONNECT_S = 10.0  # after a failed connection, wait this long before trying again


@dataclass(frozen=True)
class Heartbeat:
    """One rank's published position; ``sequence`` grows with every publication."""

    rank: int
    sequence: int
    step: int
    phase: str
    num_phases_entered: int
    declared: bool = False  # the rank declared a hang: its beats stop because it exits

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, text: bytes) -> Heartbeat:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Suspect:
    """The rank a hang is blamed on, and why."""

    rank: int
    step: int | None  # its last known step and phase (None: it never published)
    phase: str | None
    reason: str  # "heartbeat stale", "no heartbeat", "store unreachable", "behind" or "self"
    stale_ranks: tuple[int, ...] = ()


class HeartbeatBoard:
    """Every rank's latest heartbeat in a c10d store, under a prefix of one run and restart.

    Each watchdog connects its own client. The store lives in torchrun's agent when workers
    share it (``TORCHELASTIC_USE_AGENT_STORE``), otherwise in rank 0's process (the
    ``--nproc`` launcher turns sharing off: pytorch issue #135712), and a frozen rank 0 then
    freezes the store with it. A TCPStore client's timeout does not bound every call on a
    server that accepts but never answers, so each call runs in a helper thread and is given
    up after ``timeout_s``; a board that timed out once is wedged and stays unreadable. Keys
    outlive a restart of the group, hence the restart count in the prefix. Failures are
    swallowed: without the board a watchdog still watches its own rank.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        prefix: str,
        timeout_s: float = STORE_TIMEOUT_S,
        host_rank: int | None = None,
    ):
        self.host, self.port, self.prefix, self.timeout_s = host, port, prefix, timeout_s
        self.host_rank = host_rank  # the rank whose process serves the store (None: the agent)
        self._store: Any = None
        self._failed_at: float | None = None
        self.wedged = False

    @classmethod
    def from_environment(cls) -> HeartbeatBoard | None:
        """The board of this torchrun worker's group (None outside torchrun)."""
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not host or not port:
            return None
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        in_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        return cls(
            host=host,
            port=int(port),
            prefix=f"steadytrain/heartbeat/{run_id}/{restart}",
            host_rank=None if in_agent else 0,
        )

    def key(self, rank: int) -> str:
        return f"{self.prefix}/rank-{rank}"

    def publish(self, beat: Heartbeat) -> bool:
        return bool(self._bounded(lambda store: store.set(self.key(beat.rank), beat.encode())))

    def read(self, num_ranks: int) -> dict[int, Heartbeat] | None:
        """The latest heartbeat of every rank that has published one (None: no store)."""

        def read_all(store: Any) -> dict[int, Heartbeat]:
            beats: dict[int, Heartbeat] = {}
            for rank in range(num_ranks):
                key = self.key(rank)
                # check() first: get() of a missing key waits for it until the timeout.
                if store.check([key]):
                    beats[rank] = Heartbeat.decode(store.get(key))
            return beats

        return self._bounded(read_all)

    def _bounded(self, operation: Callable[[Any], T]) -> T | None:
        """``operation(store)``, or None if the store is unreachable or it outlives the timeout
        (a publish answers True on success)."""
        if self.wedged:
            return None
        outcome: list[Any] = []

        def call() -> None:
            store = self._connected()
            if store is None:
                return
            with contextlib.suppress(Exception):  # slow or gone: the next beat tries again
                result = operation(store)
                outcome.append(True if result is None else result)

        worker = threading.Thread(target=call, name="steadytrain-heartbeat-store", daemon=True)
        worker.start()
        worker.join(self.timeout_s + 0.5)
        if worker.is_alive():
            self.wedged = True  # its server accepts but never answers: a frozen process
            return None
        return outcome[0] if outcome else None

    def _connected(self) -> Any:
        if self._store is not None:
            return self._store
        if self._failed_at is not None and time.monotonic() - self._failed_at < RECONNECT_S:
            return None
        try:
            self._store = dist.TCPStore(
                self.host,
                self.port,
                is_master=False,
                timeout=timedelta(seconds=self.timeout_s),
            )
        except Exception:
            self._failed_at = time.monotonic()
        return self._store


def name_suspect(
    *,
    rank: int,
    own: Heartbeat,
    before: dict[int, Heartbeat] | None,
    after: dict[int, Heartbeat] | None,
    num_ranks: int,
    store_host_rank: int | None = None,
) -> Suspect:
    """The rank a hang is most likely caused by, from two reads of the heartbeats.

    A peer whose publication did not advance between ``before`` and ``after`` (and did not
    declare a hang itself) has a frozen or dead process; else the rank behind in
    ``(step, phases entered)``, which never reached the collective the others wait in; else
    this rank. When the heartbeats could not be read (None) and the store is served by a
    peer's process (``store_host_rank``), that peer; else this rank.
    """
    if before is None or after is None:
        if store_host_rank is not None and store_host_rank != rank:
            # The store lives in that rank's process and stopped answering: it is frozen.
            return Suspect(rank=store_host_rank, step=None, phase=None, reason="store unreachable")
        return Suspect(rank=rank, step=own.step, phase=own.phase, reason="self")
    stale = []
    for peer in range(num_ranks):
        if peer == rank:
            continue
        first, last = before.get(peer), after.get(peer)
        if last is None or (
            first is not None and last.sequence == first.sequence and not last.declared
        ):
            stale.append(peer)
    if stale:
        beat = after.get(stale[0])
        return Suspect(
            rank=stale[0],
            step=beat.step if beat else None,
            phase=beat.phase if beat else None,
            reason="heartbeat stale" if beat else "no heartbeat",
            stale_ranks=tuple(stale),
        )
    beats = {**after, rank: own}
    lowest = min((beat.step, beat.num_phases_entered) for beat in beats.values())
    behind = [
        peer
        for peer, beat in sorted(beats.items())
        if (beat.step, beat.num_phases_entered) == lowest
    ]
    if rank in behind:
        return Suspect(rank=rank, step=own.step, phase=own.phase, reason="self")
    beat = beats[behind[0]]
    return Suspect(rank=beat.rank, step=beat.step, phase=beat.phase, reason="behind")
