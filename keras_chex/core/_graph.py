"""Walking and rebuilding Keras 3 Functional graphs.

This is, with `_trainer.py` (a train step with a gradient hook), the only
module of keras-chex that touches private Keras internals
(`Functional._nodes_by_depth`, `Node.arguments`, `Sequential._functional`,
`Functional._inputs_struct`/`_outputs_struct`, the `keras.ops` operation
classes under `keras.src.ops` and `keras.src.activations`, and a layer's
own attributes, `_inbound_nodes` and `Variable._autocast` to copy a layer
whose config does not round-trip). Keras has no
public API to enumerate the call sites (nodes) of a graph network with
their arguments, and channel analysis needs exactly that. Everything else in the package goes
through the small surface below, so a Keras upgrade breaks one file, and
`tests/core/test_graph.py` pins the behaviour we rely on.
"""

import dataclasses

import keras
from keras import tree

try:  # Keras >= 3.0 keeps these here; only for isinstance checks.
    from keras.src.models.functional import Functional as _Functional
except ImportError:  # pragma: no cover - guarded by tests/core/test_graph.py
    _Functional = keras.Model


@dataclasses.dataclass(frozen=True)
class GraphNode:
    """One call of an operation (layer or `keras.ops` op) inside a graph.

    Attributes:
        operation: the layer or operation that was called.
        inputs: flat list of the `KerasTensor`s the call consumed, in order.
        outputs: flat list of the `KerasTensor`s it produced.
        arguments: Keras' record of the call's args/kwargs (opaque; pass it
            back to `call_with`).
    """

    operation: object
    inputs: tuple
    outputs: tuple
    arguments: object

    def call_with(self, operation, tensor_map):
        """Calls `operation` with this node's arguments, tensors replaced.

        Args:
            operation: callable to apply (the original or a replacement).
            tensor_map: dict from `id(original KerasTensor)` to the tensor to
                use in its place.

        Returns:
            The flat list of outputs.
        """
        args, kwargs = self.arguments.fill_in(tensor_map)
        return tree.flatten(operation(*args, **kwargs))

    def call_structure(self):
        """The call's `(args, kwargs)` as recorded, original tensors in
        place (to re-trace the call on fresh inputs of the same structure).
        """
        return self.arguments.args, self.arguments.kwargs

    def constant_arguments(self):
        """Returns the non-tensor leaves of the call (constants, flags)."""
        tensor_ids = {id(t) for t in self.inputs}
        leaves = tree.flatten((self.arguments.args, self.arguments.kwargs))
        return [x for x in leaves if id(x) not in tensor_ids]


def is_graph_model(obj):
    """True for a Functional model or a built Sequential model."""
    if isinstance(obj, keras.Sequential):
        return True
    return isinstance(obj, _Functional)


def graph_of(model):
    """Returns the Functional graph behind `model`.

    Args:
        model: a Functional model or a Sequential model.

    Returns:
        A Functional model (the model itself, or the graph a Sequential
        model keeps internally).

    Raises:
        ValueError: for a Sequential model that is not built yet, or a
            subclassed model, with what to do about it.
    """
    if isinstance(model, keras.Sequential):
        functional = getattr(model, "_functional", None)
        if functional is None:
            raise ValueError(
                f"Sequential model '{model.name}' has no known input shape, so "
                "its graph cannot be analysed. Start it with "
                "`keras.Input(shape=...)` or call `model.build(input_shape)` "
                "first."
            )
        return functional
    if isinstance(model, _Functional):
        return model
    if isinstance(model, keras.Model):
        raise ValueError(
            f"Model '{model.name}' ({type(model).__name__}) is a subclassed "
            "model: its computation is Python code in `call()`, which "
            "keras-chex cannot see. Build the same network with the "
            "Functional API (`keras.Model(inputs, outputs)`) or "
            "`keras.Sequential`, then prune that."
        )
    raise TypeError(
        f"Expected a keras.Model, got {type(model).__name__}. Pass a "
        "Functional or Sequential Keras 3 model."
    )


