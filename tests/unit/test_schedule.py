"""The learning-rate schedule when a run is trained for longer (``--allow-change``)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from steadytrain.config import TrainConfig
from steadytrain.train import WarmupCosine, apply_hyperparameters, build_optimizer, build_scheduler


def schedule() -> WarmupCosine:
    return WarmupCosine(warmup_steps=10, max_steps=100, min_ratio=0.1)


def test_respan_mid_decay_continues_without_a_jump_and_ends_at_the_new_max() -> None:
    extended = schedule()
    before = extended(40)
    extended.respan(at_step=40, max_steps=200)
    assert extended(40) == before  # no jump at the step training resumes from
    values = [extended(step) for step in range(40, 201)]
    assert all(later <= earlier for earlier, later in itertools.pairwise(values))
    assert extended(200) == pytest.approx(0.1) and extended(300) == pytest.approx(0.1)
    assert extended(120) > schedule()(120)  # decays more slowly than the original schedule


def test_respan_of_a_finished_decay_goes_on_at_the_minimum() -> None:
    finished = schedule()
    finished.respan(at_step=100, max_steps=150)
    assert [finished(step) for step in (100, 125, 150)] == pytest.approx([0.1, 0.1, 0.1])


def test_respan_during_warmup_keeps_the_warmup_and_spans_the_decay() -> None:
    early = schedule()
    early.respan(at_step=5, max_steps=200)
    planned = WarmupCosine(warmup_steps=10, max_steps=200, min_ratio=0.1)
    assert [early(step) for step in range(0, 201, 7)] == [planned(s) for s in range(0, 201, 7)]


def test_respan_twice_chains_the_decays() -> None:
    twice = schedule()
    twice.respan(at_step=40, max_steps=200)
    at_100 = twice(100)
    twice.respan(at_step=100, max_steps=400)
    assert twice(100) == at_100 and twice(400) == pytest.approx(0.1)
    midpoint = 0.1 + (at_100 - 0.1) * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert twice(250) == pytest.approx(midpoint)


def test_a_resume_mid_decay_uses_the_same_rate_next_then_the_longer_decay() -> None:
    old = TrainConfig(max_steps=20, warmup_steps=2, lr=1e-2)
    optimizer = build_optimizer(torch.nn.Linear(4, 4), old)
    scheduler = build_scheduler(optimizer, old)
    for _ in range(8):
        optimizer.step()
        scheduler.step()
    rate_before = optimizer.param_groups[0]["lr"]  # what step 9 would have used

    longer = TrainConfig(max_steps=40, warmup_steps=2, lr=1e-2)
    apply_hyperparameters(optimizer, scheduler, longer, changed={"train.max_steps": (20, 40)})

    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([rate_before] * 2)
    expected = WarmupCosine(warmup_steps=2, max_steps=20, min_ratio=0.1)
    expected.respan(at_step=8, max_steps=40)
    used = []
    for _ in range(32):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert used == pytest.approx([1e-2 * expected(step) for step in range(8, 40)])
    assert used[-1] > 1e-2 * 0.1 and used[20] > 1e-2 * schedule_of(old)(28)


def schedule_of(train: TrainConfig) -> WarmupCosine:
    return WarmupCosine(
        warmup_steps=train.warmup_steps, max_steps=train.max_steps, min_ratio=train.min_lr_ratio
    )


def test_apply_hyperparameters_puts_the_config_over_a_restored_optimizer() -> None:
    old = TrainConfig(max_steps=20, warmup_steps=2, lr=1e-2, weight_decay=0.1)
    model = torch.nn.Linear(4, 4)
    optimizer = build_optimizer(model, old)
    scheduler = build_scheduler(optimizer, old)
    for _ in range(20):  # the finished run, as a checkpoint restores it
        optimizer.step()
        scheduler.step()
    new = TrainConfig(max_steps=40, warmup_steps=2, lr=1e-2, weight_decay=0.05, betas=(0.8, 0.9))

    apply_hyperparameters(
        optimizer, scheduler, new, changed={"train.max_steps": (20, 40), "train.weight_decay": 0}
    )

    decayed, undecayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.05 and undecayed["weight_decay"] == 0.0
    assert decayed["betas"] == (0.8, 0.9)
    rates = []
    for _ in range(20):
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    # The decay had ended at min_lr_ratio × lr; the longer run goes on there.
    assert rates == pytest.approx([1e-2 * new.min_lr_ratio] * 20)
    restored = torch.optim.lr_scheduler.LambdaLR(
        build_optimizer(model, new),
        lr_lambda=WarmupCosine(warmup_steps=2, max_steps=40, min_ratio=0.1),
    )
    restored.load_state_dict(scheduler.state_dict())  # the respan is saved with the schedule
    assert restored.lr_lambdas[0].respan_step == 20  # type: ignore[attr-defined]
