"""Every CNN in keras.applications: random weights, random masks, exact strip."""

import warnings

import keras
import numpy as np
import pytest

import keras_chex
from conftest import assert_strips_exactly
from conftest import random_masks
from conftest import randomize_weights

A = keras.applications

# name -> (constructor, input size)
APPLICATIONS = {
    "ResNet50": (A.ResNet50, 224),
    "ResNet50V2": (A.ResNet50V2, 224),
    "ResNet101": (A.ResNet101, 224),
    "MobileNet": (A.MobileNet, 224),
    "MobileNetV2": (A.MobileNetV2, 224),
    "MobileNetV3Small": (A.MobileNetV3Small, 224),
    "MobileNetV3Large": (A.MobileNetV3Large, 224),
    "VGG16": (A.VGG16, 224),
    "DenseNet121": (A.DenseNet121, 224),
    "EfficientNetB0": (A.EfficientNetB0, 224),
    "EfficientNetV2B0": (A.EfficientNetV2B0, 224),
    "Xception": (A.Xception, 299),
    "InceptionV3": (A.InceptionV3, 299),
    "InceptionResNetV2": (A.InceptionResNetV2, 299),
    "NASNetMobile": (A.NASNetMobile, 224),
    "ConvNeXtTiny": (A.ConvNeXtTiny, 224),
}

# Published MACs at 224x224 (the literature's "FLOPs").
PUBLISHED_MACS = {
    "ResNet50": 3.86e9,
    "MobileNetV2": 300.8e6,
    "VGG16": 15.47e9,
    "EfficientNetB0": 386e6,
    "DenseNet121": 2.83e9,
}


def build(name):
    constructor, size = APPLICATIONS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return constructor(weights=None, input_shape=(size, size, 3),
                           classifier_activation=None)


@pytest.mark.parametrize("name", sorted(APPLICATIONS))
def test_application_strips_exactly(name):
    rng = np.random.default_rng(7)
    model = build(name)
    randomize_weights(model, rng)
    size = APPLICATIONS[name][1]
    x = rng.uniform(-1, 1, (2, size, size, 3)).astype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped, compact = assert_strips_exactly(model, x, rng, keep=0.5)
    dense = keras_chex.count_macs(model)
    assert keras_chex.count_macs(compact).macs < dense.macs
    assert compact.count_params() < model.count_params()
    assert len(keras_chex.channel_groups(wrapped)) > 0


@pytest.mark.parametrize("name", sorted(PUBLISHED_MACS))
def test_macs_match_published_and_halve(name):
    rng = np.random.default_rng(3)
    model = build(name)
    dense = keras_chex.count_macs(model)
    assert dense.macs == pytest.approx(PUBLISHED_MACS[name], rel=0.005)
    assert dense.params == model.count_params()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = keras_chex.wrap(model)
    random_masks(wrapped, rng, keep=0.5)
    assert keras_chex.count_macs(wrapped).macs <= 0.6 * dense.macs
