"""The stored weights CHEX restores when it regrows a channel.

CHEX keeps, for every prunable weight tensor, a copy of each entry's most
recently *used* value: an entry is refreshed while its channels are active
and frozen once they are pruned, so a regrown channel comes back exactly as
it was when it was last in use. The copies are non-trainable variables of
the method's state, so `.keras` files and `BackupAndRestore` keep them.
"""

import numpy as np
import tensorflow as tf


class WeightBackups:
    """One stored copy per prunable weight tensor of an analysed model.

    Args:
        layer: the layer that owns the copies (`add_weight` is called on
            it, in a fixed order, so saved files load back).
        analysis: the model's `ModelAnalysis`.

    Example:

    ```python
    backups = WeightBackups(state, model.analysis)
    backups.refresh(mask)          # before a mask change
    backups.restore(old, new)      # after it: regrown entries come back
    ```
    """

    def __init__(self, layer, analysis):
        by_var = {}
        for s in analysis.weight_slices:
            v = s.variable()
            by_var.setdefault(id(v), (v, []))[1].append(s)
        self.variables = [v for v, _ in by_var.values()]
        self._slices = [slices for _, slices in by_var.values()]
        self.copies = [
            layer.add_weight(name=f"backup_{i}", shape=tuple(v.shape),
                             dtype=v.dtype, initializer="zeros",
                             trainable=False)
            for i, v in enumerate(self.variables)]
        index = {id(v): i for i, v in enumerate(self.variables)}
        # Per group: (copy index, channel axis, 0/1 matrix picking the
        # group's channels out of that axis) for every filter tensor.
        self._filters = []
        for g in analysis.groups:
            parts = []
            for s in analysis.weight_slices:
                inside = (s.classes >= g.start) & (s.classes < g.start + g.size)
                if not s.filters or not inside.any():
                    continue
                P = np.zeros((len(s.classes), g.size), dtype=np.float32)
                P[np.flatnonzero(inside), s.classes[inside] - g.start] = 1.0
                parts.append((index[id(s.variable())], s.axis, P))
            self._filters.append(parts)
        self.gammas = [(index[id(s.variable())], s.classes)
                       for s in analysis.weight_slices if s.name == "gamma"]

    def copy_all(self):
        """Stores every variable whole (at the start)."""
        for v, b in zip(self.variables, self.copies):
            b.assign(v)

    def active(self, i, mask):
        """Bool tensor over variable `i`'s entries: all its channels kept."""
        variable = self.variables[i]
        rank = len(variable.shape)
        active = tf.ones(variable.shape, tf.bool)
        for s in self._slices[i]:
            keep = tf.where(s.classes >= 0,
                            tf.gather(mask, np.maximum(s.classes, 0)), 1.0)
            shape = [1] * rank
            shape[s.axis % rank] = -1
            active = active & (tf.reshape(keep, shape) > 0.5)
        return active

    def refresh(self, mask):
        """Copies the entries that are in use under `mask` (float tensor)."""
        for i, (v, b) in enumerate(zip(self.variables, self.copies)):
            b.assign(tf.where(self.active(i, mask), v, b))

    def restore(self, old, new):
        """Writes back the stored values of entries regrown from `old` to
        `new`."""
        for i, (v, b) in enumerate(zip(self.variables, self.copies)):
            regrown = self.active(i, new) & ~self.active(i, old)
            v.assign(tf.where(regrown, b, v))

    def filter_matrix(self, g):
        """Group `g`'s filters from the stored copies: one column per
        channel, every weight that channel produces stacked in its rows."""
        blocks = []
        for i, axis, P in self._filters[g]:
            w = tf.convert_to_tensor(self.copies[i])
            rank = len(w.shape)
            axis = axis % rank
            perm = [a for a in range(rank) if a != axis] + [axis]
            w = tf.reshape(tf.transpose(w, perm), [-1, w.shape[axis]])
            blocks.append(tf.matmul(tf.cast(w, tf.float32), P))
        return tf.concat(blocks, 0)
