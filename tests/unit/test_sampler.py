"""The global-position sampler: partitioning across ranks and resume across world sizes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from steadytrain.config import BatchLayout, DataError, batch_layout, config_from_dict
from steadytrain.data.sampler import (
    GlobalPositionSampler,
    MixtureOrder,
    SampleOrder,
    SamplerPosition,
    epoch_permutation,
)

SEED = 7
NUM_SAMPLES = 100
GLOBAL_BATCH = 12  # 8 steps per epoch, tail of 4
# A micro-batch size per world size such that world × micro divides the global batch;
# chosen so several layouts accumulate gradients.
MICRO_FOR_WORLD = {1: 4, 2: 3, 3: 2, 4: 3}


def layout_for(world_size: int, *, micro: int, global_batch: int = GLOBAL_BATCH) -> BatchLayout:
    config = config_from_dict(
        {"train": {"global_batch_size": global_batch, "micro_batch_size": micro}}
    )
    return batch_layout(config, world_size=world_size)


LAYOUTS = {world: layout_for(world, micro=micro) for world, micro in MICRO_FOR_WORLD.items()}


def step_ids_read(
    sampler: GlobalPositionSampler, layout: BatchLayout, *, epoch: int, step_in_epoch: int
) -> list[int]:
    """Every id read by every rank in one step (rank by rank, micro-step by micro-step)."""
    return [
        sample_id
        for rank in range(layout.world_size)
        for micro_batch in sampler.rank_micro_batches(
            layout, rank=rank, epoch=epoch, step_in_epoch=step_in_epoch
        )
        for sample_id in micro_batch
    ]


# --- the permutation ---------------------------------------------------------------------


def test_epoch_permutation_is_a_pure_function_of_seed_and_epoch() -> None:
    first = epoch_permutation(seed=SEED, epoch=3, num_samples=NUM_SAMPLES)
    epoch_permutation(seed=SEED + 1, epoch=0, num_samples=NUM_SAMPLES)  # unrelated call between
    np.random.seed(0)  # global numpy state must not matter
    second = epoch_permutation(seed=SEED, epoch=3, num_samples=NUM_SAMPLES)
    assert np.array_equal(first, second)
    assert sorted(first.tolist()) == list(range(NUM_SAMPLES))


def test_epoch_permutation_differs_across_epochs_and_seeds() -> None:
    base = epoch_permutation(seed=SEED, epoch=0, num_samples=NUM_SAMPLES)
    other_epoch = epoch_permutation(seed=SEED, epoch=1, num_samples=NUM_SAMPLES)
    other_seed = epoch_permutation(seed=SEED + 1, epoch=0, num_samples=NUM_SAMPLES)
    assert not np.array_equal(base, other_epoch)
    assert not np.array_equal(base, other_seed)
    assert not np.array_equal(base, np.arange(NUM_SAMPLES))


# --- one step across ranks ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("world_size", "micro"),
    [(1, 24), (1, 6), (2, 12), (2, 4), (3, 8), (3, 2), (4, 6), (4, 3), (4, 1)],
)
def test_ranks_split_each_step_exactly(world_size: int, micro: int) -> None:
    sampler = GlobalPositionSampler(num_samples=200, global_batch_size=24, seed=SEED)
    layout = layout_for(world_size, micro=micro, global_batch=24)
    for epoch, step in [(0, 0), (0, 3), (1, 7), (2, 5)]:
        expected = epoch_permutation(seed=SEED, epoch=epoch, num_samples=200)[
            step * 24 : (step + 1) * 24
        ]
        per_rank = [
            sampler.rank_micro_batches(layout, rank=rank, epoch=epoch, step_in_epoch=step)
            for rank in range(world_size)
        ]
        for micro_batches in per_rank:
            assert len(micro_batches) == layout.grad_accum_steps
            assert all(len(batch) == micro for batch in micro_batches)
        rank_sets = [{i for batch in batches for i in batch} for batches in per_rank]
        for one, two in itertools.combinations(rank_sets, 2):
            assert not one & two, "two ranks read the same sample in one step"
        union = [i for batches in per_rank for batch in batches for i in batch]
        assert len(union) == 24
        assert sorted(union) == sorted(expected.tolist())
        # The documented rule: micro-step blocks in order, each split across ranks in rank order.
        for offset, sample_id in enumerate(expected.tolist()):
            block = world_size * micro
            micro_step, rank = offset // block, (offset % block) // micro
            assert sample_id in per_rank[rank][micro_step]


def test_layout_for_another_global_batch_is_refused() -> None:
    sampler = GlobalPositionSampler(num_samples=NUM_SAMPLES, global_batch_size=12, seed=SEED)
    with pytest.raises(DataError, match="covers 24 samples"):
        sampler.rank_micro_batches(
            layout_for(2, micro=4, global_batch=24), rank=0, epoch=0, step_in_epoch=0
        )


# --- resume with another world size -------------------------------------------------------

TOTAL_STEPS = 20  # 2.5 epochs of 8 steps


def run_steps(
    sampler: GlobalPositionSampler,
    layout: BatchLayout,
    num_steps: int,
    consumed: dict[int, list[int]],
) -> None:
    """Read and commit ``num_steps`` steps, recording every id read under its epoch."""
    for _ in range(num_steps):
        epoch, step = sampler.epoch, sampler.step_in_epoch
        consumed.setdefault(epoch, []).extend(
            step_ids_read(sampler, layout, epoch=epoch, step_in_epoch=step)
        )
        sampler.advance()


def assert_each_epoch_exactly_once(consumed: dict[int, list[int]], total_steps: int) -> None:
    steps_per_epoch = NUM_SAMPLES // GLOBAL_BATCH
    full_epochs, leftover_steps = divmod(total_steps, steps_per_epoch)
    assert sorted(consumed) == list(range(full_epochs + (leftover_steps > 0)))
    for epoch, ids in consumed.items():
        permutation = epoch_permutation(seed=SEED, epoch=epoch, num_samples=NUM_SAMPLES)
        num_steps = steps_per_epoch if epoch < full_epochs else leftover_steps
        expected = permutation[: num_steps * GLOBAL_BATCH].tolist()
        assert len(ids) == len(set(ids)), f"epoch {epoch}: a sample was read twice"
        assert sorted(ids) == sorted(expected), f"epoch {epoch}: wrong samples"
        assert not set(ids) & set(permutation[steps_per_epoch * GLOBAL_BATCH :].tolist())


@pytest.mark.parametrize(
    ("world_before", "world_after"), list(itertools.product(MICRO_FOR_WORLD, repeat=2))
)
def test_resume_at_every_step_with_another_world_size(world_before: int, world_after: int) -> None:
    for resume_step in range(TOTAL_STEPS + 1):
        consumed: dict[int, list[int]] = {}
        before = GlobalPositionSampler(
            num_samples=NUM_SAMPLES, global_batch_size=GLOBAL_BATCH, seed=SEED
        )
        run_steps(before, LAYOUTS[world_before], resume_step, consumed)
        saved = before.state_dict()

        after = GlobalPositionSampler(
            num_samples=NUM_SAMPLES, global_batch_size=GLOBAL_BATCH, seed=SEED
        )
        after.load_state_dict(saved)
        assert after.position == before.position
        run_steps(after, LAYOUTS[world_after], TOTAL_STEPS - resume_step, consumed)
        assert_each_epoch_exactly_once(consumed, TOTAL_STEPS)


def test_state_dict_is_the_global_position() -> None:
    sampler = GlobalPositionSampler(num_samples=NUM_SAMPLES, global_batch_size=12, seed=SEED)
    for _ in range(10):
        sampler.advance()
    state = sampler.state_dict()
    assert state["epoch"] == 1
    assert state["samples_consumed"] == 24
    assert isinstance(state["version"], int)
    assert sampler.position == SamplerPosition(epoch=1, samples_consumed=24)
    assert sampler.step_in_epoch == 2


# --- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"), [("global_batch_size", 24), ("num_samples", 101), ("seed", SEED + 1)]
)
def test_load_state_dict_refuses_other_data_or_batch(key: str, value: int) -> None:
    saved = GlobalPositionSampler(num_samples=NUM_SAMPLES, global_batch_size=12, seed=SEED)
    saved.advance()
    settings = {"num_samples": NUM_SAMPLES, "global_batch_size": 12, "seed": SEED, key: value}
    other = GlobalPositionSampler(**settings)
    with pytest.raises(DataError, match=key):
        other.load_state_dict(saved.state_dict())
    assert other.position == SamplerPosition(epoch=0, samples_consumed=0)


def test_load_state_dict_refuses_another_version() -> None:
    sampler = GlobalPositionSampler(num_samples=NUM_SAMPLES, global_batch_size=12, seed=SEED)
    state = {**sampler.state_dict(), "version": 999}
    with pytest.raises(DataError, match="version"):
        sampler.load_state_dict(state)


def test_load_state_dict_refuses_a_position_off_a_step_boundary() -> None:
    sampler = GlobalPositionSampler(num_samples=NUM_SAMPLES, global_batch_size=12, seed=SEED)
    state = {**sampler.state_dict(), "samples_consumed": 13}
    with pytest.raises(DataError, match="step boundary"):
        sampler.load_state_dict(state)


def test_dataset_smaller_than_the_global_batch_is_refused() -> None:
    with pytest.raises(DataError, match=r"11 samples, fewer than train\.global_batch_size=12"):
        GlobalPositionSampler(num_samples=11, global_batch_size=12, seed=SEED)


def test_dataset_of_exactly_one_batch_is_accepted() -> None:
    sampler = GlobalPositionSampler(num_samples=12, global_batch_size=12, seed=SEED)
    assert sampler.steps_per_epoch == 1
    assert sampler.tail_size == 0
    assert sampler.advance() is True
    assert sampler.position == SamplerPosition(epoch=1, samples_consumed=0)


# --- epochs and the tail -------------------------------------------------------------------


def test_advance_reports_the_end_of_each_epoch_and_the_tail() -> None:
    sampler = GlobalPositionSampler(num_samples=NUM_SAMPLES, global_batch_size=12, seed=SEED)
    assert sampler.steps_per_epoch == 8
    assert sampler.tail_size == 4
    ends = [sampler.advance() for _ in range(24)]
    assert ends == ([False] * 7 + [True]) * 3
    assert sampler.position == SamplerPosition(epoch=3, samples_consumed=0)


def test_the_tail_is_never_read() -> None:
    sampler = GlobalPositionSampler(num_samples=NUM_SAMPLES, global_batch_size=12, seed=SEED)
    layout = LAYOUTS[2]
    read = [
        step_ids_read(sampler, layout, epoch=0, step_in_epoch=step)
        for step in range(sampler.steps_per_epoch)
    ]
    tail = epoch_permutation(seed=SEED, epoch=0, num_samples=NUM_SAMPLES)[-4:].tolist()
    assert not set(tail) & {i for ids in read for i in ids}


# --- the windowed shuffle ------------------------------------------------------------------

SHARD_SAMPLES = (9, 14, 0, 11, 13, 10, 12, 11, 10, 10)  # 100 samples; one shard holds none
SHARD_OF = np.repeat(np.arange(len(SHARD_SAMPLES)), SHARD_SAMPLES)


def windowed(window_shards: int) -> SampleOrder:
    return SampleOrder(window_shards=window_shards, shard_samples=SHARD_SAMPLES)


@pytest.mark.parametrize("window", [1, 2, 3, 7])
def test_windowed_permutation_is_pure_and_keeps_each_window_together(window: int) -> None:
    order = windowed(window)
    first = epoch_permutation(seed=SEED, epoch=2, num_samples=NUM_SAMPLES, order=order)
    np.random.seed(0)
    assert np.array_equal(
        first, epoch_permutation(seed=SEED, epoch=2, num_samples=NUM_SAMPLES, order=order)
    )
    assert sorted(first.tolist()) == list(range(NUM_SAMPLES))
    # Consecutive windows of the visiting order draw on `window` shards each, no more.
    shards_in_order = SHARD_OF[first]
    seen_windows: list[set[int]] = []
    for shard in shards_in_order.tolist():
        if not seen_windows or (shard not in seen_windows[-1] and len(seen_windows[-1]) == window):
            seen_windows.append(set())
        seen_windows[-1].add(shard)
    assert all(len(shards) <= window for shards in seen_windows)
    assert len(seen_windows) <= -(-len(SHARD_SAMPLES) // window)
    other_epoch = epoch_permutation(seed=SEED, epoch=3, num_samples=NUM_SAMPLES, order=order)
    assert not np.array_equal(first, other_epoch)


def test_a_window_of_every_shard_is_the_global_permutation() -> None:
    """The default (no window) and a window as large as the corpus: today's order, unchanged."""
    global_order = epoch_permutation(seed=SEED, epoch=1, num_samples=NUM_SAMPLES)
    for window in (len(SHARD_SAMPLES), len(SHARD_SAMPLES) + 5):
        assert windowed(window).is_global
        assert np.array_equal(
            global_order,
            epoch_permutation(seed=SEED, epoch=1, num_samples=NUM_SAMPLES, order=windowed(window)),
        )


