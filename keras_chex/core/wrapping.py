"""Wrapping a model for pruning: a copy of it that carries channel masks."""

import json
import os
import warnings

import keras

from keras_chex.core import _graph
from keras_chex.core import composites
from keras_chex.core import analysis as cg
from keras_chex.core import counting
from keras_chex.core import input_shapes
from keras_chex.core import _trainer
from keras_chex.core import masking
from keras_chex.core import masks as masks_lib
from keras_chex.core import method as pruning_method

# Version of the pruning config a `PrunableModel` saves; a file with a
# higher one comes from a newer keras-chex and is refused with a clear error.
CONFIG_VERSION = 2


@keras.saving.register_keras_serializable(package="keras_chex")
class PrunableModel(keras.Model):
    """A Functional model with channel masks and a pruning configuration.

    Returned by `keras_chex.wrap` and by the methods' entry points
    (`keras_chex.prune_and_regrow`, ...); do not build it directly. It
    trains, saves (`.keras`) and loads like any Functional model (only
    `import keras_chex` is needed to load it); its `pruning_config`
    (method, target, schedule, ...) travels with it, and the method's state
    (`pruning_state`) lives in variables saved with the weights.

    Args:
        pruning: the pruning configuration (a JSON-serialisable dict); its
            "method" key, if any, names the registered method whose state
            the model carries.
        chex: the same, under the key keras-chex 0.1.0 saved it with (read
            so that files saved by that version still load).
    """

    def __init__(self, *args, pruning=None, chex=None, **kwargs):
        super().__init__(*args, **kwargs)
        # Kept as JSON: Keras would wrap a dict attribute in a tracked
        # container that drags the model along when copied.
        config = dict(pruning or chex or {})
        version = config.get("config_version", 1)
        if version > CONFIG_VERSION:
            raise ValueError(
                f"Model '{kwargs.get('name', '?')}' was saved by a newer "
                f"keras-chex (pruning config version {version}; this one "
                f"reads up to {CONFIG_VERSION}). Upgrade keras-chex to load "
                "it, or strip it with the version that saved it.")
        config["config_version"] = CONFIG_VERSION
        self._pruning_config_json = json.dumps(config)
        self._analysis_cache = None
        # keras-chex 0.1.0 saved the state's variables under the attribute
        # path `chex_state`. Keras finds variables by attribute path, so
        # while such a file loads the state answers to that name too; once
        # loaded (see `PruningState.load_own_variables`) it saves the new way.
        self._legacy_state_path = pruning is None and chex is not None
        method = self.pruning_config.get("method")
        if method is not None:
            # Tracked, so Keras saves its variables with the model.
            self._pruning_state = pruning_method.state_class(
                method, self.name)(self)

    @property
    def pruning_state(self):
        """The method's state (a `PruningState`), or None for `wrap()`."""
        return getattr(self, "_pruning_state", None)

    @property
    def chex_state(self):
        # Public names are visited before private ones, and this one sorts
        # before `pruning_state`: see `_legacy_state_path`.
        return self.pruning_state if self._legacy_state_path else None

    @property
    def pruning_config(self):
        """The pruning configuration (a fresh dict; edit has no effect)."""
        return json.loads(self._pruning_config_json)

    @property
    def analysis(self):
        """The `ModelAnalysis` of this model (computed once)."""
        if self._analysis_cache is None:
            config = self.pruning_config
            shapes = config.get("input_shape")
            self._analysis_cache = cg.ModelAnalysis(
                self,
                exclude=config.get("exclude", ()),
                warn=False,
                input_shape=(input_shapes.input_batch_shapes(self, shapes)
                             if shapes else None),
            )
        return self._analysis_cache

    @property
    def masks(self):
        """The channel masks as one vector (a `Masks`: read, assign)."""
        return masks_lib.Masks.of(self.analysis)

    def train_step(self, data):
        hook = getattr(getattr(self, "pruning_state", None),
                       "transform_gradients", None)
        if hook is None:
            logs = super().train_step(data)
        else:
            logs = _trainer.train_step_with_gradient_hook(self, data, hook)
        if _trainer.in_multi_worker_mode(self):
            logs = _trainer.multi_worker_logs(logs)
        return logs

    def fit(self, *args, **kwargs):
        # A pruning callback without `log_dir` writes beside a TensorBoard
        # callback of the same fit; only `fit` sees both.
        callbacks = (kwargs.get("callbacks") if "callbacks" in kwargs
                     else args[5] if len(args) > 5 else None)
        _share_tensorboard_dir(callbacks)
        _warn_if_missing(self, callbacks)
        return super().fit(*args, **kwargs)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras' own fails under MultiWorkerMirroredStrategy; see _trainer.
        _trainer.maybe_symbolic_build(self, iterator, data_batch)

    def get_config(self):
        config = super().get_config()
        config["pruning"] = self.pruning_config
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # Layers whose own config their class refuses (see
        # `_graph.clone_layer`) load without the keys it does not take.
        repairs = (config.get("pruning") or {}).get("config_repairs")
        if repairs:
            config = _without_keys(config, repairs)
        return super().from_config(config, custom_objects=custom_objects)


