"""The consumption ledger and its audit, on ledgers written the way the trainer writes them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from steadytrain.config import BatchLayout, DataError
from steadytrain.data import ConsumptionLedger, audit_ledger, new_attempt_id
from steadytrain.data.sampler import (
    GlobalPositionSampler,
    MixtureOrder,
    SampleOrder,
    epoch_permutation,
)

SEED = 11
NUM_SAMPLES = 100
GLOBAL_BATCH = 12  # 8 steps per epoch, tail of 4
STEPS_PER_EPOCH = NUM_SAMPLES // GLOBAL_BATCH
LAYOUTS = {
    2: BatchLayout(world_size=2, micro_batch_size=3, grad_accum_steps=2),
    3: BatchLayout(world_size=3, micro_batch_size=2, grad_accum_steps=2),
}

# (step, rank, ids) -> the ids to record, or None to record nothing.
Tamper = Callable[[int, int, list[int]], "list[int] | None"]


def train_attempt(
    run_dir: Path,
    *,
    world_size: int,
    start_step: int,
    end_step: int,
    tamper: Tamper | None = None,
    attempt: str | None = None,
    skipped: Callable[[int, int], bool] = lambda step, rank: False,
    order: SampleOrder | None = None,
) -> str:
    """Record steps ``[start_step, end_step)`` as ``world_size`` ranks of one attempt would.

    The sampler resumes at ``start_step`` (as from a checkpoint there); each rank records the
    ids of its micro-batches after each committed step, or as skipped by the guard where
    ``skipped(step, rank)``.
    """
    attempt = attempt or new_attempt_id()
    sampler = GlobalPositionSampler(
        num_samples=NUM_SAMPLES, global_batch_size=GLOBAL_BATCH, seed=SEED, order=order
    )
    for _ in range(start_step):
        sampler.advance()
    layout = LAYOUTS[world_size]
    ledgers = [
        ConsumptionLedger(
            run_dir / "ledger",
            attempt=attempt,
            rank=rank,
            world_size=world_size,
            start_step=start_step,
            num_samples=NUM_SAMPLES,
            global_batch_size=GLOBAL_BATCH,
            seed=SEED,
            order=order,
        )
        for rank in range(world_size)
    ]
    for step in range(start_step, end_step):
        epoch = sampler.epoch
        for rank, ledger in enumerate(ledgers):
            micro_batches = sampler.rank_micro_batches(
                layout, rank=rank, epoch=epoch, step_in_epoch=sampler.step_in_epoch
            )
            ids: list[int] | None = [i for batch in micro_batches for i in batch]
            if tamper is not None:
                ids = tamper(step, rank, ids)
            if ids is not None:
                ledger.record(step=step, epoch=epoch, sample_ids=ids, skipped=skipped(step, rank))
        sampler.advance()
    for ledger in ledgers:
        ledger.close()
    return attempt


def test_clean_run_passes(tmp_path: Path) -> None:
    train_attempt(tmp_path, world_size=2, start_step=0, end_step=20)
    report = audit_ledger(tmp_path)
    assert report.problems == []
    assert report.ok
    assert report.num_steps == 20
    assert report.num_attempts == 1
    assert report.num_samples == NUM_SAMPLES
    assert report.global_batch_size == GLOBAL_BATCH
    assert [epoch.epoch for epoch in report.epochs] == [0, 1, 2]
    assert [epoch.complete for epoch in report.epochs] == [True, True, False]
    assert [epoch.num_consumed for epoch in report.epochs] == [96, 96, 48]
    for epoch in report.epochs[:2]:
        permutation = epoch_permutation(seed=SEED, epoch=epoch.epoch, num_samples=NUM_SAMPLES)
        assert epoch.tail == permutation[96:].tolist()
        assert not epoch.duplicates and not epoch.missing and not epoch.unexpected


def test_duplicated_sample_is_a_problem(tmp_path: Path) -> None:
    first_of_step_3: list[int] = []

    def read_rank0_ids_twice(step: int, rank: int, ids: list[int]) -> list[int]:
        if step == 3 and rank == 0:
            first_of_step_3.extend(ids)
        if step == 3 and rank == 1:
            return list(first_of_step_3)  # rank 1 read rank 0's samples again
        return ids

    train_attempt(tmp_path, world_size=2, start_step=0, end_step=10, tamper=read_rank0_ids_twice)
    report = audit_ledger(tmp_path)
    assert not report.ok
    assert any("more than once" in problem for problem in report.problems)
    assert set(report.epochs[0].duplicates) == set(first_of_step_3)
    assert report.epochs[0].missing  # what rank 1 should have read was never read


def test_missing_rank_record_is_a_problem(tmp_path: Path) -> None:
    def drop_rank1_step5(step: int, rank: int, ids: list[int]) -> list[int] | None:
        return None if (step, rank) == (5, 1) else ids

    train_attempt(tmp_path, world_size=2, start_step=0, end_step=10, tamper=drop_rank1_step5)
    report = audit_ledger(tmp_path)
    assert not report.ok
    assert "step 5: 6 samples recorded, expected 12" in report.problems
    assert any("never consumed" in problem for problem in report.problems)


def test_restart_supersedes_rolled_back_steps(tmp_path: Path) -> None:
    # Attempt 1 commits steps 0..13 but its last checkpoint is at step 10; attempt 2
    # resumes there with another world size and redoes steps 10..13 (crossing an epoch).
    train_attempt(tmp_path, world_size=2, start_step=0, end_step=14)
    train_attempt(tmp_path, world_size=3, start_step=10, end_step=20)
    report = audit_ledger(tmp_path)
    assert report.problems == []
    assert report.num_attempts == 2
    assert report.num_steps == 20
    assert [epoch.complete for epoch in report.epochs] == [True, True, False]


def test_an_attempt_that_lost_a_rank_is_superseded_or_reported(tmp_path: Path) -> None:
    # Attempt 2 resumes at step 10, but rank 0 dies before recording anything: attempt 3
    # (from step 10 again) rolls back what rank 1 recorded, as it rolls back attempt 1's.
    def rank0_lost(step: int, rank: int, ids: list[int]) -> list[int] | None:
        return None if rank == 0 else ids

    train_attempt(tmp_path, world_size=2, start_step=0, end_step=14)
    train_attempt(tmp_path, world_size=2, start_step=10, end_step=14, tamper=rank0_lost)
    train_attempt(tmp_path, world_size=2, start_step=10, end_step=20)
    report = audit_ledger(tmp_path)
    assert report.problems == []
    assert report.num_steps == 20

    # Without attempt 3, attempt 2's half-recorded steps are what counts from step 10.
    only_two = tmp_path / "two"
    train_attempt(only_two, world_size=2, start_step=0, end_step=14)
    train_attempt(only_two, world_size=2, start_step=10, end_step=14, tamper=rank0_lost)
    problems = audit_ledger(only_two).problems
    assert "step 10: 6 samples recorded, expected 12" in problems, problems


def test_restart_in_the_previous_epoch_supersedes_across_the_boundary(tmp_path: Path) -> None:
    train_attempt(tmp_path, world_size=3, start_step=0, end_step=11)
    train_attempt(tmp_path, world_size=2, start_step=6, end_step=9)
    train_attempt(tmp_path, world_size=3, start_step=7, end_step=17)
    report = audit_ledger(tmp_path)
    assert report.problems == []
    assert report.num_attempts == 3
    assert report.num_steps == 17


def test_restart_after_a_missing_step_is_a_problem(tmp_path: Path) -> None:
    train_attempt(tmp_path, world_size=2, start_step=0, end_step=5)
    train_attempt(tmp_path, world_size=2, start_step=6, end_step=12)  # step 5 never ran
    report = audit_ledger(tmp_path)
    assert not report.ok
    assert any("epoch 0" in problem for problem in report.problems)


def test_restart_skipping_the_last_step_of_an_epoch_is_a_problem(tmp_path: Path) -> None:
    # Steps 0..6 of epoch 0 commit, then a restart begins at step 8 (epoch 1): step 7, the
    # last step of epoch 0, was never consumed by anyone.
    train_attempt(tmp_path, world_size=2, start_step=0, end_step=STEPS_PER_EPOCH - 1)
    train_attempt(tmp_path, world_size=2, start_step=STEPS_PER_EPOCH, end_step=12)
    report = audit_ledger(tmp_path)
    assert not report.ok, "12 samples of epoch 0 were never consumed, yet the audit passed"


def test_a_torn_last_line_is_ignored(tmp_path: Path) -> None:
    train_attempt(tmp_path, world_size=2, start_step=0, end_step=9)
    # Both ranks crashed while writing step 9: half a JSON line each, no newline.
    for rank_file in sorted((tmp_path / "ledger").glob("rank-*.jsonl")):
        with open(rank_file, "a") as handle:
            handle.write('{"attempt": "x", "step": 9, "epoch": 1, "sample_ids": [4, ')
    report = audit_ledger(tmp_path)
    assert report.problems == []
    assert report.num_steps == 9


def test_a_torn_line_does_not_swallow_the_next_attempts_record(tmp_path: Path) -> None:
    # Rank 0 died mid-write of step 9 (no newline); the restart from step 7 appends to the
    # same file, and its first record must still count.
    train_attempt(tmp_path, world_size=2, start_step=0, end_step=9)
    with open(tmp_path / "ledger" / "rank-00000.jsonl", "a") as handle:
        handle.write('{"attempt": "x", "st')
    train_attempt(tmp_path, world_size=3, start_step=7, end_step=12)
    report = audit_ledger(tmp_path)
    assert report.problems == []
    assert report.num_steps == 12


def test_record_from_an_unknown_attempt_is_a_problem(tmp_path: Path) -> None:
    train_attempt(tmp_path, world_size=2, start_step=0, end_step=4)
    with open(tmp_path / "ledger" / "rank-00001.jsonl", "a") as handle:
        handle.write('{"attempt": "ghost", "step": 4, "epoch": 0, "sample_ids": [1]}\n')
    report = audit_ledger(tmp_path)
    assert any("unknown attempt ghost" in problem for problem in report.problems)


def test_no_ledger_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no ledger found"):
        audit_ledger(tmp_path)


def test_ledger_refuses_a_run_dir_recorded_with_other_settings(tmp_path: Path) -> None:
    train_attempt(tmp_path, world_size=2, start_step=0, end_step=2)
    with pytest.raises(DataError, match="use a new --run-dir"):
        ConsumptionLedger(
            tmp_path / "ledger",
            attempt=new_attempt_id(),
            rank=0,
            world_size=2,
            start_step=2,
            num_samples=NUM_SAMPLES,
            global_batch_size=24,
            seed=SEED,
        )


def test_attempt_ids_are_unique() -> None:
    assert len({new_attempt_id() for _ in range(20)}) == 20


def test_steps_skipped_by_the_guard_are_listed_never_missing(tmp_path: Path) -> None:
    # Attempt 1 skips step 9, then rolls back to its checkpoint at step 8 as attempt 2,
    # which passes over steps 8-10 and trains on; step 13 is skipped once more.
    train_attempt(tmp_path, world_size=2, start_step=0, end_step=10, skipped=lambda s, r: s == 9)
    train_attempt(
        tmp_path,
        world_size=2,
        start_step=8,
        end_step=16,
        skipped=lambda step, rank: step in (8, 9, 10, 13),
    )
    report = audit_ledger(tmp_path)
    assert report.problems == []
    assert report.skipped_steps == [8, 9, 10, 13]
    # Steps 8-15 are epoch 1 (8 steps per epoch): its skipped samples are those of 4 steps.
    permutation = epoch_permutation(seed=SEED, epoch=1, num_samples=NUM_SAMPLES).tolist()
    in_epoch = [0, 1, 2, 5]
    expected = [i for step in in_epoch for i in permutation[step * 12 : (step + 1) * 12]]
    assert report.epochs[1].skipped_by_guard == sorted(expected)
    assert report.epochs[0].skipped_by_guard == []
    assert report.epochs[1].missing == [] and report.epochs[1].duplicates == {}


def test_a_skip_on_some_ranks_only_is_a_problem(tmp_path: Path) -> None:
    train_attempt(
        tmp_path, world_size=2, start_step=0, end_step=6, skipped=lambda s, r: (s, r) == (3, 1)
    )
    report = audit_ledger(tmp_path)
    assert report.problems == ["step 3: skipped by the guard on some ranks, committed on others"]


def test_a_windowed_shuffle_is_audited_in_its_own_order(tmp_path: Path) -> None:
    order = SampleOrder(window_shards=2, shard_samples=(30, 25, 25, 20))
    train_attempt(tmp_path, world_size=2, start_step=0, end_step=11, order=order)
    train_attempt(tmp_path, world_size=3, start_step=9, end_step=20, order=order)
    report = audit_ledger(tmp_path)
    assert report.ok, report.problems
    assert (
        report.epochs[0].tail
        == epoch_permutation(seed=SEED, epoch=0, num_samples=NUM_SAMPLES, order=order)[96:].tolist()
    )
    # The order is recorded: the same consumption audited as the global order fails.
    meta_path = tmp_path / "ledger" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["shuffle"] == {"window_shards": 2, "shard_samples": [30, 25, 25, 20]}
    del meta["shuffle"]
    meta_path.write_text(json.dumps(meta))
    assert not audit_ledger(tmp_path).ok


def test_the_global_order_records_no_shuffle_in_the_ledger(tmp_path: Path) -> None:
    """Ledgers of runs without a window stay as they were, so those runs resume unchanged."""
    every_shard = SampleOrder(window_shards=4, shard_samples=(30, 25, 25, 20))
    train_attempt(tmp_path, world_size=2, start_step=0, end_step=3, order=every_shard)
    assert "shuffle" not in json.loads((tmp_path / "ledger" / "meta.json").read_text())
    train_attempt(tmp_path, world_size=2, start_step=3, end_step=6)
    assert audit_ledger(tmp_path).ok


def test_a_mixture_is_audited_per_source(tmp_path: Path) -> None:
    mixture = MixtureOrder(names=("small", "large"), weights=(3.0, 1.0), source_samples=(10, 90))
    train_attempt(tmp_path, world_size=2, start_step=0, end_step=12, order=mixture)
    train_attempt(tmp_path, world_size=3, start_step=10, end_step=20, order=mixture)
    report = audit_ledger(tmp_path)
    assert report.ok, report.problems
    small, large = report.sources
    assert (small.name, small.weight, small.num_samples) == ("small", 3.0, 10)
    assert small.num_consumed + large.num_consumed == 20 * GLOBAL_BATCH
    assert small.num_consumed > 2.5 * large.num_consumed  # weight 3 to 1
    assert small.passes > 10  # the small source is visited again and again, each time once


def test_a_mixture_sample_consumed_more_often_than_its_order_says_is_a_problem(
    tmp_path: Path,
) -> None:
    mixture = MixtureOrder(names=("small", "large"), weights=(3.0, 1.0), source_samples=(10, 90))

    done: list[int] = []

    def repeat_a_small_sample(step: int, rank: int, ids: list[int]) -> list[int]:
        """Once: a small-source sample read in place of a large-source one."""
        small = [i for i in ids if i < 10]
        large = [i for i in ids if i >= 10]
        if done or not small or not large:
            return ids
        done.append(step)
        return [small[0] if i == large[0] else i for i in ids]

    train_attempt(
        tmp_path,
        world_size=2,
        start_step=0,
        end_step=8,
        order=mixture,
        tamper=repeat_a_small_sample,
    )
    assert done
    problems = audit_ledger(tmp_path).problems
    assert any("more than once" in problem for problem in problems), problems
    assert any("never consumed" in problem for problem in problems), problems