def test_windowed_order_refuses_shards_that_do_not_add_up() -> None:
    with pytest.raises(DataError, match="shards hold 100 samples"):
        epoch_permutation(seed=SEED, epoch=0, num_samples=99, order=windowed(2))


@pytest.mark.parametrize(("world_before", "world_after"), [(1, 4), (4, 3), (2, 1), (3, 2)])
def test_windowed_resume_with_another_world_size_is_exact(
    world_before: int, world_after: int
) -> None:
    order = windowed(3)

    def sampler() -> GlobalPositionSampler:
        return GlobalPositionSampler(
            num_samples=NUM_SAMPLES, global_batch_size=GLOBAL_BATCH, seed=SEED, order=order
        )

    reference: dict[int, list[int]] = {}
    run_steps(sampler(), LAYOUTS[world_before], TOTAL_STEPS, reference)
    for resume_step in (0, 5, 8, 13, TOTAL_STEPS):
        consumed: dict[int, list[int]] = {}
        before = sampler()
        run_steps(before, LAYOUTS[world_before], resume_step, consumed)
        after = sampler()
        after.load_state_dict(before.state_dict())
        run_steps(after, LAYOUTS[world_after], TOTAL_STEPS - resume_step, consumed)
        # The same samples in the same step order, whatever the world sizes.
        assert {e: sorted(ids) for e, ids in consumed.items()} == {
            e: sorted(ids) for e, ids in reference.items()
        }
        for epoch, ids in consumed.items():
            permutation = epoch_permutation(
                seed=SEED, epoch=epoch, num_samples=NUM_SAMPLES, order=order
            )
            assert sorted(ids) == sorted(permutation[: len(ids)].tolist())
            assert len(ids) == len(set(ids))


