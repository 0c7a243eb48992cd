"""Checkpointing with real parts in a group of one: when saves happen, that an asynchronous
save in flight is never overwritten by the next one, how each save is timed, and the space
pre-flight."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from steadytrain.checkpoint import (
    MANIFEST_NAME,
    RESTORE_PHASES,
    CheckpointContents,
    CheckpointRefused,
    LocalStorage,
    Payload,
    PeriodicCheckpointer,
    ResumeRequest,
    StorageError,
    check_free_space,
    restore_checkpoint,
    take_snapshot,
    write_snapshot,
)
from steadytrain.config import ConfigError, load_config
from steadytrain.distributed import start_runtime, stop_runtime
from steadytrain.train import TrainingParts, build_parts, checkpoint_contents
from tests.helpers import TINY_CONFIG, RecordingEvents


class GatedStorage:
    """A ``CheckpointStorage`` (the Protocol boundary) over real local storage that logs each
    operation and holds the first save's writes until ``release`` is set."""

    def __init__(self, root: Path) -> None:
        self._local = LocalStorage(root)
        self.log: list[str] = []
        self.first_write_started = threading.Event()
        self.release = threading.Event()

    def write_file(self, location: str, filename: str, payload: Payload) -> None:
        self.log.append(f"write {Path(location).name}/{filename}")
        self.first_write_started.set()
        assert self.release.wait(timeout=120), "the test never released the save"
        self._local.write_file(location, filename, payload)

    def commit(self, location: str, name: str, manifest: bytes) -> None:
        self._local.commit(location, name, manifest)
        self.log.append(f"commit {name}")

    def __getattr__(self, name: str) -> Any:  # the rest of the Protocol, unchanged
        return getattr(self._local, name)


