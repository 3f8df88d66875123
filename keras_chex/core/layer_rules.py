"""How each kind of layer moves, mixes, and owns channels.

One `LayerRule` per supported layer or op class. A rule answers three
questions about one call of its layer:

* `propagate`: which channels of the inputs and outputs are the same channel
  (so they must be kept or removed together), which weights index which
  channels, and how many MACs each call costs;
* `kind`: whether a channel that is zero on the way in is still zero on the
  way out (decides where masks must sit, see `masking.py`);
* `stripped_config`: the layer config after channels are removed.

Which class gets which rule is `layer_registry.py`'s job. Anything without
a rule is treated as opaque: the channels it touches are left unprunable and
`channel_groups` warns, naming the layer.
"""

import math

import numpy as np

# How a layer treats a channel that is exactly zero at its input.
PRODUCER = "producer"  # Writes new channels (bias, BN beta): output may be non-zero.
PASS = "pass"  # Zero in, zero out, no per-channel constants.
ELEMENTWISE = "elementwise"  # f(0) decides; probed numerically.
ANY_DIRTY = "any"  # Merge that is non-zero if any input is (Add, Concatenate).
ALL_DIRTY = "all"  # Merge that is zero if any input is zero (Multiply).


class Unsupported(Exception):
    """Raised by a rule when one particular call cannot be analysed.

    Args:
        reason: why, as the warning about unpruned layers shows it.
        keeps_channels: the output has the input's channels, mixed (a
            softmax over them): they stay unprunable through the layer
            instead of the output starting afresh, so a layer whose output
            is fixed anyway (a model's output) costs nothing.
    """

    def __init__(self, reason, keeps_channels=False):
        super().__init__(reason)
        self.keeps_channels = keeps_channels


class LayerRule:
    """Channel semantics of one layer class. Subclasses override `propagate`.

    Attributes:
        kind: one of PRODUCER, PASS, ELEMENTWISE, ANY_DIRTY, ALL_DIRTY.
        mixes_input: True when the layer combines input channels into each
            output (convolutions, dense): its input must be exactly zero on
            masked channels for the compact model to compute the same.
    """

    kind = PASS
    mixes_input = False

    def propagate(self, ctx, node):
        """Declares channel identities, weight slices and costs of `node`."""
        ctx.set_ids(node.outputs[0], ctx.ids(node.inputs[0]))

    def opaque_macs(self, node):
        """`(coefficient, weight name)` MACs terms of a call the analysis
        could not read (all channels kept), so it still counts right."""
        return []

    def stripped_config(self, config, node, kept):
        """Returns `config` updated for the kept channels.

        Args:
            config: the layer's `get_config()` (a copy; may be modified).
            node: the `GraphNode` of one call (shared layers are consistent).
            kept: `kept(tensor) -> number of channels kept` on a tensor.
        """
        return config

    def stripped_operation(self, op, node, kept):
        """The `keras.ops` operation (not a layer) the compact model calls
        in place of `op` (itself, unless its arguments count channels)."""
        return op


# Why a channels_first layer is left whole. The analysis warns about every
# such layer: its channels are the ones a user wanted pruned.
CHANNELS_FIRST = ("data_format='channels_first' is not supported: build the "
                  "model channels_last (the Keras default) to prune it")


def _channels_last(layer):
    fmt = getattr(layer, "data_format", "channels_last")
    if fmt not in (None, "channels_last"):
        raise Unsupported(CHANNELS_FIRST)


def _spatial_size(tensor, layer=None):
    """Positions per sample of `tensor` (None if unknown), channels last
    unless `layer` says channels_first."""
    first = getattr(layer, "data_format", None) == "channels_first"
    dims = tensor.shape[2:] if first else tensor.shape[1:-1]
    if any(d is None for d in dims):
        return None
    return int(np.prod(dims, dtype=np.int64)) if dims else 1


