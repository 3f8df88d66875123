"""Tests for keras_chex.regrowth against plain NumPy references."""

import doctest
import itertools

import numpy as np
import pytest
import tensorflow as tf

from keras_chex.methods.chex import regrowth
from keras_chex.methods.chex.regrowth import projection_residuals
from keras_chex.methods.chex.regrowth import sample_without_replacement

# ---------------------------------------------------------------------------
# NumPy reference: the formula from the paper, literally.
# ---------------------------------------------------------------------------


def np_projection_residuals(matrix, kept):
    matrix = np.asarray(matrix, dtype=np.float64)
    kept = np.asarray(kept, dtype=bool)
    b = matrix[:, kept]
    residuals = []
    for j in range(matrix.shape[1]):
        w = matrix[:, j]
        if b.shape[1] == 0:
            residuals.append(np.linalg.norm(w))
            continue
        gram_pinv = np.linalg.pinv(b.T @ b, rtol=1e-10, hermitian=True)
        projected = b @ (gram_pinv @ (b.T @ w))
        residuals.append(np.linalg.norm(w - projected))
    return np.array(residuals)


def _softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


# ---------------------------------------------------------------------------
# projection_residuals
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12, 6), (6, 6), (4, 9), (27, 16)])
@pytest.mark.parametrize("seed", range(3))
def test_projection_residuals_matches_reference(shape, seed):
    rng = np.random.default_rng(seed)
    matrix = rng.normal(size=shape)
    kept = rng.random(shape[1]) < 0.4
    got = projection_residuals(matrix, kept).numpy()
    # The reference goes through B^T B, which squares the condition number,
    # so it is itself only accurate to ~1e-9 here.
    np.testing.assert_allclose(
        got, np_projection_residuals(matrix, kept), atol=1e-7
    )


def test_projection_residuals_float32_matches_reference():
    rng = np.random.default_rng(10)
    matrix = rng.normal(size=(36, 10)).astype(np.float32)
    kept = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 0], dtype=bool)
    got = projection_residuals(matrix, kept).numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(
        got, np_projection_residuals(matrix, kept), atol=1e-4
    )


def test_projection_residuals_nothing_kept_gives_column_norms():
    rng = np.random.default_rng(11)
    matrix = rng.normal(size=(7, 5))
    got = projection_residuals(matrix, np.zeros(5, dtype=bool)).numpy()
    np.testing.assert_allclose(got, np.linalg.norm(matrix, axis=0), rtol=1e-12)


def test_projection_residuals_all_kept_full_rank_is_zero():
    rng = np.random.default_rng(12)
    matrix = rng.normal(size=(9, 5))
    got = projection_residuals(matrix, np.ones(5, dtype=bool)).numpy()
    np.testing.assert_allclose(got, 0.0, atol=1e-12)


def test_projection_residuals_rows_lt_cols_span_everything():
    rng = np.random.default_rng(13)
    matrix = rng.normal(size=(3, 8))
    kept = np.array([1, 1, 1, 0, 0, 0, 0, 0], dtype=bool)
    got = projection_residuals(matrix, kept).numpy()
    # Three generic vectors in R^3 span the whole space.
    np.testing.assert_allclose(got, 0.0, atol=1e-12)


def test_projection_residuals_rank_deficient_basis():
    rng = np.random.default_rng(14)
    a, b, c = rng.normal(size=(3, 10))
    # Kept: a, 3a (duplicate direction), a + b. Not kept: b, c, 2a - b.
    matrix = np.stack([a, 3 * a, a + b, b, c, 2 * a - b], axis=1)
    kept = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    got = projection_residuals(matrix, kept).numpy()
    want = np_projection_residuals(matrix, kept)
    np.testing.assert_allclose(got, want, atol=1e-7)
    # Everything in span(a, b) has zero residual; c does not.
    np.testing.assert_allclose(got[[0, 1, 2, 3, 5]], 0.0, atol=1e-9)
    assert got[4] > 0.1


def test_projection_residuals_zero_matrix():
    got = projection_residuals(np.zeros((4, 3)), [True, False, True]).numpy()
    np.testing.assert_array_equal(got, [0.0, 0.0, 0.0])


def test_projection_residuals_kept_columns_are_zero():
    rng = np.random.default_rng(15)
    matrix = rng.normal(size=(20, 10))
    kept = rng.random(10) < 0.5
    got = projection_residuals(matrix, kept).numpy()
    np.testing.assert_allclose(got[kept], 0.0, atol=1e-10)
    assert np.all(got[~kept] > 1e-3)


def test_projection_residuals_under_xla_matches_eager():
    rng = np.random.default_rng(16)
    matrix = tf.constant(rng.normal(size=(24, 8)), tf.float32)
    compiled = tf.function(projection_residuals, jit_compile=True)
    for kept in [[0] * 8, [1, 0, 1, 0, 1, 0, 1, 0], [1] * 8]:
        kept = tf.constant(np.array(kept, dtype=bool))
        np.testing.assert_allclose(
            compiled(matrix, kept).numpy(),
            np_projection_residuals(matrix.numpy(), kept.numpy()),
            atol=1e-4,
        )


def test_projection_residuals_rejects_bad_mask():
    with pytest.raises(ValueError, match="kept"):
        projection_residuals(np.ones((3, 4)), [True, False])


# ---------------------------------------------------------------------------
# sample_without_replacement
# ---------------------------------------------------------------------------


