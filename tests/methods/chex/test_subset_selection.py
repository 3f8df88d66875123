"""Tests for keras_chex.subset_selection against plain NumPy references."""

import doctest

import numpy as np
import pytest
import tensorflow as tf

from keras_chex.methods.chex import subset_selection
from keras_chex.methods.chex.subset_selection import css_keep_mask
from keras_chex.methods.chex.subset_selection import leverage_scores
from keras_chex.methods.chex.subset_selection import select_top_k

# ---------------------------------------------------------------------------
# NumPy references.
# ---------------------------------------------------------------------------


def np_select_top_k(scores, k, candidates=None):
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    if candidates is None:
        candidates = np.ones(n, dtype=bool)
    keyed = []
    for i in range(n):
        if not candidates[i]:
            continue
        s = -np.inf if np.isnan(scores[i]) else scores[i]
        keyed.append((-s, i))
    keyed.sort()
    mask = np.zeros(n, dtype=bool)
    for _, i in keyed[: max(int(k), 0)]:
        mask[i] = True
    return mask


def np_leverage_scores(matrix, k):
    matrix = np.asarray(matrix, dtype=np.float64)
    rows, cols = matrix.shape
    if rows < cols:
        return np.array([np.sum(np.abs(matrix[:, j])) for j in range(cols)])
    _, _, vh = np.linalg.svd(matrix, full_matrices=False)
    v_k = vh.T[:, : max(int(k), 0)]
    return np.array([np.dot(v_k[j], v_k[j]) for j in range(cols)])


def np_css_keep_mask(matrix, k, candidates=None):
    return np_select_top_k(np_leverage_scores(matrix, k), k, candidates)


def _count(mask):
    return int(np.sum(np.asarray(mask)))


# ---------------------------------------------------------------------------
# select_top_k
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_select_top_k_matches_reference_with_ties_and_candidates(seed):
    rng = np.random.default_rng(seed)
    n = 17
    # Integer-valued scores produce many ties.
    scores = rng.integers(0, 5, size=n).astype(np.float32)
    candidates = rng.random(n) < 0.6
    for k in [-1, 0, 1, 3, int(candidates.sum()), n, n + 3]:
        got = select_top_k(scores, k, candidates).numpy()
        want = np_select_top_k(scores, k, candidates)
        np.testing.assert_array_equal(got, want, err_msg=f"k={k}")


def test_select_top_k_breaks_ties_by_lower_index():
    scores = [1.0, 3.0, 3.0, 3.0, 0.0]
    got = select_top_k(scores, 2).numpy()
    np.testing.assert_array_equal(got, [False, True, True, False, False])


def test_select_top_k_counts_edge_k():
    scores = np.arange(6, dtype=np.float32)
    assert _count(select_top_k(scores, 0)) == 0
    assert _count(select_top_k(scores, 6)) == 6
    assert _count(select_top_k(scores, 100)) == 6
    assert _count(select_top_k(scores, -2)) == 0


def test_select_top_k_never_picks_non_candidates():
    # Non-candidates have the highest scores and k exceeds the candidates.
    scores = [9.0, 1.0, 8.0, 2.0]
    candidates = [False, True, False, True]
    got = select_top_k(scores, 3, candidates).numpy()
    np.testing.assert_array_equal(got, [False, True, False, True])


def test_select_top_k_no_candidates():
    got = select_top_k([1.0, 2.0], 2, [False, False]).numpy()
    np.testing.assert_array_equal(got, [False, False])


def test_select_top_k_nan_and_inf_rank_last():
    scores = [np.nan, -np.inf, 0.5, -1.0]
    got = select_top_k(scores, 3).numpy()
    # -1.0 beats both; NaN and -inf tie, so the lower index (NaN) wins.
    np.testing.assert_array_equal(got, [True, False, True, True])


def test_select_top_k_accepts_float_mask():
    got = select_top_k([3.0, 2.0, 1.0], 1, [0.0, 1.0, 1.0]).numpy()
    np.testing.assert_array_equal(got, [False, True, False])


def test_select_top_k_k_is_runtime_tensor_without_retracing():
    traces = []

    @tf.function
    def fn(scores, k):
        traces.append(1)
        return select_top_k(scores, k)

    scores = tf.constant([0.3, 0.1, 0.9, 0.5])
    for k in range(5):
        got = fn(scores, tf.constant(k)).numpy()
        np.testing.assert_array_equal(got, np_select_top_k(scores, k))
    assert len(traces) == 1


def test_select_top_k_rejects_bad_shapes():
    with pytest.raises(ValueError, match="scores"):
        select_top_k([[1.0, 2.0]], 1)
    with pytest.raises(ValueError, match="candidates"):
        select_top_k([1.0, 2.0], 1, [True])
    with pytest.raises(ValueError, match="`k`"):
        select_top_k([1.0, 2.0], [1, 2])
    with pytest.raises(TypeError, match="`k`"):
        select_top_k([1.0, 2.0], 1.5)


def test_descending_ranks_is_a_permutation():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=30).astype(np.float32)
    candidates = rng.random(30) < 0.5
    ranks = subset_selection.descending_ranks(scores, candidates).numpy()
    np.testing.assert_array_equal(np.sort(ranks), np.arange(30))
    # All candidates rank before all non-candidates.
    assert ranks[candidates].max() < ranks[~candidates].min()


