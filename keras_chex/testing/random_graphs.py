"""Random valid Functional models from every construct keras-chex supports.

`build_model(chooser)` assembles a model from random choices: convolutions
(plain, strided, grouped, depthwise, separable, transposed), Dense,
BatchNorm, activations (layers and `keras.ops` calls), pooling, padding,
Add / Multiply / Subtract / Average / Maximum merges, Concatenate
(also of tensors already coupled by a merge), squeeze-and-excitation
blocks, Flatten and Reshape into Dense, nested models (called once or
twice), shared layers, several inputs and outputs, and layers the analysis
does not support, mixed in. `check_model` then checks the claims every
model must meet (see its docstring).

The choices come from a `Chooser`: `HypothesisChooser` for property tests
(Hypothesis shrinks a failure to a small model), `RandomChooser` for the
benchmark in `tools/check_random_graphs.py`, which runs a thousand models
and reports each failure with its seed.
"""

import os
import tempfile
import warnings

import keras
import numpy as np
from keras import layers

import keras_chex
from keras_chex.core import _graph


class RandomChooser:
    """Choices from a NumPy generator (for `tools/`)."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def integer(self, low, high):
        return int(self.rng.integers(low, high + 1))

    def choice(self, options):
        return options[self.integer(0, len(options) - 1)]

    def boolean(self, p=0.5):
        return bool(self.rng.random() < p)


class HypothesisChooser:
    """Choices drawn from Hypothesis' `data()` (shrinks toward the first
    option and the low end)."""

    def __init__(self, data):
        from hypothesis import strategies as st

        self._data, self._st = data, st

    def integer(self, low, high):
        return self._data.draw(self._st.integers(low, high))

    def choice(self, options):
        return options[self.integer(0, len(options) - 1)]

    def boolean(self, p=0.5):
        del p
        return self._data.draw(self._st.booleans())


@keras.saving.register_keras_serializable(package="keras_chex_testing")
class Scale(layers.Layer):
    """A custom layer: keras-chex cannot see inside it."""

    def call(self, x):
        return x * 1.5

    def compute_output_shape(self, input_shape):
        return input_shape


class _Builder:
    """Grows a pool of tensors by applying random constructs."""

    def __init__(self, chooser):
        self.c = chooser
        self.images = []  # rank-4 tensors (batch, h, w, c)
        self.vectors = []  # rank-2 tensors (batch, features)
        self.names = 0

    def name(self, kind):
        # Not Keras' "<kind>_<n>": a `keras.ops` call in the graph is named
        # that way from a process-wide counter, and two equal names make
        # the model invalid.
        self.names += 1
        return f"{kind}{self.names}"

    def recent(self, pool):
        # Mostly the newest tensors, so the graph grows deep, not wide.
        index = len(pool) - 1 - min(self.c.integer(0, 3), len(pool) - 1)
        return pool[index]

    def same_spatial(self, x):
        return [t for t in self.images if t.shape[1:3] == x.shape[1:3]]

    def add_image(self, t):
        self.images.append(t)
        return t

    # -- constructs on images ------------------------------------------------
    def conv(self, x):
        c = self.c
        channels = x.shape[-1]
        filters = c.integer(2, 8)
        groups = 1
        if c.boolean(0.3):
            common = [g for g in (2, 3, 4) if channels % g == 0
                      and filters % g == 0]
            groups = c.choice(common) if common else 1
        strides = 2 if x.shape[1] >= 4 and c.boolean(0.3) else 1
        layer = layers.Conv2D(
            filters, c.choice([1, 3]), strides=strides, padding="same",
            groups=groups, use_bias=c.boolean(),
            activation=c.choice([None, None, "relu"]), name=self.name("conv"))
        return self.add_image(layer(x))

    def depthwise(self, x):
        layer = layers.DepthwiseConv2D(
            3, padding="same", depth_multiplier=self.c.choice([1, 2]),
            use_bias=self.c.boolean(), name=self.name("depthwise"))
        return self.add_image(layer(x))

    def separable(self, x):
        layer = layers.SeparableConv2D(
            self.c.integer(2, 8), 3, padding="same",
            depth_multiplier=self.c.choice([1, 2]), name=self.name("sep"))
        return self.add_image(layer(x))

    def transposed(self, x):
        strides = 2 if x.shape[1] <= 4 and self.c.boolean() else 1
        layer = layers.Conv2DTranspose(
            self.c.integer(2, 8), self.c.choice([2, 3]), strides=strides,
            padding="same", name=self.name("transposed"))
        return self.add_image(layer(x))

    def batchnorm(self, x):
        return self.add_image(layers.BatchNormalization(
            name=self.name("bn"))(x))

    def activation(self, x):
        kind = self.c.choice(["relu", "relu6", "swish", "sigmoid", "leaky",
                              "prelu", "ops_relu", "hard_swish"])
        if kind == "relu":
            y = layers.ReLU(name=self.name("relu"))(x)
        elif kind == "relu6":
            y = layers.ReLU(6.0, name=self.name("relu6"))(x)
        elif kind in ("swish", "sigmoid"):
            y = layers.Activation(kind, name=self.name(kind))(x)
        elif kind == "leaky":
            y = layers.LeakyReLU(0.1, name=self.name("leaky"))(x)
        elif kind == "prelu":
            y = layers.PReLU(shared_axes=[1, 2], name=self.name("prelu"))(x)
        elif kind == "ops_relu":
            y = keras.ops.relu(x)
        else:
            y = keras.ops.hard_silu(x)
        return self.add_image(y)

    def pool(self, x):
        if x.shape[1] < 2:
            return None
        kind = self.c.choice([layers.MaxPooling2D, layers.AveragePooling2D])
        return self.add_image(kind(2, padding="same",
                                   name=self.name("pool"))(x))

    def pad(self, x):
        y = layers.ZeroPadding2D(1, name=self.name("pad"))(x)
        return self.add_image(layers.Cropping2D(1, name=self.name("crop"))(y))

    def merge(self, x):
        c = self.c
        others = [t for t in self.same_spatial(x) if t is not x]
        other = c.choice(others) if others and c.boolean() else x
        # A 1x1 convolution makes the channel counts agree.
        y = layers.Conv2D(x.shape[-1], 1, name=self.name("match"))(other)
        y = layers.BatchNormalization(name=self.name("bn"))(y)
        kind = c.choice([layers.Add, layers.Add, layers.Multiply,
                         layers.Subtract, layers.Average, layers.Maximum,
                         "ops_add"])
        if kind == "ops_add":
            return self.add_image(keras.ops.add(x, y))
        return self.add_image(kind(name=self.name("merge"))([x, y]))

    def concat(self, x):
        c = self.c
        parts = [x] + [t for t in self.same_spatial(x) if t is not x][:3]
        if c.boolean(0.3):
            parts.append(x)  # The same tensor twice.
        chosen = [p for i, p in enumerate(parts) if i == 0 or c.boolean()]
        if len(chosen) == 1:
            chosen.append(layers.Conv2D(3, 1, name=self.name("side"))(x))
        return self.add_image(layers.Concatenate(
            name=self.name("concat"))(chosen))

    def squeeze_excite(self, x):
        channels = x.shape[-1]
        s = layers.GlobalAveragePooling2D(keepdims=True,
                                          name=self.name("se_pool"))(x)
        s = layers.Conv2D(max(1, channels // 2), 1, activation="relu",
                          name=self.name("se_reduce"))(s)
        s = layers.Conv2D(channels, 1, activation="sigmoid",
                          name=self.name("se_expand"))(s)
        return self.add_image(layers.Multiply(name=self.name("se"))([x, s]))

    def scalar_op(self, x):
        if self.c.boolean():
            return self.add_image(x * 2.0)
        return self.add_image(x + 1.0)

    def shared(self, x):
        layer = layers.Conv2D(self.c.integer(2, 6), 3, padding="same",
                              name=self.name("shared"))
        first = layer(x)
        second = layer(layers.ReLU(name=self.name("relu"))(x))
        self.add_image(first)
        return self.add_image(layers.Add(name=self.name("merge"))(
            [first, second]))

    def nested(self, x):
        inner_in = keras.Input(x.shape[1:])
        y = layers.Conv2D(x.shape[-1] if self.c.boolean() else 4, 3,
                          padding="same")(inner_in)
        y = layers.BatchNormalization()(y)
        y = layers.ReLU()(y)
        if y.shape[-1] == x.shape[-1] and self.c.boolean():
            y = layers.Add()([y, inner_in])
        block = keras.Model(inner_in, y, name=self.name("nested"))
        out = block(x)
        if out.shape[-1] == x.shape[-1] and self.c.boolean():
            out = block(out)  # The nested model called twice.
        return self.add_image(out)

    def unsupported(self, x):
        if self.c.boolean():
            return self.add_image(Scale(name=self.name("custom"))(x))
        return self.add_image(layers.LayerNormalization(
            name=self.name("layernorm"))(x))

    def to_vector(self, x):
        if self.c.boolean() and x.shape[1] * x.shape[2] * x.shape[3] <= 512:
            v = layers.Flatten(name=self.name("flatten"))(x)
        elif self.c.boolean(0.3):
            v = layers.Reshape((-1,), name=self.name("reshape"))(
                layers.GlobalAveragePooling2D(
                    keepdims=True, name=self.name("gap"))(x))
        else:
            v = layers.GlobalAveragePooling2D(name=self.name("gap"))(x)
        v = layers.Dense(self.c.integer(3, 8), activation="relu",
                         name=self.name("dense"))(v)
        self.vectors.append(v)
        return None

    CONSTRUCTS = ("conv", "conv", "conv", "depthwise", "separable",
                  "transposed", "batchnorm", "activation", "pool", "pad",
                  "merge", "concat", "squeeze_excite", "scalar_op", "shared",
                  "nested", "unsupported", "to_vector")


def build_model(chooser):
    """A random Functional model; every construct is reachable.

    Args:
        chooser: a `RandomChooser` or `HypothesisChooser`.

    Returns:
        A built `keras.Model`.
    """
    b = _Builder(chooser)
    c = chooser
    inputs = [keras.Input((c.integer(4, 8), c.integer(4, 8),
                           c.integer(1, 4)), name="image")]
    b.images.append(inputs[0])
    b.add_image(layers.Conv2D(c.integer(3, 8), 3, padding="same",
                              name=b.name("conv"))(inputs[0]))
    if c.boolean(0.25):
        extra = keras.Input((c.integer(2, 6),), name="extra")
        inputs.append(extra)
        b.vectors.append(layers.Dense(4, name=b.name("dense"))(extra))
    for _ in range(c.integer(2, 10)):
        construct = getattr(b, c.choice(_Builder.CONSTRUCTS))
        construct(b.recent(b.images))
    if not b.vectors or c.boolean(0.3):
        b.to_vector(b.images[-1])
    if len(b.vectors) > 1 and c.boolean():
        joint = layers.Concatenate(name=b.name("concat"))(b.vectors[-2:])
    else:
        joint = b.vectors[-1]
    outputs = [layers.Dense(c.integer(2, 5), name="logits")(joint)]
    if c.boolean(0.25):
        outputs.append(layers.Conv2D(2, 1, name="map")(b.images[-1]))
    return keras.Model(inputs if len(inputs) > 1 else inputs[0],
                       outputs if len(outputs) > 1 else outputs[0])


def randomize_weights(model, rng):
    """Random values for every weight, so that a wrong slice shows.

    Variances stay positive; everything else (BatchNorm beta, moving mean,
    biases) becomes non-zero, which a missing mask would leak through.
    """
    for layer in _graph.all_layers(model):
        if isinstance(layer, keras_chex.ChannelMask):
            continue
        values = []
        for v in layer.weights:
            leaf = v.path.split("/")[-1]
            shape = tuple(v.shape)
            keep = v is getattr(layer, "mask", None)  # A folded mask.
            if keep or not np.issubdtype(np.dtype(v.dtype), np.floating):
                values.append(np.asarray(v.numpy()))
            elif "variance" in leaf:
                values.append(rng.uniform(0.5, 1.5, shape))
            elif leaf == "gamma":
                values.append(rng.uniform(0.5, 1.5, shape))
            elif leaf in ("beta", "moving_mean", "bias"):
                values.append(rng.normal(0.0, 0.3, shape))
            else:
                fan_in = max(1, int(np.prod(shape[:-1])))
                values.append(rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape))
        _graph.set_layer_weights(layer, [np.asarray(x, dtype=v.dtype)
                                         for x, v in zip(values,
                                                         layer.weights)])


def random_masks(wrapped, rng, keep=0.5):
    """Random masks on every group: something pruned in each, at least one
    channel kept in each group and in each layer's part of a group."""
    from keras_chex.core import method

    analysis = wrapped.analysis
    groups = analysis.groups
    if not groups:
        return groups
    full = np.ones(analysis.num_channels, dtype=bool)
    for g in groups:
        mask = rng.random(g.size) < keep
        if mask.all() and g.size > 1:
            mask[rng.integers(g.size)] = False  # Always prune something.
        if not mask.any():
            mask[rng.integers(g.size)] = True
        full[g.start:g.start + g.size] = mask
    masks = wrapped.masks
    masks.assign(method.keep_a_channel_per_producer(
        full, rng.random(analysis.num_channels), masks.producer_segments()))
    return groups