def nodes(model):
    """Lists the call sites of a graph model in a valid execution order.

    Args:
        model: a Functional or built Sequential model.

    Returns:
        A list of `GraphNode`, inputs excluded; nested models appear as one
        node whose `operation` is the nested model.
    """
    graph = graph_of(model)
    known = {id(t) for t in graph.inputs}
    result = []
    for depth in sorted(graph._nodes_by_depth.keys(), reverse=True):
        for node in graph._nodes_by_depth[depth]:
            if not node.operation or node.is_input:
                continue
            inputs = tuple(node.input_tensors)
            if any(id(t) not in known for t in inputs):
                continue  # Not part of this model's computation.
            outputs = tuple(node.outputs)
            known.update(id(t) for t in outputs)
            result.append(
                GraphNode(node.operation, inputs, outputs, node.arguments)
            )
    return result


def inputs_of(model):
    """The flat list of the model's input `KerasTensor`s."""
    return list(graph_of(model).inputs)


def outputs_of(model):
    """The flat list of the model's output `KerasTensor`s."""
    return list(graph_of(model).outputs)


def producer_of(tensor):
    """The operation that produced a `KerasTensor` (None for an Input)."""
    history = getattr(tensor, "_keras_history", None)
    return history[0] if history else None


def rebuild(model, node_fn, *, input_fn=None, model_fn=None,
            input_shape_fn=None):
    """Builds a new graph model by re-running `model`'s nodes.

    Args:
        model: a Functional or built Sequential model.
        node_fn: `fn(graph_node, tensor_map) -> list of output tensors`,
            called once per node in execution order. `tensor_map` maps
            `id(original KerasTensor)` to the new tensor; use
            `graph_node.call_with(op, tensor_map)` to call a replacement op.
        input_fn: optional `fn(original_input, new_input) -> tensor` giving
            the tensor the graph's nodes see in place of each input.
        model_fn: `fn(inputs, outputs, name) -> model`; defaults to
            `keras.Model`.
        input_shape_fn: optional `fn(original_input) -> batch shape` of the
            new input (e.g. fewer channels for a stripped nested model).

    Returns:
        The new model. Its inputs keep names, shapes, dtypes and structure.
    """
    graph = graph_of(model)
    tensor_map = {}
    new_inputs = []
    for old in graph.inputs:
        new = keras.Input(
            batch_shape=input_shape_fn(old) if input_shape_fn else old.shape,
            dtype=old.dtype,
            sparse=getattr(old, "sparse", False),
            name=producer_of(old).name,
        )
        tensor_map[id(old)] = input_fn(old, new) if input_fn else new
        new_inputs.append(new)
    for node in nodes(model):
        outputs = node_fn(node, tensor_map)
        for old, new in zip(node.outputs, outputs):
            tensor_map[id(old)] = new
    outputs = [tensor_map[id(t)] for t in graph.outputs]
    inputs = tree.pack_sequence_as(graph._inputs_struct, new_inputs)
    outputs = tree.pack_sequence_as(graph._outputs_struct, outputs)
    model_fn = model_fn or keras.Model
    return model_fn(inputs, outputs, name=model.name)


def all_layers(model):
    """Every layer called in `model`'s graph, nested models' too, once each.

    Layers merely attached to the model (not called in its graph) are not
    included; nor are the nested models themselves or input layers.
    """
    seen = {}

    def visit(graph):
        for node in nodes(graph):
            op = node.operation
            if is_graph_model(op):
                visit(op)
            elif isinstance(op, keras.layers.Layer):
                seen.setdefault(id(op), op)

    visit(model)
    return list(seen.values())


def every_layer(model):
    """Every layer inside `model`, also inside nested models and inside
    layers made of layers, once each (Keras' own recursive listing)."""
    return model._flatten_layers(include_self=False, recursive=True)


