"""Small hand-written models, one per construct channel analysis handles."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import keras_chex
from conftest import assert_strips_exactly
from conftest import randomize_weights


def _check(model, rng, keep=0.5, min_groups=1, inputs=None):
    randomize_weights(model, rng)
    if inputs is None:
        inputs = [
            rng.uniform(-1, 1, (2,) + tuple(t.shape[1:])).astype("float32")
            for t in model.inputs
        ]
        inputs = inputs[0] if len(inputs) == 1 else inputs
    groups = keras_chex.channel_groups(model)
    assert len(groups) >= min_groups
    wrapped, compact = assert_strips_exactly(model, inputs, rng, keep=keep)
    assert keras_chex.count_macs(compact).params < keras_chex.count_macs(
        model
    ).params
    return wrapped, compact


def conv_bn_relu(x, filters, kernel=3, **kwargs):
    x = layers.Conv2D(filters, kernel, padding="same", **kwargs)(x)
    x = layers.BatchNormalization()(x)
    return layers.ReLU()(x)


def head(x, units=3):
    x = layers.GlobalAveragePooling2D()(x)
    return layers.Dense(units)(x)


def test_conv1d_conv3d_and_dense(rng):
    inp = keras.Input((12, 4))
    x = layers.Conv1D(8, 3, padding="same", activation="relu")(inp)
    x = layers.MaxPooling1D()(x)
    x = layers.Conv1D(6, 3, activation="relu")(x)
    x = layers.GlobalAveragePooling1D()(x)
    out = layers.Dense(5)(layers.Dense(7, activation="relu")(x))
    _check(keras.Model(inp, out), rng, min_groups=3)

    inp = keras.Input((6, 6, 6, 2))
    x = layers.Conv3D(5, 3, padding="same")(inp)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    x = layers.ZeroPadding3D(1)(x)
    x = layers.Cropping3D(1)(x)
    x = layers.UpSampling3D(2)(x)
    x = layers.AveragePooling3D(2)(x)
    x = layers.Conv3D(4, 3)(x)
    out = layers.Dense(2)(layers.GlobalMaxPooling3D()(x))
    _check(keras.Model(inp, out), rng, min_groups=2)


def test_grouped_conv_keeps_groups_equal(rng):
    inp = keras.Input((8, 8, 3))
    x = conv_bn_relu(inp, 8)
    x = layers.Conv2D(12, 3, groups=4, padding="same")(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    out = head(x)
    model = keras.Model(inp, out)
    groups = keras_chex.channel_groups(model)
    # Channel k of each of the 4 groups is one logical channel.
    assert sorted(g.size for g in groups) == [2, 3]
    _, compact = _check(model, rng, keep=0.6)
    grouped = [l for l in compact.layers
               if isinstance(l, layers.Conv2D) and l.groups == 4]
    assert len(grouped) == 1 and grouped[0].filters % 4 == 0


def test_transposed_depthwise_separable(rng):
    inp = keras.Input((8, 8, 3))
    x = conv_bn_relu(inp, 6)
    x = layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same")(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU(max_value=6.0)(x)
    x = layers.SeparableConv2D(10, 3, depth_multiplier=2, padding="same")(x)
    x = layers.LeakyReLU(0.1)(x)
    x = layers.Conv2DTranspose(7, 3, strides=2, padding="same")(x)
    x = layers.ELU()(x)
    x = layers.ZeroPadding2D(1)(x)
    x = layers.Cropping2D(1)(x)
    x = layers.UpSampling2D(2)(x)
    x = layers.MaxPooling2D(2)(x)
    out = head(x)
    _check(keras.Model(inp, out), rng, min_groups=3)

    inp = keras.Input((16, 3))
    x = layers.Conv1D(6, 3, padding="same")(inp)
    x = layers.DepthwiseConv1D(3, padding="same")(x)
    x = layers.SeparableConv1D(5, 3, padding="same")(x)
    x = layers.Conv1DTranspose(4, 3, strides=2)(x)
    out = layers.Dense(2)(layers.Flatten()(x))
    _check(keras.Model(inp, out), rng, min_groups=3)


@pytest.mark.parametrize(
    "merge",
    [layers.Add, layers.Subtract, layers.Multiply, layers.Average,
     layers.Maximum, layers.Minimum],
)
def test_merge_layers_couple_residual_streams(rng, merge):
    inp = keras.Input((8, 8, 3))
    a = conv_bn_relu(inp, 8)
    b = layers.Conv2D(8, 3, padding="same")(a)
    b = layers.BatchNormalization()(b)
    c = layers.Conv2D(8, 1)(inp)
    x = merge()([a, b]) if merge is layers.Subtract else merge()([a, b, c])
    x = layers.ReLU()(x)
    out = head(x)
    model = keras.Model(inp, out)
    groups = keras_chex.channel_groups(model)
    # a, b (and c) write one stream: a single group of 8.
    assert [g.size for g in groups] == [8]
    assert len(groups[0].producers) >= 2
    _check(model, rng)


def test_squeeze_and_excitation_with_sigmoid(rng):
    inp = keras.Input((8, 8, 3))
    x = conv_bn_relu(inp, 8)
    s = layers.GlobalAveragePooling2D(keepdims=True)(x)
    s = layers.Conv2D(4, 1, activation="relu")(s)
    s = layers.Conv2D(8, 1, activation="sigmoid")(s)  # sigmoid(0) = 0.5
    x = layers.Multiply()([x, s])
    x = conv_bn_relu(x, 6)
    out = head(x)
    _check(keras.Model(inp, out), rng, min_groups=3)


def test_ops_on_keras_tensors_and_hard_swish(rng):
    inp = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, padding="same")(inp)
    # MobileNetV3's hard sigmoid: relu6(x + 3) / 6 is 0.5 at zero.
    gate = layers.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)
    x = layers.Conv2D(6, 1)(keras.ops.sigmoid(x) + gate)
    out = head(keras.ops.relu(x))
    _check(keras.Model(inp, out), rng, min_groups=2)


@pytest.mark.parametrize("constant", [None, 1.5])
def test_ops_pad_of_the_spatial_axes_passes_channels(rng, constant):
    # keras-hub's pre-activation ResNet pads its stem with keras.ops.pad.
    inp = keras.Input((8, 8, 3))
    x = conv_bn_relu(inp, 8)
    x = keras.ops.pad(x, [[0, 0], [1, 1], [2, 0], [0, 0]],
                      constant_values=constant)
    x = conv_bn_relu(x, 6)
    model = keras.Model(inp, head(x))
    names = {n for g in keras_chex.channel_groups(model) for n in g.layers}
    assert len(keras_chex.channel_groups(model)) == 2
    _check(model, rng, min_groups=2)
    assert any("conv2d" in n for n in names)


def test_ops_pad_of_the_channel_axis_is_left_alone(rng):
    inp = keras.Input((8, 8, 3))
    x = conv_bn_relu(inp, 8)
    x = keras.ops.pad(x, [[0, 0], [0, 0], [0, 0], [0, 2]])
    x = conv_bn_relu(x, 6)
    with pytest.warns(UserWarning, match="pads the channel axis"):
        keras_chex.wrap(keras.Model(inp, head(x)))


def test_pyramid_pooling_ops_pass_channels(rng):
    # DeepLabV3's pyramid pooling and MobileNet's squeeze-and-excite:
    # ops.mean over the spatial axes, a Resizing back up, ops.cast and
    # ops.concatenate of the branches.
    inp = keras.Input((8, 8, 3))
    x = conv_bn_relu(inp, 8)
    pooled = keras.ops.mean(x, axis=(1, 2), keepdims=True)
    pooled = conv_bn_relu(pooled, 4, kernel=1)
    pooled = layers.Resizing(8, 8, interpolation="bilinear")(pooled)
    pooled = keras.ops.cast(pooled, "float32")
    peak = keras.ops.max(x, axis=(1, 2), keepdims=True)
    x = keras.ops.concatenate(
        [conv_bn_relu(x, 6), pooled, x * keras.ops.sigmoid(peak)], axis=-1)
    # `keras.activations.relu` leaves its own op class (RetinaNet's FPN).
    x = keras.activations.relu(x)
    model = keras.Model(inp, head(conv_bn_relu(x, 5)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = keras_chex.channel_groups(model)
    assert sorted(g.size for g in groups) == [4, 5, 6, 8]
    _check(model, rng, min_groups=4)


def test_a_mean_over_the_channels_is_left_alone(rng):
    inp = keras.Input((8, 8, 3))
    x = conv_bn_relu(inp, 8)
    x = keras.ops.mean(x, axis=-1, keepdims=True)
    with pytest.warns(UserWarning, match="reduces over the channel axis"):
        keras_chex.wrap(keras.Model(inp, head(conv_bn_relu(x, 4))))


def test_resizing_that_pads_with_a_fill_is_left_alone():
    inp = keras.Input((8, 8, 3))
    x = conv_bn_relu(inp, 8)
    x = layers.Resizing(8, 16, pad_to_aspect_ratio=True, fill_value=1.0)(x)
    with pytest.warns(UserWarning, match="non-zero fill value"):
        keras_chex.wrap(keras.Model(inp, head(conv_bn_relu(x, 4))))


@pytest.mark.parametrize("sections", [2, [3]])
def test_ops_split_of_the_channels_gives_each_part_its_slice(rng, sections):
    # CSPNet's cross-stage block: one part skips the blocks, the other
    # goes through them, and a concatenation joins them again.
    inp = keras.Input((8, 8, 3))
    x = conv_bn_relu(inp, 8)
    skip, through = keras.ops.split(x, sections, axis=-1)
    through = conv_bn_relu(through, 4)
    x = conv_bn_relu(layers.Concatenate()([skip, through]), 6)
    model = keras.Model(inp, head(x))
    sizes = sorted(g.size for g in keras_chex.channel_groups(model))
    assert sizes == [4, 6, 8]
    for seed in range(5):
        # Any mask: each part keeps a channel, the compact splits where
        # the kept channels of the first part end.
        _check(model, np.random.default_rng(seed), keep=0.3, min_groups=3)


def test_a_mask_that_empties_a_split_part_is_refused():
    inp = keras.Input((8, 8, 3))
    x = conv_bn_relu(inp, 8)
    skip, through = keras.ops.split(x, 2, axis=-1)
    x = layers.Concatenate()([skip, conv_bn_relu(through, 4)])
    wrapped = keras_chex.wrap(keras.Model(inp, head(x)))
    group = next(g for g in keras_chex.channel_groups(wrapped) if g.size == 8)
    with pytest.raises(ValueError, match="keep at least one"):
        group.set_mask(np.array([0, 0, 0, 0, 1, 1, 1, 1], bool))


def test_ops_split_of_another_axis_passes_channels(rng):
    inp = keras.Input((8, 8, 3))
    x = conv_bn_relu(inp, 8)
    top, bottom = keras.ops.split(x, 2, axis=1)
    x = conv_bn_relu(layers.Concatenate(axis=1)([bottom, top]), 6)
    _check(keras.Model(inp, head(x)), rng, min_groups=2)


def test_concatenate_maps_offsets(rng):
    inp = keras.Input((8, 8, 3))
    a = conv_bn_relu(inp, 4)
    b = conv_bn_relu(inp, 6)
    x = layers.Concatenate()([a, b, a])
    x = conv_bn_relu(x, 5)
    out = head(x)
    model = keras.Model(inp, out)
    assert sorted(g.size for g in keras_chex.channel_groups(model)) == [
        4, 5, 6]
    _check(model, rng)


def test_flatten_and_reshape_into_dense(rng):
    inp = keras.Input((6, 6, 3))
    x = conv_bn_relu(inp, 5)
    x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.2)(x)
    x = layers.Dense(8, activation="relu")(x)
    out = layers.Dense(3)(x)
    _check(keras.Model(inp, out), rng, min_groups=2)

    inp = keras.Input((4, 4, 3))
    x = conv_bn_relu(inp, 6)
    x = layers.Reshape((16, 6))(x)
    x = layers.Conv1D(4, 3)(x)
    x = layers.Reshape((-1,))(x)
    out = layers.Dense(2)(x)
    _check(keras.Model(inp, out), rng, min_groups=2)


def test_nested_models_and_shared_layers(rng):
    block_in = keras.Input((8, 8, 6))
    y = conv_bn_relu(block_in, 6)
    block = keras.Model(block_in, layers.Add()([y, block_in]), name="block")

    inp = keras.Input((8, 8, 3))
    x = conv_bn_relu(inp, 6)
    x = block(x)
    x = block(x)  # The nested model is called twice.
    shared = layers.Conv2D(5, 3, padding="same", name="shared")
    p, q = shared(x), shared(layers.ReLU()(x))
    x = layers.Concatenate()([p, q])
    out = head(x)
    model = keras.Model(inp, out)
    _, compact = _check(model, rng, min_groups=2)
    nested = [l for l in compact.layers if isinstance(l, keras.Model)]
    assert len(nested) == 1  # Still one nested model, called twice.


def test_sequential_model(rng):
    model = keras.Sequential([
        keras.Input((8, 8, 3)),
        layers.Conv2D(8, 3, activation="relu"),
        layers.BatchNormalization(),
        layers.Conv2D(6, 3),
        layers.PReLU(shared_axes=[1, 2]),
        layers.Flatten(),
        layers.Dense(4),
    ])
    _check(model, rng, min_groups=2)


def test_multiple_inputs_and_outputs(rng):
    a_in = keras.Input((8, 8, 3), name="image")
    b_in = keras.Input((5,), name="extra")
    x = conv_bn_relu(a_in, 6)
    feat = layers.GlobalAveragePooling2D()(x)
    h = layers.Dense(7, activation="relu")(b_in)
    joint = layers.Concatenate()([feat, h])
    out1 = layers.Dense(3, name="cls")(joint)
    out2 = layers.Conv2D(2, 1, name="seg")(x)
    model = keras.Model({"image": a_in, "extra": b_in},
                        {"cls": out1, "seg": out2})
    inputs = {"image": rng.uniform(size=(2, 8, 8, 3)).astype("float32"),
              "extra": rng.uniform(size=(2, 5)).astype("float32")}
    wrapped, compact = _check(model, rng, inputs=inputs, min_groups=2)
    # Inputs and outputs keep their channels.
    out = compact(inputs)
    assert out["cls"].shape == (2, 3) and out["seg"].shape == (2, 8, 8, 2)


def test_unsupported_layers_are_left_alone_with_a_warning(rng):
    inp = keras.Input((8, 8, 3))
    a = conv_bn_relu(inp, 6)
    lam = layers.Lambda(lambda t: t * 2.0, name="doubler")(a)
    b = conv_bn_relu(lam, 5)
    n = layers.LayerNormalization(name="ln")(b)
    c = conv_bn_relu(n, 4)
    out = head(c)
    model = keras.Model(inp, out)
    with pytest.warns(UserWarning, match="'doubler'.*'ln'"):
        groups = keras_chex.channel_groups(model)
    # Only the last conv's channels remain prunable.
    assert [g.size for g in groups] == [4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check(model, rng)


def test_softmax_over_channels_is_not_split(rng):
    inp = keras.Input((8, 8, 3))
    x = layers.Conv2D(6, 3)(inp)
    x = layers.Softmax(name="chan_softmax")(x)
    x = layers.Conv2D(4, 3)(x)
    out = head(x)
    with pytest.warns(UserWarning, match="chan_softmax"):
        groups = keras_chex.channel_groups(keras.Model(inp, out))
    assert [g.size for g in groups] == [4]


@pytest.mark.parametrize("softmax", [
    lambda: layers.Activation("softmax", name="predictions"),
    lambda: layers.Softmax(name="predictions")])
def test_a_softmax_on_the_output_does_not_warn(rng, softmax):
    # keras.applications' MobileNetV3 head: a 1x1 conv to the classes,
    # flattened, then softmax. Those channels are the classes, fixed anyway.
    inp = keras.Input((8, 8, 3))
    x = layers.Conv2D(6, 3, name="body")(inp)
    x = layers.GlobalAveragePooling2D(keepdims=True)(x)
    x = layers.Conv2D(5, 1, name="logits")(x)
    out = softmax()(layers.Flatten()(x))
    model = keras.Model(inp, out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = keras_chex.channel_groups(model)
    assert [g.size for g in groups] == [6]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check(model, rng)


def test_channels_first_is_left_alone(rng):
    inp = keras.Input((3, 8, 8))
    x = layers.Conv2D(6, 3, data_format="channels_first", name="cf")(inp)
    out = layers.Dense(2)(layers.Flatten()(x))
    with pytest.warns(UserWarning, match="'cf'.*channels_first"):
        groups = keras_chex.channel_groups(keras.Model(inp, out))
    assert [g.size for g in groups] == [2] or groups == []


def _cnn(data_format):
    first = data_format == "channels_first"
    inp = keras.Input((3, 16, 16) if first else (16, 16, 3))
    x = layers.Conv2D(8, 3, padding="same", data_format=data_format,
                      name="c1")(inp)
    x = layers.BatchNormalization(axis=1 if first else -1)(x)
    x = layers.ReLU()(x)
    x = layers.DepthwiseConv2D(3, data_format=data_format)(x)
    x = layers.Conv2DTranspose(6, 2, strides=2, data_format=data_format)(x)
    x = layers.SeparableConv2D(4, 3, data_format=data_format)(x)
    x = layers.GlobalAveragePooling2D(data_format=data_format)(x)
    return keras.Model(inp, layers.Dense(3)(x))


def test_channels_first_is_counted_like_its_channels_last_twin():
    first, last = _cnn("channels_first"), _cnn("channels_last")
    assert keras_chex.count_macs(first).macs == keras_chex.count_macs(
        last).macs > 10_000
    assert keras_chex.count_macs(first).params == first.count_params()


def _run_compiled(model, x):
    # TensorFlow's eager Conv2D runs NCHW on the CPU only with oneDNN on,
    # which it turns on for some CPUs only (not for AMD EPYC without
    # AVX-512); XLA runs it on every CPU.
    return tf.function(model, jit_compile=True)(x)


def test_channels_first_strips_to_an_equal_copy_plain_and_pruned(rng):
    model = _cnn("channels_first")
    randomize_weights(model, rng)
    x = rng.uniform(-1, 1, (2, 3, 16, 16)).astype("float32")
    copy = keras_chex.strip(model)
    np.testing.assert_allclose(_run_compiled(copy, x), _run_compiled(model, x),
                               rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning, match="channels_first"):
        wrapped = keras_chex.soft_mask_prune(model, flops=0.5)
    wrapped.compile(optimizer="sgd", loss="mse", jit_compile=True)
    wrapped.fit(x, np.zeros((2, 3)), epochs=1, verbose=0,
                callbacks=[keras_chex.SoftMaskPruning()])
    # Runs the model as its fit did (XLA here), so on every CPU.
    keras_chex.recalibrate_batchnorm(wrapped, x)
    compact = keras_chex.strip(wrapped)
    np.testing.assert_allclose(_run_compiled(compact, x),
                               _run_compiled(wrapped, x), rtol=1e-4, atol=1e-5)
    assert keras_chex.count_macs(compact).macs == keras_chex.count_macs(
        wrapped).macs


def test_subclassed_model_gets_a_clear_error():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = layers.Conv2D(4, 3)

        def call(self, x):
            return self.conv(x)

    net = Net()
    net(np.zeros((1, 8, 8, 3), "float32"))
    with pytest.raises(ValueError, match="subclassed model.*Functional API"):
        keras_chex.channel_groups(net)
    with pytest.raises(ValueError, match="Sequential.*keras.Input"):
        keras_chex.wrap(keras.Sequential([layers.Dense(3)]))
    with pytest.raises(TypeError, match="keras.Model"):
        keras_chex.channel_groups("model.keras")


def test_model_outputs_and_inputs_never_pruned(rng):
    inp = keras.Input((8, 8, 3))
    x = conv_bn_relu(inp, 6)
    out = layers.Conv2D(4, 1)(x)  # Writes the output: not prunable.
    groups = keras_chex.channel_groups(keras.Model(inp, out))
    assert [g.size for g in groups] == [6]


def test_exclude_keeps_a_layer_whole(rng):
    inp = keras.Input((8, 8, 3))
    x = conv_bn_relu(inp, 6, name="keep_me")
    x = conv_bn_relu(x, 5)
    out = head(x)
    model = keras.Model(inp, out)
    wrapped = keras_chex.wrap(model, exclude=["keep_me"])
    assert [g.size for g in keras_chex.channel_groups(wrapped)] == [5]
    with pytest.raises(ValueError, match="not_a_layer"):
        keras_chex.wrap(model, exclude=["not_a_layer"])


def test_normalization_layers_are_copied_and_pruned(rng):
    data = rng.uniform(0, 255, (16, 8, 8, 3)).astype("float32")
    inp = keras.Input((8, 8, 3))
    x = layers.Normalization(name="input_norm")(inp)
    x = layers.Conv2D(6, 3, padding="same", name="c1")(x)
    mid = layers.Normalization(name="mid_norm")
    mid.adapt(rng.normal(3.0, 2.0, (16, 8, 8, 6)))
    x = layers.ReLU()(mid(x))
    x = layers.Conv2D(5, 3, padding="same", name="c2")(x)
    x = layers.Normalization(axis=None, mean=1.0, variance=4.0)(x)
    x = layers.ReLU()(x)
    x = layers.Conv2D(4, 3, padding="same", name="c3")(x)
    x = layers.Normalization(mean=[1, 2, 3, 4], variance=[1, 1, 2, 2],
                             name="const_norm")(x)
    model = keras.Model(inp, head(layers.ReLU()(x)))
    model.get_layer("input_norm").adapt(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Nothing here is unsupported.
        wrapped = keras_chex.wrap(model)
        groups = {g.name: g for g in keras_chex.channel_groups(model)}
    # The adapted statistics are copied, not left at their initial values.
    np.testing.assert_allclose(wrapped(data), model(data), rtol=1e-5,
                               atol=1e-5)
    assert "mid_norm" in groups["c1"].layers
    # A per-channel constant in the config cannot be sliced: c3 stays.
    assert "c3" not in groups and {"c1", "c2"} <= set(groups)
    _check(model, rng, inputs=data)


def _twin_blocks():
    def block(name):
        inputs = keras.Input((6, 6, 4))
        y = layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
        y = layers.Conv2D(4, 1, name="out")(layers.ReLU()(y))
        return keras.Model(inputs, y, name=name)

    inputs = keras.Input((6, 6, 4))
    y = block("first")(inputs)
    y = block("second")(layers.ReLU()(y))
    y = layers.GlobalAveragePooling2D()(y)
    return keras.Model(inputs, layers.Dense(2, name="head")(y))


def test_groups_of_layers_with_the_same_name_are_named_by_their_path(rng):
    model = _twin_blocks()
    names = [g.name for g in keras_chex.channel_groups(model)]
    assert "first/conv" in names and "second/conv" in names
    assert len(set(names)) == len(names)
    # A path excludes one of them; a bare name, every layer called so.
    wrapped = keras_chex.wrap(model, exclude=["second/conv"])
    assert "second/conv" not in [g.name for g in keras_chex.channel_groups(
        wrapped)]
    assert "conv" in [g.name for g in keras_chex.channel_groups(wrapped)]
    wrapped = keras_chex.wrap(model, exclude=["conv"])
    assert not any(g.name.endswith("conv")
                   for g in keras_chex.channel_groups(wrapped))
    with pytest.raises(ValueError, match="third/conv"):
        keras_chex.wrap(model, exclude=["third/conv"])
    _check(model, rng)
