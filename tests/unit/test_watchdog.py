"""The hang watchdog in-process: tiny timeouts, a real TCPStore, real stack dumps; the exit is
injected (``on_hang``) so the test observes instead of dying."""

from __future__ import annotations

import datetime
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.distributed as dist

from steadytrain.config import FaultConfig
from steadytrain.distributed.runtime import enable_nccl_debugging, nccl_debug_environment
from steadytrain.fault import (
    HangReport,
    HangWatchdog,
    Heartbeat,
    HeartbeatBoard,
    hang_dump_dir,
    hang_watchdog,
    name_suspect,
)
from tests.helpers import RecordingEvents

INTERVAL_S = 0.05


class Hangs:
    """The ``on_hang`` of a test: records each report and wakes whoever waits for one."""

    def __init__(self) -> None:
        self.reports: list[HangReport] = []
        self.declared = threading.Event()

    def __call__(self, report: HangReport) -> None:
        self.reports.append(report)
        self.declared.set()


def make_watchdog(
    tmp_path: Path,
    *,
    timeout_s: float,
    warmup_s: float = 0.0,
    rank: int = 0,
    num_ranks: int = 1,
    board: HeartbeatBoard | None = None,
) -> tuple[HangWatchdog, Hangs, RecordingEvents]:
    hangs, events = Hangs(), RecordingEvents()
    watchdog = HangWatchdog(
        rank=rank,
        num_ranks=num_ranks,
        run_dir=tmp_path,
        timeout_s=timeout_s,
        warmup_s=warmup_s,
        emit=events.emit,
        board=board,
        beat_interval_s=INTERVAL_S,
        on_hang=hangs,
    )
    return watchdog, hangs, events


def run_step(watchdog: HangWatchdog, step: int) -> None:
    """One complete step through the phases the loop enters."""
    watchdog.step_started(step=step)
    for phase in ("data_wait", "h2d", "forward", "backward", "optimizer", "checkpoint"):
        watchdog.phase_started(phase, step=step)
        watchdog.phase_ended(phase, step=step, seconds=0.0)
    watchdog.step_ended(step=step, action="commit", seconds=0.0)


def enter(watchdog: HangWatchdog, step: int, phases: list[str]) -> None:
    """Start ``step`` and go through ``phases``; the last one stays open."""
    watchdog.step_started(step=step)
    for phase in phases[:-1]:
        watchdog.phase_started(phase, step=step)
        watchdog.phase_ended(phase, step=step, seconds=0.0)
    watchdog.phase_started(phases[-1], step=step)


def stuck_in_backward(watchdog: HangWatchdog, hangs: Hangs) -> None:
    """Enters ``backward`` and never leaves it (until the watchdog has declared the hang)."""
    enter(watchdog, 1, ["data_wait", "h2d", "forward", "backward"])
    assert hangs.declared.wait(timeout=10), "no hang was declared"


def test_a_phase_that_does_not_end_is_declared_once_with_every_stack(tmp_path: Path) -> None:
    watchdog, hangs, events = make_watchdog(tmp_path, timeout_s=0.3)
    run_step(watchdog, 0)
    started = time.monotonic()
    stuck_in_backward(watchdog, hangs)
    waited = time.monotonic() - started
    time.sleep(5 * INTERVAL_S)  # time for a second declaration, which must not come
    watchdog.stop()

    assert len(hangs.reports) == 1
    report = hangs.reports[0]
    assert report.seconds_stalled >= 0.3 and waited < 2
    assert (report.step, report.phase) == (1, "backward")
    assert (report.suspect.rank, report.suspect.reason) == (0, "self")
    assert report.dump is not None and report.dump.parent == tmp_path.resolve() / "hangs"
    assert report.dump.name.startswith("rank-0-restart-0-")
    dump = report.dump.read_text()
    assert "rank: 0" in dump and "phase: backward" in dump and "suspect: rank 0" in dump
    assert "stuck_in_backward" in dump  # the training thread's frame, from the watchdog thread
    assert "Current thread" in dump and "_watch" in dump  # every thread, the watchdog's too
    [event] = events.of_kind("hang")
    assert event["suspect_rank"] == 0 and event["phase"] == "backward" and event["step"] == 1
    assert event["dump"] == str(report.dump) and event["exit_code"] == 76
    assert event["seconds_stalled"] == report.seconds_stalled