def _without_keys(config, repairs):
    """A copy of a Functional `config` whose layers named in `repairs`
    (name -> keys) lack those keys, nested models' layers too."""
    config = dict(config)
    layers = []
    for entry in config.get("layers", ()):
        entry = dict(entry)
        inner = dict(entry.get("config") or {})
        if inner.get("name") in repairs:
            for key in repairs[inner["name"]]:
                inner.pop(key, None)
        if "layers" in inner:
            inner = _without_keys(inner, repairs)
        entry["config"] = inner
        layers.append(entry)
    config["layers"] = layers
    return config


def is_wrapped(model):
    """True if `model` carries keras-chex channel masks."""
    return isinstance(model, PrunableModel)


def is_method(model, name):
    """True if `model` is wrapped for pruning method `name`."""
    return is_wrapped(model) and model.pruning_config.get("method") == name


def _share_tensorboard_dir(callbacks):
    """Lends a listed TensorBoard's `log_dir` to pruning callbacks without one.

    Called by `PrunableModel.fit`; a later fit without a TensorBoard
    callback takes the loan back.

    Args:
        callbacks: the `callbacks` argument of `fit` (None, a list, or a
            `keras.callbacks.CallbackList`).
    """
    listed = list(getattr(callbacks, "callbacks", callbacks) or [])
    boards = [c for c in listed
              if isinstance(c, keras.callbacks.TensorBoard)]
    pruning = tuple(pruning_method.every_callback_class())
    for c in listed:
        if pruning and isinstance(c, pruning):
            c._tensorboard_dir = (os.fspath(boards[0].log_dir) if boards
                                  else None)


def _warn_if_missing(model, callbacks):
    """Warns when a method's model is fitted without the method's callback:
    its masks would then never change, silently."""
    name = model.pruning_config.get("method")
    wanted = pruning_method.callback_classes(name)
    if not wanted:
        return  # `keras_chex.wrap`: masks are the user's to set.
    listed = callbacks if isinstance(callbacks, (list, tuple)) else (
        [] if callbacks is None else [callbacks])
    if any(isinstance(c, tuple(wanted)) for c in listed):
        return
    warnings.warn(
        f"Fitting '{model.name}' (a {name} pruning model) without "
        f"`keras_chex.{wanted[0].__name__}` in `callbacks=`: its masks will "
        "not change during this fit. To prune, add the callback; to "
        "fine-tune with the masks as they are, ignore this.",
        stacklevel=3)


def check_exclude(exclude):
    """`exclude` as a tuple of layer names, or a ValueError naming it."""
    if isinstance(exclude, str):
        return (exclude,)  # One layer name, not its letters.
    try:
        names = tuple(exclude)
    except TypeError:
        names = None
    if names is None or not all(isinstance(n, str) for n in names):
        raise ValueError(
            "`exclude` must be a layer name or a list of layer names, got "
            f"{exclude!r}.")
    return names