class ConvRule(LayerRule):
    """Conv1D/2D/3D, including grouped convolutions."""

    kind = PRODUCER
    mixes_input = True

    def opaque_macs(self, node):
        return [(_spatial_size(node.outputs[0], node.operation), "kernel")]

    def propagate(self, ctx, node):
        layer = node.operation
        _channels_last(layer)
        groups = getattr(layer, "groups", 1) or 1
        x, y = node.inputs[0], node.outputs[0]
        in_ids = ctx.ids(x)
        out_ids = ctx.layer_block(layer, layer.filters)
        if groups > 1:
            # Every group must keep the same number of channels for the
            # compact layer to stay a valid grouped convolution, so channel k
            # of each group is coupled with channel k of the others.
            in_ids = ctx.couple_across_groups(in_ids, groups)
            out_ids = ctx.couple_across_groups(out_ids, groups)
        per_group = len(in_ids) // groups
        ctx.weight_slice(layer, "kernel", -2, in_ids[:per_group])
        ctx.weight_slice(layer, "kernel", -1, out_ids, filters=True)
        ctx.weight_slice(layer, "bias", 0, out_ids)
        ctx.set_ids(y, out_ids)
        ctx.add_macs(node, _spatial_size(y), layer, "kernel")

    def stripped_config(self, config, node, kept):
        config["filters"] = kept(node.outputs[0])
        return config


class ConvTransposeRule(ConvRule):
    """Conv1DTranspose/2D/3D (kernel is [..., out, in])."""

    def opaque_macs(self, node):
        return [(_spatial_size(node.inputs[0], node.operation), "kernel")]

    def propagate(self, ctx, node):
        layer = node.operation
        _channels_last(layer)
        x, y = node.inputs[0], node.outputs[0]
        out_ids = ctx.layer_block(layer, layer.filters)
        ctx.weight_slice(layer, "kernel", -1, ctx.ids(x))
        ctx.weight_slice(layer, "kernel", -2, out_ids, filters=True)
        ctx.weight_slice(layer, "bias", 0, out_ids)
        ctx.set_ids(y, out_ids)
        # Each input pixel scatters one kernel: cost scales with input size.
        ctx.add_macs(node, _spatial_size(x), layer, "kernel")


class DepthwiseRule(LayerRule):
    """DepthwiseConv1D/2D: per-channel filters, output c*m+j from input c."""

    kind = PRODUCER

    def opaque_macs(self, node):
        return [(_spatial_size(node.outputs[0], node.operation), "kernel")]

    def propagate(self, ctx, node):
        layer = node.operation
        _channels_last(layer)
        in_ids = ctx.ids(node.inputs[0])
        out_ids = np.repeat(in_ids, layer.depth_multiplier)
        ctx.weight_slice(layer, "kernel", -2, in_ids)
        ctx.weight_slice(layer, "bias", 0, out_ids)
        ctx.set_ids(node.outputs[0], out_ids)
        ctx.add_macs(node, _spatial_size(node.outputs[0]), layer, "kernel")


class SeparableRule(ConvRule):
    """SeparableConv1D/2D: depthwise on the input, pointwise to new channels."""

    def opaque_macs(self, node):
        positions = _spatial_size(node.outputs[0], node.operation)
        return [(positions, "depthwise_kernel"),
                (positions, "pointwise_kernel")]

    def propagate(self, ctx, node):
        layer = node.operation
        _channels_last(layer)
        in_ids = ctx.ids(node.inputs[0])
        mid_ids = np.repeat(in_ids, layer.depth_multiplier)
        out_ids = ctx.layer_block(layer, layer.filters)
        ctx.weight_slice(layer, "depthwise_kernel", -2, in_ids)
        ctx.weight_slice(layer, "pointwise_kernel", -2, mid_ids)
        ctx.weight_slice(layer, "pointwise_kernel", -1, out_ids, filters=True)
        ctx.weight_slice(layer, "bias", 0, out_ids)
        ctx.set_ids(node.outputs[0], out_ids)
        spatial = _spatial_size(node.outputs[0])
        ctx.add_macs(node, spatial, layer, "depthwise_kernel")
        ctx.add_macs(node, spatial, layer, "pointwise_kernel")


class DenseRule(LayerRule):
    """Dense on the last axis of inputs of any rank."""

    kind = PRODUCER
    mixes_input = True

    def opaque_macs(self, node):
        return [(_spatial_size(node.outputs[0]), "kernel")]

    def propagate(self, ctx, node):
        layer = node.operation
        if getattr(layer, "lora_enabled", False) or getattr(
            layer, "quantization_mode", None
        ):
            raise Unsupported("LoRA or quantized Dense layers are not supported")
        out_ids = ctx.layer_block(layer, layer.units)
        ctx.weight_slice(layer, "kernel", 0, ctx.ids(node.inputs[0]))
        ctx.weight_slice(layer, "kernel", 1, out_ids, filters=True)
        ctx.weight_slice(layer, "bias", 0, out_ids)
        ctx.set_ids(node.outputs[0], out_ids)
        ctx.add_macs(node, _spatial_size(node.outputs[0]), layer, "kernel")

    def stripped_config(self, config, node, kept):
        config["units"] = kept(node.outputs[0])
        return config


