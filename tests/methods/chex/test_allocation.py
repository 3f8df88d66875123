"""Tests for keras_chex.allocation against a greedy NumPy reference."""

import doctest
import math

import numpy as np
import pytest
import tensorflow as tf

from keras_chex.methods.chex import allocation
from keras_chex.methods.chex.allocation import global_keep_counts
from keras_chex.methods.chex.allocation import keep_target

# ---------------------------------------------------------------------------
# NumPy reference, written as the procedure the docs describe: take the
# global top-target channels, then repair each group below its minimum by
# adding its best missing channel and dropping the lowest-ranked kept channel
# that no minimum protects.
# ---------------------------------------------------------------------------


def np_keep_target(total, sparsity):
    return int(math.floor((1.0 - sparsity) * total + 0.5 + 1e-9))


def np_global_keep_counts(scores, group_ids, n_groups, sparsity, min_channels):
    scores = np.asarray(scores, dtype=np.float64)
    group_ids = np.asarray(group_ids)
    total = len(scores)
    min_channels = np.broadcast_to(np.asarray(min_channels), (n_groups,))
    order = sorted(range(total), key=lambda i: (-scores[i], i))
    position = {i: p for p, i in enumerate(order)}
    target = np_keep_target(total, sparsity)
    kept = set(order[:target])

    members = {
        g: [i for i in order if group_ids[i] == g] for g in range(n_groups)
    }
    minimum = {g: min(int(min_channels[g]), len(members[g])) for g in members}
    protected = set()
    for g in range(n_groups):
        protected.update(members[g][: minimum[g]])

    for g in range(n_groups):
        for i in members[g][: minimum[g]]:
            if i in kept:
                continue
            kept.add(i)
            droppable = [j for j in kept if j not in protected]
            if droppable:
                kept.remove(max(droppable, key=position.get))

    counts = np.zeros(n_groups, dtype=np.int64)
    for i in kept:
        counts[group_ids[i]] += 1
    return counts


def _random_problem(rng, total, n_groups, ties, zeros):
    if ties:
        scores = rng.integers(0, 4, size=total).astype(np.float32)
    else:
        scores = rng.random(total).astype(np.float32)
    if zeros:
        scores[rng.random(total) < 0.3] = 0.0  # already pruned
    # Non-contiguous groups; some groups may be empty.
    group_ids = rng.integers(0, n_groups, size=total)
    return scores, group_ids


@pytest.mark.parametrize("seed", range(12))
def test_matches_greedy_reference(seed):
    rng = np.random.default_rng(seed)
    total = int(rng.integers(5, 60))
    n_groups = int(rng.integers(1, 7))
    scores, group_ids = _random_problem(
        rng, total, n_groups, ties=seed % 2 == 0, zeros=seed % 3 == 0
    )
    for sparsity in [0.0, 0.3, 0.5, 0.7, 0.95]:
        for min_channels in [0, 1, rng.integers(0, 6, size=n_groups)]:
            got = global_keep_counts(
                scores, group_ids, n_groups, sparsity, min_channels
            ).numpy()
            want = np_global_keep_counts(
                scores, group_ids, n_groups, sparsity, min_channels
            )
            np.testing.assert_array_equal(
                got, want, err_msg=f"sparsity={sparsity} min={min_channels}"
            )


@pytest.mark.parametrize("seed", range(6))
def test_total_and_minimums(seed):
    rng = np.random.default_rng(100 + seed)
    total, n_groups = 80, 5
    scores, group_ids = _random_problem(
        rng, total, n_groups, ties=True, zeros=True
    )
    sizes = np.bincount(group_ids, minlength=n_groups)
    min_channels = rng.integers(0, 25, size=n_groups)  # some exceed the size
    floor = np.minimum(min_channels, sizes)
    for sparsity in np.linspace(0.0, 0.99, 12):
        counts = global_keep_counts(
            scores, group_ids, n_groups, float(sparsity), min_channels
        ).numpy()
        target = np_keep_target(total, sparsity)
        assert np.all(counts >= floor)
        assert np.all(counts <= sizes)
        assert counts.sum() == max(target, floor.sum())


def test_without_minimums_equals_plain_global_threshold():
    rng = np.random.default_rng(7)
    scores = rng.random(50)
    group_ids = np.repeat(np.arange(5), 10)
    for sparsity in [0.1, 0.5, 0.9]:
        target = np_keep_target(50, sparsity)
        top = np.argsort(-scores, kind="stable")[:target]
        want = np.bincount(group_ids[top], minlength=5)
        got = global_keep_counts(scores, group_ids, 5, sparsity, 0).numpy()
        np.testing.assert_array_equal(got, want)


