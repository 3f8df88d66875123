"""MACs the count cannot see are named, never a silent zero."""

import warnings

import keras
import numpy as np
import pytest

import keras_chex
from keras_chex.cifar.resnet import cifar_resnet


class ConvBlock(keras.layers.Layer):
    """A composite layer keras-chex cannot look inside: besides its
    convolution it holds a weight of its own, which a traced graph of its
    inner layers would lose."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv = keras.layers.Conv2D(filters, 3, padding="same")

    def build(self, input_shape):
        self.conv.build(input_shape)
        self.gain = self.add_weight(shape=(), initializer="ones", name="gain")

    def call(self, x):
        return keras.ops.relu(self.conv(x)) * self.gain

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


def _model(block_filters=8, head_filters=64, stem=16):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(stem, 3, padding="same", name="stem")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(head_filters, 1, name="wide")(x)
    x = ConvBlock(block_filters, name="block")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


def test_a_layer_whose_macs_are_unknown_is_named_and_left_out():
    model = _model()
    with pytest.warns(UserWarning, match="MACs of 'block' are unknown"):
        result = keras_chex.count_macs(model)
    assert result.uncounted == ("block",)
    assert "block" not in {r.name for r in result.layers if r.macs}
    stem = 8 * 8 * 3 * 3 * 3 * 16
    wide = 8 * 8 * 16 * 64
    assert result.macs == stem + wide + 8 * 3
    # Its parameters are counted in full.
    assert result.params == model.count_params()


def test_a_plain_cnn_counts_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = keras_chex.count_macs(cifar_resnet(8, widths=(4, 8, 16),
                                                    input_shape=(8, 8, 3)))
    assert result.uncounted == ()


def test_attention_is_uncounted_and_an_embedding_lookup_is_not():
    tokens = keras.Input((6,), dtype="int32")
    x = keras.layers.Embedding(50, 8, name="embed")(tokens)
    x = keras.layers.MultiHeadAttention(2, 4, name="attention")(x, x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    model = keras.Model(tokens, keras.layers.Dense(2, name="head")(x))
    with pytest.warns(UserWarning, match="'attention'"):
        result = keras_chex.count_macs(model)
    assert result.uncounted == ("attention",)


def test_a_macs_target_against_a_mostly_unknown_total_is_refused():
    # The composite block holds most of the parameters: half of the MACs
    # keras-chex sees would not be half of the model's.
    model = _model(block_filters=64, head_filters=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="`flops=0.5`.*'block'.*params="):
            keras_chex.prune_and_regrow(model, flops=0.5, seed=0)
        # Parameters are counted in full: that target is honest.
        wrapped = keras_chex.prune_and_regrow(model, params=0.8, seed=0)
    assert wrapped.pruning_state.config.target == "params"


def test_a_small_unknown_share_is_warned_and_pruned():
    model = _model(block_filters=1, head_filters=16, stem=64)
    with pytest.warns(UserWarning, match="'block'.*`flops=0.5` is a fraction"):
        wrapped = keras_chex.prune_and_regrow(model, flops=0.5, seed=0)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compact = keras_chex.strip(wrapped)
    np.testing.assert_allclose(compact(x), wrapped(x), atol=1e-5)
