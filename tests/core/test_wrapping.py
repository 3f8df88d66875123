"""Wrapped models: masks, gradient modes, training, saving, compilation."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import keras_chex
from conftest import random_masks
from conftest import randomize_weights


def small_net(name="net"):
    inp = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, padding="same", name="c1")(inp)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU()(x)
    y = layers.Conv2D(8, 3, padding="same", name="c2")(x)
    y = layers.BatchNormalization(name="bn2")(y)
    x = layers.ReLU()(layers.Add()([x, y]))
    x = layers.Conv2D(6, 3, padding="same", name="c3")(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, layers.Dense(3, name="head")(x), name=name)


@pytest.fixture
def data(rng):
    x = rng.uniform(-1, 1, (16, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, 16)
    return x, y


def test_wrap_leaves_the_users_model_untouched(rng, data):
    model = small_net()
    randomize_weights(model, rng)
    before = [w.copy() for w in model.get_weights()]
    wrapped = keras_chex.wrap(model)
    random_masks(wrapped, rng)
    wrapped.compile("sgd", keras.losses.SparseCategoricalCrossentropy(True))
    wrapped.fit(*data, epochs=1, verbose=0)
    after = model.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert not any(isinstance(l, keras_chex.ChannelMask) for l in model.layers)
    # All-ones masks: the wrapped copy computes exactly what the model does.
    fresh = keras_chex.wrap(model)
    np.testing.assert_allclose(fresh(data[0]), model(data[0]), atol=1e-6)


def test_masked_channels_are_exact_zeros_where_they_are_consumed(rng, data):
    model = small_net()
    randomize_weights(model, rng)
    wrapped = keras_chex.wrap(model)
    groups = random_masks(wrapped, rng)
    masks = [l for l in wrapped.layers
             if isinstance(l, (keras_chex.ChannelMask,
                               keras_chex.MaskedBatchNormalization))]
    # c3 has a bias and no BatchNorm: an activation mask; bn1/bn2 fold.
    assert {type(l) for l in masks} == {
        keras_chex.ChannelMask, keras_chex.MaskedBatchNormalization}
    probe = keras.Model(wrapped.input, [m.output for m in masks])
    for layer, out in zip(masks, probe(data[0])):
        dropped = np.asarray(layer.mask.numpy()) == 0
        assert np.all(np.asarray(out)[..., dropped] == 0)
    assert sum((~g.mask).sum() for g in groups) > 0


def test_channel_group_handle(rng):
    wrapped = keras_chex.wrap(small_net())
    groups = keras_chex.channel_groups(wrapped)
    by_name = {g.name: g for g in groups}
    stream = by_name["c1"]
    assert stream.size == 8
    assert set(stream.producers) == {"c1", "c2"}
    assert {"c1", "bn1", "c2", "bn2", "c3"} <= set(stream.layers)
    assert stream.mask.dtype == bool and stream.mask.all()
    mask = np.array([1, 0, 1, 0, 1, 1, 1, 1], bool)
    stream.set_mask(mask)
    np.testing.assert_array_equal(stream.mask, mask)
    # A fresh handle sees the same (state lives in the model, not the handle).
    np.testing.assert_array_equal(
        keras_chex.channel_groups(wrapped)[groups.index(stream)].mask, mask)
    with pytest.raises(ValueError, match="shape"):
        stream.set_mask(np.ones(3, bool))
    with pytest.raises(ValueError, match="removes all"):
        stream.set_mask(np.zeros(8, bool))
    with pytest.raises(ValueError, match="wrap"):
        keras_chex.channel_groups(small_net())[0].set_mask(mask)
    with pytest.raises(ValueError, match="already wrapped"):
        keras_chex.wrap(wrapped)


def _grads(wrapped, x, y):
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, wrapped(x, training=True))
    names = [v.path for v in wrapped.trainable_variables]
    return dict(zip(names, tape.gradient(loss, wrapped.trainable_variables)))


def _pruned_slices(wrapped):
    group = {g.name: g for g in keras_chex.channel_groups(wrapped)}["c3"]
    dropped = ~group.mask
    return group, dropped


@pytest.mark.parametrize("mode", ["hard", "straight_through"])
def test_gradient_modes(rng, data, mode):
    model = small_net()
    randomize_weights(model, rng)
    wrapped = keras_chex.wrap(model, mode=mode)
    group = {g.name: g for g in keras_chex.channel_groups(wrapped)}["c3"]
    mask = np.ones(group.size, bool)
    mask[[1, 4]] = False
    group.set_mask(mask)
    grads = _grads(wrapped, *data)
    kernel_grad = np.asarray(grads["c3/kernel"])[..., ~mask]
    bias_grad = np.asarray(grads["c3/bias"])[~mask]
    kept_grad = np.asarray(grads["c3/kernel"])[..., mask]
    assert np.abs(kept_grad).sum() > 0
    if mode == "hard":
        assert np.all(kernel_grad == 0) and np.all(bias_grad == 0)
    else:
        assert np.abs(kernel_grad).sum() > 0 and np.abs(bias_grad).sum() > 0
    # Either way the forward pass is masked: strip agrees.
    compact = keras_chex.strip(wrapped)
    np.testing.assert_allclose(compact(data[0]), wrapped(data[0]),
                               rtol=1e-4, atol=1e-5)


def test_permanent_mode_zeroes_weights_and_refuses_regrowth(rng):
    model = small_net()
    randomize_weights(model, rng)
    wrapped = keras_chex.wrap(model, mode="permanent")
    group = {g.name: g for g in keras_chex.channel_groups(wrapped)}["c1"]
    mask = np.ones(group.size, bool)
    mask[[0, 5]] = False
    group.set_mask(mask)
    layer = {l.name: l for l in wrapped.layers}
    assert np.all(np.asarray(layer["c1"].kernel)[..., ~mask] == 0)
    assert np.all(np.asarray(layer["c2"].kernel)[..., ~mask, :] == 0)
    assert np.all(np.asarray(layer["bn2"].gamma)[~mask] == 0)
    assert np.all(np.asarray(layer["c3"].kernel)[:, :, ~mask, :] == 0)
    assert np.abs(np.asarray(layer["c1"].kernel)[..., mask]).sum() > 0
    with pytest.raises(ValueError, match="permanent"):
        group.set_mask(np.ones(group.size, bool))
    tighter = mask.copy()
    tighter[1] = False
    group.set_mask(tighter)  # Pruning more is fine.


def test_fit_tf_function_and_xla(rng, data):
    model = small_net()
    wrapped = keras_chex.wrap(model)
    random_masks(wrapped, rng)
    wrapped.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    history = wrapped.fit(*data, batch_size=8, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    fn = tf.function(lambda x: wrapped(x, training=False), jit_compile=True)
    np.testing.assert_allclose(fn(data[0]), wrapped(data[0]), rtol=1e-4,
                               atol=1e-5)
    # A mask set after tracing takes effect without retracing.
    for g in keras_chex.channel_groups(wrapped):
        g.set_mask(np.eye(1, g.size, 0, dtype=bool)[0])
    compact = keras_chex.strip(wrapped)
    np.testing.assert_allclose(fn(data[0]), compact(data[0]), rtol=1e-4,
                               atol=1e-5)


def test_save_and_load_keras_file_keeps_masks(rng, data, tmp_path):
    model = small_net()
    randomize_weights(model, rng)
    # Excluding the head leaves c3 whole (the head reads it) and the
    # c1/c2 stream prunable: an excluded layer keeps its input channels too.
    wrapped = keras_chex.wrap(model, mode="straight_through",
                              exclude=["head"])
    random_masks(wrapped, rng)
    old = keras_chex.channel_groups(wrapped)
    assert [g.name for g in old] == ["c1"] and not old[0].mask.all()
    path = tmp_path / "wrapped.keras"
    wrapped.save(path)
    loaded = keras.saving.load_model(path)  # No custom_objects needed.
    assert keras_chex.is_wrapped(loaded)
    assert loaded.pruning_config["exclude"] == ["head"]
    assert loaded.pruning_config["mask_mode"] == "straight_through"
    new = keras_chex.channel_groups(loaded)
    assert [g.name for g in old] == [g.name for g in new]
    for a, b in zip(old, new):
        np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(loaded(data[0]), wrapped(data[0]), atol=1e-6)
    compact = keras_chex.strip(loaded)
    compact.save(tmp_path / "compact.keras")
    plain = keras.saving.load_model(tmp_path / "compact.keras")
    assert type(plain) is not keras_chex.PrunableModel
    np.testing.assert_allclose(plain(data[0]), wrapped(data[0]), rtol=1e-4,
                               atol=1e-5)


def test_strip_of_a_plain_model_is_an_equal_copy():
    model = small_net()
    x = np.random.default_rng(0).normal(size=(2,) + tuple(
        model.inputs[0].shape[1:])).astype("float32")
    copy = keras_chex.strip(model)
    assert copy is not model and not keras_chex.is_wrapped(copy)
    assert {id(w) for w in copy.weights}.isdisjoint(
        {id(w) for w in model.weights})
    np.testing.assert_array_equal(copy(x), model(x))
    assert keras_chex.count_macs(copy).macs == keras_chex.count_macs(
        model).macs
    with pytest.raises(TypeError, match="Expected a keras.Model"):
        keras_chex.strip("model.keras")


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="mode"):
        keras_chex.wrap(small_net(), mode="soft")


def test_count_macs_table_and_masks(rng):
    model = small_net()
    dense = keras_chex.count_macs(model)
    # c1: 8*8 positions * 3*3*3 * 8; c2: 64*9*8*8; c3: 64*9*8*6; head 6*3.
    expected = 64 * 27 * 8 + 64 * 72 * 8 + 64 * 72 * 6 + 6 * 3
    assert dense.macs == expected
    assert dense.params == model.count_params()
    rows = {r.name: r for r in dense.layers}
    assert rows["c2"].macs == 64 * 72 * 8
    assert "c3" in dense.table()
    wrapped = keras_chex.wrap(model)
    stream = {g.name: g for g in keras_chex.channel_groups(wrapped)}["c1"]
    stream.set_mask(np.arange(8) < 4)
    half = keras_chex.count_macs(wrapped)
    assert half.macs == 64 * 27 * 4 + 64 * 36 * 4 + 64 * 36 * 6 + 6 * 3


def _fully_convolutional(shape, nested=True):
    inp = keras.Input(shape)
    x = layers.Conv2D(8, 3, strides=2, padding="same", name="c1")(inp)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU()(x)
    if nested:
        block_in = keras.Input((None, None, 8))
        y = layers.Conv2D(8, 3, padding="same", name="inner")(block_in)
        x = keras.Model(block_in, layers.Add()([y, block_in]),
                        name="block")(x)
    x = layers.Conv2D(5, 1, name="c2")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, layers.Dense(3, name="head")(x))


def test_count_macs_at_an_input_shape_for_free_spatial_dims():
    keras.utils.set_random_seed(0)
    free = _fully_convolutional((None, None, 3))
    with pytest.raises(ValueError, match="input_shape=\\(224, 224, 3\\)"):
        keras_chex.count_macs(free)
    at = keras_chex.count_macs(free, input_shape=(32, 32, 3))
    fixed = keras_chex.count_macs(_fully_convolutional((32, 32, 3)))
    assert (at.macs, at.params) == (fixed.macs, fixed.params)
    assert {r.name: r.macs for r in at.layers} == {
        r.name: r.macs for r in fixed.layers}
    # c1: 16*16 positions * 27 * 8; inner: 256 * 72 * 8; c2: 256*8*5; head.
    assert at.macs == 256 * 27 * 8 + 256 * 72 * 8 + 256 * 8 * 5 + 5 * 3
    assert keras_chex.count_macs(free, input_shape=(64, 64, 3)).macs > (
        at.macs)
    # Masks count too, and the model itself keeps its free input.
    wrapped = keras_chex.wrap(free)
    group = {g.name: g for g in keras_chex.channel_groups(wrapped)}["c1"]
    group.set_mask(np.arange(8) < 4)
    half = keras_chex.count_macs(wrapped, input_shape=(32, 32, 3))
    compact = keras_chex.strip(wrapped)
    assert half.macs == keras_chex.count_macs(
        compact, input_shape=(32, 32, 3)).macs < at.macs
    assert tuple(free.inputs[0].shape) == (None, None, None, 3)


@pytest.mark.parametrize("shape, match", [
    ((32, 32, 4), "does not fit input"),
    ((32, 32), "does not fit input"),
    ([(32, 32, 3), (8,)], "1 input"),
    ((0, 32, 3), "does not fit input"),
])
def test_count_macs_rejects_an_input_shape_that_does_not_fit(shape, match):
    with pytest.raises(ValueError, match=match):
        keras_chex.count_macs(_fully_convolutional((None, None, 3)),
                              input_shape=shape)


def test_public_api_is_complete():
    for name in ("prune_and_regrow", "ChannelExploration", "channel_groups",
                 "count_macs", "strip", "wrap", "export_tflite",
                 "export_saved_model", "ChannelGroup", "ChannelMask",
                 "MaskedBatchNormalization", "soft_mask_prune",
                 "SoftMaskPruning", "build_latency_table", "LatencyTable",
                 "relevance_prune", "RelevancePruning", "relevance_scores",
                 "register_layer_rule"):
        assert name in keras_chex.__all__ and hasattr(keras_chex, name)


class _Scale(keras.layers.Layer):
    """Reports a size it derives in `get_config`, which its constructor
    refuses (as keras-hub's `ViTPatchingAndEmbedding` does)."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],),
                                     initializer="ones")

    def call(self, x):
        return x * self.scale

    def get_config(self):
        return {**super().get_config(), "units": self.units,
                "derived_size": 2 * self.units}


