"""MACs the count cannot see are named, never a silent zero."""

import warnings

import keras
import numpy as np
import pytest

import keras_chex
from keras_chex.core import analysis as analysis_lib
from keras_chex.cifar.resnet import cifar_resnet


class ConvBlock(keras.layers.Layer):
    """A convolution keras-chex cannot see: its own kernel, through
    `keras.ops.conv` (no layer inside to look at)."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(3, 3, input_shape[-1], self.filters), name="kernel")

    def call(self, x):
        return keras.ops.relu(keras.ops.conv(x, self.kernel, padding="same"))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


class GainedConvBlock(keras.layers.Layer):
    """A composite layer left closed (a weight of its own besides its
    convolution's): its MACs are counted through the graph of its call."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(filters, 3, padding="same")

    def build(self, input_shape):
        self.conv.build(input_shape)
        self.gain = self.add_weight(shape=(), initializer="ones", name="gain")

    def call(self, x):
        return keras.ops.relu(self.conv(x)) * self.gain


def _model(block_filters=8, head_filters=64, stem=16, block=ConvBlock):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(stem, 3, padding="same", name="stem")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(head_filters, 1, name="wide")(x)
    x = block(block_filters, name="block")(x)
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


def test_a_closed_composite_is_counted_through_its_call():
    model = _model(block=GainedConvBlock)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = keras_chex.count_macs(model)
    assert result.uncounted == ()
    stem = 8 * 8 * 3 * 3 * 3 * 16
    wide = 8 * 8 * 16 * 64
    block = 8 * 8 * 3 * 3 * 64 * 8
    assert {r.name: r.macs for r in result.layers}["block"] == block
    assert result.macs == stem + wide + block + 8 * 3


def test_a_closed_composite_is_analysed_once_for_all_counts(monkeypatch):
    model = _model(block=GainedConvBlock)
    first = keras_chex.count_macs(model).macs
    analysed = []
    original = analysis_lib.ModelAnalysis.__init__

    def spy(self, model, *args, **kwargs):
        analysed.append(model.name)
        original(self, model, *args, **kwargs)

    monkeypatch.setattr(analysis_lib.ModelAnalysis, "__init__", spy)
    assert keras_chex.count_macs(model).macs == first
    # The model itself again, not the traced graph of its block.
    assert analysed and "block" not in analysed


def test_attention_and_einsum_dense_are_counted_an_embedding_is_a_lookup():
    tokens = keras.Input((6,), dtype="int32")
    context = keras.Input((5, 12))
    x = keras.layers.Embedding(50, 8, name="embed")(tokens)
    x = keras.layers.MultiHeadAttention(2, 4, name="self")(x, x)
    x = keras.layers.MultiHeadAttention(3, 5, value_dim=7, name="cross")(
        x, context)
    x = keras.layers.EinsumDense("abc,cd->abd", (None, 9), name="proj")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    model = keras.Model([tokens, context],
                        keras.layers.Dense(2, name="head")(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = keras_chex.count_macs(model)
    assert result.uncounted == ()
    macs = {r.name: r.macs for r in result.layers}
    # Four projections, query-key scores, the weighted sum of values.
    assert macs["self"] == 3 * 6 * 8 * 8 + 6 * 8 * 8 + 2 * 6 * 6 * 8
    assert macs["cross"] == (6 * 8 * 15 + 5 * 12 * 15 + 5 * 12 * 21
                             + 6 * 21 * 8 + 6 * 5 * 15 + 6 * 5 * 21)
    assert macs["proj"] == 6 * 8 * 9 and "embed" not in macs or not macs[
        "embed"]
    assert result.macs == sum(macs.values())


def test_layers_with_the_same_name_in_nested_models_count_once_each():
    def block(name):
        inputs = keras.Input((4, 4, 8))
        y = keras.layers.Conv2D(8, 1, name="conv")(inputs)
        return keras.Model(inputs, y, name=name)

    inputs = keras.Input((4, 4, 8))
    y = block("first")(inputs)
    y = block("second")(y)
    model = keras.Model(inputs, y)
    result = keras_chex.count_macs(model)
    assert [r.macs for r in result.layers] == [4 * 4 * 8 * 8] * 2
    assert result.macs == 2 * 4 * 4 * 8 * 8


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


def test_keras_hubs_cached_attention_counts_as_attention():
    # keras-hub is a test extra; its private path is where the registry
    # knows the class by name.
    from keras_hub.src.layers.modeling.cached_multi_head_attention import (
        CachedMultiHeadAttention)

    x = keras.Input((6, 8))
    y = CachedMultiHeadAttention(2, 4, name="cached")(x, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = keras_chex.count_macs(keras.Model(x, y))
    assert result.macs == 3 * 6 * 8 * 8 + 6 * 8 * 8 + 2 * 6 * 6 * 8
