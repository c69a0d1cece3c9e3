"""GlobalBatchSampler: coverage, disjointness, equal steps, reshuffle, resume, length grouping."""

from __future__ import annotations

import numpy as np
import pytest

from ds_distil.batching import GlobalBatchSampler
from ds_distil.errors import UserError

N = 1000
GLOBAL = 48  # divisible by micro 4 x world 1, 2 and 3
MICRO = 4


@pytest.fixture(scope="module")
def lengths() -> np.ndarray:
    # Skewed like real text: many short lines, a tail of long ones.
    rng = np.random.default_rng(123)
    return np.clip(rng.lognormal(mean=3.5, sigma=0.7, size=N).astype(np.int64), 12, 512)


def samplers(lengths, world_size: int, seed: int = 7) -> list[GlobalBatchSampler]:
    return [GlobalBatchSampler(lengths, GLOBAL, MICRO, world_size=world_size, rank=rank, seed=seed)
            for rank in range(world_size)]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_sequence_once_per_epoch_except_the_dropped_remainder(lengths, world_size):
    ranks = samplers(lengths, world_size)
    for epoch in range(2):
        seen = [i for s in ranks for _, micro in s.iter_epoch(epoch) for batch in micro for i in batch]
        dropped = ranks[0].dropped(epoch)
        # Exactly N % GLOBAL sequences are left out: the tail of the epoch's permutation.
        assert len(dropped) == N % GLOBAL == ranks[0].dropped_per_epoch == 40
        assert len(seen) == len(set(seen)) == (N // GLOBAL) * GLOBAL
        assert sorted(seen + dropped.tolist()) == list(range(N))
    # A different random handful is left out each epoch (no sequence always skipped).
    assert set(ranks[0].dropped(0).tolist()) != set(ranks[0].dropped(1).tolist())


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_batches_and_the_same_number_of_steps(lengths, world_size):
    ranks = samplers(lengths, world_size)
    per_rank = [list(s.iter_epoch(3)) for s in ranks]
    assert {len(steps) for steps in per_rank} == {N // GLOBAL}
    for s in ranks:
        assert s.accumulation_steps == GLOBAL // (MICRO * world_size)
    for step in range(N // GLOBAL):
        owned = [set(i for batch in per_rank[r][step][1] for i in batch) for r in range(world_size)]
        for r in range(world_size):
            assert len(per_rank[r][step][1]) == ranks[r].accumulation_steps
            assert all(len(batch) == MICRO for batch in per_rank[r][step][1])
            for other in range(r + 1, world_size):
                assert not owned[r] & owned[other]


def test_global_batches_do_not_depend_on_world_size(lengths):
    for epoch in range(2):
        reference = [sorted(i for batch in micro for i in batch) for _, micro in samplers(lengths, 1)[0].iter_epoch(epoch)]
        for world_size in (2, 3):
            ranks = samplers(lengths, world_size)
            for step, expected in enumerate(reference):
                union = sorted(i for s in ranks for batch in s.step_batches(epoch, step) for i in batch)
                assert union == expected
                # The micro-batches themselves are the same cut of the global batch.
                micro_1 = sorted(map(tuple, samplers(lengths, 1)[0].step_batches(epoch, step)))
                micro_n = sorted(tuple(b) for s in ranks for b in s.step_batches(epoch, step))
                assert micro_1 == micro_n


def test_order_is_reshuffled_each_epoch_and_fixed_by_seed_and_epoch(lengths):
    a, b = samplers(lengths, 2, seed=7)[0], samplers(lengths, 2, seed=7)[0]
    assert list(a.iter_epoch(0)) == list(b.iter_epoch(0))  # a fresh sampler: same batches
    epoch0 = a.epoch_layout(0)[0]
    epoch1 = a.epoch_layout(1)[0]
    assert not np.array_equal(epoch0, epoch1)
    # Reshuffled, not merely rotated: most global batches of epoch 1 share few members with any of epoch 0.
    overlap = max(len(set(epoch1[0]) & set(row)) for row in epoch0)
    assert overlap < GLOBAL // 2
    other_seed = samplers(lengths, 2, seed=8)[0].epoch_layout(0)[0]
    assert not np.array_equal(epoch0, other_seed)


def test_resume_sees_exactly_the_remaining_batches(lengths):
    for world_size in (1, 3):
        for rank, s in enumerate(samplers(lengths, world_size)):
            full = list(s.iter_epoch(2))
            fresh = GlobalBatchSampler(lengths, GLOBAL, MICRO, world_size=world_size, rank=rank, seed=7)
            assert list(fresh.iter_epoch(2, start_step=7)) == full[7:]
            flat = fresh.epoch_micro_batches(2, start_step=7).tolist()
            assert flat == [batch for _, micro in full[7:] for batch in micro]
    # position(): a run that completed 25 steps continues at epoch 1, step 25 - 20.
    assert samplers(lengths, 1)[0].position(25) == (1, 25 - N // GLOBAL)


def test_a_resume_on_another_world_size_continues_the_same_global_batches(lengths):
    two = samplers(lengths, 2)
    three = samplers(lengths, 3)
    for step in range(5, N // GLOBAL):
        before = sorted(i for s in two for b in s.step_batches(1, step) for i in b)
        after = sorted(i for s in three for b in s.step_batches(1, step) for i in b)
        assert before == after


def test_length_grouping_keeps_padding_small(lengths):
    sampler = samplers(lengths, 2)[0]
    grouped = sampler.padding_fraction(0)
    # Independent recomputation over all ranks' micro-batches.
    slots = real = 0
    for s in samplers(lengths, 2):
        for _, micro in s.iter_epoch(0):
            for batch in micro:
                longest = max(lengths[batch])
                slots += -(-longest // 8) * 8 * len(batch)
                real += sum(lengths[batch])
    assert grouped == pytest.approx(1 - real / slots)
    # Baseline: the same micro-batch size drawn at random.
    rng = np.random.default_rng(0)
    random_batches = rng.permutation(N)[: (N // MICRO) * MICRO].reshape(-1, MICRO)
    random_longest = -(-lengths[random_batches].max(axis=1) // 8) * 8
    random_padding = 1 - lengths[random_batches].sum() / (random_longest.sum() * MICRO)
    assert grouped < 0.15 and grouped < random_padding / 3, (grouped, random_padding)


def test_micro_batches_are_length_sorted_and_ranks_balanced(lengths):
    ranks = samplers(lengths, 3)
    for step in range(4):
        # Rank r takes micro-batches r, r + 3, ...: at every accumulation slot the ranks'
        # longest sequences are neighbours in the sorted global batch.
        per_slot = [[max(lengths[b]) for b in s.step_batches(0, step)] for s in ranks]
        for slot in range(ranks[0].accumulation_steps):
            longest = [per_slot[r][slot] for r in range(3)]
            assert longest == sorted(longest)
        global_lengths = lengths[ranks[0].global_batch(0, step)]
        assert list(global_lengths) == sorted(global_lengths)
    # Steps mix lengths (groups are shuffled), unlike one long sorted run.
    medians = [np.median(lengths[ranks[0].global_batch(0, step)]) for step in range(N // GLOBAL)]
    assert medians != sorted(medians)


def test_batch_arithmetic_is_validated(lengths):
    with pytest.raises(UserError, match=r"global batch size 50 is not a multiple of micro batch size 4 x world size 2"):
        GlobalBatchSampler(lengths, 50, 4, world_size=2, rank=0)
    with pytest.raises(UserError, match=r"has 1000 sequences, fewer than one global batch of 1024"):
        GlobalBatchSampler(lengths, 1024, 4, world_size=2, rank=0)
    with pytest.raises(ValueError, match="rank 2 is outside a world of 2"):
        GlobalBatchSampler(lengths, 48, 4, world_size=2, rank=2)
    with pytest.raises(IndexError):
        samplers(lengths, 1)[0].step_batches(0, N // GLOBAL)
