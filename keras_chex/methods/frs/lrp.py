"""Layer-wise relevance propagation (LRP) over a Keras graph.

The relevance of the true class (one at its logit, zero elsewhere; a
softmax is skipped) is sent back through the network node by node, each
layer splitting the relevance of its outputs over its inputs by one rule:

- convolutions (plain, grouped, depthwise, transposed) and Dense: the
  alpha-beta rule with alpha = 2, beta = 1. Each input's positive
  contributions take `alpha` times their share of the output's positive
  total, its negative contributions `beta` times their share of the
  negative total. Biases are left out of both totals, so the inputs
  receive exactly `alpha - beta = 1` times the output's relevance. Where an
  output has contributions of one sign only, that sign takes all of it (a
  share of 1), which keeps the total.
- separable convolutions: the same rule for the depthwise stage and the
  pointwise stage, one after the other;
- BatchNorm, masks, activations, dropout and other element-wise layers:
  relevance passes through unchanged;
- max pooling, Maximum/Minimum: all of it to the arg-max;
- average and global average pooling, Add, Subtract, Average: in
  proportion to each input's contribution `x_i * d out / d x_i`;
- Concatenate (by channel), Flatten, Reshape, Permute, padding, cropping,
  up-sampling: moved with the values they index;
- Multiply (an SE block's gate): all of it to the input of the output's
  full shape, the gate being the smaller (broadcast) one.

An output whose inputs contribute nothing (all zero, its value made by a
bias or a BatchNorm shift alone; |total| <= `EPSILON`) passes nothing on:
its relevance is absorbed there, as a bias's share is in LRP. Everywhere
else the total is conserved from layer to layer up to float rounding.
Layers with no rule are reported; every tensor upstream of one gets an
incomplete relevance, so `RelevanceGraph.incomplete` names those tensors
and the method does not score their channels.
"""

import dataclasses

import keras
import tensorflow as tf
from keras import layers as L

from keras_chex.core import _graph
from keras_chex.core import masking
from keras_chex.core import statistics

ALPHA = 2.0
BETA = 1.0
EPSILON = 1e-9

PASS = "pass"
ROUTE = "route"
PROPORTIONAL = "proportional"
GATE = "gate"
ALPHA_BETA = "alpha_beta"
SEPARABLE = "separable"


def _classes(*names):
    return tuple(c for c in (getattr(L, n, None) for n in names) if c)


_LAYER_RULES = {}
for _cls in _classes(
    "BatchNormalization", "Activation", "ReLU", "LeakyReLU", "PReLU", "ELU",
    "Softmax", "Dropout", "SpatialDropout1D", "SpatialDropout2D",
    "SpatialDropout3D", "GaussianNoise", "GaussianDropout", "AlphaDropout",
    "ActivityRegularization", "Identity", "Rescaling", "Normalization",
):
    _LAYER_RULES[_cls] = PASS
_LAYER_RULES[masking.ChannelMask] = PASS
# The BatchNorms a wrapped model holds: masked, or only tracking statistics
# (those whose channels are never pruned, e.g. before the model's output).
_LAYER_RULES[statistics.TrackingBatchNormalization] = PASS
_LAYER_RULES[masking.MaskedBatchNormalization] = PASS
for _cls in _classes(
    "Flatten", "Reshape", "Permute", "Concatenate", "RepeatVector",
    "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "Cropping1D",
    "Cropping2D", "Cropping3D", "UpSampling1D", "UpSampling2D",
    "UpSampling3D", "MaxPooling1D", "MaxPooling2D", "MaxPooling3D",
    "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
    "Maximum", "Minimum",
):
    _LAYER_RULES[_cls] = ROUTE
for _cls in _classes(
    "Add", "Subtract", "Average", "AveragePooling1D", "AveragePooling2D",
    "AveragePooling3D", "GlobalAveragePooling1D", "GlobalAveragePooling2D",
    "GlobalAveragePooling3D",
):
    _LAYER_RULES[_cls] = PROPORTIONAL
_LAYER_RULES[L.Multiply] = GATE
for _cls in _classes(
    "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose",
    "Conv3DTranspose", "DepthwiseConv1D", "DepthwiseConv2D", "Dense",
):
    _LAYER_RULES[_cls] = ALPHA_BETA
for _cls in _classes("SeparableConv1D", "SeparableConv2D"):
    _LAYER_RULES[_cls] = SEPARABLE