# ---------------------------------------------------------------------------
# leverage_scores
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 5), (5, 5), (30, 3), (12, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_leverage_scores_matches_reference(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    matrix = rng.normal(size=shape).astype(dtype)
    cols = shape[1]
    atol = 1e-4 if dtype == np.float32 else 1e-10
    for k in sorted({0, 1, cols // 2, cols - 1, cols, cols + 2}):
        got = leverage_scores(matrix, k).numpy()
        want = np_leverage_scores(matrix, k)
        np.testing.assert_allclose(got, want, atol=atol, err_msg=f"k={k}")


def test_leverage_scores_sum_to_k_for_full_rank():
    rng = np.random.default_rng(3)
    matrix = rng.normal(size=(10, 6))
    for k in range(7):
        scores = leverage_scores(matrix, k).numpy()
        assert np.all(scores >= -1e-12) and np.all(scores <= 1 + 1e-12)
        np.testing.assert_allclose(scores.sum(), k, atol=1e-9)


def test_leverage_scores_fall_back_to_l1_when_rows_lt_cols():
    matrix = np.array([[1.0, -2.0, 0.0, 0.5], [-3.0, 0.0, 0.0, 0.5]])
    for k in [0, 1, 4]:
        got = leverage_scores(matrix, k).numpy()
        np.testing.assert_allclose(got, [4.0, 2.0, 0.0, 1.0])


def test_leverage_scores_zero_columns_score_zero_when_k_le_rank():
    rng = np.random.default_rng(4)
    matrix = rng.normal(size=(9, 6))
    matrix[:, [1, 4]] = 0.0  # already pruned
    scores = leverage_scores(matrix, 4).numpy()
    np.testing.assert_allclose(scores[[1, 4]], 0.0, atol=1e-12)


def test_leverage_scores_rejects_dynamic_or_wrong_rank():
    with pytest.raises(ValueError, match="matrix"):
        leverage_scores(np.ones(3), 1)

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    def fn(matrix):
        return leverage_scores(matrix, 1)

    with pytest.raises(ValueError, match="static shape"):
        fn.get_concrete_function()


# ---------------------------------------------------------------------------
# css_keep_mask
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_css_keep_mask_matches_reference(seed):
    rng = np.random.default_rng(seed)
    rows, cols = [(16, 8), (8, 8), (4, 9), (27, 12)][seed]
    matrix = rng.normal(size=(rows, cols))
    candidates = rng.random(cols) < 0.8
    for k in range(cols + 2):
        got = css_keep_mask(matrix, k).numpy()
        np.testing.assert_array_equal(got, np_css_keep_mask(matrix, k))
        got = css_keep_mask(matrix, k, candidates).numpy()
        want = np_css_keep_mask(matrix, k, candidates)
        np.testing.assert_array_equal(got, want)
        assert _count(got) == min(k, int(candidates.sum()))


def test_css_keep_mask_prefers_independent_columns_over_duplicates():
    rng = np.random.default_rng(5)
    base = rng.normal(size=(10, 3))
    # Columns 0 and 1 are the same filter (1 is 2x 0); 2 and 3 differ.
    matrix = np.stack(
        [base[:, 0], 2 * base[:, 0], base[:, 1], 0.1 * base[:, 2]], axis=1
    )
    got = css_keep_mask(matrix, 3).numpy()
    # Keeping both copies would leave one direction uncovered.
    assert not (got[0] and got[1])
    assert got[2] and got[3]


def test_css_keep_mask_with_candidates_never_keeps_pruned():
    rng = np.random.default_rng(6)
    matrix = rng.normal(size=(12, 6))
    active = np.array([True, True, False, True, False, True])
    matrix[:, ~active] = 0.0
    # k above the rank of the active columns.
    got = css_keep_mask(matrix, 5, active).numpy()
    np.testing.assert_array_equal(got, active)


def test_css_keep_mask_under_xla_matches_eager():
    rng = np.random.default_rng(7)
    matrix = tf.constant(rng.normal(size=(18, 7)), tf.float32)
    candidates = tf.constant([True, True, True, False, True, True, True])
    compiled = tf.function(css_keep_mask, jit_compile=True)
    for k in [0, 2, 5, 7]:
        k = tf.constant(k)
        got = compiled(matrix, k, candidates).numpy()
        want = css_keep_mask(matrix, k, candidates).numpy()
        np.testing.assert_array_equal(got, want)


def test_select_top_k_under_xla_keeps_tie_break():
    compiled = tf.function(select_top_k, jit_compile=True)
    scores = tf.constant([2.0, 5.0, 5.0, 2.0, 5.0, 2.0])
    candidates = tf.constant([True, True, False, True, True, True])
    for k in range(7):
        got = compiled(scores, tf.constant(k), candidates).numpy()
        want = np_select_top_k(scores.numpy(), k, candidates.numpy())
        np.testing.assert_array_equal(got, want)


def test_docstring_examples():
    result = doctest.testmod(subset_selection, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