# --- the weighted mixture -------------------------------------------------------------------

MIXTURE = MixtureOrder(names=("small", "large"), weights=(3.0, 1.0), source_samples=(10, 90))


def test_a_mixture_takes_each_source_at_its_weight_and_its_stream_once() -> None:
    assert MIXTURE.epoch_counts() == [75, 25]
    taken: dict[int, list[int]] = {0: [], 1: []}
    for epoch in range(8):
        permutation = epoch_permutation(seed=SEED, epoch=epoch, num_samples=100, order=MIXTURE)
        assert np.array_equal(
            permutation, epoch_permutation(seed=SEED, epoch=epoch, num_samples=100, order=MIXTURE)
        )
        assert len(permutation) == 100
        small = permutation[permutation < 10]
        assert len(small) == 75
        taken[0].extend(small.tolist())
        taken[1].extend((permutation[permutation >= 10] - 10).tolist())
    # 600 samples of the small source: 60 whole passes, each sample 60 times; 200 of the large
    # one: two whole passes and 20 samples of the third.
    assert sorted(taken[0]) == sorted(list(range(10)) * 60)
    counts = np.bincount(taken[1], minlength=90)
    assert sorted(counts.tolist()) == [2] * 70 + [3] * 20


def test_mixture_weights_round_to_the_epoch_length() -> None:
    odd = MixtureOrder(names=("a", "b", "c"), weights=(1.0, 1.0, 1.0), source_samples=(5, 5, 4))
    assert sum(odd.epoch_counts()) == 14
    assert sorted(odd.epoch_counts()) == [4, 5, 5]
