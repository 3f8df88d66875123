"""Regrowth by importance sampling: the CHEX regrowth step.

After pruning, CHEX brings back some pruned channels. A pruned filter `w_j` is
more likely to come back the less it is explained by the kept filters `B`:
its importance is the residual of its orthogonal projection onto `span(B)`,
`e_j = || w_j - B (B^T B)^+ B^T w_j ||`, and channels are drawn without
replacement with probabilities `softmax(e)`.

Both functions run inside `tf.function`, including under `jit_compile=True`:
shapes are static and the number of channels to regrow is a runtime scalar
tensor.
"""

import numpy as np
import tensorflow as tf

from keras_chex.methods.chex import subset_selection


def projection_residuals(matrix, kept):
    """Distance of every column from the span of the kept columns.

    For each column `w_j` of `matrix`, returns
    `|| w_j - B (B^T B)^+ B^T w_j ||_2`, where `B` holds the kept columns.

    `B (B^T B)^+ B^T` is the orthogonal projector onto `span(B)`. Forming
    `B^T B` squares the condition number, so it is not computed. Instead,
    the non-kept columns of `matrix` are zeroed (which leaves the span, and so
    the projector, unchanged, and keeps the shape static), and the projector
    is built from the thin SVD `B = U S V^T` as `U_r U_r^T`, where `U_r` are
    the left singular vectors whose singular value exceeds
    `max(rows, cols) * eps * max(S)` (the rank tolerance of
    `numpy.linalg.matrix_rank`). This handles a rank-deficient `B` and an
    empty `B`: with nothing kept every singular value is 0, no vector passes
    and the residual is `||w_j||`. TF's QR is not rank-revealing (no column
    pivoting) and its least-squares solver goes through the normal
    equations, so neither is used.

    Kept columns get a residual of (numerically) zero.

    Args:
        matrix: 2-D float tensor `(rows, cols)` with a static shape; column
            `j` is filter `j`.
        kept: Bool mask of length `cols` (0/1 numbers are accepted too): the
            columns that span the subspace.

    Returns:
        A float tensor of length `cols` (the dtype of `matrix`, or float32
        for non-float inputs).

    Example:

    >>> w = [[1.0, 0.0, 3.0],
    ...      [0.0, 1.0, 4.0]]
    >>> e = projection_residuals(w, [True, False, False])
    >>> [round(x, 4) for x in e.numpy().tolist()]
    [0.0, 1.0, 4.0]
    >>> e = projection_residuals(w, [False, False, False])
    >>> [round(x, 4) for x in e.numpy().tolist()]
    [1.0, 1.0, 5.0]
    """
    matrix = subset_selection._static_matrix(matrix)
    rows, cols = matrix.shape
    kept = subset_selection._bool_mask(kept, cols, "kept")
    basis = matrix * tf.cast(kept, matrix.dtype)[tf.newaxis, :]
    singular_values, u, _ = tf.linalg.svd(basis, full_matrices=False)
    eps = np.finfo(matrix.dtype.as_numpy_dtype).eps
    tolerance = max(rows, cols) * eps * tf.reduce_max(singular_values)
    in_span = tf.cast(singular_values > tolerance, matrix.dtype)
    u = u * in_span[tf.newaxis, :]
    # Subtracting the projection (rather than using ||w||^2 - ||U^T w||^2)
    # avoids cancellation for columns that lie almost inside the span.
    residual = matrix - tf.matmul(u, tf.matmul(u, matrix, transpose_a=True))
    return tf.norm(residual, axis=0)


def sample_without_replacement(logits, n, candidates, rng):
    """Draws `n` distinct candidates with probabilities `softmax(logits)`.

    Uses the Gumbel-top-k trick: add independent standard Gumbel noise to the
    logits and keep the `n` largest. This has exactly the distribution of
    drawing one index from `softmax(logits)` restricted to the candidates,
    removing it, renormalising, and repeating `n` times.

    The generator always draws one uniform number per entry, whatever `n` and
    `candidates` are, so its state advances by the same amount on every call
    and a run is reproducible from a checkpointed generator state.

    Args:
        logits: 1-D float tensor with a static length. Entries outside
            `candidates` are ignored (they may be `-inf` or NaN). A candidate
            with logit `-inf` has probability 0 and is chosen only when fewer
            than `n` candidates have a finite logit.
        n: Number of entries to draw: a Python int or a scalar integer
            tensor. Clipped to `[0, number of candidates]`.
        candidates: Bool mask of the same length as `logits`, or None for
            all entries.
        rng: A `tf.random.Generator` (its state is advanced), or a stateless
            seed: an int tensor of shape `(2,)` for
            `tf.random.stateless_uniform` (the draw then depends only on the
            seed, which makes resumed training repeat itself exactly).

    Returns:
        A bool mask of the same length as `logits` with exactly
        `min(max(n, 0), number of candidates)` True entries, all among the
        candidates.

    Example:

    >>> rng = tf.random.Generator.from_seed(0)
    >>> mask = sample_without_replacement(
    ...     [0.0, 0.0, 5.0, 0.0], 2, [True, True, True, False], rng)
    >>> int(tf.reduce_sum(tf.cast(mask, tf.int32)))
    2
    >>> bool(mask[3])
    False
    """
    logits = subset_selection._static_vector(logits, "logits")
    length = logits.shape[0]
    candidates = subset_selection._bool_mask(candidates, length, "candidates")
    # The smallest positive float keeps log(u) finite, so no candidate gets
    # -inf noise and loses its chance by a rounding accident.
    tiny = np.finfo(logits.dtype.as_numpy_dtype).tiny
    if isinstance(rng, tf.random.Generator):
        uniform = rng.uniform([length], minval=tiny, maxval=1.0,
                              dtype=logits.dtype)
    elif tf.is_tensor(rng) or isinstance(rng, (np.ndarray, list, tuple)):
        seed = tf.convert_to_tensor(rng)
        if seed.shape != (2,) or not seed.dtype.is_integer:
            raise TypeError("A stateless `rng` seed must be 2 integers, got "
                            f"shape {seed.shape} of {seed.dtype.name}.")
        uniform = tf.random.stateless_uniform(
            [length], seed, minval=tiny, maxval=1.0, dtype=logits.dtype
        )
    else:
        raise TypeError(
            "`rng` must be a tf.random.Generator or a stateless seed of 2 "
            f"integers, got {type(rng).__name__}."
        )
    gumbel = -tf.math.log(-tf.math.log(uniform))
    return subset_selection.select_top_k(logits + gumbel, n, candidates)
