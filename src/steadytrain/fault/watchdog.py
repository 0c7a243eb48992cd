"""The hang watchdog: a rank without progress dumps its stacks, names a suspect and exits 76.

A rank stuck in a collective, a deadlocked loader or behind a frozen peer never comes back to
Python, so only another thread can notice and only ``os._exit`` can end the process. The
training thread therefore just records where it is (one attribute write per observer call); a
daemon thread publishes that as this rank's heartbeat to torchrun's c10d store about once a
second and compares it with the allowance. On a hang every live rank dumps its own stacks,
writes a ``hang`` event and exits ``EXIT_HANG``; torchrun's agent then restarts the group,
which resumes from the newest good checkpoint.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from steadytrain.config import EXIT_HANG, FaultConfig
from steadytrain.fault.heartbeat import (
    STORE_TIMEOUT_S,
    Heartbeat,
    HeartbeatBoard,
    Suspect,
    name_suspect,
)

HANGS_DIR = "hangs"  # RUN_DIR/hangs: stack dumps (and NCCL's flight recorder on CUDA)
LONG_PHASES = frozenset({"checkpoint", "eval"})  # phases with the warm-up allowance
CONFIRM_BEATS = 3  # beats a peer gets to show it still publishes before it counts as frozen


class _Position(NamedTuple):
    """Where the training thread is; replaced whole, so the watchdog reads it consistently."""

    step: int
    phase: str
    num_phases_entered: int  # phases entered in this step: the order collectives are met in
    since: float  # time.monotonic() of the last progress
    generous: bool  # the warm-up allowance applies (first step, checkpoint, eval)


@dataclass(frozen=True)
class HangReport:
    """What a watchdog found when it declared a hang (what ``on_hang`` is given)."""

    rank: int
    step: int
    phase: str
    seconds_stalled: float
    suspect: Suspect
    dump: Path | None  # the stack dump (None: it could not be written)


def exit_on_hang(report: HangReport) -> None:
    """End the process now: the main thread is stuck in C++ and cannot be unwound."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(EXIT_HANG)