def _inputs(model, rng, batch=2):
    values = [rng.uniform(-1, 1, (batch,) + tuple(t.shape[1:])).astype(
        "float32") for t in model.inputs]
    return values[0] if len(values) == 1 else values


def _max_rel_diff(expected, actual):
    worst = 0.0
    for e, a in zip(keras.tree.flatten(expected), keras.tree.flatten(actual)):
        e, a = np.asarray(e), np.asarray(a)
        if e.shape != a.shape:
            return np.inf
        worst = max(worst, np.abs(e - a).max() / max(np.abs(e).max(), 1e-6))
    return worst


def check_model(model, seed, rtol=1e-4, tflite=True, relevance=True):
    """Checks every claim on one model; raises AssertionError on a miss.

    With random weights and BatchNorm statistics and random masks on every
    channel group:

    - the stripped model's outputs equal the masked model's (max relative
      difference <= `rtol`);
    - `count_macs` of the compact model equals the masked count (MACs and
      parameters);
    - the wrapped model survives a `.keras` round trip: same masks, same
      outputs;
    - a TFLite export of the compact model matches the masked model
      (`export_tflite` verifies it with LiteRT);
    - `relevance_scores` runs on a classifier: every group gets a finite
      score or, with a warning, NaN.

    Returns:
        A dict of what was seen (groups, unsupported layers, differences).
    """
    rng = np.random.default_rng(seed)
    randomize_weights(model, rng)
    inputs = _inputs(model, rng)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = keras_chex.wrap(model)
    report = {"groups": len(keras_chex.channel_groups(wrapped)),
              "unsupported": len(wrapped.analysis.unsupported),
              "warned": len(caught)}
    random_masks(wrapped, rng)
    compact = keras_chex.strip(wrapped)
    expected = wrapped(inputs, training=False)
    diff = _max_rel_diff(expected, compact(inputs, training=False))
    report["strip_rel_diff"] = diff
    assert diff <= rtol, f"strip: max relative difference {diff:.3g}"
    masked, stripped = (keras_chex.count_macs(wrapped),
                        keras_chex.count_macs(compact))
    assert (stripped.macs, stripped.params) == (masked.macs, masked.params), (
        f"count_macs: compact {stripped.macs}/{stripped.params}, masked "
        f"{masked.macs}/{masked.params}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "wrapped.keras")
        wrapped.save(path)
        loaded = keras.saving.load_model(path)
        np.testing.assert_array_equal(loaded.masks.numpy(),
                                      wrapped.masks.numpy())
        diff = _max_rel_diff(expected, loaded(inputs, training=False))
        assert diff <= 1e-6, f".keras round trip: difference {diff:.3g}"
        if tflite:
            sample = inputs if isinstance(inputs, list) else [inputs]
            report["tflite_rel_diff"] = keras_chex.export_tflite(
                wrapped, os.path.join(tmp, "compact.tflite"),
                sample_input=[s[:1] for s in sample]).max_rel_diff
    if relevance and len(model.outputs) == 1:
        report.update(_check_relevance(model, inputs, rng))
    return report


def _check_relevance(model, inputs, rng):
    classes = int(model.outputs[0].shape[-1])
    labels = rng.integers(0, classes, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = tuple(inputs) if isinstance(inputs, list) else inputs
        scores = keras_chex.relevance_scores(model, (x, labels))
    unscored = [n for n, v in scores.items() if np.isnan(v).any()]
    for name, values in scores.items():
        assert np.isnan(values).all() or np.isfinite(values).all(), (
            f"relevance of group '{name}' is partly NaN: {values}")
    if unscored:
        assert any("not scored" in str(w.message) for w in caught), (
            f"groups {unscored} are not scored, with no warning")
    return {"unscored_groups": len(unscored)}
