"""Composite layers are opened into nested models of their inner layers,
only when that provably computes the same thing."""

import warnings

import keras
import numpy as np
import pytest

import keras_chex
from keras_chex.core import _graph
from keras_chex.core import composites
from keras_chex.testing.random_graphs import random_masks


class Block(keras.layers.Layer):
    """conv -> BN -> relu -> conv (+ input): a residual block as keras-hub
    writes them, as a layer of layers."""

    def __init__(self, filters, inner=6, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.inner = filters, inner
        self.conv1 = keras.layers.Conv2D(inner, 3, padding="same",
                                         name=f"{self.name}_conv1")
        self.bn = keras.layers.BatchNormalization(name=f"{self.name}_bn")
        self.conv2 = keras.layers.Conv2D(filters, 1, name=f"{self.name}_conv2")

    def build(self, input_shape):
        self.conv1.build(input_shape)
        self.bn.build(input_shape[:-1] + (self.inner,))
        self.conv2.build(input_shape[:-1] + (self.inner,))

    def call(self, x):
        y = keras.ops.relu(self.bn(self.conv1(x)))
        return x + self.conv2(y)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "inner": self.inner}


class Stage(keras.layers.Layer):
    """Two blocks: a composite layer made of composite layers."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.first = Block(filters, name=f"{self.name}_b1")
        self.second = Block(filters, name=f"{self.name}_b2")

    def build(self, input_shape):
        self.first.build(input_shape)
        self.second.build(input_shape)

    def call(self, x, training=None):
        return self.second(self.first(x, training=training),
                           training=training)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


class OwnWeight(Block):
    """Holds a weight of its own: a traced graph would lose it."""

    def build(self, input_shape):
        super().build(input_shape)
        self.gain = self.add_weight(shape=(), initializer="ones", name="gain")

    def call(self, x):
        return super().call(x) * self.gain


class TrainingBranch(Block):
    """Branches in Python on `training`: a trace would freeze one branch."""

    def call(self, x, training=None):
        if training:
            return super().call(x) * 0.5
        return super().call(x)


class Head(keras.layers.Layer):
    """A head shared by two feature maps of different sizes."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(5, 3, padding="same",
                                        name=f"{self.name}_conv")
        self.out = keras.layers.Conv2D(2, 1, name=f"{self.name}_out")

    def build(self, input_shape):
        self.conv.build(input_shape)
        self.out.build(input_shape[:-1] + (5,))

    def call(self, x):
        return self.out(keras.ops.relu(self.conv(x)))


def _model(block=Block):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = block(8, name="block")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


def _x(shape=(2, 8, 8, 3)):
    return np.random.default_rng(0).standard_normal(shape).astype("float32")


def test_a_block_of_layers_opens_and_its_channels_are_pruned():
    keras.utils.set_random_seed(0)
    model = _model()
    opened = composites.open_composites(model)
    assert opened is not model
    nested = [n.operation for n in _graph.nodes(opened)
              if _graph.is_graph_model(n.operation)]
    assert [m.name for m in nested] == ["block"]
    # The same layer objects, so the same weights: nothing is copied.
    assert nested[0].get_layer("block_conv1") is model.get_layer(
        "block").conv1
    np.testing.assert_array_equal(opened(_x()), model(_x()))
    # The block's inner width is a group, and its MACs are counted.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = keras_chex.count_macs(model)
    assert result.uncounted == ()
    assert result.macs == 8 * 8 * (3 * 9 * 8 + 8 * 9 * 6 + 6 * 8) + 8 * 3
    groups = {g.name: g for g in keras_chex.channel_groups(model)}
    assert groups["block_conv1"].size == 6
    # Pruned, stripped: the compact computes what the masked model does.
    wrapped = keras_chex.prune_and_regrow(model, flops=0.6, seed=0)
    compact = keras_chex.strip(wrapped)
    np.testing.assert_allclose(compact(_x()), wrapped(_x()), atol=1e-5)
    assert keras_chex.count_macs(compact).macs < result.macs
    assert model.get_layer("block").conv1.kernel.shape[-1] == 6  # Untouched.