class HangWatchdog:
    """A step observer that ends its process when the training thread stops making progress.

    A rank hangs when its current phase (or the gap between phases) lasts longer than
    ``timeout_s``; before the first step completes (which builds ``torch.compile``'s graphs
    with ``train.compile``) and in the ``checkpoint`` and ``eval`` phases the allowance is
    ``warmup_s + timeout_s``. The thread starts with the first step (or ``start()``);
    ``stop()`` ends it. ``on_hang`` is called once, after the dump and the event; the default
    exits with ``EXIT_HANG``.
    """

    def __init__(
        self,
        *,
        rank: int,
        num_ranks: int,
        run_dir: Path,
        timeout_s: float,
        warmup_s: float,
        emit: Callable[..., None],
        board: HeartbeatBoard | None = None,
        restart_count: int = 0,
        beat_interval_s: float = 1.0,
        on_hang: Callable[[HangReport], None] = exit_on_hang,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s}")
        self.rank, self.num_ranks = rank, num_ranks
        self.hangs_dir = hang_dump_dir(run_dir)
        self.timeout_s, self.warmup_s = timeout_s, warmup_s
        self.restart_count = restart_count
        self._emit, self._board, self._on_hang = emit, board, on_hang
        self._interval = beat_interval_s
        self._open_phases: list[str] = []  # training thread only
        self._long_phases_open = 0  # how many of them are LONG_PHASES
        self._num_phases_entered = 0
        self._first_step_done = False
        self._position = _Position(0, "setup", 0, time.monotonic(), True)
        self._sequence = 0  # watchdog thread only
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # The step observer: training thread, several calls per step; memory writes only.

    def step_started(self, *, step: int) -> None:
        self._open_phases.clear()
        self._long_phases_open = 0
        self._num_phases_entered = 0
        self._record(step, "step start")
        if self._thread is None:
            self.start()

    def phase_started(self, phase: str, *, step: int) -> None:
        self._open_phases.append(phase)
        self._long_phases_open += phase in LONG_PHASES
        self._num_phases_entered += 1
        self._record(step, phase)

    def phase_ended(self, phase: str, *, step: int, seconds: float) -> None:
        if self._open_phases and self._open_phases[-1] == phase:
            self._open_phases.pop()
            self._long_phases_open -= phase in LONG_PHASES
        self._record(step, self._open_phases[-1] if self._open_phases else f"after {phase}")

    def step_ended(self, *, step: int, action: str, seconds: float) -> None:
        self._first_step_done = True
        self._open_phases.clear()
        self._long_phases_open = 0
        self._record(step, "between steps")

    def event(self, kind: str, fields: dict[str, Any]) -> None:
        return None  # events also come from background threads (async saves): not progress

    def _record(self, step: int, phase: str) -> None:
        generous = self._long_phases_open > 0 or not self._first_step_done
        # One attribute write of a new tuple: atomic under the GIL, no lock needed.
        self._position = _Position(
            step, phase, self._num_phases_entered, time.monotonic(), generous
        )

    # The watchdog thread.

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._watch, name=f"steadytrain-hang-watchdog-{self.rank}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self._interval + 2 * STORE_TIMEOUT_S)

    def allowance_s(self, position: _Position) -> float:
        return self.timeout_s + (self.warmup_s if position.generous else 0.0)

    def _watch(self) -> None:
        self._publish(self._position)  # at once: peers can tell "frozen" from "not started"
        while not self._stopping.wait(self._interval):
            position = self._position
            self._publish(position)
            stalled = time.monotonic() - position.since > self.allowance_s(position)
            if stalled and self._declare(position):
                return

    def _publish(self, position: _Position, *, declared: bool = False) -> None:
        if self._board is None:
            return
        self._sequence += 1
        self._board.publish(self._beat(position, declared=declared))

    def _beat(self, position: _Position, *, declared: bool = False) -> Heartbeat:
        return Heartbeat(
            rank=self.rank,
            sequence=self._sequence,
            step=position.step,
            phase=position.phase,
            num_phases_entered=position.num_phases_entered,
            declared=declared,
        )

    def _declare(self, position: _Position) -> bool:
        """Name a suspect, dump, report, exit; False if progress resumed meanwhile."""
        before = self._read_beats()
        if self._board is not None:
            # Give every live peer a few beats to prove its process is not frozen.
            for _ in range(CONFIRM_BEATS):
                if self._stopping.wait(self._interval):
                    return True
                if self._position is not position:
                    return False
                self._publish(position)
        after = self._read_beats()
        if self._stopping.is_set():
            return True
        if self._position is not position:
            return False
        suspect = name_suspect(
            rank=self.rank,
            own=self._beat(position),
            before=before,
            after=after,
            num_ranks=self.num_ranks,
            store_host_rank=self._board.host_rank if self._board is not None else None,
        )
        self._publish(position, declared=True)  # peers must not take our exit for a freeze
        report = HangReport(
            rank=self.rank,
            step=position.step,
            phase=position.phase,
            seconds_stalled=round(time.monotonic() - position.since, 3),
            suspect=suspect,
            dump=None,
        )
        report = replace(report, dump=self._dump_stacks(report, after or {}))
        self._report(report)
        self._on_hang(report)
        return True

    def _read_beats(self) -> dict[int, Heartbeat] | None:
        return self._board.read(self.num_ranks) if self._board is not None else None

    def _dump_stacks(self, report: HangReport, beats: dict[int, Heartbeat]) -> Path | None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        path = self.hangs_dir / f"rank-{self.rank}-restart-{self.restart_count}-{stamp}.txt"
        try:
            self.hangs_dir.mkdir(parents=True, exist_ok=True)
            with path.open("w") as dump:
                dump.write(_dump_header(report, beats, restart=self.restart_count))
                dump.flush()
                faulthandler.dump_traceback(dump, all_threads=True)
                os.fsync(dump.fileno())
        except OSError:
            return None
        return path

    def _report(self, report: HangReport) -> None:
        suspect = report.suspect
        # The event log may be closed already (a hang in the final barrier).
        with contextlib.suppress(Exception):
            self._emit(
                "hang",
                rank=self.rank,
                step=report.step,
                phase=report.phase,
                seconds_stalled=report.seconds_stalled,
                suspect_rank=suspect.rank,
                suspect_step=suspect.step,
                suspect_phase=suspect.phase,
                suspect_reason=suspect.reason,
                stale_ranks=list(suspect.stale_ranks),
                dump=str(report.dump) if report.dump is not None else None,
                exit_code=EXIT_HANG,
            )
        print(
            f"steadytrain: rank {self.rank}: no progress for {report.seconds_stalled:.0f} s "
            f"in {report.phase} at step {report.step}; suspect {_describe(suspect)}; stacks "
            f"in {report.dump}; exiting {EXIT_HANG} so the group restarts",
            file=sys.stderr,
            flush=True,
        )


def hang_dump_dir(run_dir: str | Path) -> Path:
    """Where stack dumps go: ``RUN_DIR/hangs``."""
    return Path(run_dir).resolve() / HANGS_DIR


def hang_watchdog(
    fault: FaultConfig,
    *,
    rank: int,
    num_ranks: int,
    run_dir: str | Path,
    emit: Callable[..., None],
) -> HangWatchdog | None:
    """The watchdog ``fault`` asks for (None when ``hang_timeout_s`` is 0), with the heartbeat
    board of this torchrun group when there are peers to watch."""
    if fault.hang_timeout_s == 0:
        return None
    return HangWatchdog(
        rank=rank,
        num_ranks=num_ranks,
        run_dir=Path(run_dir),
        timeout_s=fault.hang_timeout_s,
        warmup_s=fault.hang_warmup_s,
        emit=emit,
        board=HeartbeatBoard.from_environment() if num_ranks > 1 else None,
        restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
    )


def _describe(suspect: Suspect) -> str:
    where = (
        f"last seen at step {suspect.step} in {suspect.phase}"
        if suspect.step is not None
        else "never seen"
    )
    return f"rank {suspect.rank} ({suspect.reason}), {where}"


def _dump_header(report: HangReport, beats: dict[int, Heartbeat], *, restart: int) -> str:
    lines = [
        "steadytrain hang report",
        f"time: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}",
        f"rank: {report.rank} (pid {os.getpid()}, restart {restart})",
        f"step: {report.step}",
        f"phase: {report.phase}",
        f"seconds without progress: {report.seconds_stalled}",
        f"suspect: {_describe(report.suspect)}",
    ]
    lines += [
        f"heartbeat of rank {beat.rank}: step {beat.step}, {beat.phase}, "
        f"{beat.num_phases_entered} phases entered, beat {beat.sequence}"
        + (", declared a hang" if beat.declared else "")
        for _, beat in sorted(beats.items())
    ]
    return "\n".join([*lines, "", "Stacks of every thread (most recent call first):", ""]) + "\n"
