"""Checkpointing with real parts in a group of one: when saves happen, that an asynchronous
save never has a second one in flight, and the space pre-flight."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from steadytrain.checkpoint import LocalStorage
from steadytrain.checkpoint.storage import Payload
from steadytrain.config import ConfigError, load_config
from steadytrain.distributed import start_runtime, stop_runtime
from steadytrain.train import TrainState, build_parts
from steadytrain.train.checkpointer import PeriodicCheckpointer
from steadytrain.train.checkpointing import check_free_space
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
        assert self.release.wait(timeout=60), "the test never released the save"
        self._local.write_file(location, filename, payload)

    def commit(self, location: str, name: str, manifest: bytes) -> None:
        self._local.commit(location, name, manifest)
        self.log.append(f"commit {name}")

    def __getattr__(self, name: str) -> Any:  # the rest of the Protocol, unchanged
        return getattr(self._local, name)


@pytest.fixture
def make_parts(small_overrides: list[str], tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Real training parts in a group of one, built from the small test config plus ``extra``."""

    def make(*extra: str) -> Any:
        config = load_config(
            TINY_CONFIG, overrides=[*small_overrides, f"run_dir={tmp_path / 'run'}", *extra]
        )
        built = build_parts(config, start_runtime(config))
        built.events = RecordingEvents()
        return built

    try:
        yield make
    finally:
        stop_runtime()


def test_async_save_waits_for_the_one_in_flight(make_parts: Any, tmp_path: Path) -> None:
    parts = make_parts("checkpoint.every_steps=1", "checkpoint.async_save=true")
    storage = GatedStorage(tmp_path / "checkpoints")
    checkpointer = PeriodicCheckpointer(storage, parts.config, is_main=True)
    state = TrainState()
    state.commit_step(num_samples=8, num_tokens=8)

    assert checkpointer.after_step(parts, state, final=False) is None  # step 1: in flight
    assert storage.first_write_started.wait(timeout=60)

    state.commit_step(num_samples=8, num_tokens=8)
    outcomes: list[Any] = []
    second = threading.Thread(
        target=lambda: outcomes.append(checkpointer.after_step(parts, state, final=False))
    )
    second.start()
    second.join(timeout=0.5)
    # Step 2 is due but step 1's write is held: the second save must not start.
    assert second.is_alive(), "a second save started while one was in flight"
    assert all("step_00000002" not in entry for entry in storage.log), storage.log

    storage.release.set()
    second.join(timeout=60)
    last = checkpointer.finish()

    assert outcomes[0] is not None and outcomes[0].step == 1 and outcomes[0].committed
    assert last is not None and last.step == 2 and last.committed, last
    first_of_step_2 = next(i for i, entry in enumerate(storage.log) if "step_00000002" in entry)
    assert storage.log.index("commit step_00000001") < first_of_step_2, storage.log


def test_saves_only_on_due_steps_and_not_twice(make_parts: Any, tmp_path: Path) -> None:
    parts = make_parts("checkpoint.every_steps=3", "checkpoint.keep_last=2")
    storage = LocalStorage(tmp_path / "checkpoints")
    checkpointer = PeriodicCheckpointer(storage, parts.config, is_main=True)
    state = TrainState()
    outcomes = []
    for _ in range(7):
        state.commit_step(num_samples=8, num_tokens=8)
        outcome = checkpointer.after_step(parts, state, final=state.step == 7)
        if outcome is not None:
            outcomes.append(outcome)
    # The final step is saved once, even when asked again.
    assert checkpointer.after_step(parts, state, final=True) is None
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
    make_parts: Any, tmp_path: Path
) -> None:
    parts = make_parts("checkpoint.every_steps=1", "checkpoint.keep_last=3")
    parameters = parts.model.unwrapped.parameters()
    estimate = 3 * sum(p.numel() * p.element_size() for p in parameters) + 2**20

    def verdict(free: int) -> str | None:
        return check_free_space(SizedStorage(tmp_path, free=free), parts)

    with pytest.raises(ConfigError, match="less than two checkpoints"):
        verdict(2 * estimate - 1)
    warning = verdict(2 * estimate)
    assert warning is not None and "keep_last=3 needs 4" in warning, warning
    assert verdict(4 * estimate) is None