@pytest.fixture
def make_parts(small_overrides: list[str], tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Real training parts in a group of one, built from the small test config plus ``extra``."""

    def make(*extra: str) -> TrainingParts:
        config = load_config(
            TINY_CONFIG, overrides=[*small_overrides, f"run_dir={tmp_path / 'run'}", *extra]
        )
        built = build_parts(config, start_runtime(config))
        built.events = RecordingEvents()  # type: ignore[assignment]
        return built

    try:
        yield make
    finally:
        stop_runtime()


def contents_of(parts: TrainingParts) -> CheckpointContents:
    return checkpoint_contents(
        model=parts.model.unwrapped,
        optimizer=parts.optimizer,
        scheduler=parts.scheduler,
        sampler=parts.sampler,
        state=parts.state,
    )


def checkpointer_over(storage: Any, parts: TrainingParts) -> PeriodicCheckpointer:
    return PeriodicCheckpointer(
        storage, contents_of(parts), identity=parts.identity, rank=0, events=parts.events
    )


def save_synchronously(root: Path, parts: TrainingParts) -> Path:
    """The state of ``parts`` as a synchronous save writes it: the reference to compare with."""
    storage = LocalStorage(root)
    snapshot = take_snapshot(
        contents_of(parts),
        rank=0,
        manifest=parts.identity.manifest(step=parts.state.step),
        copy=True,
    )
    outcome = write_snapshot(storage, snapshot, events=RecordingEvents())
    assert outcome.committed, outcome
    return Path(outcome.location)


def state_files(checkpoint: Path) -> dict[str, bytes]:
    """A checkpoint's files but the manifest (which holds the time of the save)."""
    return {
        path.name: path.read_bytes()
        for path in sorted(checkpoint.iterdir())
        if path.name != MANIFEST_NAME
    }


def test_an_async_save_in_flight_is_never_overwritten_by_the_next(
    make_parts: Any, tmp_path: Path
) -> None:
    parts = make_parts("checkpoint.every_steps=1", "checkpoint.async_save=true")
    storage = GatedStorage(tmp_path / "checkpoints")
    checkpointer = checkpointer_over(storage, parts)
    parts.state.commit_step(num_samples=8, num_tokens=8)
    reference_1 = save_synchronously(tmp_path / "reference", parts)

    assert checkpointer.after_step(step=1, final=False) is None  # step 1: in flight, held
    assert storage.first_write_started.wait(timeout=60)
    # Training goes on: the weights change in place, and step 2 is due.
    with torch.no_grad():
        for parameter in parts.model.unwrapped.parameters():
            parameter.add_(1.0)
    parts.state.commit_step(num_samples=8, num_tokens=8)
    outcomes: list[Any] = []
    second = threading.Thread(
        target=lambda: outcomes.append(checkpointer.after_step(step=2, final=False))
    )
    second.start()
    # A second snapshot taken now would copy into the buffers step 1 is written from; give
    # it the chance before letting step 1's write go on. The verdict is in the files below.
    second.join(timeout=2)
    storage.release.set()
    second.join(timeout=60)
    last = checkpointer.finish()

    assert outcomes[0] is not None and outcomes[0].step == 1 and outcomes[0].committed
    assert last is not None and last.step == 2 and last.committed, last
    committed_1 = tmp_path / "checkpoints" / "step_00000001"
    assert state_files(committed_1) == state_files(reference_1), "step 1 was overwritten"
    reference_2 = save_synchronously(tmp_path / "reference-2", parts)
    assert state_files(Path(last.location)) == state_files(reference_2)
    assert state_files(reference_2) != state_files(reference_1)  # the change is visible
    first_of_step_2 = next(i for i, entry in enumerate(storage.log) if "step_00000002" in entry)
    assert storage.log.index("commit step_00000001") < first_of_step_2, storage.log


def test_saves_only_on_due_steps_and_not_twice(make_parts: Any, tmp_path: Path) -> None:
    parts = make_parts("checkpoint.every_steps=3", "checkpoint.keep_last=2")
    storage = LocalStorage(tmp_path / "checkpoints")
    checkpointer = checkpointer_over(storage, parts)
    outcomes = []
    for _ in range(7):
        parts.state.commit_step(num_samples=8, num_tokens=8)
        step = parts.state.step
        outcome = checkpointer.after_step(step=step, final=step == 7)
        if outcome is not None:
            outcomes.append(outcome)
    # The final step is saved once, even when asked again.
    assert checkpointer.after_step(step=7, final=True) is None
    assert [outcome.step for outcome in outcomes] == [3, 6, 7]
    assert all(outcome.committed for outcome in outcomes)
    assert outcomes[-1].pruned == ["step_00000003"]  # keep_last=2
    assert storage.checkpoint_names() == ["step_00000006", "step_00000007"]


class SizedStorage(GatedStorage):
    """Real local storage that reports a chosen amount of free space."""

    def __init__(self, root: Path, *, free: int) -> None:
        super().__init__(root)
        self._free = free

    def free_bytes(self) -> int | None:
        return self._free


def test_preflight_refuses_below_two_checkpoints_and_warns_below_keep_last(
    tmp_path: Path,
) -> None:
    estimate = 10 * 2**20

    def verdict(free: int) -> str | None:
        storage = SizedStorage(tmp_path, free=free)
        return check_free_space(storage, checkpoint_bytes=estimate, keep_last=3)

    with pytest.raises(ConfigError, match="less than two checkpoints"):
        verdict(2 * estimate - 1)
    warning = verdict(2 * estimate)
    assert warning is not None and "keep_last=3 needs 4" in warning, warning
    assert verdict(4 * estimate) is None


class UnlistableStorage(GatedStorage):
    """Real local storage whose listing fails for good, as a store denying access does."""

    def checkpoint_names(self) -> list[str]:
        raise StorageError("PermissionError: access denied")


def test_storage_that_cannot_be_listed_refuses_the_resume_in_one_line(
    make_parts: Any, tmp_path: Path
) -> None:
    parts = make_parts()
    with pytest.raises(CheckpointRefused) as refused:
        restore_checkpoint(
            UnlistableStorage(tmp_path / "checkpoints"),
            contents_of(parts),
            identity=parts.identity,
            request=ResumeRequest(),
            rank=0,
            events=parts.events,
        )
    message = str(refused.value)
    assert "StorageError" in message and "access denied" in message, message
    assert "\n" not in message and "--no-resume" in message


class SlowStorage(GatedStorage):
    """Real local storage whose every file write takes at least ``delay`` seconds."""

    def __init__(self, root: Path, *, delay: float) -> None:
        super().__init__(root)
        self.release.set()
        self.delay = delay

    def write_file(self, location: str, filename: str, payload: Payload) -> None:
        time.sleep(self.delay)
        super().write_file(location, filename, payload)


SAVE_DELAY = 0.1  # per file written: a save writes several


def saved_events(parts: TrainingParts) -> dict[int, dict[str, Any]]:
    return {event["step"]: event for event in parts.events.of_kind("checkpoint_saved")}


def test_an_async_save_times_its_wait_its_snapshot_and_its_background_write(
    make_parts: Any, tmp_path: Path
) -> None:
    parts = make_parts("checkpoint.every_steps=1", "checkpoint.async_save=true")
    checkpointer = checkpointer_over(SlowStorage(tmp_path / "c", delay=SAVE_DELAY), parts)
    for step in (1, 2):
        parts.state.commit_step(num_samples=8, num_tokens=8)
        checkpointer.after_step(step=step, final=False)
    second = checkpointer.finish()
    assert second is not None and second.committed
    first_event, second_event = saved_events(parts)[1], saved_events(parts)[2]
    for event in (first_event, second_event):
        assert event["async_save"] is True
        # The background write holds every file's delay; the snapshot is a copy to memory.
        assert event["write_s"] >= SAVE_DELAY
        assert 0 < event["blocked_s"] < SAVE_DELAY
    # Nothing was in flight before the first save; the second waited for the first's write,
    # and that wait is not its snapshot.
    assert first_event["waited_s"] < SAVE_DELAY / 2
    assert second_event["waited_s"] >= SAVE_DELAY / 2
    assert second.seconds_blocked == pytest.approx(
        second_event["waited_s"] + second_event["blocked_s"]
    )


def test_a_save_now_blocks_for_its_write_even_with_async_saves(
    make_parts: Any, tmp_path: Path
) -> None:
    parts = make_parts("checkpoint.every_steps=1", "checkpoint.async_save=true")
    checkpointer = checkpointer_over(SlowStorage(tmp_path / "c", delay=SAVE_DELAY), parts)
    parts.state.commit_step(num_samples=8, num_tokens=8)
    checkpointer.after_step(step=1, final=False)  # in the background
    parts.state.commit_step(num_samples=8, num_tokens=8)
    now = checkpointer.after_step(step=2, final=False, now=True)  # as on preemption
    assert now is not None and now.committed
    event = saved_events(parts)[2]
    # Synchronous, even from an async checkpointer: the write blocked training too.
    assert event["async_save"] is False
    assert event["waited_s"] >= SAVE_DELAY / 2  # for step 1's write
    assert event["write_s"] >= SAVE_DELAY
    assert event["blocked_s"] >= event["write_s"]
    assert now.seconds_blocked >= event["waited_s"] + event["blocked_s"]


def test_a_synchronous_checkpointer_waits_for_nothing(make_parts: Any, tmp_path: Path) -> None:
    sync_parts = make_parts("checkpoint.every_steps=1")
    sync = checkpointer_over(SlowStorage(tmp_path / "s", delay=SAVE_DELAY), sync_parts)
    sync_parts.state.commit_step(num_samples=8, num_tokens=8)
    outcome = sync.after_step(step=1, final=False)
    assert outcome is not None and outcome.committed
    (sync_event,) = sync_parts.events.of_kind("checkpoint_saved")
    assert sync_event["async_save"] is False and sync_event["waited_s"] < SAVE_DELAY / 2
    assert sync_event["blocked_s"] >= sync_event["write_s"] >= SAVE_DELAY


class SlowReads(GatedStorage):
    """Real local storage whose every read of a tensor file's data takes ``delay`` seconds."""

    def __init__(self, root: Path, *, delay: float) -> None:
        super().__init__(root)
        self.release.set()
        self.delay = delay
        self.tensor_reads = 0

    def read_into(self, *args: Any, **kwargs: Any) -> None:
        self.tensor_reads += 1
        time.sleep(self.delay)
        self._local.read_into(*args, **kwargs)


def test_a_restore_times_its_phases_and_builds_states_while_the_data_arrives(
    make_parts: Any, tmp_path: Path
) -> None:
    parts = make_parts("checkpoint.every_steps=1")
    storage = SlowReads(tmp_path / "c", delay=SAVE_DELAY)
    parts.state.commit_step(num_samples=8, num_tokens=8)
    saved = checkpointer_over(storage, parts).after_step(step=1, final=False)
    assert saved is not None and saved.committed
    started = time.perf_counter()
    restored = restore_checkpoint(
        storage,
        contents_of(parts),
        identity=parts.identity,
        request=ResumeRequest(),
        rank=0,
        events=parts.events,
    )
    seconds = time.perf_counter() - started
    assert restored is not None and restored.step == 1
    phases = restored.phase_seconds
    assert set(phases) == set(RESTORE_PHASES), phases
    assert storage.tensor_reads >= 2  # the model's and the optimizer's files at least
    # Every data read is inside read_files. The states were built while the data was still
    # arriving: what was left of it is read_wait, part of read.
    assert phases["read_files"] >= storage.tensor_reads * SAVE_DELAY
    assert SAVE_DELAY / 2 <= phases["read_wait"] <= phases["read"]
    in_order = sum(phases[p] for p in RESTORE_PHASES if p not in ("read_files", "read_wait"))
    assert in_order == pytest.approx(seconds, abs=0.05)
