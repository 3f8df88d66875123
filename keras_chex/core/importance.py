"""Channel importance from weights: first-order Taylor, or magnitude.

A channel's Taylor importance is `|sum(-W * g)|` over the weights that
write it, summed over all layers of its group: the producers' filters and
every per-channel parameter on the way (BatchNorm gamma and beta, biases,
PReLU slopes). That sum is the first-order change of the loss if the
channel were removed (for a BatchNorm channel, `gamma * dgamma + beta *
dbeta` equals `sum(y * dL/dy)` over its output `y`). The consumers' input
slices are left out on purpose: SMCP's straight-through masks zero a pruned
channel's activation, so its consumers' weights get no gradient from it,
and counting them would favour channels that are already kept.

The per-step value (its absolute value) is accumulated inside the compiled
train step (SMCP); `magnitude` is `sum |W|` over the same weights, read
when the masks are recomputed. Restricted to the producers' filters,
`magnitude` is the L1-norm criterion of Li et al. (2017), the baseline the
relevance method is compared with.
"""

import numpy as np
import tensorflow as tf

_PER_CHANNEL = ("gamma", "beta", "bias", "alpha")


def owned_slices(analysis):
    """The `WeightSlice`s whose entries are written by their channel."""
    return [s for s in analysis.weight_slices
            if s.filters or s.name in _PER_CHANNEL]


class ImportancePlan:
    """Which entries of which variables score which channel.

    Args:
        analysis: the wrapped model's `ModelAnalysis`.
        filters_only: score by the producers' filters alone (no BatchNorm
            or bias entries), as L1-norm filter pruning does.

    Attributes:
        num_channels: length of the importance vector.
    """

    def __init__(self, analysis, filters_only=False):
        self.num_channels = analysis.num_channels
        self._parts = {}  # id(variable) -> (variable, [(axis, classes)])
        slices = ([s for s in analysis.weight_slices if s.filters]
                  if filters_only else owned_slices(analysis))
        for s in slices:
            variable = s.variable()
            self._parts.setdefault(id(variable), (variable, []))[1].append(
                (s.axis, s.classes))

    def _per_channel(self, tensors_by_var):
        """Sums `tensors_by_var[id(v)]` per channel over the planned slices."""
        total = tf.zeros([self.num_channels], tf.float32)
        for key, (variable, parts) in self._parts.items():
            value = tensors_by_var.get(key)
            if value is None:
                continue
            value = tf.cast(value, tf.float32)
            rank = len(value.shape)
            for axis, classes in parts:
                axis = axis % rank
                per_entry = tf.reduce_sum(
                    value, axis=[a for a in range(rank) if a != axis])
                sel = np.flatnonzero(classes >= 0)
                total = tf.tensor_scatter_nd_add(
                    total, classes[sel][:, None], tf.gather(per_entry, sel))
        return total

    def taylor(self, grads, variables):
        """Per-channel `|sum(-W * g)|` of one step (a float32 tensor).

        Args:
            grads: the step's gradients, aligned with `variables`.
            variables: the model's trainable variables.
        """
        products = {}
        for g, v in zip(grads, variables):
            if g is not None and id(v) in self._parts:
                products[id(v)] = -tf.cast(v, tf.float32) * tf.cast(
                    tf.convert_to_tensor(g), tf.float32)
        # The sign is summed per weight first, then per channel: only the
        # channel's total first-order change is meaningful, not each part.
        return tf.abs(self._per_channel(products))

    def magnitude(self):
        """Per-channel `sum |W|` (a NumPy array)."""
        values = {key: tf.abs(tf.convert_to_tensor(variable))
                  for key, (variable, _) in self._parts.items()}
        return np.asarray(self._per_channel(values))