# `keras.ops` calls on graph tensors, by operation class name.
_OP_RULES = {
    "Add": PROPORTIONAL, "Subtract": PROPORTIONAL, "Multiply": GATE,
    "Maximum": ROUTE, "Minimum": ROUTE, "Concatenate": ROUTE,
    "Reshape": ROUTE, "Transpose": ROUTE, "ExpandDims": ROUTE,
    "Squeeze": ROUTE,
}


# Activations whose output is never negative: a convolution reading it has
# no negative inputs, and the alpha-beta rule needs half the products.
_NONNEGATIVE_ACTIVATIONS = {"relu", "relu6", "sigmoid", "softmax", "softplus",
                            "hard_sigmoid", "exponential"}
_NONNEGATIVE_OPS = {"Relu", "Relu6", "Sigmoid", "Softplus", "HardSigmoid",
                    "Exp", "Softmax", "Abs", "Absolute", "Square", "Sqrt"}
# Layers that keep a non-negative input non-negative.
_KEEPS_SIGN = _classes(
    "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
    "GaussianDropout", "AlphaDropout", "GaussianNoise",
    "ActivityRegularization", "Identity") + (masking.ChannelMask,)


def makes_nonnegative(op):
    """Whether `op`'s output is >= 0 whatever its input."""
    if isinstance(op, L.ReLU):
        return not op.negative_slope and (op.threshold or 0) >= 0
    if isinstance(op, L.Softmax):
        return True
    activation = getattr(op, "activation", None)
    if isinstance(op, keras.layers.Layer):
        return getattr(activation, "__name__", None) in (
            _NONNEGATIVE_ACTIVATIONS)
    return type(op).__name__ in _NONNEGATIVE_OPS


def keeps_nonnegative(op, rule):
    """Whether `op` maps non-negative inputs to a non-negative output."""
    if type(op).__name__ == "Subtract":
        return False
    return rule in (ROUTE, PROPORTIONAL, GATE) or isinstance(op, _KEEPS_SIGN)


def rule_of(node):
    """The LRP rule of one graph node, or None if it has none."""
    op = node.operation
    rule = _LAYER_RULES.get(type(op))
    if rule is not None:
        return rule
    if isinstance(op, keras.layers.Layer):
        return None
    name = type(op).__name__
    if name in _OP_RULES:
        return _OP_RULES[name]
    # A one-tensor keras.ops call that keeps the shape (`ops.relu(x)`,
    # `x * 2.0`) is element-wise.
    if (len(node.inputs) == 1 and len(node.outputs) == 1
            and tuple(node.inputs[0].shape) == tuple(node.outputs[0].shape)):
        return PASS
    return None


@dataclasses.dataclass
class Step:
    """One node of the flattened graph, or an alias across a nested model.

    Attributes:
        node: the `GraphNode` (None for an alias).
        rule: its LRP rule (None: unsupported).
        inputs: keys of the tensors it reads.
        outputs: keys of the tensors it writes.
    """

    node: object
    rule: object
    inputs: tuple
    outputs: tuple