class BatchNormRule(LayerRule):
    """BatchNormalization over the last axis (per-channel statistics)."""

    kind = PRODUCER

    def propagate(self, ctx, node):
        layer = node.operation
        rank = len(node.inputs[0].shape)
        if layer.axis not in (-1, rank - 1):
            raise Unsupported(
                f"normalises axis {layer.axis}, not the channel axis"
            )
        ids = ctx.ids(node.inputs[0])
        # Every per-channel weight, renorm's statistics included (those a
        # layer lacks are skipped by `weight_slice`).
        for name in ("gamma", "beta", "moving_mean", "moving_variance",
                     "moving_stddev", "renorm_mean", "renorm_stddev"):
            ctx.weight_slice(layer, name, 0, ids)
        ctx.set_ids(node.outputs[0], ids)

    def stripped_config(self, config, node, kept):
        config["axis"] = -1
        return config


class NormalizationRule(LayerRule):
    """Normalization (fixed mean and variance) per channel or per tensor."""

    kind = PRODUCER  # (0 - mean) / std is not zero.

    def propagate(self, ctx, node):
        layer = node.operation
        rank = len(node.inputs[0].shape)
        axes = tuple(sorted(a % rank for a in layer.axis))
        ids = ctx.ids(node.inputs[0])
        if axes == (rank - 1,):
            if getattr(layer, "input_mean", None) is not None:
                # Per-channel constants in the config, not weights: nothing
                # to slice them by, so these channels stay.
                ctx.block(ids, f"'{layer.name}' has a constant per-channel "
                               "mean")
            for name in ("mean", "variance"):
                ctx.weight_slice(layer, name, 0, ids)
        elif axes:
            raise Unsupported(f"normalises per position of axes {axes}")
        ctx.set_ids(node.outputs[0], ids)


class PReLURule(LayerRule):
    """PReLU: alpha is per channel unless shared along the channel axis."""

    kind = ELEMENTWISE

    def propagate(self, ctx, node):
        layer = node.operation
        ids = ctx.ids(node.inputs[0])
        if layer.alpha.shape[-1] == len(ids) and len(ids) > 1:
            ctx.weight_slice(layer, "alpha", -1, ids)
        ctx.set_ids(node.outputs[0], ids)


class ActivationRule(LayerRule):
    """Element-wise activations; softmax over channels couples them all."""

    kind = ELEMENTWISE

    def propagate(self, ctx, node):
        layer = node.operation
        fn = getattr(layer, "activation", None)
        name = getattr(fn, "__name__", "")
        if name in ("softmax", "log_softmax"):
            raise Unsupported(f"'{name}' mixes all channels",
                              keeps_channels=True)
        super().propagate(ctx, node)


class SoftmaxRule(LayerRule):
    kind = ELEMENTWISE

    def propagate(self, ctx, node):
        rank = len(node.inputs[0].shape)
        axes = np.atleast_1d(node.operation.axis)
        if any(a in (-1, rank - 1) for a in axes):
            raise Unsupported("softmax over the channel axis mixes channels",
                              keeps_channels=True)
        super().propagate(ctx, node)


class WholeRule(LayerRule):
    """A layer left whole on purpose whose MACs are still known: its
    channels stay unpruned (as for an unsupported layer) and `opaque_macs`
    prices each call. `opaque_macs` terms may name the sublayer holding
    the weight: `(coefficient, weight name, layer)`."""

    reason = "is left whole"

    def propagate(self, ctx, node):
        raise Unsupported(f"{type(node.operation).__name__} {self.reason}")


class EinsumDenseRule(WholeRule):
    """`EinsumDense`: every product of its equation is one MAC."""

    reason = "is left whole (its MACs are counted)"

    def opaque_macs(self, node):
        layer = node.operation
        total = einsum_macs(layer.equation, node.inputs[0].shape,
                            layer.kernel.shape)
        coef = None if total is None else total / product(layer.kernel.shape)
        return [(coef, "kernel")]