class _Unbuildable(_Scale):
    def get_config(self):
        return {**super().get_config(), "units": "not a number",
                "derived_size": 1}

    @classmethod
    def from_config(cls, config):
        raise RuntimeError("cannot rebuild")


def _with(layer):
    inputs = keras.Input((6, 6, 3))
    x = layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = layers.BatchNormalization()(layers.ReLU()(x))
    x = layers.Conv2D(8, 1, name="conv2")(x)
    x = layer(layers.ReLU()(x))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(2, name="head")(x))


def test_a_layer_whose_config_its_class_refuses_still_wraps_saves_and_strips(
        rng, tmp_path):
    keras.saving.get_custom_objects()["_Scale"] = _Scale
    try:
        model = _with(_Scale(8, name="scale"))
        model.get_layer("scale").scale.assign(
            rng.uniform(0.5, 2, 8).astype("float32"))
        x = rng.normal(size=(2, 6, 6, 3)).astype("float32")
        wrapped = keras_chex.wrap(model)
        np.testing.assert_allclose(wrapped(x), model(x), atol=1e-6)
        assert wrapped.pruning_config["config_repairs"] == {
            "scale": ["derived_size"]}
        random_masks(wrapped, rng)
        wrapped.save(tmp_path / "w.keras")
        loaded = keras.saving.load_model(tmp_path / "w.keras")
        np.testing.assert_allclose(loaded(x), wrapped(x), atol=1e-6)
        with pytest.warns(UserWarning, match="'scale' holds keys its own "
                                             "class refuses"):
            compact = keras_chex.strip(loaded)
        np.testing.assert_allclose(compact(x), wrapped(x), atol=1e-5)
    finally:
        del keras.saving.get_custom_objects()["_Scale"]


