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

from keras_chex.core import layer_rules


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
    cost = CostModel(model.analysis)
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

    def group_cost(self, analysis, resource="macs"):
        """The same cost as a function of per-group keep counts.

        Exact when every channel of a group appears equally often along
        each pruned axis (true for every graph the rules build: Flatten
        repeats each channel H*W times); which channels are kept does not
        matter to a count, only how many.

        Args:
            analysis: the `ModelAnalysis` this model was built from.
            resource: "macs" or "params".

        Returns:
            A `GroupCost`.
        """
        coef, idx = self._macs if resource == "macs" else self._params
        weights = group_weights(self._counts, analysis)
        return GroupCost(self._fixed, weights, idx[:, 0], idx[:, 1],
                         lambda a0, a1, terms: coef[terms] * a0 * a1)


def group_weights(counts, analysis):
    """(F, G) matrix: entries of factor f per kept channel of group g."""
    weights = np.zeros((counts.shape[0], len(analysis.groups)))
    for g in analysis.groups:
        block = counts[:, g.start:g.start + g.size]
        weights[:, g.index] = block.sum(axis=1) / g.size
    return weights


class GroupCost:
    """A cost as a function of how many channels each group keeps.

    The cost is a sum of terms `f_t(A[i0_t], A[i1_t])` over linear forms
    `A = fixed + weights @ counts` (the active size of each pruned axis or
    tensor). MACs and parameters have `f_t = coef_t * a0 * a1`; a measured
    latency table has one lookup per layer call.

    `linearized(counts)` gives SMCP's knapsack its separable costs: each
    group's options priced with every other group held at `counts`.

    Args:
        fixed: (F,) array, the part of each form no group moves.
        weights: (F, G) array.
        i0, i1: (T,) int arrays, the two forms of each term.
        term_fn: `term_fn(a0, a1, terms) -> costs`: the cost of terms
            `terms` (an int array) at form values `a0`, `a1` (arrays whose
            last axis runs over `terms`; leading axes broadcast).

    Example:

    ```python
    cost = CostModel(analysis).group_cost(analysis, "macs")
    cost.total(np.array([g.size for g in analysis.groups]))  # dense MACs
    ```
    """

    def __init__(self, fixed, weights, i0, i1, term_fn):
        self.fixed = np.asarray(fixed, np.float64)
        self.weights = np.asarray(weights, np.float64)
        self.i0 = np.asarray(i0, np.int64)
        self.i1 = np.asarray(i1, np.int64)
        self.term_fn = term_fn
        touches = self.weights != 0
        # Which groups each term depends on, through either form.
        self._touch = touches[self.i0] | touches[self.i1]  # (T, G)

    def forms(self, counts):
        return self.fixed + self.weights @ np.asarray(counts, np.float64)

    def terms(self, counts):
        """(T,) cost of each term at `counts`."""
        a = self.forms(counts)
        return np.asarray(self.term_fn(a[self.i0], a[self.i1],
                                       np.arange(len(self.i0))), np.float64)

    def total(self, counts):
        """The cost with group `g` keeping `counts[g]` channels."""
        return float(np.sum(self.terms(counts)))

    def linearized(self, counts, widths):
        """Separable costs around `counts`, for a knapsack.

        Args:
            counts: (G,) the current keep counts.
            widths: list of G int arrays, the widths each group may take.

        Returns:
            (costs, offset): `costs[g][j]` is the cost of every term that
            depends on group `g` when it keeps `widths[g][j]` channels and
            the others keep `counts`; `sum_g costs[g][j_g] - offset`
            approximates `total` (exactly at `counts`, and for every term
            that depends on one group only).
        """
        counts = np.asarray(counts, np.float64)
        a = self.forms(counts)
        base = self.terms(counts)
        n_touch = self._touch.sum(axis=1)
        offset = float(np.sum((n_touch - 1) * base))
        out = []
        for g, w in enumerate(widths):
            mine = np.flatnonzero(self._touch[:, g])
            if not len(mine):
                out.append(np.zeros(len(w)))
                continue
            delta = np.asarray(w, np.float64)[:, None] - counts[g]
            i0, i1 = self.i0[mine], self.i1[mine]
            a0 = a[i0][None, :] + self.weights[i0, g][None, :] * delta
            a1 = a[i1][None, :] + self.weights[i1, g][None, :] * delta
            values = np.asarray(self.term_fn(a0, a1, mine), np.float64)
            out.append(values.sum(axis=1))
        return out, offset


def channel_groups_of(analysis):
    """Group index of every channel (an int array of length N)."""
    ids = np.zeros(analysis.num_channels, dtype=np.int64)
    for g in analysis.groups:
        ids[g.start:g.start + g.size] = g.index
    return ids