def sublayers(layer):
    """The layers inside `layer` (recursively), without `layer` itself."""
    return layer._flatten_layers(include_self=False, recursive=True)


def own_variables(layer):
    """The variables `layer` holds itself, not through a layer inside it."""
    inner = {id(v) for sub in sublayers(layer) for v in sub.variables}
    return [v for v in layer.variables if id(v) not in inner]


def clone_layer(layer, config=None, cls=None):
    """A new layer of class `cls` (default: `layer`'s) from `config`.

    `config` defaults to `layer`'s own.

    Weights are not copied.

    The config comes from this process, not from a file, so Lambda layers
    are rebuilt without the safe-mode refusal meant for untrusted files.

    A config its class refuses only because it holds keys the constructor
    does not take (keras-hub's `ViTPatchingAndEmbedding` reports the sizes
    it derives, `num_patches` and `num_positions`) is retried without them;
    the new layer's `dropped_config_keys` then names them (the caller's
    weights check that nothing that mattered was dropped).

    Raises:
        ValueError: the layer cannot be rebuilt from its config, naming it
            and the cause.
    """
    from keras.src.saving import serialization_lib

    cls = cls or layer.__class__
    if config is None:
        try:
            config = layer.get_config()
        except Exception:
            if layer.variables or cls is not layer.__class__:
                raise
            return _stateless_copy(layer)
    with serialization_lib.SafeModeScope(False):
        try:
            return cls.from_config(config)
        except Exception as error:  # Any failure of the user's class.
            extra = unaccepted_keys(cls, config)
            if extra:
                try:
                    new = cls.from_config(
                        {k: v for k, v in config.items() if k not in extra})
                except Exception:
                    pass
                else:
                    new.dropped_config_keys = tuple(extra)
                    return new
            refusal = ValueError(
                f"keras-chex copies every layer of the model it works on, "
                f"and layer '{layer.name}' ({cls.__name__}) cannot be "
                f"rebuilt from its config: `{cls.__name__}.from_config("
                f"layer.get_config())` fails with {type(error).__name__}: "
                f"{_first_line(error)}. Make the layer's `get_config` return "
                "what its constructor takes (and its `from_config` accept "
                "it), or build the model without it.")
            refusal.reason = f"{type(error).__name__}: {_first_line(error)}"
            raise refusal from None


def _stateless_copy(layer):
    """A layer without variables whose config cannot be read (keras-hub
    builds `Identity` layers with a dtype policy object their automatic
    config refuses): a fresh `Identity`, or the same object, which holds
    nothing a copy could protect."""
    if type(layer) is keras.layers.Identity:
        return keras.layers.Identity(name=layer.name)
    return layer


def rebuilt_layer(layer):
    """`clone_layer(layer)`, or, when `layer`'s config does not round-trip,
    `copy_layer(layer)` (marked `copied_without_config`, already holding
    its weights): a layer that stays as it is never blocks a model."""
    try:
        return clone_layer(layer)
    except Exception as error:
        return copy_layer(layer, cause=error)


def load_rebuilt_weights(layer, new, values, node, tensor_map, outputs):
    """Loads `values` into `new`, `layer` rebuilt and called as `node`.

    A rebuilt layer that cannot hold them (its config does not describe
    it: D-FINE's decoder) is replaced, when `values` are `layer`'s own
    weights unchanged, by `copy_layer(layer)`, called in its place.

    Returns:
        (the layer in the new graph, its outputs there).
    """
    if getattr(new, "copied_without_config", False):
        return new, outputs
    try:
        set_layer_weights(new, values)
        return new, outputs
    except ValueError as error:
        if len(values) != len(layer.weights) or any(
                tuple(v.shape) != tuple(w.shape)
                for v, w in zip(values, layer.weights)):
            raise
        copy = copy_layer(layer, cause=error)
        return copy, node.call_with(copy, tensor_map)


