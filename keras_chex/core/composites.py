"""Looking inside composite layers.

Many real models (keras-hub's MobileNet, EfficientNet and HGNetV2 blocks,
RetinaNet's feature pyramid and heads, DeepLabV3's pyramid pooling) are
Functional graphs of *composite* layers: subclassed layers whose `call`
is made of other Keras layers and `keras.ops`. The channel analysis sees
such a layer as one opaque operation and can prune nothing next to it.

A composite layer's own `call`, run on `keras.Input`s, leaves a graph of
the layers and ops inside it. `open_composites` turns that graph into a
nested Functional model (named as the layer, sharing its inner layers and
weights) called in the layer's place, repeated inside until nothing more
opens. The analysis then treats it like any nested model.

A layer is opened only when the result provably computes the same thing:

- it is not a Keras built-in layer and has no layer rule of its own;
- it holds no variable of its own (only through the layers inside it),
  and the traced graph uses exactly its variables, no more and no fewer;
- it is called with one tensor argument (or one list/dict of tensors),
  and no other argument than `training=None`;
- its `call` does not branch in Python on `training` (the trace would
  freeze one branch);
- on random inputs (inference mode) the nested model's outputs equal the
  layer's own.

Anything else is left as it was (and the analysis reports it as before).
"""

import inspect
import logging
import re
import weakref

import keras
import numpy as np
from keras import tree

from keras_chex.core import _graph
from keras_chex.core import layer_registry

# Spatial or sequence sizes the check runs at where the model leaves them
# free.
CHECK_SIZE = 32

_TRAINING_BRANCH = re.compile(
    r"\bif\s+(not\s+)?training\b|\btraining\s+(and|or)\b|"
    r"\b(and|or)\s+(not\s+)?training\b|\bif\s+self\.training\b")

# Opening a model traces and checks each composite layer once; callers
# (count_macs, channel_groups, wrap) may ask for the same model often.
_CACHE = weakref.WeakKeyDictionary()
# Layer -> why it stays whole, for the analysis' report.
_CLOSED = weakref.WeakKeyDictionary()
# Closed layer -> {input shapes: its traced graph (or None)}, for costs.
_TRACES = weakref.WeakKeyDictionary()


def closed_reason(layer):
    """Why a layer made of layers was not opened (None if it was, or is
    not one)."""
    try:
        return _CLOSED.get(layer)
    except TypeError:
        return None


def open_composites(model):
    """Returns `model` with every composite layer that can be opened
    replaced by a nested Functional model of the layers inside it.

    Args:
        model: a Functional or built Sequential model.

    Returns:
        `model` itself when nothing opens; otherwise a new Functional model
        sharing `model`'s layers and weights (nothing is copied) with the
        same inputs and outputs.

    Example:

    ```python
    backbone = keras_hub.models.MobileNetBackbone(...)
    opened = open_composites(backbone)  # blocks become nested models
    ```
    """
    if not _graph.is_graph_model(model):
        return model
    try:
        opened = _CACHE[model]
        return model if opened is None else opened
    except (KeyError, TypeError):
        pass
    opened = _Opener().open_graph(model)
    try:
        # None for "nothing opened": the model itself as the value would
        # keep its weak key alive for ever.
        _CACHE[model] = None if opened is model else opened
    except TypeError:
        pass
    return opened


class _Opener:
    """One pass over a model: each composite layer traced once."""

    def __init__(self):
        # id(graph) or (id(layer), input shapes) -> replacement (or itself)
        self._subs = {}

    def open_graph(self, graph):
        """`graph`, or a rebuilt copy of it if something inside opened."""
        # id(a node's first output) -> replacement; nodes are re-listed
        # on every walk, their tensors are not.
        replacements = {}
        calls = {}  # id(op) -> input shapes of its calls so far
        for node in _graph.nodes(graph):
            op = node.operation
            if _graph.is_graph_model(op):
                key = id(op)
                if key not in self._subs:
                    self._subs[key] = self.open_graph(op)
            else:
                # A layer called at several sizes (a detection head shared
                # by the levels of a feature pyramid) gets one nested model
                # per size, sharing its layers, so that every call keeps
                # concrete sizes to count MACs at.
                shape = tuple(tuple(t.shape) for t in node.inputs)
                shapes = calls.setdefault(id(op), [])
                if shape not in shapes:
                    shapes.append(shape)
                key = (id(op), shape)
                if key not in self._subs:
                    name = op.name if len(shapes) == 1 else (
                        f"{op.name}_call{len(shapes)}")
                    self._subs[key] = self._open_layer(op, node, name)
            if self._subs[key] is not op:
                replacements[id(node.outputs[0])] = self._subs[key]
        if not replacements:
            return graph

        def node_fn(node, tensor_map):
            sub = replacements.get(id(node.outputs[0]))
            if sub is None or _graph.is_graph_model(node.operation):
                return node.call_with(sub or node.operation, tensor_map)
            args, _ = node.call_structure()
            # One argument, and a `training=None` that can go.
            inputs = tree.map_structure(lambda t: tensor_map[id(t)], args[0])
            return tree.flatten(sub(inputs))

        return _graph.rebuild(graph, node_fn)

    def _open_layer(self, layer, node, name):
        """The nested model (named `name`) replacing `layer` at this
        call's input sizes, or `layer` itself."""
        if not _is_composite(layer):
            return layer
        reason = self._why_not(layer, node, name)
        if isinstance(reason, str):
            try:
                _CLOSED[layer] = reason
            except TypeError:
                pass
            return layer
        # Composite layers inside the traced graph open the same way.
        return self.open_graph(reason)

    def _why_not(self, layer, node, name):
        """The traced nested model, or why there is none."""
        if _graph.own_variables(layer):
            return "it holds weights of its own besides its layers'"
        if _branches_on_training(type(layer)):
            return "its `call` branches on `training`"
        traced = _trace(layer, node, name)
        if isinstance(traced, str):
            return traced
        sub, inputs = traced
        if not _same_variables(layer, sub):
            return "its `call` uses weights other than through its layers"
        if not _same_outputs(layer, sub, inputs):
            return "the traced graph of its `call` computes something else"
        return sub


