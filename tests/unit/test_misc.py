"""Small resumable pieces: the LR schedule, the grad-sync clock, TrainState, RNG capture."""

from __future__ import annotations

import copy
import itertools
import random
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from steadytrain.config import TrainConfig
from steadytrain.distributed.parallel import GradSyncClock
from steadytrain.distributed.seeding import (
    capture_rng_state,
    rank_seed,
    restore_rng_state,
    seed_all,
)
from steadytrain.train.optim import (
    WarmupCosine,
    apply_hyperparameters,
    build_optimizer,
    build_scheduler,
)
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


def next_lrs(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, count: int
) -> list[float]:
    """The learning rates of the next ``count`` optimizer steps, stepping both."""
    lrs = []
    for _ in range(count):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_a_restored_scheduler_continues_the_schedule_exactly() -> None:
    train = TrainConfig(lr=0.5, warmup_steps=2, max_steps=6, min_lr_ratio=0.2)
    longer = TrainConfig(lr=0.5, warmup_steps=2, max_steps=12, min_lr_ratio=0.2)
    model = nn.Linear(3, 2)
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train)
    next_lrs(optimizer, scheduler, 4)
    # Resumed with a longer run: the decay re-spans from step 4, which only the schedule's own
    # state records; last_epoch alone cannot tell it apart from a run built with 12 steps.
    apply_hyperparameters(optimizer, scheduler, longer, changed={"train.max_steps": 12})
    next_lrs(optimizer, scheduler, 1)
    saved = copy.deepcopy((optimizer.state_dict(), scheduler.state_dict()))

    def rebuilt(scheduler_state: dict) -> tuple[torch.optim.Optimizer, LambdaLR]:
        fresh_optimizer = build_optimizer(model, longer)  # as the next resume builds them
        fresh_scheduler = build_scheduler(fresh_optimizer, longer)
        fresh_optimizer.load_state_dict(copy.deepcopy(saved[0]))
        fresh_scheduler.load_state_dict(copy.deepcopy(scheduler_state))
        return fresh_optimizer, fresh_scheduler

    continuing = next_lrs(optimizer, scheduler, 6)
    restored = next_lrs(*rebuilt(saved[1]), 6)
    # LambdaLR skips a None entry: everything restored but the schedule's own state.
    schedule_not_restored = next_lrs(*rebuilt({**saved[1], "lr_lambdas": [None]}), 6)

    assert all(later < earlier for earlier, later in itertools.pairwise(continuing)), continuing
    assert restored == continuing
    assert schedule_not_restored != continuing


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
