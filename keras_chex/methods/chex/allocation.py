"""Global width re-allocation: how many channels each group keeps.

CHEX ranks an importance score (the absolute BatchNorm gamma) of every
prunable channel of every channel group together, and a single global
threshold decides each group's width. Channels already pruned have score 0,
so they rank last. A configurable per-group minimum keeps a group from
vanishing (the reference code has none).

The computation runs inside `tf.function`, including under
`jit_compile=True`: it uses sorts and segment sums over the static number of
channels, and the sparsity may be a runtime tensor.
"""

import numbers

import numpy as np
import tensorflow as tf

from keras_chex.methods.chex import subset_selection


def _check_sparsity(sparsity):
    """Validates a Python sparsity; returns it as a float64 tensor."""
    if isinstance(sparsity, numbers.Real) and not isinstance(sparsity, bool):
        if not 0 <= sparsity < 1:
            raise ValueError(f"`sparsity` must be in [0, 1), got {sparsity}.")
    sparsity = tf.convert_to_tensor(sparsity)
    if sparsity.shape.rank not in (None, 0):
        raise ValueError(
            f"`sparsity` must be a scalar, got shape {sparsity.shape}."
        )
    # float64 so that half-way targets such as (1 - 0.75) * 10 = 2.5 are
    # computed exactly enough to round the same way every time.
    return tf.cast(sparsity, tf.float64)


def _check_group_ids(group_ids, length, n_groups):
    if not isinstance(n_groups, numbers.Integral) or n_groups < 1:
        raise ValueError(f"`n_groups` must be an int >= 1, got {n_groups!r}.")
    if isinstance(group_ids, (list, tuple, np.ndarray)):
        ids = np.asarray(group_ids)
        if ids.size and (ids.min() < 0 or ids.max() >= n_groups):
            raise ValueError(
                f"`group_ids` must be in [0, n_groups={n_groups}), got "
                f"values from {ids.min()} to {ids.max()}."
            )
    group_ids = tf.convert_to_tensor(group_ids)
    if not group_ids.dtype.is_integer:
        raise TypeError(
            f"`group_ids` must be integers, got dtype {group_ids.dtype}."
        )
    if group_ids.shape.rank != 1 or group_ids.shape[0] != length:
        raise ValueError(
            f"`group_ids` must be a 1-D tensor of length {length} (one group "
            f"index per channel), got shape {group_ids.shape}."
        )
    return tf.cast(group_ids, tf.int32)


def _check_min_channels(min_channels, n_groups):
    if isinstance(min_channels, (numbers.Integral, list, tuple, np.ndarray)):
        values = np.asarray(min_channels)
        if values.size and values.min() < 0:
            raise ValueError(
                f"`min_channels` must be >= 0, got {min_channels!r}."
            )
    min_channels = tf.cast(tf.convert_to_tensor(min_channels), tf.int32)
    if min_channels.shape.rank == 0:
        return tf.fill([n_groups], min_channels)
    if min_channels.shape.rank != 1 or min_channels.shape[0] != n_groups:
        raise ValueError(
            f"`min_channels` must be a scalar or have one entry per group "
            f"(length {n_groups}), got shape {min_channels.shape}."
        )
    return min_channels


def keep_target(total, sparsity):
    """Number of channels kept at `sparsity`: `round((1 - sparsity) * total)`.

    Rounds half up, in float64.

    Args:
        total: Number of prunable channels, a Python int.
        sparsity: Fraction of channels removed, in `[0, 1)`: a Python float
            or a scalar tensor.

    Returns:
        A scalar int32 tensor.

    Example:

    >>> int(keep_target(10, 0.75))
    3
    """
    sparsity = _check_sparsity(sparsity)
    sparsity = tf.clip_by_value(sparsity, 0.0, 1.0)
    kept = (1.0 - sparsity) * float(total)
    # The small epsilon absorbs float error just below a half, such as
    # (1 - 0.65) * 10 = 3.4999999999999996, which should round to 4.
    return tf.cast(tf.floor(kept + 0.5 + 1e-9), tf.int32)