class RelevanceGraph:
    """A Keras graph model flattened for relevance propagation.

    Nested models are inlined; a tensor is keyed by the path of the
    nested-model calls it lives in and its own id, so a nested model
    called twice has two sets of keys.

    Args:
        model: a Functional or Sequential model (plain or wrapped).

    Attributes:
        steps: the `Step`s in execution order.
        input_keys / output_keys: keys of the model's inputs and outputs.
        unsupported: names of the layers (or ops) with no LRP rule.
        incomplete: keys of the tensors whose relevance misses what should
            have come back through an unsupported layer.
        nonnegative: keys of the tensors that are never negative.
    """

    def __init__(self, model):
        self.model = model
        self.steps = []
        self.tensors = {}  # key -> KerasTensor
        self.unsupported = []
        self.input_keys = [self._key((), t) for t in _graph.inputs_of(model)]
        self.output_keys = self._flatten(model, (), self.input_keys)
        self.incomplete = self._incomplete()
        self.nonnegative = self._nonnegative()

    def _key(self, path, tensor):
        key = (path, id(tensor))
        self.tensors[key] = tensor
        return key

    def _flatten(self, model, path, input_keys):
        for inner, outer in zip(_graph.inputs_of(model), input_keys):
            key = self._key(path, inner)
            if key != outer:
                self.steps.append(Step(None, PASS, (outer,), (key,)))
        for i, node in enumerate(_graph.nodes(model)):
            ins = tuple(self._key(path, t) for t in node.inputs)
            outs = tuple(self._key(path, t) for t in node.outputs)
            op = node.operation
            if _graph.is_graph_model(op):
                inner_outs = self._flatten(op, path + (i,), ins)
                for inner, outer in zip(inner_outs, outs):
                    self.steps.append(Step(None, PASS, (inner,), (outer,)))
                continue
            rule = rule_of(node)
            if rule == GATE and not gate_is_clear(node):
                rule = None  # Two full-size factors: neither is the gate.
            if rule is None and op.name not in self.unsupported:
                self.unsupported.append(op.name)
            self.steps.append(Step(node, rule, ins, outs))
        return [self._key(path, t) for t in _graph.outputs_of(model)]

    def _incomplete(self):
        incomplete = set()
        for step in reversed(self.steps):
            if step.rule is None or any(k in incomplete for k in step.outputs):
                incomplete.update(step.inputs)
        return incomplete

    def _nonnegative(self):
        keys = set()
        for step in self.steps:
            inputs_ok = all(k in keys for k in step.inputs)
            if step.node is None:
                ok = inputs_ok
            else:
                op = step.node.operation
                ok = makes_nonnegative(op) or (
                    inputs_ok and keeps_nonnegative(op, step.rule))
            if ok:
                keys.update(step.outputs)
        return keys

    # -- running -------------------------------------------------------------
    def forward(self, inputs):
        """All tensor values for a batch (a list aligned with the inputs)."""
        values = dict(zip(self.input_keys, inputs))
        for step in self.steps:
            if step.node is None:
                values[step.outputs[0]] = values[step.inputs[0]]
                continue
            node = step.node
            feed = {id(t): values[k] for t, k in zip(node.inputs, step.inputs)}
            outputs = node.call_with(node.operation, feed)
            for k, v in zip(step.outputs, outputs):
                values[k] = v
        return values

    def backward(self, values, relevance, on_step=None):
        """Propagates `relevance` (a dict key -> tensor) to every tensor.

        Args:
            values: the forward values (from `forward`).
            relevance: initial relevance of the output tensors.
            on_step: optional `fn(step, output_relevances)`, called once
                each step's output relevance is complete (before it is
                passed to the step's inputs).

        Returns:
            The dict key -> relevance of every tensor reached.
        """
        relevance = dict(relevance)
        for step in reversed(self.steps):
            outs = [relevance.get(k) for k in step.outputs]
            if all(r is None for r in outs):
                continue
            outs = [tf.zeros_like(values[k], tf.float32) if r is None else r
                    for k, r in zip(step.outputs, outs)]
            if on_step is not None:
                on_step(step, outs)
            if step.rule is None:
                continue
            ins = [tf.cast(values[k], tf.float32) for k in step.inputs]
            nonnegative = step.inputs[0] in self.nonnegative
            for key, r in zip(step.inputs,
                              _backward(step, ins, outs, nonnegative)):
                if r is None:
                    continue
                relevance[key] = r if key not in relevance else (
                    relevance[key] + r)
        return relevance


def _backward(step, inputs, relevance, nonnegative=False):
    """Relevance of a step's inputs from that of its outputs.

    `nonnegative`: the (first) input is known to be >= 0.
    """
    rule = step.rule
    if rule == PASS:
        return [relevance[0]]
    node = step.node
    if rule == ALPHA_BETA:
        layer = node.operation
        return [alpha_beta(_linear_op(layer), inputs[0],
                           tf.cast(layer.kernel, tf.float32), relevance[0],
                           nonnegative=nonnegative)]
    if rule == SEPARABLE:
        return [_separable(node.operation, inputs[0], relevance[0],
                           nonnegative)]
    if rule == GATE:
        return _gate(node, inputs, relevance[0])
    op = node.operation

    def call(*xs):
        feed = {id(t): x for t, x in zip(node.inputs, xs)}
        return node.call_with(op, feed)

    if rule == ROUTE:
        return route(call, inputs, relevance)
    return proportional(call, inputs, relevance)


def route(fn, inputs, relevance):
    """Moves relevance back along `fn`'s gradient (index ops, arg-max)."""
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        outputs = [tf.cast(o, tf.float32) for o in fn(*inputs)]
    return tape.gradient(outputs, inputs, output_gradients=relevance)


