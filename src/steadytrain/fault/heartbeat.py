"""Heartbeats in torchrun's c10d store, and naming the rank a hang is blamed on."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

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
    reason: str  # "heartbeat stale", "no heartbeat", "behind" or "self"
    stale_ranks: tuple[int, ...] = ()


class HeartbeatBoard:
    """Every rank's latest heartbeat in a c10d store, under a prefix of one run and restart.

    Each watchdog connects its own client with a short timeout: the store lives in torchrun's
    agent (``TORCHELASTIC_USE_AGENT_STORE``), so a frozen rank cannot block it, and no call
    waits longer than ``timeout_s`` if it is gone. Keys outlive a restart of the group, hence
    the restart count in the prefix. Failures are swallowed: without the board a watchdog
    still watches its own rank.
    """

    def __init__(self, *, host: str, port: int, prefix: str, timeout_s: float = STORE_TIMEOUT_S):
        self.host, self.port, self.prefix, self.timeout_s = host, port, prefix, timeout_s
        self._store: Any = None
        self._failed_at: float | None = None

    @classmethod
    def from_environment(cls) -> HeartbeatBoard | None:
        """The board of this torchrun worker's group (None outside torchrun)."""
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not host or not port:
            return None
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return cls(host=host, port=int(port), prefix=f"steadytrain/heartbeat/{run_id}/{restart}")

    def key(self, rank: int) -> str:
        return f"{self.prefix}/rank-{rank}"

    def publish(self, beat: Heartbeat) -> bool:
        store = self._connected()
        if store is None:
            return False
        try:
            store.set(self.key(beat.rank), beat.encode())
            return True
        except Exception:  # the store is slow or gone: the next beat tries again
            return False

    def read(self, num_ranks: int) -> dict[int, Heartbeat] | None:
        """The latest heartbeat of every rank that has published one (None: no store)."""
        store = self._connected()
        if store is None:
            return None
        beats: dict[int, Heartbeat] = {}
        try:
            for rank in range(num_ranks):
                key = self.key(rank)
                # check() first: get() of a missing key waits for it until the timeout.
                if store.check([key]):
                    beats[rank] = Heartbeat.decode(store.get(key))
        except Exception:
            return None
        return beats

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
) -> Suspect:
    """The rank a hang is most likely caused by, from two reads of the heartbeats.

    A peer whose publication did not advance between ``before`` and ``after`` (and did not
    declare a hang itself) has a frozen or dead process; else the rank behind in
    ``(step, phases entered)``, which never reached the collective the others wait in; else
    this rank (also when the heartbeats could not be read: None).
    """
    if before is None or after is None:
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