def global_keep_counts(scores, group_ids, n_groups, sparsity, min_channels):
    """Per-group keep counts from one global ranking of all channels.

    The channels are ranked by score (highest first, lower position in
    `scores` first among ties). Without minimums, the top
    `round((1 - sparsity) * total)` channels are kept and each group keeps
    however many of them it owns. With minimums, group `g` always keeps its
    best `min(min_channels[g], size[g])` channels; the remaining budget goes
    to the best of all other channels. This is the same as starting from the
    unconstrained choice and, for every channel a group needs to reach its
    minimum, dropping the lowest-ranked kept channel that no minimum
    protects. The total then still equals the target unless the minimums
    alone exceed it, in which case every group keeps exactly its minimum.

    Args:
        scores: 1-D float tensor over all prunable channels of all groups
            concatenated (static length). Already-pruned channels should
            score 0 so that they rank last.
        group_ids: 1-D int tensor of the same length: the group of each
            channel, in `[0, n_groups)` (checked only for Python/NumPy
            input). Channels of one group need not be contiguous.
        n_groups: Number of groups, a Python int `>= 1`. Groups without
            channels get 0.
        sparsity: Fraction of channels to remove, in `[0, 1)`: a Python
            float (validated) or a scalar tensor (clipped to `[0, 1]`).
        min_channels: Minimum channels per group: an int or one int per
            group (Python, NumPy or tensor), `>= 0`.

    Returns:
        An int32 tensor of shape `(n_groups,)`.

    Raises:
        ValueError: If a Python argument is out of range or a shape does not
            match.

    Example:

    >>> scores = [0.9, 0.8, 0.7, 0.1, 0.2, 0.05]
    >>> group_ids = [0, 0, 0, 1, 1, 2]
    >>> global_keep_counts(scores, group_ids, 3, 0.5, 0).numpy().tolist()
    [3, 0, 0]
    >>> global_keep_counts(scores, group_ids, 3, 0.5, 1).numpy().tolist()
    [1, 1, 1]
    >>> counts = global_keep_counts(scores, group_ids, 3, 0.5, [0, 1, 0])
    >>> counts.numpy().tolist()
    [2, 1, 0]
    """
    scores = subset_selection._static_vector(scores, "scores")
    total = scores.shape[0]
    group_ids = _check_group_ids(group_ids, total, n_groups)
    min_channels = _check_min_channels(min_channels, n_groups)
    target = keep_target(total, sparsity)

    ones = tf.ones([total], tf.int32)
    sizes = tf.math.unsorted_segment_sum(ones, group_ids, n_groups)
    minimums = tf.minimum(tf.maximum(min_channels, 0), sizes)

    # Sort by group, stably, on top of the global order: the position of a
    # channel inside its group's run is its rank within the group.
    global_order = tf.math.invert_permutation(
        subset_selection.descending_ranks(scores)
    )
    ids_in_order = tf.gather(group_ids, global_order)
    by_group = tf.argsort(ids_in_order, stable=True)
    group_starts = tf.cumsum(sizes, exclusive=True)
    position = tf.math.invert_permutation(by_group)
    rank_in_group = position - tf.gather(group_starts, ids_in_order)
    # Everything below is in global order.
    protected = rank_in_group < tf.gather(minimums, ids_in_order)

    budget = tf.maximum(target - tf.reduce_sum(minimums), 0)
    free = tf.logical_not(protected)
    free_rank = tf.cumsum(tf.cast(free, tf.int32), exclusive=True)
    chosen = tf.logical_and(free, free_rank < budget)
    kept = tf.cast(tf.logical_or(protected, chosen), tf.int32)
    return tf.math.unsorted_segment_sum(kept, ids_in_order, n_groups)


def sparsity_for_budget(mask_at, cost_fn, budget):
    """The smallest global sparsity whose allocation costs at most `budget`.

    Bisection in a graph loop, not a Python one: 40 unrolled copies of the
    sorts made tracing take ~15 s even on a tiny ResNet.

    Args:
        mask_at: function of a float64 sparsity tensor giving the float mask
            that CHEX's ranking keeps there.
        cost_fn: function of a mask giving its cost (a tensor).
        budget: the cost allowed, a Python float.

    Returns:
        A float64 scalar tensor in `[0, 1)`.
    """
    def bisect(lo, hi):
        mid = (lo + hi) / 2
        fits = cost_fn(mask_at(mid)) <= budget
        return tf.where(fits, lo, mid), tf.where(fits, mid, hi)

    start = (tf.constant(0.0, tf.float64), tf.constant(1.0 - 1e-9, tf.float64))
    _, hi = tf.while_loop(lambda lo, hi: True, bisect, start,
                          maximum_iterations=40)
    return hi