class _Forgetful(_Scale):
    """Its config forgets `extra`, so a copy holds one weight fewer."""

    def __init__(self, units, extra=False, **kwargs):
        super().__init__(units, **kwargs)
        self.extra = extra

    def build(self, input_shape):
        super().build(input_shape)
        if self.extra:
            self.shift = self.add_weight(shape=(input_shape[-1],),
                                         initializer="zeros")

    def get_config(self):
        return {**keras.layers.Layer.get_config(self), "units": self.units}


class _NoConfig(keras.layers.Layer):
    """Made of layers, with a `get_config` that fails (keras-hub's
    `DeiTEncoder` reads an attribute it never set)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(8, name="inner")
        self.norm = layers.LayerNormalization()
        self.dropout = layers.Dropout(0.5)

    def build(self, input_shape):
        # A weight of its own keeps it closed (never opened as a graph).
        self.gate = self.add_weight(shape=(input_shape[-1],),
                                    initializer="ones")

    def call(self, x, training=None):
        y = self.dropout(self.dense(x), training=training)
        return self.norm(x + self.gate * y)

    def get_config(self):
        return {**super().get_config(), "key_dim": self.key_dim}


class _Misconfigured(_Scale):
    """Its config forgets `factor` (no weight of its own), so a copy
    rebuilt from it has every weight and computes something else."""

    def __init__(self, units, factor=1.0, **kwargs):
        super().__init__(units, **kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.scale * self.factor

    def get_config(self):
        return {**keras.layers.Layer.get_config(self), "units": self.units}


def _misconfigured():
    return _Misconfigured(8, factor=3.0, name="odd")


def _unbuildable():
    return _Unbuildable(8, name="odd")


def _forgetful():
    return _Forgetful(8, extra=True, name="odd")


def _no_config():
    return _NoConfig(name="odd")


@pytest.mark.parametrize("make", [_unbuildable, _forgetful, _no_config,
                                  _misconfigured])
def test_a_layer_whose_config_does_not_round_trip_is_copied(make, rng, data):
    # Refused by its class, short of a weight, not producible at all, or
    # silently incomplete: the layer is left whole, as a copy holding its
    # own variables.
    model = _with(make())
    randomize_weights(model, rng)
    original = [w.numpy().copy() for w in model.get_layer("odd").weights]
    x = rng.normal(size=(4, 6, 6, 3)).astype("float32")
    wrapped = keras_chex.wrap(model)
    np.testing.assert_allclose(wrapped(x), model(x), atol=1e-5)
    copy = wrapped.get_layer("odd")
    assert copy is not model.get_layer("odd")
    assert len(copy.weights) == len(original) and not (
        {id(v) for v in copy.weights}
        & {id(v) for v in model.get_layer("odd").weights})
    # Training the wrapped model trains the copy, never the user's layer.
    wrapped.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses
                    .SparseCategoricalCrossentropy(from_logits=True))
    wrapped.fit(x, data[1][:4] % 2, epochs=1, verbose=0)
    assert any(not np.allclose(w.numpy(), o)
               for w, o in zip(copy.weights, original))
    for w, o in zip(model.get_layer("odd").weights, original):
        np.testing.assert_array_equal(w.numpy(), o)
    # Its neighbours still prune, and the compact model is exact.
    assert "conv" in {name for g in keras_chex.channel_groups(wrapped)
                      for name in g.producers}
    random_masks(wrapped, rng)
    compact = keras_chex.strip(wrapped)
    assert compact.get_layer("conv").filters < 8
    np.testing.assert_allclose(compact(x), wrapped(x), atol=1e-5)


def test_a_layer_that_can_neither_be_rebuilt_nor_copied_is_a_clear_error(
        monkeypatch):
    from keras_chex.core import _graph

    def refuse(obj, memo):
        raise TypeError("cannot copy this object")

    monkeypatch.setattr(_graph, "_copy_object", refuse)
    with pytest.raises(ValueError, match="layer 'odd' \\(_Unbuildable\\) "
                       "can neither be rebuilt from its config \\(Runtime"
                       "Error: cannot rebuild\\) nor copied \\(TypeError: "
                       "cannot copy this object\\)"):
        keras_chex.wrap(_with(_Unbuildable(8, name="odd")))