def wrap(model, *, mode="hard", exclude=(), pruning=None,
         fold_batchnorm=True, input_shape=None):
    """Returns a copy of `model` whose prunable channels carry masks.

    The copy has the same layers (fresh objects holding copies of the
    weights; the user's model is untouched), with masks at the points where
    removed channels must read as exact zeros: BatchNormalization layers
    become `MaskedBatchNormalization` (same name and weights, plus a mask
    on gamma and beta), and `ChannelMask` layers go where no BatchNorm can
    carry the mask. All masks start at 1 (nothing pruned).

    Args:
        model: a Functional or Sequential Keras model.
        mode: mask gradient mode, see `ChannelMask` ("hard",
            "straight_through" or "permanent").
        exclude: names of layers whose channels must never be pruned
            ("outer/inner" for a layer inside a nested model, as group
            names show when layer names repeat).
        pruning: optional dict of method configuration stored on the model
            (the methods' entry points fill it).
        fold_batchnorm: fold masks into BatchNorms where possible (modes
            "hard" and "permanent"). Folding changes neither the outputs
            nor the gradients, only the cost of a training step.
        input_shape: the input size to count MACs at, without the batch
            axis (a list of shapes for several inputs), for a model whose
            spatial size is free (`keras.Input((None, None, 3))`): a
            backbone fine-tuned at the user's resolution. Stored with the
            model; the wrapped and stripped models keep the free size.

    Returns:
        A `PrunableModel`.

    Example:

    ```python
    wrapped = keras_chex.wrap(keras.applications.MobileNetV2(weights=None))
    groups = keras_chex.channel_groups(wrapped)
    ```
    """
    if is_wrapped(model):
        raise ValueError(
            f"Model '{model.name}' is already wrapped by keras-chex. Wrap the "
            "original model, or `keras_chex.strip()` this one first."
        )
    if mode not in masking.MASK_MODES:
        raise ValueError(
            f"`mode` must be one of {masking.MASK_MODES}, got {mode!r}."
        )
    if not isinstance(fold_batchnorm, bool):
        raise ValueError(f"`fold_batchnorm` must be True or False, got "
                         f"{fold_batchnorm!r}.")
    exclude = check_exclude(exclude)
    if input_shape is not None:
        pruning = dict(pruning or {}, input_shape=[
            list(shape[1:])
            for shape in input_shapes.input_batch_shapes(model, input_shape)])
    analysis = cg.ModelAnalysis(model, exclude=exclude)
    # The graph analysed: composite layers opened into nested models.
    model = analysis.model
    if not analysis.groups:
        warnings.warn(
            f"Model '{model.name}' has no channels keras-chex can prune: "
            "every channel is a model input or output, excluded, or next to "
            "a layer it cannot analyse (see any warning above). Pruning it "
            "changes nothing.", stacklevel=3)
    to_mask, folded = masking.place_masks(
        analysis,
        fold_batchnorm=fold_batchnorm and mode in masking.FOLDING_MODES,
    )
    clones = {}
    mask_names = set()
    # Layers of other libraries the analysis leaves whole: rebuilt from
    # their configs only when the copy provably computes the same.
    left_whole = {name for name, _ in analysis.unsupported}

    def mask_name(tensor):
        base = f"{_graph.producer_of(tensor).name}_channel_mask"
        name, i = base, 1
        while name in mask_names:
            i += 1
            name = f"{base}_{i}"
        mask_names.add(name)
        return name

    def add_mask(old, new):
        if id(old) not in to_mask:
            return new
        layer = masking.ChannelMask(new.shape[-1], mode=mode,
                                    name=mask_name(old))
        return layer(new)

    config = dict(pruning or {})
    config.setdefault("exclude", list(exclude))
    config["mask_mode"] = mode

    def copy_graph(graph, model_fn=None):
        def node_fn(node, tensor_map):
            op = node.operation
            fresh = id(op) not in clones
            if fresh:
                if _graph.is_graph_model(op):
                    clones[id(op)] = copy_graph(op)
                elif id(op) in folded:
                    clones[id(op)] = masking.MaskedBatchNormalization.replacing(
                        op, mode=mode)
                elif type(op) is keras.layers.BatchNormalization:
                    clones[id(op)] = (
                        masking.TrackingBatchNormalization.replacing(op))
                elif isinstance(op, keras.layers.Layer):
                    clones[id(op)] = _graph.rebuilt_layer(op)
                else:
                    clones[id(op)] = op  # A stateless keras.ops operation.
            new_op = clones[id(op)]
            dropped = getattr(new_op, "dropped_config_keys", None)
            if fresh and dropped:
                config.setdefault("config_repairs", {})[new_op.name] = list(
                    dropped)
            outputs = node.call_with(new_op, tensor_map)
            if fresh and new_op is not op and not _graph.is_graph_model(op):
                if isinstance(new_op, masking.TrackingBatchNormalization):
                    new_op.load_batchnorm_weights(op)
                else:
                    new_op, outputs = _graph.load_rebuilt_weights(
                        op, new_op, op.get_weights(), node, tensor_map,
                        outputs)
                    if op.name in left_whole:
                        new_op, outputs = faithful(op, new_op, node,
                                                   tensor_map, outputs)
                    clones[id(op)] = new_op
            return [add_mask(o, n) for o, n in zip(node.outputs, outputs)]

        return _graph.rebuild(graph, node_fn, input_fn=add_mask,
                              model_fn=model_fn)

    def top_model(inputs, outputs, name):
        return PrunableModel(inputs, outputs, name=name, pruning=config)

    wrapped = copy_graph(model, top_model)
    if config.get("target") == "flops":
        _check_macs_visible(wrapped, config["target_value"])
    return wrapped


def faithful(layer, rebuilt, node, tensor_map, outputs):
    """`rebuilt` (`layer` rebuilt from its config, called as `node` with
    `outputs`) if it computes what `layer` does, else a copy of `layer`'s
    objects called in its place: a config that forgets a setting must not
    change a layer keras-chex leaves whole.

    Returns:
        (the layer in the new graph, its outputs there).
    """
    if getattr(rebuilt, "copied_without_config", False) or (
            composites.same_call(layer, rebuilt, node)):
        return rebuilt, outputs
    copy = _graph.copy_layer(layer)
    return copy, node.call_with(copy, tensor_map)


# A MACs target is refused when layers whose MACs are unknown hold more
# than this share of the parameters: the fraction would be of the wrong
# total.
MAX_UNCOUNTED_SHARE = 0.25


def _check_macs_visible(model, target):
    names, share = counting.uncounted_layers(model.analysis)
    if not names:
        return
    what = counting.describe_uncounted(names, share)
    if share > MAX_UNCOUNTED_SHARE:
        raise ValueError(
            f"`flops={target:g}` cannot be measured on '{model.name}': "
            f"{what}, so a fraction of the MACs keras-chex counts is not a "
            "fraction of the model's. Give `params=` instead (parameters "
            "are counted in full), or tell keras-chex about those layers "
            "(`keras_chex.register_layer_rule`).")
    warnings.warn(
        f"'{model.name}': {what}; `flops={target:g}` is a fraction of the "
        "MACs of the other layers.", stacklevel=4)
