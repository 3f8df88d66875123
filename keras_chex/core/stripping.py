"""Stripping: from a wrapped model to a compact plain Keras model."""

import warnings

import keras
import numpy as np

from keras_chex.core import _graph
from keras_chex.core import masking
from keras_chex.core import masks as masks_lib
from keras_chex.core import statistics
from keras_chex.core import wrapping
from keras_chex.core.layer_rules import weight_leaf_name

is_wrapped = wrapping.is_wrapped


def _slice_weights(layer, analysis, class_mask):
    values = []
    for variable in masking.parameter_weights(layer):
        value = np.asarray(variable.numpy())
        for s in analysis.slices_for(layer, weight_leaf_name(variable)):
            keep = masks_lib.keep_mask(s.classes, class_mask)
            value = np.compress(keep, value, axis=s.axis)
        values.append(value)
    return values


def strip(model):
    """Removes masked channels for good: returns a compact plain model.

    The result is built only from stock Keras layers (no keras-chex layer),
    with every masked channel physically removed and weights sliced. In
    inference mode it computes what the wrapped model computes.

    Args:
        model: a model returned by `keras_chex.prune_and_regrow` (or
            another entry point, or `keras_chex.wrap`), possibly trained,
            saved and loaded. A plain Functional or Sequential model has
            nothing to remove: an equal copy of it is returned.

    Returns:
        A plain `keras.Model` (Functional; nested models stay nested).

    Warns:
        When the model's BatchNorm statistics predate its masks (fewer
        than `SETTLED_BATCHES` training batches since the last change):
        the compact model would predict with them. Call
        `keras_chex.recalibrate_batchnorm` first.

    Raises:
        ValueError: for a model keras-chex cannot rebuild (subclassed).
        TypeError: for something that is not a Keras model.

    Example:

    ```python
    compact = keras_chex.strip(wrapped)
    compact.save("compact.keras")  # Loads without keras-chex.
    ```
    """
    if is_wrapped(model):
        statistics.warn_if_stale(model, f"Stripping model '{model.name}'")
    else:
        with warnings.catch_warnings():
            # Which layers could not be pruned is moot for a copy.
            warnings.simplefilter("ignore", UserWarning)
            model = wrapping.wrap(model)
    analysis = model.analysis
    class_mask = masks_lib.Masks.of(analysis).numpy()
    # Layers the analysis could not read keep their config: their channels
    # are all kept, and a rule's reading of them would be wrong.
    opaque = {name for name, _ in analysis.unsupported}
    memo = {}

    def kept(tensor):
        return int(masks_lib.keep_mask(analysis.classes_of(tensor), class_mask).sum())

    def strip_graph(graph):
        def node_fn(node, tensor_map):
            op = node.operation
            if isinstance(op, masking.ChannelMask):
                return [tensor_map[id(node.inputs[0])]]
            fresh = id(op) not in memo
            if fresh:
                if _graph.is_graph_model(op):
                    memo[id(op)] = strip_graph(op)
                elif isinstance(op, keras.layers.Layer):
                    rule = analysis.rule_for(op)
                    if rule is not None and op.name in opaque:
                        rule = None
                    if isinstance(op, masking.TrackingBatchNormalization):
                        config = op.batchnorm_config()
                        memo[id(op)] = _graph.clone_layer(
                            op, rule.stripped_config(config, node, kept)
                            if rule else config,
                            cls=keras.layers.BatchNormalization)
                    elif rule is None:
                        # Left as it is: never blocked by its config.
                        memo[id(op)] = _graph.rebuilt_layer(op)
                    else:
                        memo[id(op)] = _graph.clone_layer(
                            op, rule.stripped_config(op.get_config(), node,
                                                     kept))
                else:
                    rule = analysis.rule_for(op)
                    memo[id(op)] = (
                        op if rule is None or op.name in opaque
                        else rule.stripped_operation(op, node, kept))
            new_op = memo[id(op)]
            outputs = node.call_with(new_op, tensor_map)
            if (fresh and isinstance(op, keras.layers.Layer)
                    and not _graph.is_graph_model(op)):
                new_op, outputs = _graph.load_rebuilt_weights(
                    op, new_op, _slice_weights(op, analysis, class_mask),
                    node, tensor_map, outputs)
                if rule is None:  # Left whole (set above).
                    new_op, outputs = wrapping.faithful(
                        op, new_op, node, tensor_map, outputs)
                memo[id(op)] = new_op
            return outputs

        def input_shape(tensor):
            return tuple(tensor.shape[:-1]) + (kept(tensor),)

        return _graph.rebuild(graph, node_fn, input_shape_fn=input_shape)

    compact = strip_graph(model)
    refused = sorted({layer.name for layer in _graph.all_layers(compact)
                      if getattr(layer, "dropped_config_keys", None)})
    if refused:
        warnings.warn(
            f"The compact model of '{model.name}' works and exports, but a "
            ".keras file of it will not load in plain Keras: the config of "
            f"{', '.join(repr(n) for n in refused)} holds keys its own class "
            "refuses (a bug of that layer). Ship it with `export_tflite` or "
            "`export_saved_model`, or keep its weights (`save_weights`).",
            stacklevel=2)
    return compact