def copy_layer(layer, cause=None):
    """A copy of `layer` with variables of its own, made without its config.

    For layers whose config does not round-trip (keras-hub's `DeiTEncoder`
    cannot produce one, MiT's attention refuses its own, D-FINE's decoder
    rebuilt from one holds another number of weights): the layer's
    objects are copied attribute by attribute, every variable becomes a new
    one holding the same values, every layer inside becomes a copy, and
    the copy forgets the graph calls of the original. Functions, classes
    and objects from outside Keras are shared, not copied (immutable in
    practice: activations, signatures).

    Args:
        layer: a built layer.
        cause: the error of the config round trip, quoted if the copy
            fails too.

    Returns:
        The copy, built, holding the same weight values, marked
        `copied_without_config`.

    Raises:
        ValueError: the layer cannot be copied either, naming it.
    """
    try:
        new = _copy_object(layer, {})
        old_weights, new_weights = layer.weights, new.weights
        fresh = not {id(v) for v in old_weights} & {id(v) for v in new_weights}
        if not fresh or len(old_weights) != len(new_weights):
            raise ValueError("its variables could not all be copied")
    except Exception as error:
        why = getattr(cause, "reason", None) or (
            f"{type(cause).__name__}: {_first_line(cause)}" if cause
            else "refused")
        raise ValueError(
            f"keras-chex copies every layer of the model it works on, and "
            f"layer '{layer.name}' ({type(layer).__name__}) can neither be "
            f"rebuilt from its config ({why}) nor copied "
            f"({type(error).__name__}: {_first_line(error)}). Fix its "
            "`get_config`, or build the model without it.") from None
    new.copied_without_config = True
    return new


_NODE_LISTS = ("_inbound_nodes", "_outbound_nodes")


def _copy_object(obj, memo):
    import types

    import numpy as np

    key = id(obj)
    if key in memo:
        return memo[key]
    if isinstance(obj, keras.Variable):
        new = keras.Variable(
            initializer=obj.numpy(), dtype=obj.dtype,
            trainable=obj.trainable, autocast=obj._autocast,
            aggregation=obj.aggregation, name=obj.name)
    elif isinstance(obj, types.MethodType):
        new = types.MethodType(obj.__func__, _copy_object(obj.__self__, memo))
    elif isinstance(obj, np.ndarray):
        new = obj.copy()
    elif type(obj).__name__ == "TrackableReference":
        # TensorFlow's record of a checkpoint dependency (slots, no dict).
        new = type(obj)(obj.name, _copy_object(obj.ref, memo))
    elif isinstance(obj, (list, dict, set)):
        # Keras' TrackedList/Dict/Set: filled through the base class, so
        # their tracker (the original's) is never called.
        base = list if isinstance(obj, list) else (
            dict if isinstance(obj, dict) else set)
        new = base.__new__(type(obj))
        memo[key] = new
        if base is dict:
            dict.update(new, {k: _copy_object(v, memo)
                              for k, v in obj.items()})
        else:
            (list.extend if base is list else set.update)(
                new, [_copy_object(v, memo) for v in obj])
        for name, value in getattr(obj, "__dict__", {}).items():
            object.__setattr__(new, name, _copy_object(value, memo))
        return new
    elif isinstance(obj, tuple):
        items = [_copy_object(v, memo) for v in obj]
        new = (type(obj)(*items) if hasattr(obj, "_fields")
               else tuple(items) if type(obj) is tuple else type(obj)(items))
    elif hasattr(obj, "__dict__") and not isinstance(obj, type) and (
            isinstance(obj, keras.layers.Layer) or (
                type(obj).__module__.startswith("keras")
                and not isinstance(obj, keras.KerasTensor))):
        new = object.__new__(type(obj))
        memo[key] = new
        for name, value in vars(obj).items():
            value = [] if name in _NODE_LISTS else _copy_object(value, memo)
            object.__setattr__(new, name, value)
        return new
    else:
        new = obj
    memo[key] = new
    return new