def proportional(fn, inputs, relevance):
    """Splits relevance in proportion to each input's contribution."""
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        outputs = [tf.cast(o, tf.float32) for o in fn(*inputs)]
    scaled = [tf.where(tf.abs(z) > EPSILON, r / _safe(z), 0.0)
              for z, r in zip(outputs, relevance)]
    grads = tape.gradient(outputs, inputs, output_gradients=scaled)
    return [None if g is None else x * g for x, g in zip(inputs, grads)]


def _safe(z):
    return tf.where(tf.abs(z) > EPSILON, z, 1.0)


def alpha_beta(linear, x, kernel, relevance, alpha=ALPHA, beta=BETA,
               nonnegative=False):
    """The alpha-beta rule for an op linear in `x` and in `kernel`.

    Args:
        linear: `fn(x, kernel)` without bias and activation.
        x: the input (float32).
        kernel: the weights (float32).
        relevance: the relevance of the op's output.
        alpha, beta: the rule's weights (`alpha - beta = 1` conserves).
        nonnegative: `x` is known to be >= 0 (after a ReLU, say): the
            products of its negative part are skipped.

    Returns:
        The relevance of `x`.
    """
    kp, kn = tf.nn.relu(kernel), tf.minimum(kernel, 0.0)
    if nonnegative:
        with tf.GradientTape() as tape:
            tape.watch(x)
            zp, zn = linear(x, kp), linear(x, kn)
        sp, sn = _shares(zp, zn, relevance, alpha, beta)
        return x * tape.gradient([zp, zn], x, output_gradients=[sp, -sn])
    xp, xn = tf.nn.relu(x), tf.minimum(x, 0.0)
    with tf.GradientTape() as tape:
        tape.watch([xp, xn])
        zp = linear(xp, kp) + linear(xn, kn)
        zn = linear(xp, kn) + linear(xn, kp)
    sp, sn = _shares(zp, zn, relevance, alpha, beta)
    gp, gn = tape.gradient([zp, zn], [xp, xn], output_gradients=[sp, -sn])
    return xp * gp + xn * gn


def _shares(zp, zn, relevance, alpha, beta):
    """Relevance per unit of positive and of negative contribution."""
    has_p, has_n = zp > EPSILON, zn < -EPSILON
    both = has_p & has_n
    a = tf.where(both, alpha, tf.where(has_p, 1.0, 0.0))
    b = tf.where(both, beta, tf.where(has_n, -1.0, 0.0))
    return (tf.where(has_p, a * relevance / _safe(zp), 0.0),
            tf.where(has_n, b * relevance / _safe(zn), 0.0))


def _linear_op(layer):
    """`fn(x, kernel)`: the layer's linear part, without bias."""
    ops = keras.ops
    if isinstance(layer, L.Dense):
        return lambda x, k: ops.matmul(x, k)
    common = dict(strides=layer.strides, padding=layer.padding,
                  dilation_rate=layer.dilation_rate,
                  data_format=layer.data_format)
    if isinstance(layer, (L.DepthwiseConv1D, L.DepthwiseConv2D)):
        return lambda x, k: ops.depthwise_conv(x, k, **common)
    if "Transpose" in type(layer).__name__:
        return lambda x, k: ops.conv_transpose(
            x, k, output_padding=layer.output_padding, **common)
    return lambda x, k: layer.convolution_op(x, k)


def _separable(layer, x, relevance, nonnegative=False):
    ops = keras.ops
    depthwise = tf.cast(layer.depthwise_kernel, tf.float32)
    pointwise = tf.cast(layer.pointwise_kernel, tf.float32)

    def first(v, k):
        return ops.depthwise_conv(
            v, k, strides=layer.strides, padding=layer.padding,
            dilation_rate=layer.dilation_rate, data_format=layer.data_format)

    def second(v, k):
        return ops.conv(v, k, strides=1, padding="valid",
                        data_format=layer.data_format)

    middle = first(x, depthwise)
    r_middle = alpha_beta(second, middle, pointwise, relevance)
    return alpha_beta(first, x, depthwise, r_middle, nonnegative=nonnegative)


def _gate(node, inputs, relevance):
    full = tuple(node.outputs[0].shape[1:])
    return [relevance if tuple(t.shape[1:]) == full else None
            for t in node.inputs]


def gate_is_clear(node):
    """Whether a Multiply node has exactly one full-shape (signal) input."""
    full = tuple(node.outputs[0].shape[1:])
    return sum(tuple(t.shape[1:]) == full for t in node.inputs) == 1