def test_sample_exact_count_and_only_candidates():
    rng = tf.random.Generator.from_seed(1)
    data_rng = np.random.default_rng(1)
    for _ in range(20):
        logits = data_rng.normal(size=11).astype(np.float32)
        candidates = data_rng.random(11) < 0.5
        n_candidates = int(candidates.sum())
        for n in [-1, 0, 1, 3, n_candidates, 11, 20]:
            mask = sample_without_replacement(logits, n, candidates, rng)
            mask = mask.numpy()
            assert mask.sum() == min(max(n, 0), n_candidates)
            assert not np.any(mask & ~candidates)


def test_sample_ignores_non_candidate_logits_even_if_nan_or_huge():
    rng = tf.random.Generator.from_seed(2)
    logits = [np.nan, 100.0, 0.0, -np.inf, 0.0]
    candidates = [False, False, True, False, True]
    for _ in range(10):
        mask = sample_without_replacement(logits, 2, candidates, rng).numpy()
        np.testing.assert_array_equal(mask, [False, False, True, False, True])


def test_sample_is_deterministic_for_a_fixed_generator_state():
    logits = np.linspace(-1.0, 1.0, 16).astype(np.float32)
    candidates = np.arange(16) % 3 != 0
    first = tf.random.Generator.from_seed(42)
    second = tf.random.Generator.from_seed(42)
    for _ in range(5):
        a = sample_without_replacement(logits, 4, candidates, first).numpy()
        b = sample_without_replacement(logits, 4, candidates, second).numpy()
        np.testing.assert_array_equal(a, b)
    # Restoring a saved state replays the same draw.
    saved = first.state.numpy()
    a = sample_without_replacement(logits, 4, candidates, first).numpy()
    first.reset(saved)
    b = sample_without_replacement(logits, 4, candidates, first).numpy()
    np.testing.assert_array_equal(a, b)


def test_sample_advances_state_independently_of_n():
    logits = np.zeros(8, dtype=np.float32)
    small = tf.random.Generator.from_seed(3)
    large = tf.random.Generator.from_seed(3)
    sample_without_replacement(logits, 1, None, small)
    sample_without_replacement(logits, 6, None, large)
    np.testing.assert_array_equal(small.state.numpy(), large.state.numpy())


def test_sample_different_states_give_different_draws():
    logits = np.zeros(40, dtype=np.float32)
    rng = tf.random.Generator.from_seed(4)
    draws = {
        tuple(sample_without_replacement(logits, 5, None, rng).numpy())
        for _ in range(5)
    }
    # 5 draws of 5 out of 40 uniformly: a repeat is astronomically unlikely.
    assert len(draws) == 5


def test_sample_minus_inf_candidate_only_when_needed():
    rng = tf.random.Generator.from_seed(5)
    logits = [0.0, -np.inf, 3.0, -1.0]
    for _ in range(20):
        mask = sample_without_replacement(logits, 3, None, rng).numpy()
        np.testing.assert_array_equal(mask, [True, False, True, True])
    mask = sample_without_replacement(logits, 4, None, rng).numpy()
    assert mask.all()


def _draw_many(logits, candidates, n, draws, seed):
    """Runs `draws` samples in one graph loop; returns a (draws, len) array."""
    rng = tf.random.Generator.from_seed(seed)
    logits = tf.constant(logits, tf.float32)
    candidates = tf.constant(candidates)

    @tf.function
    def loop():
        out = tf.TensorArray(tf.bool, size=draws)
        for i in tf.range(draws):
            out = out.write(
                i, sample_without_replacement(logits, n, candidates, rng)
            )
        return out.stack()

    return loop().numpy()


def test_sample_first_choice_frequency_matches_softmax():
    # Two non-candidates with large logits must not disturb the distribution.
    logits = np.array([5.0, 1.0, 0.0, 5.0, -0.5], dtype=np.float32)
    candidates = np.array([False, True, True, False, True])
    draws = 4000
    masks = _draw_many(logits, candidates, 1, draws, seed=7)
    assert np.all(masks.sum(axis=1) == 1)
    frequency = masks.mean(axis=0)
    expected = np.zeros(5)
    expected[candidates] = _softmax(logits[candidates])
    # Binomial standard deviation is at most 0.008 here; allow ~5 sigma.
    np.testing.assert_allclose(frequency, expected, atol=0.04)


def test_sample_pairs_match_sequential_sampling_without_replacement():
    # P({i, j}) = p_i p_j / (1 - p_i) + p_j p_i / (1 - p_j) for sequential
    # draws without replacement; sampling with replacement, or sampling
    # proportional to p without renormalising, gives different numbers.
    logits = np.array([2.0, 0.5, 0.0], dtype=np.float32)
    p = _softmax(logits.astype(np.float64))
    draws = 4000
    masks = _draw_many(logits, np.ones(3, dtype=bool), 2, draws, seed=8)
    assert np.all(masks.sum(axis=1) == 2)
    for i, j in itertools.combinations(range(3), 2):
        expected = p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j])
        observed = np.mean(masks[:, i] & masks[:, j])
        assert abs(observed - expected) < 0.04, (i, j, observed, expected)


def test_sample_under_xla():
    rng = tf.random.Generator.from_seed(9)
    logits = tf.constant(np.linspace(0.0, 2.0, 12), tf.float32)
    candidates = tf.constant(np.arange(12) % 2 == 0)

    @tf.function(jit_compile=True)
    def compiled(n):
        return sample_without_replacement(logits, n, candidates, rng)

    for n in [0, 2, 6, 9]:
        mask = compiled(tf.constant(n)).numpy()
        assert mask.sum() == min(n, 6)
        assert not np.any(mask & ~candidates.numpy())


def test_sample_rejects_non_generator():
    with pytest.raises(TypeError, match="rng"):
        sample_without_replacement([0.0, 1.0], 1, None, rng=0)


def test_docstring_examples():
    result = doctest.testmod(regrowth)
    assert result.attempted > 0
    assert result.failed == 0