class AttentionRule(WholeRule):
    """`MultiHeadAttention`: its four projections, the query-key scores and
    the weighted sum of values."""

    reason = "is left whole: attention heads are not pruned (its MACs are counted)"

    def opaque_macs(self, node):
        layer = node.operation
        args, kwargs = node.call_structure()
        query = args[0] if args else kwargs.get("query")
        value = args[1] if len(args) > 1 else kwargs.get("value")
        t_query, t_value = _spatial_size(query), _spatial_size(value)
        if t_query is None or t_value is None:
            return [(None, "kernel", layer.query_dense)]
        q, k, v, o = (layer.query_dense, layer.key_dense, layer.value_dense,
                      layer.output_dense)
        pairs = t_query * t_value
        return [
            (t_query, "kernel", q), (t_value, "kernel", k),
            (t_value, "kernel", v), (t_query, "kernel", o),
            # heads * key_dim and heads * value_dim per pair of positions,
            # as a share of the projection kernels (d_in * heads * dim).
            (pairs / q.kernel.shape[0], "kernel", q),
            (pairs / v.kernel.shape[0], "kernel", v),
        ]


def einsum_macs(equation, input_shape, kernel_shape):
    """Multiply-adds per sample of `EinsumDense(equation)` on an input of
    `input_shape` (batch axis first): the product of the sizes of every
    index of the equation, the batch's excepted. None when a size is
    unknown."""
    operands = equation.split("->")[0]
    inputs, kernel = operands.split(",")
    shape = list(input_shape)
    other = 1
    if "..." in inputs:
        start = inputs.index("...")
        count = len(shape) - (len(inputs) - 3)
        covered = shape[start:start + count]
        shape = shape[:start] + shape[start + count:]
        inputs = inputs.replace("...", "")
        if start == 0:
            covered = covered[1:]  # The batch axis.
        if any(d is None for d in covered):
            return None
        other = product(covered) if covered else 1
        batch = None
    else:
        batch = inputs[0]
    sizes = dict(zip(inputs, shape))
    sizes.update(zip(kernel, kernel_shape))
    sizes.pop(batch, None)
    if any(d is None for d in sizes.values()):
        return None
    return other * product(sizes.values())


class PoolingRule(LayerRule):
    """Pooling, padding, cropping, upsampling, dropout: per-channel maps."""

    def propagate(self, ctx, node):
        _channels_last(node.operation)
        super().propagate(ctx, node)


class ResizingRule(PoolingRule):
    """`Resizing`: interpolates each channel on its own, zero to zero,
    unless it pads to an aspect ratio with a non-zero fill."""

    def propagate(self, ctx, node):
        layer = node.operation
        if getattr(layer, "pad_to_aspect_ratio", False) and getattr(
                layer, "fill_value", 0.0):
            raise Unsupported("pads with a non-zero fill value")
        super().propagate(ctx, node)


class FlattenRule(LayerRule):
    """Flatten of channels-last data: channel c lands on rows p*C + c."""

    def propagate(self, ctx, node):
        _channels_last(node.operation)
        x = node.inputs[0]
        spatial = _spatial_size(x)
        if spatial is None:
            raise Unsupported("input has unknown spatial size")
        ctx.set_ids(node.outputs[0], np.tile(ctx.ids(x), spatial))


class ReshapeRule(LayerRule):
    """Reshape that keeps channels last, or flattens everything."""

    def propagate(self, ctx, node):
        x, y = node.inputs[0], node.outputs[0]
        in_ids = ctx.ids(x)
        if y.shape[-1] == x.shape[-1] and x.shape[-1] is not None:
            ctx.set_ids(y, in_ids)
        elif len(y.shape) == 2 and _spatial_size(x) is not None:
            ctx.set_ids(y, np.tile(in_ids, _spatial_size(x)))
        else:
            raise Unsupported(
                f"reshapes {tuple(x.shape)} to {tuple(y.shape)}, which moves "
                "the channel axis"
            )

    def stripped_config(self, config, node, kept):
        target = list(config["target_shape"])
        if target and target[-1] != -1:
            target[-1] = kept(node.outputs[0])
        config["target_shape"] = tuple(target)
        return config


class PermuteRule(LayerRule):
    def propagate(self, ctx, node):
        dims = tuple(node.operation.dims)
        if dims[-1] != len(dims):
            raise Unsupported("permutes the channel axis")
        super().propagate(ctx, node)


class MergeRule(LayerRule):
    """Add, Subtract, Average, Maximum, Minimum, Multiply: coupled inputs."""

    def __init__(self, kind):
        self.kind = kind

    def propagate(self, ctx, node):
        full = [t for t in node.inputs if t.shape[-1] not in (1, None)]
        if not full:
            return super().propagate(ctx, node)
        ids = ctx.ids(full[0])
        for t in node.inputs:
            other = ctx.ids(t)
            if len(other) == len(ids):
                ctx.union(ids, other)
            elif len(other) == 1:
                # Broadcast along channels: that single channel stays.
                ctx.block(other, f"'{node.operation.name}' broadcasts it")
            else:
                raise Unsupported("inputs have different channel counts")
        ctx.set_ids(node.outputs[0], ids)


