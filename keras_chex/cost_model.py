"""Cost of a channel mask, as a differentiable-free closed form.

Every MACs term and every parameter tensor of a model is
`constant * prod(active channels along each pruned axis)`, and the active
count along an axis is `fixed + counts . mask` (a dot product with the
model-wide channel mask). `CostModel` stores that form once so pruning
methods can price thousands of candidate masks, in NumPy or inside a
`tf.function`, without touching the model. It agrees exactly with
`keras_chex.count_macs` (tested).
"""

import numpy as np
import tensorflow as tf

from keras_chex import layer_rules


class CostModel:
    """MACs and parameter counts as functions of the channel mask.

    Args:
        analysis: a `ModelAnalysis`.

    Attributes:
        num_channels: length of the mask vectors it takes.
        dense_macs: MACs with every channel kept.
        dense_params: parameters with every channel kept.

    Example:

    ```python
    cost = CostModel(model.chex_analysis)
    half = np.random.rand(cost.num_channels) < 0.5
    cost.macs(half) / cost.dense_macs
    ```
    """

    def __init__(self, analysis):
        self.num_channels = n = analysis.num_channels
        factors = {}  # (id(layer), name, axis) -> index
        fixed, counts = [1.0], [np.zeros(n)]  # Factor 0 is the constant 1.

        def factor(s):
            key = (id(s.layer), s.name, s.axis)
            if key not in factors:
                sel = s.classes >= 0
                factors[key] = len(fixed)
                fixed.append(float(np.sum(~sel)))
                counts.append(np.bincount(s.classes[sel], minlength=n)
                              .astype(np.float64))
            return factors[key]

        def term(layer, variable):
            name = layer_rules.weight_leaf_name(variable)
            mine = analysis.slices_for(layer, name)
            axes = {s.axis % len(variable.shape): s for s in mine}
            const = 1.0
            idx = []
            for axis, dim in enumerate(variable.shape):
                if axis in axes:
                    idx.append(factor(axes[axis]))
                else:
                    const *= int(dim)
            if len(idx) > 2:
                raise ValueError(f"{variable.path}: more than 2 pruned axes")
            return const, (idx + [0, 0])[:2]

        macs = []
        for _, coef, layer, variable in analysis.macs_weights():
            const, idx = term(layer, variable)
            macs.append((coef * const, idx))
        params = [term(layer, v)
                  for layer, weights in analysis.parameter_weights()
                  for v in weights]
        self._fixed = np.array(fixed)
        self._counts = np.stack(counts)  # (factors, channels)
        self._macs = self._pack(macs)
        self._params = self._pack(params)
        ones = np.ones(n)
        self.dense_macs = self.macs(ones)
        self.dense_params = self.params(ones)

    @staticmethod
    def _pack(terms):
        if not terms:
            return np.zeros(0), np.zeros((0, 2), dtype=np.int64)
        coef = np.array([c for c, _ in terms], dtype=np.float64)
        idx = np.array([i for _, i in terms], dtype=np.int64)
        return coef, idx

    def _eval(self, packed, mask):
        coef, idx = packed
        active = self._fixed + self._counts @ np.asarray(mask, np.float64)
        return float(np.sum(coef * active[idx[:, 0]] * active[idx[:, 1]]))

    def macs(self, mask):
        """MACs for a model-wide channel mask (bool or 0/1 array)."""
        return self._eval(self._macs, mask)

    def params(self, mask):
        """Parameters for a model-wide channel mask."""
        return self._eval(self._params, mask)

    def cost(self, mask, resource="macs"):
        """`macs(mask)` or `params(mask)`, by name."""
        return self.macs(mask) if resource == "macs" else self.params(mask)

    def tf_cost(self, resource="macs"):
        """A TensorFlow function `mask (float32, [N]) -> cost (float64)`."""
        coef, idx = self._macs if resource == "macs" else self._params
        fixed = tf.constant(self._fixed, tf.float64)
        counts = tf.constant(self._counts, tf.float64)
        coef = tf.constant(coef, tf.float64)
        i0 = tf.constant(idx[:, 0])
        i1 = tf.constant(idx[:, 1])

        def cost(mask):
            m = tf.cast(tf.reshape(mask, [-1, 1]), tf.float64)
            active = fixed + tf.reshape(tf.matmul(counts, m), [-1])
            return tf.reduce_sum(
                coef * tf.gather(active, i0) * tf.gather(active, i1)
            )

        return cost


def channel_groups_of(analysis):
    """Group index of every channel (an int array of length N)."""
    ids = np.zeros(analysis.num_channels, dtype=np.int64)
    for g in analysis.groups:
        ids[g.start:g.start + g.size] = g.index
    return ids