def test_composites_inside_composites_open_too_and_exclude_names_them():
    keras.utils.set_random_seed(0)
    model = _model(Stage)
    groups = {g.name for g in keras_chex.channel_groups(model)}
    assert {"block_b1_conv1", "block_b2_conv1"} <= groups
    np.testing.assert_array_equal(composites.open_composites(model)(_x()),
                                  model(_x()))
    # Excluding the composite layer excludes every layer inside it.
    excluded = keras_chex.wrap(model, exclude=["block"])
    names = {g.name for g in keras_chex.channel_groups(excluded)}
    assert not names & {"block_b1_conv1", "block_b2_conv1"}


@pytest.mark.parametrize("block, why", [
    (OwnWeight, "holds weights of its own"),
    (TrainingBranch, "branches on `training`")])
def test_a_layer_that_cannot_be_opened_safely_stays_whole(block, why):
    model = _model(block)
    assert composites.open_composites(model) is model
    with pytest.warns(UserWarning, match=f"'block' .*made of layers.*{why}"):
        keras_chex.wrap(model)


def test_a_layer_whose_trace_differs_stays_whole():
    class Lying(Block):
        # Its symbolic call and its eager call compute different things.
        def call(self, x):
            y = super().call(x)
            if isinstance(x, keras.KerasTensor):
                return y
            return y + 1.0

    model = _model(Lying)
    assert composites.open_composites(model) is model
    assert "computes something else" in composites.closed_reason(
        model.get_layer("block"))


def test_a_head_shared_by_two_sizes_gets_one_nested_model_per_size():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    big = keras.layers.Conv2D(4, 3, padding="same", name="p3")(inputs)
    small = keras.layers.Conv2D(4, 3, strides=2, padding="same",
                                name="p4")(big)
    head = Head(name="head")
    outputs = [keras.layers.Flatten()(head(big)),
               keras.layers.Flatten()(head(small))]
    model = keras.Model(inputs, keras.layers.Concatenate()(outputs))
    opened = composites.open_composites(model)
    nested = sorted(n.operation.name for n in _graph.nodes(opened)
                    if _graph.is_graph_model(n.operation))
    assert nested == ["head", "head_call2"]
    # Both calls' MACs are counted, at their own sizes.
    macs = keras_chex.count_macs(model).macs
    per_pixel = 4 * 9 * 5 + 5 * 2
    assert macs == (8 * 8 * 3 * 9 * 4 + 4 * 4 * 4 * 9 * 4
                    + (64 + 16) * per_pixel)
    wrapped = keras_chex.wrap(model)
    groups = {g.name: g for g in keras_chex.channel_groups(wrapped)}
    assert groups["head_conv"].size == 5
    random_masks(wrapped, np.random.default_rng(0), keep=0.5)
    compact = keras_chex.strip(wrapped)
    np.testing.assert_allclose(compact(_x()), wrapped(_x()), atol=1e-5)


class Pyramid(keras.layers.Layer):
    """Takes a dict of feature maps, as RetinaNet's `FeaturePyramid`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.lateral = keras.layers.Conv2D(4, 1, name=f"{self.name}_lateral")
        self.smooth = keras.layers.Conv2D(4, 3, padding="same",
                                          name=f"{self.name}_smooth")

    def build(self, input_shape):
        self.lateral.build(input_shape["P4"])
        self.smooth.build(input_shape["P3"][:-1] + (4,))

    def call(self, inputs):
        up = keras.ops.repeat(keras.ops.repeat(
            self.lateral(inputs["P4"]), 2, axis=1), 2, axis=2)
        return self.smooth(inputs["P3"] + up)


def test_a_layer_taking_a_dict_opens_without_a_warning():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    p3 = keras.layers.Conv2D(4, 3, padding="same", name="p3")(inputs)
    p4 = keras.layers.Conv2D(6, 3, strides=2, padding="same", name="p4")(p3)
    x = Pyramid(name="fpn")({"P3": p3, "P4": p4})
    x = keras.layers.Conv2D(5, 1, name="mix")(x)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opened = composites.open_composites(model)
    assert opened is not model
    np.testing.assert_array_equal(opened(_x()), model(_x()))