class ConcatenateRule(LayerRule):
    kind = ANY_DIRTY

    def propagate(self, ctx, node):
        rank = len(node.outputs[0].shape)
        axis = node.operation.axis
        parts = [ctx.ids(t) for t in node.inputs]
        if axis in (-1, rank - 1):
            ctx.set_ids(node.outputs[0], np.concatenate(parts))
        else:
            for other in parts[1:]:
                ctx.union(parts[0], other)
            ctx.set_ids(node.outputs[0], parts[0])


class ConcatenateOpRule(ConcatenateRule):
    """`keras.ops.concatenate` (DeepLabV3's pyramid pooling): the layer's
    rule, once every operand is known to be a graph tensor."""

    def propagate(self, ctx, node):
        if any(not isinstance(c, (int, type(None)))
               for c in node.constant_arguments()):
            raise Unsupported("concatenates a constant")
        super().propagate(ctx, node)


class OpRule(LayerRule):
    """A `keras.ops` call on KerasTensors (e.g. `x + 3.0`, `ops.relu(x)`).

    One tensor operand: element-wise (constants must be scalars).
    Several tensor operands: a coupled merge like the merge layers.
    """

    def __init__(self, merge_kind=None):
        self.merge_kind = merge_kind

    def propagate(self, ctx, node):
        for c in node.constant_arguments():
            if isinstance(c, (bool, int, float, type(None), str)):
                continue
            if np.size(c) != 1:
                raise Unsupported("has a non-scalar constant operand")
        if len(node.inputs) == 1:
            return super().propagate(ctx, node)
        if self.merge_kind is None:
            raise Unsupported("is not element-wise in its tensor operands")
        MergeRule(self.merge_kind).propagate(ctx, node)


class PadRule(OpRule):
    """`keras.ops.pad` of the spatial axes (keras-hub's pre-activation
    ResNet stem): each channel maps to itself; masks sit after it, as after
    any element-wise op, since a non-zero `constant_values` fills the
    border of a masked channel."""

    def propagate(self, ctx, node):
        widths = node.operation.pad_width
        if tuple(widths[-1]) != (0, 0):
            raise Unsupported("pads the channel axis")
        super().propagate(ctx, node)


class ReduceRule(LayerRule):
    """`keras.ops.mean` / `max` over axes other than the channels (the
    global pooling of a squeeze-and-excite block): each channel maps to
    itself, zero to zero."""

    def propagate(self, ctx, node):
        axis = node.operation.axis
        rank = len(node.inputs[0].shape)
        axes = range(rank) if axis is None else (
            [axis] if isinstance(axis, int) else axis)
        if any(a % rank == rank - 1 for a in axes):
            raise Unsupported("reduces over the channel axis")
        super().propagate(ctx, node)


class SplitRule(LayerRule):
    """`keras.ops.split` (CSPNet's cross-stage halves). Along the channel
    axis each part takes its slice of the channel ids (a part consumed by a
    layer keeps at least one channel: `Masks.producer_segments`); along
    another axis every part keeps them all."""

    def propagate(self, ctx, node):
        x = node.inputs[0]
        ids = ctx.ids(x)
        if not _splits_channels(node):
            for y in node.outputs:
                ctx.set_ids(y, ids)
            return
        start = 0
        for y in node.outputs:
            if y.shape[-1] is None:
                raise Unsupported("splits channels into parts of unknown size")
            ctx.set_ids(y, ids[start:start + y.shape[-1]])
            start += y.shape[-1]

    def stripped_operation(self, op, node, kept):
        if not _splits_channels(node):
            return op
        bounds = np.cumsum([kept(y) for y in node.outputs])[:-1]
        return type(op)([int(b) for b in bounds], axis=op.axis)


def _splits_channels(node):
    rank = len(node.inputs[0].shape)
    return node.operation.axis % rank == rank - 1


def node_kind(rule, node):
    """The zero-propagation kind of one call (ops depend on operand count)."""
    if isinstance(rule, OpRule):
        if len(node.inputs) == 1:
            return ELEMENTWISE
        return rule.merge_kind
    return rule.kind


def weight_leaf_name(variable):
    """'kernel' for a variable whose path is 'conv1/kernel'."""
    return variable.path.split("/")[-1]


def product(values):
    return math.prod(int(v) for v in values)

