"""Channel masks: the layer that carries them and where it is placed.

A `ChannelMask` multiplies its input by a 0/1 vector over channels held in a
non-trainable variable, independent of every trainable weight. Masks are
placed where the compact model must see exact zeros: on every tensor that
reaches a layer mixing channels (convolution, dense) while a removed channel
may still be non-zero (after a bias, a BatchNorm beta, or an activation with
f(0) != 0). Putting the mask as late as possible lets one mask serve a whole
conv-BN-ReLU chain or a residual Add, and keeps the training overhead small.
"""

import keras
import numpy as np
from keras import ops

from keras_chex import _graph
from keras_chex import layer_rules

MASK_MODES = ("hard", "straight_through", "permanent")


@keras.saving.register_keras_serializable(package="keras_chex")
class ChannelMask(keras.layers.Layer):
    """Multiplies the last axis by a fixed 0/1 channel mask.

    Args:
        channels: number of channels (size of the last axis).
        mode: how gradients treat masked channels:
            - "hard": masked channels get no gradient (CHEX);
            - "straight_through": the forward pass is masked but the
              gradient flows as if unmasked, so pruned weights keep
              learning and can come back (SMCP);
            - "permanent": like "hard", and the weights of pruned channels
              are zeroed when the mask is set (gradual pruning).
        **kwargs: standard layer arguments (name, dtype, ...).

    Example:

    ```python
    layer = ChannelMask(4)
    layer.set_channel_mask([True, False, True, True])
    layer(np.ones((1, 4)))  # [[1., 0., 1., 1.]]
    ```
    """

    def __init__(self, channels, mode="hard", **kwargs):
        super().__init__(**kwargs)
        if mode not in MASK_MODES:
            raise ValueError(
                f"mode must be one of {MASK_MODES}, got {mode!r}."
            )
        self.channels = int(channels)
        self.mode = mode
        self.mask = self.add_weight(
            name="mask",
            shape=(self.channels,),
            initializer="ones",
            trainable=False,
            dtype="float32",
        )

    def call(self, inputs):
        mask = ops.cast(self.mask, inputs.dtype)
        masked = inputs * mask
        if self.mode == "straight_through":
            return inputs + ops.stop_gradient(masked - inputs)
        return masked

    def set_channel_mask(self, keep):
        """Sets the mask from a bool array (True = keep)."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (self.channels,):
            raise ValueError(
                f"{self.name}: mask must have shape ({self.channels},), "
                f"got {keep.shape}."
            )
        self.mask.assign(keep.astype("float32"))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"channels": self.channels, "mode": self.mode})
        return config


class _MaskRule(layer_rules.LayerRule):
    kind = "mask"

    def propagate(self, ctx, node):
        ids = ctx.ids(node.inputs[0])
        ctx.mask_layer(node.operation, ids)
        ctx.set_ids(node.outputs[0], ids)


MASK_RULE = _MaskRule()


def _zeros_like(tensor):
    shape = [1 if d is None else d for d in tensor.shape]
    return np.zeros(shape, dtype=tensor.dtype or "float32")


def _preserves_zero(node, cache):
    """True if the element-wise call maps an all-zero input to zeros."""
    key = id(node.operation), tuple(id(t) for t in node.inputs)
    if key not in cache:
        try:
            zeros = {id(t): _zeros_like(t) for t in node.inputs}
            out = node.call_with(node.operation, zeros)
            cache[key] = all(
                not np.any(np.asarray(ops.convert_to_numpy(o)))
                for o in out
            )
        except Exception:  # A probe failure must not break wrapping.
            cache[key] = False
    return cache[key]


def place_masks(analysis):
    """Chooses the tensors that need a `ChannelMask`.

    Args:
        analysis: a `ModelAnalysis` of the plain model.

    Returns:
        A set of `id(KerasTensor)` of the original model's tensors to mask.
    """
    cache = {}
    prunable = {}

    def has_channels(t):
        key = id(t)
        if key not in prunable:
            prunable[key] = bool(np.any(analysis.classes_of(t) >= 0))
        return prunable[key]

    opaque = {name for name, _ in analysis.unsupported}

    def sinks_and_dirt(masked):
        dirty = {}
        need = set()
        for model_id, nodes in analysis._nodes.items():
            model = analysis._graphs[model_id]
            top = model is analysis.model
            for t in _graph.inputs_of(model):
                # A nested model may be called on unmasked tensors.
                dirty[id(t)] = not top
            for node in nodes:
                ins = [dirty.get(id(t), True) and id(t) not in masked
                       for t in node.inputs]
                op = node.operation
                if _graph.is_graph_model(op):
                    for t in node.outputs:
                        dirty[id(t)] = True
                    continue
                rule = analysis.rule_for(op)
                if rule is None or op.name in opaque:
                    out = True
                else:
                    if rule.mixes_input:
                        for t, d in zip(node.inputs, ins):
                            if d and has_channels(t):
                                need.add(id(t))
                    kind = layer_rules.node_kind(rule, node)
                    if kind == layer_rules.PRODUCER:
                        out = True
                    elif kind == layer_rules.ALL_DIRTY:
                        out = all(ins)
                    elif kind == layer_rules.ELEMENTWISE:
                        out = any(ins) or not _preserves_zero(node, cache)
                    else:
                        out = any(ins)
                for t in node.outputs:
                    dirty[id(t)] = out
        return need, dirty

    first, _ = sinks_and_dirt(set())
    # Drop masks made redundant by masks further upstream.
    _, dirty = sinks_and_dirt(first)
    needed = {t for t in first if dirty.get(t, True)}

    # Safety net: every prunable channel must be covered by some mask,
    # otherwise masking it would not change the wrapped model's output.
    covered = np.zeros(analysis.num_channels, dtype=bool)
    for t in needed:
        c = analysis.classes_of(analysis._tensors[t])
        covered[c[c >= 0]] = True
    if not covered.all():
        for model_id, nodes in analysis._nodes.items():
            for node in nodes:
                for t in node.outputs:
                    c = analysis.classes_of(t)
                    c = c[c >= 0]
                    if len(c) and not covered[c].all():
                        needed.add(id(t))
                        covered[c] = True
    return needed