def test_warm_up_allowance_before_the_first_step_and_in_checkpoints(tmp_path: Path) -> None:
    watchdog, hangs, _ = make_watchdog(tmp_path, timeout_s=0.2, warmup_s=1.0)
    enter(watchdog, 0, ["data_wait", "h2d", "forward"])  # a slow first step
    time.sleep(0.6)
    watchdog.phase_ended("forward", step=0, seconds=0.6)
    watchdog.step_ended(step=0, action="commit", seconds=0.6)
    enter(watchdog, 1, ["data_wait", "h2d", "forward", "backward", "optimizer", "checkpoint"])
    time.sleep(0.6)  # a slow save
    watchdog.phase_ended("checkpoint", step=1, seconds=0.6)
    assert not hangs.reports, "the warm-up allowance did not hold"
    enter(watchdog, 2, ["data_wait"])  # a training phase: the short allowance
    assert hangs.declared.wait(timeout=0.2 + 1.0), "a stuck training phase was not declared"
    watchdog.stop()
    assert (hangs.reports[0].step, hangs.reports[0].phase) == (2, "data_wait")


def test_hang_timeout_zero_means_no_watchdog_and_the_thread_starts_with_training(
    tmp_path: Path,
) -> None:
    def watchdog_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if "hang-watchdog" in t.name]

    events = RecordingEvents()
    off = FaultConfig(hang_timeout_s=0)
    assert hang_watchdog(off, rank=0, num_ranks=1, run_dir=tmp_path, emit=events.emit) is None
    watchdog = hang_watchdog(FaultConfig(), rank=0, num_ranks=1, run_dir=tmp_path, emit=events.emit)
    assert watchdog is not None and not watchdog_threads()
    watchdog.step_started(step=0)
    assert watchdog_threads() == ["steadytrain-hang-watchdog-0"]
    watchdog.stop()
    assert not watchdog_threads()


@pytest.fixture
def store() -> Iterator[dist.TCPStore]:
    """The c10d store torchrun's agent would host, on a free port of this machine."""
    yield dist.TCPStore(
        "127.0.0.1",
        0,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=5),
    )


def board_of(store: dist.TCPStore) -> HeartbeatBoard:
    # Each watchdog has its own client, as in a worker; one prefix per test.
    return HeartbeatBoard(host="127.0.0.1", port=store.port, prefix=f"test/{uuid.uuid4().hex}")


def test_a_rank_whose_heartbeat_stops_is_the_suspect_even_when_ahead(
    tmp_path: Path, store: dist.TCPStore
) -> None:
    board = board_of(store)
    peer_board = HeartbeatBoard(host=board.host, port=board.port, prefix=board.prefix)
    waiting, hangs, events = make_watchdog(tmp_path, timeout_s=0.5, num_ranks=2, board=board)
    frozen, _, _ = make_watchdog(tmp_path, timeout_s=60, rank=1, num_ranks=2, board=peer_board)
    enter(waiting, 3, ["data_wait", "h2d"])  # behind in the count, but alive
    enter(frozen, 3, ["data_wait", "h2d", "forward", "backward"])
    time.sleep(5 * INTERVAL_S)
    frozen.stop()  # its process froze: no more beats
    assert hangs.declared.wait(timeout=5), "no hang was declared"
    waiting.stop()

    suspect = hangs.reports[0].suspect
    assert (suspect.rank, suspect.reason, suspect.stale_ranks) == (1, "heartbeat stale", (1,))
    assert (suspect.step, suspect.phase) == (3, "backward")
    [event] = events.of_kind("hang")
    assert (event["suspect_rank"], event["suspect_step"], event["suspect_phase"]) == (
        1,
        3,
        "backward",
    )
    dump = hangs.reports[0].dump
    assert dump is not None and "heartbeat of rank 1: step 3, backward" in dump.read_text()


