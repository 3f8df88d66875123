"""Masks folded into BatchNorms: same model, same gradients, cheaper."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import keras_chex
from keras_chex.core import _graph
from keras_chex.cifar.resnet import cifar_resnet
from conftest import assert_strips_exactly
from conftest import randomize_weights

MASK_LAYERS = (keras_chex.ChannelMask, keras_chex.MaskedBatchNormalization)


def _layers_of(model, cls):
    return [l for l in _graph.all_layers(model) if isinstance(l, cls)]


def _random_bn(rng, config):
    bn = layers.BatchNormalization(**config)
    masked = keras_chex.MaskedBatchNormalization(**config)
    bn.build((None, 4, 4, 6))
    masked.build((None, 4, 4, 6))
    values = [rng.uniform(0.5, 1.5, tuple(w.shape)) for w in bn.weights]
    bn.set_weights(values)
    masked.load_batchnorm_weights(bn)
    return bn, masked


@pytest.mark.parametrize("config", [
    {}, {"scale": False}, {"center": False},
    {"momentum": 0.5, "epsilon": 0.1}, {"dtype": "mixed_float16"},
])
def test_all_ones_mask_computes_what_batchnorm_computes(rng, config):
    bn, masked = _random_bn(rng, config)
    x = rng.normal(size=(8, 4, 4, 6)).astype("float32")
    for training in (True, False, True):
        np.testing.assert_allclose(masked(x, training=training),
                                   bn(x, training=training),
                                   rtol=1e-6, atol=1e-6)
    # The moving statistics took the same two updates.
    for a, b in zip(bn.weights, masked.weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    bn.trainable = masked.trainable = False  # Frozen: moving statistics.
    np.testing.assert_allclose(masked(x, training=True),
                               bn(x, training=True), rtol=1e-6, atol=1e-6)


def test_masked_channels_are_zero_and_get_no_gradient(rng):
    _, masked = _random_bn(rng, {})
    keep = np.array([1, 0, 1, 1, 0, 1], bool)
    masked.set_channel_mask(keep)
    x = tf.constant(rng.normal(size=(8, 4, 4, 6)).astype("float32"))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = masked(x, training=True)
        loss = tf.reduce_sum(tf.sin(y))
    assert np.all(np.asarray(y)[..., ~keep] == 0)
    assert np.all(np.asarray(y)[..., keep] != 0)
    for grad in (tape.gradient(loss, x), tape.gradient(loss, masked.gamma),
                 tape.gradient(loss, masked.beta)):
        grad = np.asarray(grad)
        assert np.all(grad[..., ~keep] == 0)
        assert np.abs(grad[..., keep]).sum() > 0
    with pytest.raises(ValueError, match="shape"):
        masked.set_channel_mask(np.ones(4, bool))
    with pytest.raises(ValueError, match="mode"):
        keras_chex.MaskedBatchNormalization(mode="straight_through")


def _same_random_masks(rng, *models):
    groups = [keras_chex.channel_groups(m) for m in models]
    for same in zip(*groups):
        keep = rng.random(same[0].size) < 0.5
        keep[0] = True
        for g in same:
            g.set_mask(keep)


def _grads(model, x, y):
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    return {v.path: np.asarray(g)
            for v, g in zip(model.trainable_variables, grads)}


@pytest.mark.parametrize("depth", [8, 14])
def test_folding_changes_neither_outputs_nor_gradients(rng, depth):
    model = cifar_resnet(depth, widths=(8, 16, 16), input_shape=(16, 16, 3))
    randomize_weights(model, rng)
    folded = keras_chex.wrap(model)
    unfolded = keras_chex.wrap(model, fold_batchnorm=False)
    # A CIFAR ResNet needs no activation mask at all once folded.
    assert not _layers_of(folded, keras_chex.ChannelMask)
    assert len(_layers_of(folded, keras_chex.MaskedBatchNormalization)) == (
        len(_layers_of(model, layers.BatchNormalization)))
    assert not _layers_of(unfolded, keras_chex.MaskedBatchNormalization)
    _same_random_masks(rng, folded, unfolded)
    x = rng.normal(size=(8, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 10, 8)
    for training in (False, True):
        np.testing.assert_allclose(folded(x, training=training),
                                   unfolded(x, training=training),
                                   rtol=1e-5, atol=1e-5)
    a, b = _grads(folded, x, y), _grads(unfolded, x, y)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_allclose(a[path], b[path], rtol=1e-4, atol=1e-6,
                                   err_msg=path)
    # Pruned filters get exactly no gradient, as with activation masks.
    for g in keras_chex.channel_groups(folded):
        for name in g.producers:
            assert np.all(a[f"{name}/kernel"][..., ~g.mask] == 0), name


def test_straight_through_and_renorm_keep_activation_masks(rng):
    model = cifar_resnet(8, widths=(8, 8, 8), input_shape=(8, 8, 3))
    wrapped = keras_chex.wrap(model, mode="straight_through")
    assert _layers_of(wrapped, keras_chex.ChannelMask)
    assert not _layers_of(wrapped, keras_chex.MaskedBatchNormalization)

    inp = keras.Input((8, 8, 3))
    x = layers.Conv2D(6, 3, name="c1")(inp)
    x = layers.BatchNormalization(renorm=True, name="renorm_bn")(x)
    x = layers.ReLU(name="relu1")(x)
    x = layers.Conv2D(4, 3, name="c2")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.ReLU()(x)
    out = layers.Dense(3)(layers.GlobalAveragePooling2D()(x))
    net = keras.Model(inp, out)
    wrapped, _ = assert_strips_exactly(
        net, rng.normal(size=(4, 8, 8, 3)).astype("float32"), rng)
    # Renorm keeps Keras' own maths: its mask stays on the activation.
    kinds = {l.name: type(l) for l in _layers_of(wrapped, MASK_LAYERS)}
    assert kinds == {"relu1_channel_mask": keras_chex.ChannelMask,
                     "bn2": keras_chex.MaskedBatchNormalization}


def test_folded_model_saves_loads_and_strips(rng, tmp_path):
    model = cifar_resnet(8, widths=(8, 16, 16), input_shape=(16, 16, 3))
    randomize_weights(model, rng)
    wrapped = keras_chex.wrap(model)
    _same_random_masks(rng, wrapped)
    path = tmp_path / "folded.keras"
    wrapped.save(path)
    loaded = keras.saving.load_model(path)
    x = rng.normal(size=(4, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(loaded(x), wrapped(x), atol=1e-6)
    for a, b in zip(keras_chex.channel_groups(wrapped),
                    keras_chex.channel_groups(loaded)):
        np.testing.assert_array_equal(a.mask, b.mask)
    # Masks are not parameters: the wrapped model counts what the plain
    # model has, and the compact one what survives.
    assert keras_chex.count_macs(
        keras_chex.wrap(model)).params == keras_chex.count_macs(model).params
    compact = keras_chex.strip(loaded)
    assert not _layers_of(compact, MASK_LAYERS)
    assert all(type(l) is layers.BatchNormalization
               for l in _layers_of(compact, layers.BatchNormalization))
    np.testing.assert_allclose(compact(x), wrapped(x), rtol=1e-4, atol=1e-5)
    assert keras_chex.count_macs(compact).params == (
        keras_chex.count_macs(wrapped).params) < (
        keras_chex.count_macs(model).params)
