"""Column subset selection (CSS) by leverage scores: the CHEX pruning step.

CHEX prunes inside one layer by keeping the filters that best span the
layer's filter space. The kernel is reshaped to a matrix whose columns are the
output filters (rows = kernel height * kernel width * input channels), and a
filter's importance is its leverage score: the squared norm of its row in
`V_k`, the top-`k` right singular vectors. The `k` filters with the highest
leverage scores are kept.

Every function here runs inside `tf.function`, including under
`jit_compile=True`: shapes are static and the number of channels to keep is a
runtime scalar tensor that is only ever compared against, never used as a
shape.
"""

import numpy as np
import tensorflow as tf


def _as_float_tensor(value, name):
    """Converts `value` to a float32 or float64 tensor."""
    value = tf.convert_to_tensor(value)
    if value.dtype not in (tf.float32, tf.float64):
        if not (value.dtype.is_floating or value.dtype.is_integer):
            raise TypeError(
                f"`{name}` must be a real-valued tensor, "
                f"got dtype {value.dtype}."
            )
        # SVD and sorting kernels exist for float32/float64 only.
        value = tf.cast(value, tf.float32)
    return value


def _static_matrix(matrix, name="matrix"):
    """Converts `matrix` to a float tensor with a static 2-D shape."""
    matrix = _as_float_tensor(matrix, name)
    shape = matrix.shape
    if shape.rank != 2 or not shape.is_fully_defined():
        raise ValueError(
            f"`{name}` must be a 2-D tensor with a static shape "
            f"(rows, columns), got shape {shape}."
        )
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"`{name}` must not be empty, got shape {shape}.")
    return matrix


def _static_vector(vector, name):
    """Converts `vector` to a float tensor with a static 1-D shape."""
    vector = _as_float_tensor(vector, name)
    shape = vector.shape
    if shape.rank != 1 or not shape.is_fully_defined():
        raise ValueError(
            f"`{name}` must be a 1-D tensor with a static length, "
            f"got shape {shape}."
        )
    return vector


def _bool_mask(mask, length, name):
    """Converts `mask` to a bool vector of static length `length`."""
    if mask is None:
        return tf.ones([length], dtype=tf.bool)
    mask = tf.convert_to_tensor(mask)
    if mask.dtype != tf.bool:
        # Accept 0/1 float or int masks, as stored in Keras variables.
        mask = tf.not_equal(mask, tf.zeros([], dtype=mask.dtype))
    if mask.shape.rank != 1 or mask.shape[0] != length:
        raise ValueError(
            f"`{name}` must be a 1-D mask of length {length}, "
            f"got shape {mask.shape}."
        )
    return mask


def _count(k, name):
    """Converts a channel count (Python int or scalar tensor) to int32."""
    k = tf.convert_to_tensor(k)
    if k.shape.rank not in (None, 0):
        raise ValueError(f"`{name}` must be a scalar, got shape {k.shape}.")
    if not k.dtype.is_integer:
        # A float count would be truncated silently; make the caller round.
        raise TypeError(f"`{name}` must be an integer, got dtype {k.dtype}.")
    return tf.cast(k, tf.int32)


def descending_ranks(scores, candidates=None):
    """Ranks of every entry when sorted by candidacy, then score, then index.

    Candidates come first (highest score first, lower index first among equal
    scores), then every non-candidate in the same order. NaN scores rank below
    every other score, like `-inf`. The ranks are a permutation of
    `0 .. len(scores) - 1`, so `ranks < k` selects exactly `k` entries for any
    `0 <= k <= len(scores)`.

    Args:
        scores: 1-D float tensor with a static length.
        candidates: Optional bool mask of the same length. Defaults to all
            entries.

    Returns:
        An int32 tensor of the same length as `scores`.

    Example:

    >>> ranks = descending_ranks([0.5, 2.0, 0.5, 1.0],
    ...                          candidates=[True, True, True, False])
    >>> ranks.numpy().tolist()
    [1, 0, 2, 3]
    """
    scores = _static_vector(scores, "scores")
    candidates = _bool_mask(candidates, scores.shape[0], "candidates")
    scores = tf.where(
        tf.math.is_nan(scores), tf.constant(-np.inf, scores.dtype), scores
    )
    # Two stable sorts make a lexicographic sort: by score first, then by the
    # candidate flag, so that ties on either key fall back to the index.
    # Stable descending argsort keeps the lower index first among equals.
    by_score = tf.argsort(scores, direction="DESCENDING", stable=True)
    flags = tf.gather(tf.cast(candidates, tf.int32), by_score)
    by_flag = tf.argsort(flags, direction="DESCENDING", stable=True)
    order = tf.gather(by_score, by_flag)
    return tf.math.invert_permutation(order)