def test_with_every_heartbeat_live_the_rank_behind_is_the_suspect(
    tmp_path: Path, store: dist.TCPStore
) -> None:
    board = board_of(store)
    peer_board = HeartbeatBoard(host=board.host, port=board.port, prefix=board.prefix)
    waiting, hangs, _ = make_watchdog(tmp_path, timeout_s=0.5, num_ranks=2, board=board)
    behind, _, _ = make_watchdog(tmp_path, timeout_s=60, rank=1, num_ranks=2, board=peer_board)
    enter(waiting, 7, ["data_wait", "h2d", "forward", "backward"])  # waits in the all-reduce
    enter(behind, 7, ["data_wait", "h2d", "forward"])  # never got there
    assert hangs.declared.wait(timeout=5), "no hang was declared"
    waiting.stop()
    behind.stop()

    suspect = hangs.reports[0].suspect
    assert (suspect.rank, suspect.reason) == (1, "behind")
    assert (suspect.step, suspect.phase) == (7, "forward")


def beat(rank: int, sequence: int, step: int, entered: int, declared: bool = False) -> Heartbeat:
    return Heartbeat(rank, sequence, step, "backward", entered, declared)


def test_suspect_rules_without_a_store() -> None:
    own = beat(0, 9, 5, 4)
    same = {1: beat(1, 3, 5, 4), 2: beat(2, 7, 5, 4)}
    moved = {1: beat(1, 6, 5, 4), 2: beat(2, 10, 5, 4)}
    # All level and alive: this rank. No heartbeats to read: this rank.
    assert name_suspect(rank=0, own=own, before=same, after=moved, num_ranks=3).reason == "self"
    assert name_suspect(rank=0, own=own, before=None, after=None, num_ranks=3).reason == "self"
    # A rank that never published.
    missing = name_suspect(rank=0, own=own, before={1: same[1]}, after={1: moved[1]}, num_ranks=3)
    assert (missing.rank, missing.reason, missing.step) == (2, "no heartbeat", None)
    # A rank that stopped beating because it declared a hang itself is not frozen.
    gone = beat(1, 4, 5, 4, declared=True)
    declared = name_suspect(
        rank=0, own=own, before={1: gone, 2: same[2]}, after={1: gone, 2: moved[2]}, num_ranks=3
    )
    assert declared.rank == 0
    # Behind in the step beats behind in the phases.
    behind = {1: beat(1, 6, 4, 6), 2: moved[2]}
    assert name_suspect(rank=0, own=own, before=same, after=behind, num_ranks=3).rank == 1


def test_heartbeat_keys_belong_to_one_run_and_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert HeartbeatBoard.from_environment() is None  # single process: no store
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "steadytrain-1234abcd")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    board = HeartbeatBoard.from_environment()
    assert board is not None and (board.host, board.port) == ("localhost", 29500)
    assert board.key(1) == "steadytrain/heartbeat/steadytrain-1234abcd/2/rank-1"


def test_nccl_debug_environment_dumps_beside_the_stacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    environment = nccl_debug_environment(tmp_path / "run")
    assert environment == {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_FR_DUMP_TEMP_FILE": str(hang_dump_dir(tmp_path / "run") / "nccl_trace_rank_"),
        "TORCH_NCCL_DESYNC_DEBUG": "1",
    }
    for name in environment:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_NCCL_TRACE_BUFFER_SIZE", "100")  # the user's own choice stays
    enable_nccl_debugging(tmp_path / "run")
    assert (tmp_path / "run" / "hangs").is_dir()
    assert os.environ["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "100"
    assert os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"


def test_a_store_that_never_answers_is_given_up_and_its_host_is_the_suspect() -> None:
    # A frozen rank 0 serving the store (sharing with the agent turned off) accepts
    # connections in the kernel but never answers; no call may block the watchdog for long.
    import socket

    frozen = socket.socket()
    frozen.bind(("127.0.0.1", 0))
    frozen.listen(8)
    try:
        board = HeartbeatBoard(
            host="127.0.0.1",
            port=frozen.getsockname()[1],
            prefix="steadytrain/heartbeat/test/0",
            timeout_s=0.5,
            host_rank=0,
        )
        started = time.monotonic()
        assert board.read(2) is None
        assert (
            board.publish(
                Heartbeat(rank=1, sequence=1, step=3, phase="forward", num_phases_entered=2)
            )
            is False
        )
        assert time.monotonic() - started < 4
    finally:
        frozen.close()
    own = Heartbeat(rank=1, sequence=9, step=3, phase="grad_sync", num_phases_entered=4)
    suspect = name_suspect(
        rank=1, own=own, before=None, after=None, num_ranks=2, store_host_rank=board.host_rank
    )
    assert (suspect.rank, suspect.reason) == (0, "store unreachable")
