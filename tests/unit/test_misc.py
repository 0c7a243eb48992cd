"""Small resumable pieces: the LR schedule, the grad-sync clock, TrainState, RNG capture."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from torch import nn

from steadytrain.config import TrainConfig
from steadytrain.distributed.parallel import GradSyncClock
from steadytrain.distributed.seeding import (
    capture_rng_state,
    rank_seed,
    restore_rng_state,
    seed_all,
)
from steadytrain.train.optim import WarmupCosine, build_optimizer, build_scheduler
from steadytrain.train.state import TrainState

# --- WarmupCosine ------------------------------------------------------------------------------


def test_warmup_is_linear_up_to_one() -> None:
    schedule = WarmupCosine(warmup_steps=10, max_steps=100, min_ratio=0.1)
    warmup = [schedule(step) for step in range(10)]
    assert warmup == pytest.approx([(step + 1) / 10 for step in range(10)])
    assert warmup[-1] == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0)


def test_cosine_decays_to_the_minimum_and_stays() -> None:
    schedule = WarmupCosine(warmup_steps=10, max_steps=100, min_ratio=0.1)
    decay = [schedule(step) for step in range(10, 101)]
    assert all(later <= earlier for earlier, later in itertools.pairwise(decay))
    assert schedule(55) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert schedule(100) == pytest.approx(0.1)
    assert schedule(500) == pytest.approx(0.1)


def test_no_warmup_starts_at_the_peak() -> None:
    schedule = WarmupCosine(warmup_steps=0, max_steps=10, min_ratio=0.0)
    assert schedule(0) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(0.0)


def test_scheduler_drives_the_optimizer_lr() -> None:
    train = TrainConfig(lr=0.5, warmup_steps=2, max_steps=6, min_lr_ratio=0.2)
    model = nn.Linear(3, 2)
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train)
    seen = []
    for _ in range(8):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[:3] == pytest.approx([0.25, 0.5, 0.5])
    assert seen[6:] == pytest.approx([0.1, 0.1])
    # The schedule survives a scheduler state round trip.
    restored = build_scheduler(build_optimizer(model, train), train)
    restored.load_state_dict(scheduler.state_dict())
    assert restored.last_epoch == scheduler.last_epoch


def test_weight_decay_applies_to_matrices_only() -> None:
    train = TrainConfig(weight_decay=0.3)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    groups = build_optimizer(model, train).param_groups
    decayed = {id(p) for group in groups if group["weight_decay"] == 0.3 for p in group["params"]}
    undecayed = {id(p) for group in groups if group["weight_decay"] == 0.0 for p in group["params"]}
    assert decayed == {id(model[0].weight)}
    assert undecayed == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}


# --- GradSyncClock ------------------------------------------------------------------------------


def test_grad_sync_clock_unions_overlapping_intervals() -> None:
    clock = GradSyncClock()
    for start, end in [(5.0, 6.0), (0.0, 2.0), (1.0, 3.0), (5.2, 5.8), (10.0, 10.0), (2.5, 4.0)]:
        clock.record(start, end)
    # [0, 4] and [5, 6]
    assert clock.take_seconds() == pytest.approx(5.0)


def test_grad_sync_clock_resets_after_taking() -> None:
    clock = GradSyncClock()
    clock.record(0.0, 1.5)
    assert clock.take_seconds() == pytest.approx(1.5)
    assert clock.take_seconds() == 0.0
    clock.record(7.0, 7.25)
    assert clock.take_seconds() == pytest.approx(0.25)


def test_grad_sync_clock_accepts_records_from_threads() -> None:
    clock = GradSyncClock()

    def record_disjoint(thread: int) -> None:
        for number in range(200):
            start = (thread * 200 + number) * 2.0
            clock.record(start, start + 1.0)

    threads = [threading.Thread(target=record_disjoint, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert clock.take_seconds() == pytest.approx(800.0)


# --- TrainState ----------------------------------------------------------------------------------


def test_train_state_round_trip() -> None:
    state = TrainState()
    for _ in range(3):
        state.commit_step(num_samples=32, num_tokens=32 * 128)
    saved = state.state_dict()
    assert saved["step"] == 3
    assert saved["samples_seen"] == 96
    assert saved["tokens_seen"] == 96 * 128
    assert isinstance(saved["version"], int)
    restored = TrainState()
    restored.load_state_dict(saved)
    assert restored == state


def test_train_state_refuses_another_version() -> None:
    saved = {**TrainState(step=4).state_dict(), "version": 999}
    restored = TrainState()
    with pytest.raises(ValueError, match="version 999"):
        restored.load_state_dict(saved)
    assert restored == TrainState()


# --- RNG capture -------------------------------------------------------------------------------


def draw_from_every_generator() -> tuple[float, list[float], list[float]]:
    return (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())


def test_restored_rng_reproduces_the_same_draws() -> None:
    seed_all(123)
    draw_from_every_generator()  # move away from the seeded start
    saved = capture_rng_state()
    expected = [draw_from_every_generator() for _ in range(3)]
    seed_all(999)  # disturb everything
    draw_from_every_generator()
    restore_rng_state(saved)
    assert [draw_from_every_generator() for _ in range(3)] == expected


def test_capture_is_a_snapshot_not_a_live_view() -> None:
    seed_all(5)
    saved = capture_rng_state()
    first = draw_from_every_generator()
    draw_from_every_generator()
    restore_rng_state(saved)
    assert draw_from_every_generator() == first


def test_restore_refuses_another_version() -> None:
    with pytest.raises(ValueError, match="version"):
        restore_rng_state({**capture_rng_state(), "version": 999})


def test_seed_all_is_reproducible_and_rank_seeds_differ() -> None:
    seed_all(77)
    first = draw_from_every_generator()
    seed_all(77)
    assert draw_from_every_generator() == first
    seeds = {rank_seed(77, rank=rank) for rank in range(64)}
    assert len(seeds) == 64
    assert rank_seed(77, rank=3) == rank_seed(77, rank=3)
    assert rank_seed(77, rank=3) != rank_seed(78, rank=3)


# --- exit_process ------------------------------------------------------------------------------


def test_exit_process_keeps_buffered_output_and_the_exit_code() -> None:
    """Skipping finalization must not lose what was printed (stdout to a pipe is buffered)."""
    program = (
        "import sys\n"
        "from steadytrain.distributed import exit_process\n"
        "print('kept', end='')\n"
        "sys.stderr.write('also kept')\n"
        "exit_process(7)\n"
        "print('never')\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    assert (completed.returncode, completed.stdout, completed.stderr) == (7, "kept", "also kept")