def select_top_k(scores, k, candidates=None):
    """Mask of the `k` highest scores among the candidates.

    Ties are broken by the lower index, so the result is deterministic. NaN
    scores count as the lowest possible score. `k` is clipped to
    `[0, number of candidates]`, so the mask has exactly
    `min(max(k, 0), number of candidates)` True entries.

    Args:
        scores: 1-D float tensor with a static length.
        k: Number of entries to select: a Python int or a scalar integer
            tensor (it may change from call to call without retracing).
        candidates: Optional bool mask of the same length as `scores`; only
            these entries may be selected. Defaults to all entries.

    Returns:
        A bool tensor of the same length as `scores`.

    Example:

    >>> select_top_k([0.1, 0.9, 0.5, 0.9], 2).numpy().tolist()
    [False, True, False, True]
    >>> select_top_k([0.1, 0.9, 0.5, 0.9], 2,
    ...              candidates=[True, False, True, True]).numpy().tolist()
    [False, False, True, True]
    """
    scores = _static_vector(scores, "scores")
    candidates = _bool_mask(candidates, scores.shape[0], "candidates")
    k = _count(k, "k")
    ranks = descending_ranks(scores, candidates)
    return tf.logical_and(ranks < k, candidates)


def leverage_scores(matrix, k):
    """Leverage score of every column with respect to the top-`k` subspace.

    For a matrix `A = U S V^T` (thin SVD, singular values in decreasing
    order), the leverage score of column `j` is `sum_{i < k} V[j, i] ** 2`,
    the squared norm of row `j` of `V_k`. Scores lie in `[0, 1]` and sum to
    `min(k, number of columns)`. Instead of slicing `V[:, :k]`, which would
    need a static `k`, the columns of `V` are masked by `range(cols) < k`.

    When the matrix has fewer rows than columns (a layer with more filters
    than weights per filter), its rank is at most `rows`, so `V_k` is not
    defined for `k > rows`. Like the CHEX reference code, the score then falls
    back to the L1 norm of each column and `k` is ignored. Note that these
    scores are then not in `[0, 1]`; only their order matters.

    Args:
        matrix: 2-D float tensor `(rows, cols)` with a static shape; column
            `j` is filter `j`.
        k: Number of singular vectors: a Python int or a scalar integer
            tensor. Values above `cols` behave like `cols`.

    Returns:
        A float tensor of length `cols`.

    Example:

    >>> a = [[1.0, 0.0, 1.0],
    ...      [0.0, 1.0, 0.0],
    ...      [0.0, 0.0, 0.0]]
    >>> [round(s, 3) for s in leverage_scores(a, 1).numpy().tolist()]
    [0.5, 0.0, 0.5]
    """
    matrix = _static_matrix(matrix)
    rows, cols = matrix.shape
    k = _count(k, "k")
    if rows < cols:
        return tf.reduce_sum(tf.abs(matrix), axis=0)
    # Thin SVD: v has shape (cols, cols) because rows >= cols.
    _, _, v = tf.linalg.svd(matrix, full_matrices=False)
    in_top_k = tf.cast(tf.range(cols) < k, matrix.dtype)
    return tf.reduce_sum(tf.square(v) * in_top_k[tf.newaxis, :], axis=1)


def css_keep_mask(matrix, k, candidates=None):
    """Channels that CHEX's column subset selection keeps.

    Computes `leverage_scores(matrix, k)` and keeps the `k` highest-scoring
    columns among `candidates` (lower index first among ties).

    Passing the channels that are currently active as `candidates` guarantees
    that an already-pruned channel is never kept by this step, even when `k`
    exceeds the rank of the active columns (the extra singular vectors then
    span the null space and may give zero columns a non-zero score).

    Args:
        matrix: 2-D float tensor `(rows, cols)` with a static shape; column
            `j` is filter `j`.
        k: Number of channels to keep: a Python int or a scalar integer
            tensor.
        candidates: Optional bool mask of length `cols`; only these channels
            may be kept. Defaults to all channels.

    Returns:
        A bool tensor of length `cols` with exactly
        `min(max(k, 0), number of candidates)` True entries.

    Example:

    >>> a = [[1.0, 1.0, 0.0, 0.0],
    ...      [0.0, 0.0, 3.0, 0.0],
    ...      [0.0, 0.0, 0.0, 0.1],
    ...      [0.0, 0.0, 0.0, 0.0]]
    >>> css_keep_mask(a, 3).numpy().tolist()
    [True, False, True, True]

    Column 1 duplicates column 0, so it adds nothing to the span and loses to
    the small but independent column 3.
    """
    matrix = _static_matrix(matrix)
    scores = leverage_scores(matrix, k)
    return select_top_k(scores, k, candidates)
