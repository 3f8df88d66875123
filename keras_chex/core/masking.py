"""Channel masks: the layer that carries them and where it is placed.

A `ChannelMask` multiplies its input by a 0/1 vector over channels held in a
non-trainable variable, independent of every trainable weight. Masks are
placed where the compact model must see exact zeros: on every tensor that
reaches a layer mixing channels (convolution, dense) while a removed channel
may still be non-zero (after a bias, a BatchNorm beta, or an activation with
f(0) != 0). Putting the mask as late as possible lets one mask serve a whole
conv-BN-ReLU chain or a residual Add.

Where the removed channels come out of a BatchNormalization, the mask is
folded into it instead (`MaskedBatchNormalization`): zeroing gamma and beta
costs C multiplies per step, a `ChannelMask` on the activations N*H*W*C
forward and again backward. Most masks of a ResNet or MobileNet fold.
"""

import keras
import numpy as np
from keras import ops

from keras_chex.core import _graph
from keras_chex.core import layer_rules
from keras_chex.core import statistics

MASK_MODES = ("hard", "straight_through", "permanent")
# Modes whose masks can fold into a BatchNorm. A straight-through mask must
# let the gradient pass masked channels as if unmasked, through the
# activation evaluated on the unmasked value; zeroing gamma and beta cannot.
FOLDING_MODES = ("hard", "permanent")


def _check_mode(mode, modes=MASK_MODES):
    if mode not in modes:
        raise ValueError(f"`mode` must be one of {modes}, got {mode!r}.")


def _add_mask_weight(layer, channels):
    return layer.add_weight(
        name="mask",
        shape=(channels,),
        initializer="ones",
        trainable=False,
        dtype="float32",
    )


def _set_mask(layer, keep):
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != tuple(layer.mask.shape):
        raise ValueError(
            f"{layer.name}: mask must have shape {tuple(layer.mask.shape)}, "
            f"got {keep.shape}."
        )
    layer.mask.assign(keep.astype("float32"))


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
        _check_mode(mode)
        self.channels = int(channels)
        self.mode = mode
        self.mask = _add_mask_weight(self, self.channels)

    def call(self, inputs):
        mask = ops.cast(self.mask, inputs.dtype)
        masked = inputs * mask
        if self.mode == "straight_through":
            return inputs + ops.stop_gradient(masked - inputs)
        return masked

    def set_channel_mask(self, keep):
        """Sets the mask from a bool array (True = keep)."""
        _set_mask(self, keep)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"channels": self.channels, "mode": self.mode})
        return config


@keras.saving.register_keras_serializable(package="keras_chex")
class MaskedBatchNormalization(statistics.TrackingBatchNormalization):
    """A BatchNormalization whose output is exactly zero on masked channels.

    The mask multiplies gamma and beta rather than the output, which is
    the same in the forward pass and for "hard" gradients, for a fraction
    of the cost. `keras_chex.wrap` puts it in place of a BatchNormalization
    whose output needs masking; `keras_chex.strip` turns it back into a
    plain BatchNormalization. Its moving statistics restart after a mask
    change (see `TrackingBatchNormalization`).

    Args:
        mode: "hard" or "permanent", see `ChannelMask`.
        **kwargs: the arguments of `keras.layers.BatchNormalization`.

    Example:

    ```python
    layer = MaskedBatchNormalization(center=True)
    layer.build((None, 4))
    layer.set_channel_mask([True, False, True, True])
    layer(np.ones((1, 4)) + 5.0)[0, 1]  # 0.0
    ```
    """

    def __init__(self, mode="hard", **kwargs):
        super().__init__(**kwargs)
        _check_mode(mode, FOLDING_MODES)
        self.mode = mode

    def build(self, input_shape):
        super().build(input_shape)
        self.mask = _add_mask_weight(self, input_shape[-1])

    def call(self, inputs, training=None, mask=None):
        if self._keras_path(inputs, mask):
            # Rare paths: keep Keras' own maths and mask the output.
            outputs = super().call(inputs, training=training, mask=mask)
            return outputs * ops.cast(self.mask, outputs.dtype)
        keep = self.mask
        return self._normalize(
            inputs, self.gamma * keep if self.scale else keep,
            self.beta * keep if self.center else None, training)

    def set_channel_mask(self, keep):
        """Sets the mask from a bool array (True = keep)."""
        _set_mask(self, keep)

    def get_config(self):
        config = super().get_config()
        config["mode"] = self.mode
        return config


def parameter_weights(layer):
    """`layer`'s weights that are model parameters (not masks)."""
    if isinstance(layer, ChannelMask):
        return []
    if isinstance(layer, statistics.TrackingBatchNormalization):
        return [w for w in layer.weights
                if w is not layer.batches_seen
                and w is not getattr(layer, "mask", None)]
    return list(layer.weights)


class _MaskRule(layer_rules.LayerRule):
    kind = "mask"

    def propagate(self, ctx, node):
        ids = ctx.ids(node.inputs[0])
        ctx.mask_layer(node.operation, ids)
        ctx.set_ids(node.outputs[0], ids)


MASK_RULE = _MaskRule()


class _MaskedBatchNormRule(layer_rules.BatchNormRule):

    def propagate(self, ctx, node):
        super().propagate(ctx, node)
        ctx.mask_layer(node.operation, ctx.ids(node.inputs[0]))


MASKED_BATCHNORM_RULE = _MaskedBatchNormRule()
TRACKING_BATCHNORM_RULE = layer_rules.BatchNormRule()
# Where wrapping puts one and analysis looks it up, beside the mask layers.
TrackingBatchNormalization = statistics.TrackingBatchNormalization


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


def _foldable(layer, rule, opaque):
    # A BatchNorm over another axis than the channels' is opaque: its rule
    # rejects it.
    return (isinstance(rule, layer_rules.BatchNormRule)
            and type(layer) is keras.layers.BatchNormalization
            and not layer.renorm and layer.name not in opaque)


def place_masks(analysis, fold_batchnorm=True):
    """Chooses where masks go: `ChannelMask` tensors and folded BatchNorms.

    Args:
        analysis: a `ModelAnalysis` of the plain model.
        fold_batchnorm: mask BatchNorms that produce prunable channels by
            their gamma and beta (`MaskedBatchNormalization`), so that most
            `ChannelMask`s become unnecessary.

    Returns:
        (tensors, batchnorms): a set of `id(KerasTensor)` of the original
        model's tensors to mask, and a set of `id(layer)` of the
        BatchNormalization layers to replace by `MaskedBatchNormalization`.
    """
    cache = {}
    prunable = {}

    def has_channels(t):
        key = id(t)
        if key not in prunable:
            prunable[key] = bool(np.any(analysis.classes_of(t) >= 0))
        return prunable[key]

    opaque = {name for name, _ in analysis.unsupported}
    folded = set()
    folded_outputs = []
    if fold_batchnorm:
        for nodes in analysis._nodes.values():
            for node in nodes:
                op = node.operation
                if (_foldable(op, analysis.rule_for(op), opaque)
                        and has_channels(node.outputs[0])):
                    folded.add(id(op))
                    folded_outputs.append(node.outputs[0])

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
                if id(op) in folded:
                    out = False
                elif rule is None or op.name in opaque:
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
    for t in [analysis._tensors[t] for t in needed] + folded_outputs:
        c = analysis.classes_of(t)
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
    return needed, folded