def unaccepted_keys(cls, config):
    """Keys of `config` that neither `cls`'s constructor nor
    `keras.layers.Layer`'s names."""
    import inspect

    taken = set()
    for c in (cls, keras.layers.Layer):
        taken.update(inspect.signature(c.__init__).parameters)
    taken.update(("input_shape", "batch_input_shape", "batch_size",
                  "input_dim", "input_dtype"))
    return sorted(k for k in config if k not in taken)


def _first_line(error):
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    # Keras wraps the constructor's error; its last line names the cause.
    return (lines[-1] if lines else type(error).__name__)[:300]


def set_layer_weights(layer, values):
    """`layer.set_weights(values)`, then refreshes state derived from them.

    Some layers cache tensors computed from their weights (Normalization
    keeps its mean and variance reshaped for broadcasting); Keras refreshes
    them in their `finalize_state` when it loads a file, not in
    `set_weights`.

    Raises:
        ValueError: `layer` (a copy rebuilt from a config) holds another
            number of weights than `values`, naming it.
    """
    if len(values) != len(layer.weights):
        error = ValueError(
            f"keras-chex copies every layer of the model it works on, and "
            f"layer '{layer.name}' ({type(layer).__name__}) rebuilt from its "
            f"config holds {len(layer.weights)} weights where the original "
            f"holds {len(values)}: its `get_config` does not describe it "
            "fully (a bug of that layer). Fix its `get_config`, or build the "
            "model without it.")
        error.reason = (f"the rebuilt layer holds {len(layer.weights)} "
                        f"weights, the original {len(values)}")
        raise error
    layer.set_weights(values)
    finalize = getattr(layer, "finalize_state", None)
    if finalize is not None:
        finalize()


def op_classes(names):
    """The `keras.ops` operation classes called `names` (the classes of the
    nodes a `keras.ops.relu(x)` call leaves in a Functional graph).

    Keras exports the functions, not the classes, so they are looked up in
    `keras.src.ops`; names a Keras version lacks are skipped.

    Returns:
        dict name -> list of classes (one per `keras.src.ops` module that
        defines it).
    """
    from keras.src.activations import activations as ops_act
    from keras.src.ops import core as ops_core
    from keras.src.ops import nn as ops_nn
    from keras.src.ops import numpy as ops_np

    found = {}
    for name in names:
        # `keras.activations.relu(x)` leaves an activations-module `ReLU`.
        for module in (ops_nn, ops_np, ops_core, ops_act):
            cls = getattr(module, name, None)
            if isinstance(cls, type):
                found.setdefault(name, []).append(cls)
    return found


def numpy_op_class(name):
    """The `keras.ops` NumPy-namespace operation class `name`, or None."""
    from keras.src.ops import numpy as ops_np

    cls = getattr(ops_np, name, None)
    return cls if isinstance(cls, type) else None


def with_input_shapes(model, batch_shapes):
    """`model`'s graph on inputs of `batch_shapes`, sharing its layers.

    Nested models are rebuilt for the shapes they receive, so that every
    tensor inside has its concrete size.

    Args:
        model: a Functional or Sequential model.
        batch_shapes: one batch shape per input (batch axis first).

    Returns:
        A new Functional model with the same layers (and weights).
    """
    shapes = dict(zip((id(t) for t in graph_of(model).inputs), batch_shapes))
    cache = {}

    def node_fn(node, tensor_map):
        op = node.operation
        if is_graph_model(op):
            inner = [tuple(tensor_map[id(t)].shape) for t in node.inputs]
            key = (id(op), tuple(inner))
            if key not in cache:
                cache[key] = with_input_shapes(op, inner)
            op = cache[key]
        return node.call_with(op, tensor_map)

    return rebuild(model, node_fn, input_shape_fn=lambda t: shapes[id(t)])

