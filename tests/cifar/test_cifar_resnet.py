"""Tests for keras_chex.cifar.resnet."""

import keras
import numpy as np
import pytest

from keras_chex.cifar.resnet import cifar_resnet


def _expected_parameters(depth, widths=(16, 32, 64), num_classes=10):
    """Counts (trainable, non-trainable) weights from the architecture.

    Convolutions have k*k*in*out weights and no bias; each BN layer has a
    trainable scale and offset plus a non-trainable moving mean and variance
    per channel; the dense layer has a kernel and a bias.
    """
    trainable = non_trainable = 0

    def conv_bn(kernel_size, channels_in, channels_out):
        nonlocal trainable, non_trainable
        trainable += kernel_size**2 * channels_in * channels_out
        trainable += 2 * channels_out
        non_trainable += 2 * channels_out

    conv_bn(3, 3, widths[0])
    channels = widths[0]
    for width in widths:
        for _ in range((depth - 2) // 6):
            conv_bn(3, channels, width)
            conv_bn(3, width, width)
            if channels != width:
                conv_bn(1, channels, width)  # Projection shortcut.
            channels = width
    trainable += channels * num_classes + num_classes
    return trainable, non_trainable


def _count(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


@pytest.mark.parametrize(
    "depth, widths, num_classes",
    [(20, (16, 32, 64), 10), (32, (16, 32, 64), 10), (20, (8, 12, 40), 100)],
)
def test_parameter_count_matches_the_architecture(depth, widths, num_classes):
    model = cifar_resnet(depth, num_classes, widths=widths)

    trainable, non_trainable = _expected_parameters(depth, widths, num_classes)

    assert _count(model.trainable_weights) == trainable
    assert _count(model.non_trainable_weights) == non_trainable


@pytest.mark.parametrize("depth, published", [(20, "0.27"), (32, "0.46")])
def test_parameter_count_matches_the_paper(depth, published):
    # Table 6 of He et al. (2016) gives the sizes in millions, cut to two
    # decimals.
    model = cifar_resnet(depth)

    millions = _count(model.trainable_weights) / 1e6
    assert f"{millions:.4f}"[:4] == published


@pytest.mark.parametrize("depth", [0, 2, 19, 21, 24, -4, 20.0, True, "20"])
def test_depth_must_be_6n_plus_2(depth):
    with pytest.raises(ValueError, match=r"`depth` must be 6n\+2"):
        cifar_resnet(depth)


@pytest.mark.parametrize("widths", [(16, 32), (16, 32, 0), (16, 32, 64.0), 16])
def test_invalid_widths_are_rejected(widths):
    with pytest.raises(ValueError, match="`widths` must be three positive"):
        cifar_resnet(20, widths=widths)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"weight_decay": "1e-4"}, "weight_decay"),
    ],
)
def test_invalid_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cifar_resnet(20, **kwargs)


def test_stages_halve_the_resolution_with_projection_shortcuts():
    model = cifar_resnet(20, input_shape=(32, 32, 3))

    def shape(layer_name):
        return tuple(model.get_layer(layer_name).output.shape)

    assert shape("stage1_block3_out") == (None, 32, 32, 16)
    assert shape("stage2_block1_out") == (None, 16, 16, 32)
    assert shape("stage3_block3_out") == (None, 8, 8, 64)
    for stage in (2, 3):
        shortcut = model.get_layer(f"stage{stage}_block1_shortcut_conv")
        assert shortcut.kernel_size == (1, 1) and shortcut.strides == (2, 2)
        assert model.get_layer(f"stage{stage}_block1_conv1").strides == (2, 2)
    names = {layer.name for layer in model.layers}
    assert "stage1_block1_shortcut_conv" not in names
    assert "stage2_block2_shortcut_conv" not in names


def test_every_block_ends_in_add_and_relu():
    model = cifar_resnet(32)

    adds = [l for l in model.layers if isinstance(l, keras.layers.Add)]
    assert len(adds) == 3 * 5
    for add in adds:
        assert model.get_layer(add.name.replace("_add", "_out"))


def test_convolutions_have_no_bias_and_he_normal_init():
    model = cifar_resnet(20)

    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    assert len(convs) == 1 + 3 * 3 * 2 + 2  # Stem, blocks, projections.
    for conv in convs:
        assert not conv.use_bias
        assert isinstance(conv.kernel_initializer, keras.initializers.HeNormal)


def test_outputs_are_logits_of_num_classes():
    model = cifar_resnet(20, num_classes=7, name="small")
    images = np.random.default_rng(0).random((3, 32, 32, 3), dtype=np.float32)

    logits = keras.ops.convert_to_numpy(model(images, training=False))

    assert model.name == "small"
    assert logits.shape == (3, 7)
    # A softmax output would be positive and sum to one per row.
    assert not np.allclose(logits.sum(axis=1), 1.0)
    assert model.get_layer("logits").activation is keras.activations.linear


def test_weight_decay_regularises_every_kernel():
    model = cifar_resnet(20, weight_decay=1e-4)
    plain = cifar_resnet(20)

    kernels = [l for l in model.layers if hasattr(l, "kernel")]
    assert len(model.losses) == len(kernels) == 1 + 18 + 2 + 1
    assert all(float(loss) > 0 for loss in model.losses)
    assert not plain.losses


def test_fit_runs_two_steps_on_random_data():
    rng = np.random.default_rng(0)
    x = rng.random((16, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, size=16)
    model = cifar_resnet(20, weight_decay=1e-4)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = [w.copy() for w in model.get_weights()]

    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)

    assert np.isfinite(history.history["loss"][0])
    changed = [
        not np.array_equal(a, b) for a, b in zip(before, model.get_weights())
    ]
    assert all(changed)
