"""The channel masks of a wrapped model, read and written as one vector.

A wrapped model's masks sit in many layers (`ChannelMask`s and masked
BatchNorms), each over its own tensor's channels; `Masks` presents them as
one bool vector over all channels of all groups (the `ModelAnalysis`
order) and writes such a vector back, keeping every layer consistent,
restarting BatchNorm statistics after a change and, for `mode="permanent"`,
zeroing what is removed. The analysis describes the model; this is the one
place that changes its masks.
"""

import numpy as np

from keras_chex.core import _trainer
from keras_chex.core import statistics

def keep_mask(classes, class_mask):
    """Per-position keep flags for positions mapped to channel `classes`."""
    keep = np.ones(len(classes), dtype=bool)
    sel = classes >= 0
    keep[sel] = class_mask[classes[sel]]
    return keep


class Masks:
    """Reads and writes the channel masks of one analysed model.

    Get it as `model.masks` of a wrapped model (or `Masks.of(analysis)`).

    Args:
        analysis: the model's `ModelAnalysis`.

    Example:

    ```python
    masks = wrapped.masks
    mask = masks.numpy()
    mask[:4] = False
    masks.assign(mask)
    ```
    """

    def __init__(self, analysis):
        self._analysis = analysis
        self._segments = None
        self._read_plan = None
        self._sites_by_range = {}

    @classmethod
    def of(cls, analysis):
        """The `Masks` of `analysis` (one per analysis)."""
        # Kept on the analysis: in a WeakKeyDictionary keyed by the
        # analysis, the value's reference back to its key would keep every
        # wrapped model alive for the life of the process.
        masks = getattr(analysis, "_masks", None)
        if masks is None:
            masks = analysis._masks = cls(analysis)
        return masks

    def numpy(self):
        """Bool vector over all channels of all groups (True = kept)."""
        every = range(len(self._analysis.mask_sites))
        return self._combine(every, self._site_values(every))

    def channels(self, start, stop):
        """`numpy()[start:stop]`, read from only the mask layers that hold
        those channels."""
        indices = self._sites_holding(start, stop)
        return self._combine(indices, self._site_values(indices))[start:stop]

    def _site_values(self, indices):
        """The keep flags of the mask sites at `indices`, as bool arrays."""
        sites = self._analysis.mask_sites
        return [np.asarray(sites[i].layer.mask.numpy()) > 0.5
                for i in indices]

    def _combine(self, indices, values):
        """The model-wide vector those sites' `values` give (True where
        no site among them holds a channel)."""
        analysis = self._analysis
        mask = np.ones(analysis.num_channels, dtype=bool)
        for i, site_values in zip(indices, values):
            classes = analysis.mask_sites[i].classes
            sel = classes >= 0
            # Every channel is covered by at least one site; any covering
            # site holds its value (sites are written together).
            mask[classes[sel]] = site_values[sel]
        return mask

    def _sites_holding(self, start, stop):
        """Indices of the mask sites that hold a channel in [start, stop)."""
        key = (start, stop)
        if key not in self._sites_by_range:
            self._sites_by_range[key] = [
                i for i, site in enumerate(self._analysis.mask_sites)
                if np.any((site.classes >= start) & (site.classes < stop))]
        return self._sites_by_range[key]

    def counts(self, mask=None):
        """Channels kept per group (int array, in group order) by `mask`
        (a model-wide bool vector; default: the current masks)."""
        mask = self.numpy() if mask is None else np.asarray(mask, bool)
        return np.array([int(mask[g.start:g.start + g.size].sum())
                         for g in self._analysis.groups], np.int64)

    def tensor(self):
        """The same vector as a float32 tensor (1 = kept), read in
        TensorFlow ops, so a compiled step can use it."""
        import tensorflow as tf

        if self._read_plan is None:
            analysis = self._analysis
            n = analysis.num_channels
            site_of = np.full(n, -1)
            position = np.zeros(n, dtype=np.int64)
            for i, site in enumerate(analysis.mask_sites):
                for p, c in enumerate(site.classes):
                    if c >= 0 and site_of[c] < 0:
                        site_of[c], position[c] = i, p
            self._read_plan = [
                (site.layer.mask, np.flatnonzero(site_of == i),
                 position[site_of == i])
                for i, site in enumerate(analysis.mask_sites)
                if np.any(site_of == i)]
        if not self._read_plan:
            return tf.ones([self._analysis.num_channels])
        values = [tf.gather(tf.convert_to_tensor(variable), positions)
                  for variable, _, positions in self._read_plan]
        indices = np.concatenate([c for _, c, _ in self._read_plan])
        return tf.scatter_nd(indices[:, None], tf.concat(values, 0),
                             [self._analysis.num_channels])

    def assign_tensor(self, mask, old=None):
        """Writes a float32 tensor from `tensor()`'s space, in TensorFlow
        ops (BatchNorm statistics restart if anything changed).

        Args:
            mask: the new masks.
            old: `tensor()` as read before, if the caller has it.
        """
        import tensorflow as tf

        analysis = self._analysis
        old = self.tensor() if old is None else old
        changed = tf.reduce_any(tf.not_equal(mask, old))
        for layer in statistics.tracking_batchnorms(analysis.model):
            # Every activation after a change has a new distribution.
            layer.restart_statistics(when=changed)
        for site in analysis.mask_sites:
            classes = site.classes
            site.layer.mask.assign(tf.where(
                classes >= 0, tf.gather(mask, np.maximum(classes, 0)), 1.0))

    def producer_segments(self):
        """The channels of each layer that writes, or reads, only part of
        a group.

        A group may join the outputs of several layers (a concatenation
        added to another tensor, say); a mask must leave each of them at
        least one channel, or the stripped layer would have none. Likewise
        a layer reading one part of a group (after `keras.ops.split`) must
        keep an input channel.

        Returns:
            A list of (layer name, int array of channel indices).
        """
        if self._segments is None:
            analysis = self._analysis
            segments, seen = [], set()
            starts = np.array([g.start for g in analysis.groups])
            for s in analysis.weight_slices:
                classes = np.unique(s.classes[s.classes >= 0])
                owners = np.searchsorted(starts, classes, side="right") - 1
                for index in np.unique(owners[owners >= 0]):
                    g = analysis.groups[index]
                    inside = classes[(classes >= g.start)
                                     & (classes < g.start + g.size)]
                    # A layer's kernel and bias name the same segment once.
                    key = (s.layer.name, tuple(inside.tolist()))
                    if 0 < len(inside) < g.size and key not in seen:
                        seen.add(key)
                        segments.append((s.layer.name, inside))
            self._segments = segments
        return self._segments

    def emptied_producers(self, mask):
        """Names of the layers `mask` would leave without an output channel."""
        mask = np.asarray(mask, dtype=bool)
        return [name for name, seg in self.producer_segments()
                if not mask[seg].any()]

    def assign(self, mask):
        """Writes a model-wide channel mask into every mask layer.

        Raises:
            ValueError: the mask removes every output channel of a layer
                (see `producer_segments`), or the model has no masks.
        """
        mask = np.asarray(mask, dtype=bool)
        self._write(mask, range(len(self._analysis.mask_sites)))

    def assign_channels(self, start, values):
        """Writes channels `start` to `start + len(values)` (a group's),
        leaving the others as they are.

        The same as `assign` of the current masks with that range replaced,
        but it reads and writes only the mask layers that hold those
        channels: setting every group of a large model one at a time
        would otherwise read and write its hundreds of masks per group.

        Args:
            start: first channel, in the model-wide channel order.
            values: bool array-like, the new flags of the channels from
                `start` on.

        Raises:
            ValueError: as `assign`.
        """
        values = np.asarray(values, dtype=bool)
        stop = start + len(values)
        sites = self._analysis.mask_sites
        if sites and sites[0].layer.mode == "permanent":
            # Its regrowth check compares whole vectors.
            indices = range(len(sites))
        else:
            indices = self._sites_holding(start, stop)
        current = self._site_values(indices)
        mask = self._combine(indices, current)
        mask[start:stop] = values
        self._write(mask, indices, current)

    def _write(self, mask, indices, current=None):
        """Writes `mask` into the mask sites at `indices` (`current`: their
        values, if read already) and restarts the statistics if it changed
        anything."""
        analysis = self._analysis
        emptied = self.emptied_producers(mask)
        if emptied:
            raise ValueError(
                f"The mask removes every channel layer(s) {emptied} write or "
                "read: their channels are part of a larger group (a "
                "concatenation joined to another tensor, a part of a "
                "`keras.ops.split`), and a layer must keep at least one. "
                "Keep one of each of their channels.")
        if not analysis.mask_sites:
            raise ValueError(
                f"Model '{analysis.model.name}' carries no channel masks. "
                "Wrap it with `keras_chex.wrap(model)` or "
                "`keras_chex.prune_and_regrow(model, ...)` and set masks on "
                "the returned model."
            )
        if current is None:
            current = self._site_values(indices)
        changed = mask != self._combine(indices, current)
        if analysis.mask_sites[0].layer.mode == "permanent":
            self._prune_permanently(mask)
        for i, values in zip(indices, current):
            keep = keep_mask(analysis.mask_sites[i].classes, mask)
            # Only the layers whose mask differs.
            if not np.array_equal(keep, values):
                analysis.mask_sites[i].layer.set_channel_mask(keep)
        if changed.any():
            # Every activation after a change has a new distribution.
            statistics.restart_statistics(analysis.model)

    def _prune_permanently(self, mask):
        analysis = self._analysis
        old = self.numpy()
        regrown = np.flatnonzero(mask & ~old)
        if len(regrown):
            names = sorted({g.name for g in analysis.groups
                            for c in regrown[:20]
                            if g.start <= c < g.start + g.size})
            raise ValueError(
                "This model was wrapped with mode='permanent': pruned "
                f"channels cannot come back, but the new mask re-enables "
                f"{len(regrown)} of them (groups {names}). Wrap with "
                "mode='hard' or 'straight_through' to allow regrowth."
            )
        for s in analysis.weight_slices:
            _zero_entries(s.variable(), s.axis, ~keep_mask(s.classes, mask))

    def clear_optimizer_state(self, optimizer, channels):
        """Zeroes what `optimizer` keeps (momentum, moments) for `channels`.

        Weights zeroed for good must stay zero: an SGD momentum left from
        earlier steps would move them again.

        Args:
            optimizer: the model's optimizer (None or unbuilt: nothing).
            channels: bool array over all channels, True for the ones to
                clear.
        """
        analysis = self._analysis
        channels = np.asarray(channels, dtype=bool)
        others = analysis.model.trainable_variables
        for s in analysis.weight_slices:
            cleared = ~keep_mask(s.classes, ~channels)
            if not cleared.any():
                continue
            for slot in _trainer.optimizer_slots(optimizer, s.variable(),
                                                 others):
                _zero_entries(slot, s.axis, cleared)


def _zero_entries(variable, axis, entries):
    """Sets `variable`'s `entries` (bool, along `axis`) to zero."""
    if not entries.any():
        return
    value = np.array(variable.numpy())
    index = [slice(None)] * value.ndim
    index[axis] = entries
    value[tuple(index)] = 0
    variable.assign(value)