def traced_for_cost(layer, node):
    """The graph of a composite layer that stays closed, traced at this
    call's sizes, to count its MACs (its channels are all kept, so the
    graph need not compute exactly what the layer does, only the same
    multiplications): None when it cannot be traced.

    Example: keras-hub's `ViTPatchingAndEmbedding` holds a position
    embedding of its own, so it stays closed; the convolution inside it is
    counted through this graph.
    """
    if not _is_composite(layer):
        return None
    key = tuple(tuple(t.shape) for t in node.inputs)
    try:
        traces = _TRACES.setdefault(layer, {})
    except TypeError:
        traces = {}
    if key not in traces:
        # One sample: some layers size tensors by the batch (keras-hub's
        # patch embeddings tile a class token), which a symbolic batch
        # cannot do; MACs are per sample anyway.
        traced = _trace(layer, node, layer.name, batch=1)
        traces[key] = None if isinstance(traced, str) else traced[0]
    return traces[key]


def _trace(layer, node, name, batch=None):
    """`(nested model of layer.call at the node's sizes, its inputs)`, or
    why the call cannot be traced. `batch` fixes the batch size."""
    argument = _single_argument(node)
    if argument is None:
        return "it is called with more than one argument"
    if isinstance(argument, dict):
        # Named after their keys, as Keras wants of dict inputs.
        inputs = {k: keras.Input(batch_shape=(batch,) + t.shape[1:],
                                 dtype=t.dtype, name=k)
                  for k, t in argument.items()}
    else:
        inputs = tree.map_structure(
            lambda t: keras.Input(batch_shape=(batch,) + t.shape[1:],
                                  dtype=t.dtype), argument)
    try:
        outputs = layer.call(inputs)
        sub = keras.Model(inputs, outputs, name=name)
    except Exception as error:
        return ("its `call` cannot run on symbolic inputs "
                f"({type(error).__name__})")
    return sub, inputs


def same_call(layer, other, node):
    """Whether `other` (a rebuilt copy of `layer`) computes what `layer`
    does in the call `node`, on random inputs in inference mode. Keras'
    own layers are trusted; a call with more than one tensor argument
    cannot be checked and counts as different."""
    if type(layer).__module__.startswith("keras."):
        return True
    argument = _single_argument(node)
    return argument is not None and _same_outputs(layer, other, argument)


def _single_argument(node):
    """The call's one argument (a tensor, or a list/dict of tensors), or
    None when it takes more."""
    args, kwargs = node.call_structure()
    # `training=None` (a parent composite passing its own on, traced
    # without one) leaves the mode to the call context, as a nested
    # model does.
    if len(args) != 1 or {k: v for k, v in kwargs.items()
                          if not (k == "training" and v is None)}:
        return None
    leaves = tree.flatten(args[0])
    if not leaves or not all(isinstance(t, keras.KerasTensor)
                             for t in leaves):
        return None
    return args[0]


def origin_name(name):
    """The composite layer's name behind a nested model's: the model of
    its second call size is named `<layer>_call2`, and so on."""
    match = re.fullmatch(r"(.+)_call\d+", name)
    return match.group(1) if match else name


def _is_composite(layer):
    """A layer of layers keras-chex has no rule for (Keras' own layers are
    analysed by their rules, or not at all)."""
    if not isinstance(layer, keras.layers.Layer):
        return False  # A keras.ops operation.
    if type(layer).__module__.startswith("keras."):
        return False
    if layer_registry.rule_for(layer) is not None:
        return False
    return bool(_graph.sublayers(layer))


def _branches_on_training(cls):
    try:
        source = inspect.getsource(cls.call)
    except (OSError, TypeError):
        return True  # Cannot tell: do not risk freezing a branch.
    return bool(_TRAINING_BRANCH.search(source))


def _same_variables(layer, sub):
    # Weights, not variables: a layer the trace did not call (a residual's
    # dropout when the shapes differ) leaves its seed state behind.
    ids = {id(v) for v in layer.weights}
    return ids == {id(v) for v in sub.weights}


def _sample(tensor, rng):
    shape = [2] + [CHECK_SIZE if d is None else d for d in tensor.shape[1:]]
    if "float" in str(tensor.dtype):
        return rng.standard_normal(shape).astype(tensor.dtype)
    return np.zeros(shape, dtype=tensor.dtype)


def _same_outputs(layer, sub, inputs):
    rng = np.random.default_rng(0)
    x = tree.map_structure(lambda t: _sample(t, rng), inputs)
    # Eager calls at new shapes make TensorFlow warn about retracing its
    # convolutions: true of this check, not of the user's model.
    tf_logger = logging.getLogger("tensorflow")
    level = tf_logger.level
    tf_logger.setLevel(max(level, logging.ERROR))
    try:
        expected = tree.flatten(layer(x, training=False))
        got = tree.flatten(sub(x, training=False))
    except Exception:
        return False
    finally:
        tf_logger.setLevel(level)
    if len(expected) != len(got):
        return False
    for e, g in zip(expected, got):
        e = keras.ops.convert_to_numpy(e)
        g = keras.ops.convert_to_numpy(g)
        scale = max(1.0, float(np.max(np.abs(e), initial=0.0)))
        if e.shape != g.shape or not np.allclose(g, e, rtol=1e-4,
                                                 atol=1e-5 * scale):
            return False
    return True
