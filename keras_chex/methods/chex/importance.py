"""CHEX's channel importance: |BatchNorm gamma|, filter norms where none."""

import numpy as np
import tensorflow as tf


def channel_scores(backups, mask, matrices, group_sizes, pruned="zero"):
    """Per-channel importance (by default 0 where pruned).

    A channel scaled by BatchNorms scores its |gamma|; a coupled group (a
    residual stream) feeds several BatchNorms, and a channel that any of
    them scales up is needed there, so it scores the largest. The mean
    dilutes it by the number of blocks sharing the stream (and lost
    accuracy at 25% of the MACs; the sum was even with the max). A "fair"
    score (a stream's mean level, one BatchNorm's spread) cut ResNet-56's
    last stream to 4-9 of 64 channels and lost 8.8 points at 25% of the
    MACs: see docs/benchmarks.md, "CHEX quality". Groups without a
    BatchNorm score their filter norms, scaled so that their mean matches
    the mean active |gamma| and they rank fairly against it.

    Args:
        backups: the state's `WeightBackups` (gammas are read from the
            stored copies, refreshed just before).
        mask: float tensor over all channels, 1 = active.
        matrices: per group, its filter matrix (`filter_matrix`).
        group_sizes: int array, channels per group.
        pruned: "zero" (the paper's: a pruned channel ranks after every
            active one, so a layer never widens on merit) or "last" (a
            pruned channel competes with the importance it had when it was
            last used, kept in the backups).

    Returns:
        A float32 tensor over all channels.
    """
    n = int(np.sum(group_sizes))
    has_bn = np.zeros(n, bool)
    gamma = tf.zeros([n])
    for i, classes in backups.gammas:
        sel = np.flatnonzero(classes >= 0)
        has_bn[classes[sel]] = True
        g = tf.abs(tf.gather(tf.cast(backups.copies[i], tf.float32), sel))
        gamma = tf.tensor_scatter_nd_max(gamma, classes[sel][:, None], g)
    bn_mean = tf.math.divide_no_nan(
        tf.reduce_sum(tf.where(has_bn, gamma * mask, 0.0)),
        tf.reduce_sum(tf.where(has_bn, mask, 0.0)),
    )
    bn_mean = tf.where(bn_mean > 0, bn_mean, 1.0)
    norms = []
    start = 0
    for size, w in zip(group_sizes, matrices):
        norm = tf.norm(w, axis=0)
        active = mask[start:start + size]
        start += size
        mean = tf.math.divide_no_nan(tf.reduce_sum(norm * active),
                                     tf.reduce_sum(active))
        norms.append(tf.math.divide_no_nan(norm, mean) * bn_mean)
    fallback = tf.concat(norms, 0) if norms else tf.zeros([n])
    scores = tf.where(has_bn, gamma, fallback)
    return scores * mask if pruned == "zero" else scores