def test_ties_break_by_lower_position():
    scores = [1.0, 1.0, 1.0, 1.0]
    group_ids = [1, 0, 1, 0]
    # Keep 1 of 4: the first channel overall, which belongs to group 1.
    got = global_keep_counts(scores, group_ids, 2, 0.75, 0).numpy()
    np.testing.assert_array_equal(got, [0, 1])


def test_pruned_channels_rank_last():
    scores = [0.0, 0.0, 0.5, 0.2, 0.0, 0.3]
    group_ids = [0, 0, 0, 1, 1, 1]
    got = global_keep_counts(scores, group_ids, 2, 0.5, 0).numpy()
    np.testing.assert_array_equal(got, [1, 2])


def test_minimum_takes_from_lowest_ranked_other_group():
    # Group 2 has only bad channels; its minimum of 1 must displace the
    # lowest-ranked kept channel (0.6 in group 1), not the best one.
    scores = [0.9, 0.8, 0.7, 0.6, 0.05, 0.01]
    group_ids = [0, 0, 1, 1, 2, 2]
    got = global_keep_counts(scores, group_ids, 3, 1 / 3, [0, 0, 1]).numpy()
    np.testing.assert_array_equal(got, [2, 1, 1])


def test_minimums_above_target_keep_exactly_the_minimums():
    scores = np.linspace(1.0, 0.1, 10)
    group_ids = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    got = global_keep_counts(scores, group_ids, 3, 0.9, 2).numpy()
    np.testing.assert_array_equal(got, [2, 2, 2])


def test_empty_group_and_min_larger_than_size():
    scores = [0.5, 0.4, 0.3]
    group_ids = [0, 0, 2]
    got = global_keep_counts(scores, group_ids, 3, 0.5, [0, 4, 5]).numpy()
    np.testing.assert_array_equal(got, [1, 0, 1])


def test_keep_target_rounding():
    assert int(keep_target(10, 0.7)) == 3
    assert int(keep_target(10, 0.75)) == 3  # 2.5 rounds up
    assert int(keep_target(10, 0.0)) == 10
    assert int(keep_target(7, 0.5)) == 4  # 3.5 rounds up
    assert int(keep_target(10, 0.65)) == 4  # 3.4999999999999996 in floats
    assert int(keep_target(1000, 0.7)) == 300


def test_tensor_sparsity_under_xla_without_retracing():
    rng = np.random.default_rng(8)
    scores, group_ids = _random_problem(rng, 40, 4, ties=True, zeros=True)
    min_channels = np.array([1, 2, 0, 3])
    traces = []

    @tf.function(jit_compile=True)
    def compiled(sparsity):
        traces.append(1)
        return global_keep_counts(scores, group_ids, 4, sparsity, min_channels)

    for sparsity in [0.0, 0.25, 0.5, 0.7, 0.9]:
        got = compiled(tf.constant(sparsity)).numpy()
        want = np_global_keep_counts(
            scores, group_ids, 4, sparsity, min_channels
        )
        np.testing.assert_array_equal(got, want)
    assert len(traces) == 1


def test_large_problem_is_fast_and_consistent():
    # About the number of prunable channels in ResNet-50.
    rng = np.random.default_rng(9)
    total, n_groups = 26_000, 53
    scores = np.abs(rng.normal(size=total)).astype(np.float32)
    group_ids = np.sort(rng.integers(0, n_groups, size=total))
    counts = global_keep_counts(scores, group_ids, n_groups, 0.7, 8).numpy()
    assert counts.sum() == np_keep_target(total, 0.7)
    assert np.all(counts >= np.minimum(8, np.bincount(group_ids)))


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_rejects_sparsity_out_of_range(sparsity):
    with pytest.raises(ValueError, match="`sparsity`"):
        global_keep_counts([1.0, 2.0], [0, 0], 1, sparsity, 0)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`group_ids`"):
        global_keep_counts([1.0, 2.0], [0, 2], 2, 0.5, 0)
    with pytest.raises(ValueError, match="`group_ids`"):
        global_keep_counts([1.0, 2.0], [0], 2, 0.5, 0)
    with pytest.raises(TypeError, match="`group_ids`"):
        global_keep_counts([1.0, 2.0], [0.0, 1.0], 2, 0.5, 0)
    with pytest.raises(ValueError, match="`min_channels`"):
        global_keep_counts([1.0, 2.0], [0, 1], 2, 0.5, [1, 1, 1])
    with pytest.raises(ValueError, match="`min_channels`"):
        global_keep_counts([1.0, 2.0], [0, 1], 2, 0.5, -1)
    with pytest.raises(ValueError, match="`n_groups`"):
        global_keep_counts([1.0, 2.0], [0, 0], 0, 0.5, 0)


def test_docstring_examples():
    result = doctest.testmod(allocation)
    assert result.attempted > 0
    assert result.failed == 0
