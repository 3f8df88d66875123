"""A user's own layer classes joining channel groups (register_layer_rule)."""

import warnings

import keras
import numpy as np
import pytest
from keras import layers

import keras_chex


class StandardizedConv2D(layers.Conv2D):
    """A Conv2D with weight standardisation: channels as in Conv2D."""

    def call(self, inputs):
        kernel = self.kernel
        mean = keras.ops.mean(kernel, axis=(0, 1, 2), keepdims=True)
        std = keras.ops.std(kernel, axis=(0, 1, 2), keepdims=True) + 1e-5
        out = keras.ops.conv(inputs, (kernel - mean) / std,
                             strides=self.strides, padding=self.padding)
        return out + self.bias if self.use_bias else out


class Scale(layers.Layer):
    """A learned scale per channel."""

    def build(self, shape):
        self.scale = self.add_weight(shape=shape[-1:], name="scale",
                                     initializer="ones")

    def call(self, x):
        return x * self.scale


def _model():
    keras.utils.set_random_seed(0)
    x = keras.Input((8, 8, 3))
    h = StandardizedConv2D(8, 3, padding="same", name="ws")(x)
    h = layers.ReLU()(h)
    h = layers.Conv2D(6, 3, padding="same", name="c2")(h)
    h = Scale(name="scale")(h)
    h = layers.ReLU()(h)
    h = layers.GlobalAveragePooling2D()(h)
    model = keras.Model(x, layers.Dense(3, name="head")(h))
    scale = model.get_layer("scale")
    scale.scale.assign(np.linspace(0.5, 2.0, 6).astype("float32"))
    return model


def _group_names(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {g.name for g in keras_chex.channel_groups(model)}


def test_registered_layers_are_pruned_and_strip_exactly():
    before = _group_names(_model())
    assert "ws" not in before and "c2" not in before  # Left whole.
    keras_chex.register_layer_rule(StandardizedConv2D, like=layers.Conv2D)
    keras_chex.register_layer_rule(Scale, channelwise_weights=["scale"])
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Nothing left unsupported.
        wrapped = keras_chex.wrap(model)
    groups = {g.name: g for g in keras_chex.channel_groups(wrapped)}
    assert {"ws", "c2"} <= set(groups)
    groups["ws"].set_mask(np.arange(8) % 2 == 0)
    groups["c2"].set_mask(np.arange(6) < 4)
    compact = keras_chex.strip(wrapped)
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(compact(x), wrapped(x), atol=1e-5)
    assert isinstance(compact.get_layer("ws"), StandardizedConv2D)
    assert compact.get_layer("ws").filters == 4
    # The scale keeps the values of the channels that stayed.
    np.testing.assert_allclose(compact.get_layer("scale").scale.numpy(),
                               np.linspace(0.5, 2.0, 6)[:4], rtol=1e-6)
    assert keras_chex.count_macs(compact).macs < (
        keras_chex.count_macs(model).macs)


def test_a_wrong_registration_is_left_whole_with_the_reason():
    class Bad(layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(shape=(1,), name="w")

        def call(self, x):
            return x * self.w

    keras_chex.register_layer_rule(Bad, channelwise_weights=["gain"])
    x = keras.Input((4, 4, 3))
    h = layers.Conv2D(4, 1, name="c")(x)
    h = Bad(name="bad")(h)
    model = keras.Model(x, layers.Conv2D(2, 1)(h))
    with pytest.warns(UserWarning, match="no weight 'gain'"):
        keras_chex.channel_groups(model)


def test_bad_registrations_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="`layer_class` must be"):
        keras_chex.register_layer_rule(Scale(), channelwise_weights=[])
    with pytest.raises(ValueError, match="exactly one of `like`"):
        keras_chex.register_layer_rule(Scale)
    with pytest.raises(ValueError, match="exactly one of `like`"):
        keras_chex.register_layer_rule(Scale, like=layers.Conv2D,
                                       channelwise_weights=[])
    with pytest.raises(ValueError, match="`like` must be a Keras layer"):
        keras_chex.register_layer_rule(Scale, like=Scale)
    with pytest.raises(ValueError, match="`channelwise_weights` must be"):
        keras_chex.register_layer_rule(Scale, channelwise_weights="scale")
    with pytest.raises(ValueError, match="already has a rule for Conv2D"):
        keras_chex.register_layer_rule(layers.Conv2D, like=layers.Dense)
