"""Gradual pruning by feature relevance scores: LRP rules, scores, method."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import keras_chex
from keras_chex.cifar.resnet import cifar_resnet
from keras_chex.methods.frs import lrp
from keras_chex.methods.frs import scores as scores_lib
from keras_chex.methods.frs import selection

from conftest import assert_keras_file_continues
from conftest import assert_resumes_exactly
from conftest import compile_sgd as _compile
from conftest import tiny_data as _data
from conftest import tiny_resnet as _resnet
from conftest import randomize_weights
from conftest import synthetic_latency_table

# Relevance is conserved up to float32 rounding: the totals of a layer's
# inputs and outputs agree to this relative tolerance.
CONSERVATION_RTOL = 1e-4


# -- NumPy references ---------------------------------------------------------------
def _jacobian(fn, shape):
    """The matrix M of a linear `fn`: out.flat[j] = sum_i x.flat[i] M[i, j]."""
    n = int(np.prod(shape))
    basis = np.eye(n, dtype=np.float32).reshape((n,) + shape)
    return np.asarray(fn(tf.constant(basis))).reshape(n, -1)


def _alpha_beta_np(x, matrix, r, alpha=2.0, beta=1.0, eps=1e-9):
    """The alpha-beta rule on explicit contributions z_ij = x_i * M_ij."""
    z = x.reshape(-1, 1) * matrix
    zp, zn = np.maximum(z, 0).sum(0), np.minimum(z, 0).sum(0)
    has_p, has_n = zp > eps, zn < -eps
    a = np.where(has_p & has_n, alpha, np.where(has_p, 1.0, 0.0))
    b = np.where(has_p & has_n, beta, np.where(has_n, -1.0, 0.0))
    r = r.reshape(-1)
    share_p = np.where(has_p, a * r / np.where(has_p, zp, 1), 0)
    share_n = np.where(has_n, b * r / np.where(has_n, zn, 1), 0)
    return (np.maximum(z, 0) @ share_p - np.minimum(z, 0) @ share_n).reshape(
        x.shape)


def _one_layer(layer, shape):
    inp = keras.Input(shape)
    return keras.Model(inp, layer(inp))


def _propagate(model, x, r):
    """Relevance at the (single) input for relevance `r` at the output."""
    graph = lrp.RelevanceGraph(model)
    values = graph.forward([tf.constant(x)])
    out = graph.backward(values, {graph.output_keys[0]: tf.constant(r)})
    return np.asarray(out[graph.input_keys[0]])


LINEAR_LAYERS = [
    ("dense", lambda: layers.Dense(5), (6,)),
    ("conv", lambda: layers.Conv2D(4, 3, strides=2, padding="same"),
     (5, 5, 3)),
    ("grouped", lambda: layers.Conv2D(4, 3, groups=2), (4, 4, 4)),
    ("conv1d", lambda: layers.Conv1D(3, 2, dilation_rate=2), (6, 2)),
    ("depthwise", lambda: layers.DepthwiseConv2D(3, depth_multiplier=2),
     (4, 4, 2)),
    ("transposed", lambda: layers.Conv2DTranspose(3, 3, strides=2),
     (3, 3, 2)),
]


@pytest.mark.parametrize("name, make, shape", LINEAR_LAYERS,
                         ids=[c[0] for c in LINEAR_LAYERS])
def test_alpha_beta_matches_numpy_and_conserves(rng, name, make, shape):
    model = _one_layer(make(), shape)
    randomize_weights(model, rng)
    layer = model.layers[-1]
    x = rng.normal(size=(1,) + shape).astype("float32")
    out = np.asarray(model(x))
    r = rng.normal(size=out.shape).astype("float32")
    matrix = _jacobian(
        lambda v: lrp._linear_op(layer)(v, layer.kernel), shape)
    expected = _alpha_beta_np(x[0], matrix, r[0])
    actual = _propagate(model, x, r)[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(actual.sum(), r.sum(), rtol=CONSERVATION_RTOL)


def test_the_non_negative_shortcut_gives_the_same_relevance(rng):
    layer = layers.Conv2D(4, 3, padding="same")
    model = _one_layer(layer, (5, 5, 3))
    randomize_weights(model, rng)
    x = tf.nn.relu(rng.normal(size=(2, 5, 5, 3)).astype("float32"))
    r = tf.constant(rng.normal(size=(2, 5, 5, 4)).astype("float32"))
    kernel = tf.cast(layer.kernel, tf.float32)
    general = lrp.alpha_beta(lrp._linear_op(layer), x, kernel, r)
    short = lrp.alpha_beta(lrp._linear_op(layer), x, kernel, r,
                           nonnegative=True)
    np.testing.assert_allclose(short, general, rtol=1e-5, atol=1e-7)


def test_inputs_after_a_relu_are_known_non_negative():
    model = cifar_resnet(8, num_classes=4, widths=(8, 16, 16),
                         input_shape=(8, 8, 3))
    graph = lrp.RelevanceGraph(model)
    convs = {s.node.operation.name: s.inputs[0] in graph.nonnegative
             for s in graph.steps if s.rule == lrp.ALPHA_BETA}
    assert convs.pop("stem_conv") is False  # The image is signed.
    assert convs.pop("logits") is True  # After ReLU and pooling.
    assert all(convs.values()), convs


def test_one_signed_output_gives_all_its_relevance_to_that_sign():
    # Only positive contributions: alpha = 2 would double the total.
    model = _one_layer(layers.Dense(1, use_bias=False), (2,))
    model.layers[-1].set_weights([np.array([[1.0], [3.0]], "float32")])
    r = _propagate(model, np.array([[1.0, 1.0]], "float32"),
                   np.array([[1.0]], "float32"))
    np.testing.assert_allclose(r, [[0.25, 0.75]], rtol=1e-6)


def test_separable_conv_is_two_alpha_beta_stages(rng):
    model = _one_layer(layers.SeparableConv2D(3, 3, depth_multiplier=2),
                       (4, 4, 2))
    randomize_weights(model, rng)
    layer = model.layers[-1]
    x = rng.normal(size=(1, 4, 4, 2)).astype("float32")
    r = rng.normal(size=(1, 2, 2, 3)).astype("float32")
    first = lambda v: keras.ops.depthwise_conv(v, layer.depthwise_kernel)
    middle = np.asarray(first(x))
    second = lambda v: keras.ops.conv(v, layer.pointwise_kernel)
    r_mid = _alpha_beta_np(middle[0], _jacobian(second, middle.shape[1:]),
                           r[0])
    expected = _alpha_beta_np(x[0], _jacobian(first, (4, 4, 2)), r_mid)
    actual = _propagate(model, x, r)[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(actual.sum(), r.sum(), rtol=CONSERVATION_RTOL)


def test_max_pooling_routes_to_the_arg_max(rng):
    x = rng.normal(size=(1, 4, 4, 2)).astype("float32")
    r = rng.normal(size=(1, 2, 2, 2)).astype("float32")
    actual = _propagate(_one_layer(layers.MaxPooling2D(2), (4, 4, 2)), x, r)
    expected = np.zeros_like(x)
    for i in range(2):
        for j in range(2):
            for c in range(2):
                window = x[0, 2 * i:2 * i + 2, 2 * j:2 * j + 2, c]
                a, b = np.unravel_index(np.argmax(window), (2, 2))
                expected[0, 2 * i + a, 2 * j + b, c] = r[0, i, j, c]
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


def test_average_pooling_splits_in_proportion(rng):
    x = rng.uniform(0.1, 1.0, size=(1, 4, 4, 2)).astype("float32")
    r = rng.normal(size=(1, 2, 2, 2)).astype("float32")
    actual = _propagate(_one_layer(layers.AveragePooling2D(2), (4, 4, 2)),
                        x, r)
    window_sum = x.reshape(1, 2, 2, 2, 2, 2).sum(axis=(2, 4))
    expected = x * np.repeat(np.repeat(r / window_sum, 2, 1), 2, 2)
    np.testing.assert_allclose(actual, expected, rtol=1e-5)
    g = _propagate(_one_layer(layers.GlobalAveragePooling2D(), (4, 4, 2)),
                   x, r[:, 0, 0])
    np.testing.assert_allclose(
        g, x * (r[:, 0, 0] / x.sum(axis=(1, 2)))[:, None, None], rtol=1e-5)


def _two_input(layer, shape_a, shape_b):
    a, b = keras.Input(shape_a), keras.Input(shape_b)
    return keras.Model([a, b], layer([a, b]))


def _propagate_two(model, xa, xb, r):
    graph = lrp.RelevanceGraph(model)
    values = graph.forward([tf.constant(xa), tf.constant(xb)])
    out = graph.backward(values, {graph.output_keys[0]: tf.constant(r)})
    return [None if k not in out else np.asarray(out[k])
            for k in graph.input_keys]


def test_add_splits_by_contribution_and_concatenate_by_channel(rng):
    a = rng.normal(size=(2, 3, 3, 2)).astype("float32")
    b = rng.normal(size=(2, 3, 3, 2)).astype("float32")
    r = rng.normal(size=(2, 3, 3, 2)).astype("float32")
    ra, rb = _propagate_two(_two_input(layers.Add(), (3, 3, 2), (3, 3, 2)),
                            a, b, r)
    np.testing.assert_allclose(ra, a / (a + b) * r, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rb, b / (a + b) * r, rtol=1e-4, atol=1e-5)
    r2 = rng.normal(size=(2, 3, 3, 5)).astype("float32")
    c = rng.normal(size=(2, 3, 3, 3)).astype("float32")
    ra, rc = _propagate_two(
        _two_input(layers.Concatenate(), (3, 3, 2), (3, 3, 3)), a, c, r2)
    np.testing.assert_array_equal(ra, r2[..., :2])
    np.testing.assert_array_equal(rc, r2[..., 2:])


def test_flatten_and_reshape_move_relevance_by_index(rng):
    x = rng.normal(size=(2, 2, 3, 4)).astype("float32")
    r = rng.normal(size=(2, 24)).astype("float32")
    np.testing.assert_array_equal(
        _propagate(_one_layer(layers.Flatten(), (2, 3, 4)), x, r),
        r.reshape(x.shape))
    np.testing.assert_array_equal(
        _propagate(_one_layer(layers.Reshape((6, 4)), (2, 3, 4)), x,
                   r.reshape(2, 6, 4)), r.reshape(x.shape))


def test_batchnorm_and_activations_pass_relevance_through(rng):
    inp = keras.Input((3, 3, 2))
    x = layers.BatchNormalization()(inp)
    x = layers.ReLU()(x)
    x = layers.Activation("softmax")(x)
    x = keras.ops.relu(x)
    model = keras.Model(inp, layers.Dropout(0.5)(x))
    randomize_weights(model, rng)
    x = rng.normal(size=(2, 3, 3, 2)).astype("float32")
    r = rng.normal(size=(2, 3, 3, 2)).astype("float32")
    np.testing.assert_array_equal(_propagate(model, x, r), r)


def test_multiply_gives_everything_to_the_signal_not_the_gate(rng):
    a = rng.normal(size=(2, 3, 3, 2)).astype("float32")
    gate = rng.uniform(size=(2, 1, 1, 2)).astype("float32")
    r = rng.normal(size=(2, 3, 3, 2)).astype("float32")
    model = _two_input(layers.Multiply(), (3, 3, 2), (1, 1, 2))
    ra, rg = _propagate_two(model, a, gate, r)
    np.testing.assert_array_equal(ra, r)
    assert rg is None or not np.any(rg)
    # Two full-size factors: no rule, reported.
    same = lrp.RelevanceGraph(
        _two_input(layers.Multiply(), (3, 3, 2), (3, 3, 2)))
    assert same.unsupported and same.incomplete


def _mobilenet_like():
    inp = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(inp)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU(6.0)(x)
    y = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    y = layers.BatchNormalization()(y)
    y = layers.ReLU(6.0)(y)
    se = layers.GlobalAveragePooling2D(keepdims=True)(y)
    se = layers.Conv2D(4, 1, activation="relu")(se)
    se = layers.Conv2D(8, 1, activation="sigmoid")(se)
    y = layers.Multiply()([y, se])
    y = layers.Conv2D(8, 1, use_bias=False)(y)
    y = layers.BatchNormalization()(y)
    x = layers.Add()([x, y])
    x = layers.SeparableConv2D(12, 3, padding="same")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Concatenate()([x, layers.AveragePooling2D(1)(x)])
    x = layers.Flatten()(x)
    return keras.Model(inp, layers.Dense(5)(x))


@pytest.mark.parametrize("build", [
    lambda: cifar_resnet(8, num_classes=4, widths=(8, 16, 16),
                         input_shape=(8, 8, 3)),
    _mobilenet_like,
], ids=["resnet", "mobilenet_like"])
def test_relevance_is_conserved_from_the_logit_to_the_input(rng, build):
    keras.utils.set_random_seed(0)
    model = build()
    randomize_weights(model, rng)
    # An output that only a bias or a BatchNorm shift makes non-zero (all
    # its inputs zero) absorbs its relevance, as the bias's share does in
    # LRP; without shifts, every rule must pass the whole total on.
    for layer in model.layers:
        for v in layer.weights:
            if v.path.split("/")[-1] in ("bias", "beta", "moving_mean"):
                v.assign(np.zeros(v.shape, v.dtype))
    x = rng.normal(size=(3, 8, 8, 3)).astype("float32")
    classes = int(model.outputs[0].shape[-1])
    onehot = np.eye(classes, dtype="float32")[[0, 1, 2]]
    graph = lrp.RelevanceGraph(model)
    assert not graph.unsupported
    values = graph.forward([tf.constant(x)])
    out = graph.backward(values, {graph.output_keys[0]: tf.constant(onehot)})
    per_image = np.asarray(out[graph.input_keys[0]]).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(per_image, 1.0, rtol=CONSERVATION_RTOL)


def test_nested_models_are_inlined(rng):
    inner_in = keras.Input((6,))
    inner = keras.Model(inner_in, layers.Dense(4)(inner_in), name="inner")
    inp = keras.Input((6,))
    flat = keras.Model(inp, layers.Dense(3)(inner(inp)))
    randomize_weights(flat, rng)
    x = rng.normal(size=(2, 6)).astype("float32")
    r = rng.normal(size=(2, 3)).astype("float32")
    dense_in, dense_out = inner.layers[-1], flat.layers[-1]
    middle = np.asarray(inner(x))
    expected = np.stack([
        _alpha_beta_np(x[i], np.asarray(dense_in.kernel), _alpha_beta_np(
            middle[i], np.asarray(dense_out.kernel), r[i]))
        for i in range(2)])
    np.testing.assert_allclose(_propagate(flat, x, r), expected, rtol=1e-4,
                               atol=1e-5)


# -- scores ------------------------------------------------------------------------
def test_class_weights_follow_the_papers_formula():
    counts = np.array([10, 10, 10, 0])
    correct = np.array([8, 4, 0, 0])
    w = scores_lib.class_weights(counts, correct)
    sigmoid = lambda v: 1 / (1 + np.exp(-v))
    np.testing.assert_allclose(w[:3], [sigmoid(1.0), sigmoid(2.0), 1.0])
    assert w[3] == 0  # Absent class.
    np.testing.assert_array_equal(
        scores_lib.class_weights([5, 5], [0, 0]), [1.0, 1.0])


def test_scores_aggregate_per_class_then_normalise_per_group():
    groups = keras_chex.channel_groups(_resnet())
    n = sum(g.size for g in groups)
    rng = np.random.default_rng(0)
    sums = rng.normal(size=(n, 4))
    counts = np.array([4.0, 2.0, 1.0, 3.0])
    correct = np.array([2.0, 2.0, 0.0, 1.0])
    got = scores_lib.aggregate(sums, counts, correct, groups)
    w = scores_lib.class_weights(counts, correct)
    raw = np.abs((sums / counts) @ w / 4)
    for g in groups:
        part = slice(g.start, g.start + g.size)
        np.testing.assert_allclose(got[part],
                                   raw[part] / np.linalg.norm(raw[part]))


def test_relevance_scores_of_every_group_from_arrays_or_a_dataset():
    model = _resnet()
    x, y = _data(48)
    scores = keras_chex.relevance_scores(model, (x, y))
    groups = keras_chex.channel_groups(model)
    assert list(scores) == [g.name for g in groups]
    for g in groups:
        values = scores[g.name]
        assert values.shape == (g.size,) and np.all(np.isfinite(values))
        np.testing.assert_allclose(np.linalg.norm(values), 1.0)
    ds = tf.data.Dataset.from_tensor_slices((x, np.eye(4)[y])).batch(16)
    one_hot = keras_chex.relevance_scores(model, ds)
    for name in scores:
        np.testing.assert_allclose(one_hot[name], scores[name], rtol=1e-5)
    first = keras_chex.relevance_scores(model, ds.repeat(), batches=1)
    assert not np.allclose(first[groups[0].name], scores[groups[0].name])


def test_scores_match_the_relevance_summed_at_the_producers():
    model = _resnet()
    x, y = _data(8)
    scorer = scores_lib.RelevanceScorer(model)
    sums, counts, correct = scorer.accumulate(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(8))
    graph = scorer.graph
    values = graph.forward([tf.constant(x)])
    seen = {}
    graph.backward(values, {graph.output_keys[0]: tf.one_hot(y, 4)},
                   lambda step, r: seen.__setitem__(id(step), r[0]))
    expected = np.zeros((scorer.num_channels + 1, 4))
    for step, segments in scorer._sites.values():
        per_channel = np.asarray(seen[id(step)]).sum(axis=(1, 2))
        for b in range(len(x)):
            np.add.at(expected[:, y[b]], segments, per_channel[b])
    np.testing.assert_allclose(sums, expected[:-1], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(counts, np.bincount(y, minlength=4))
    predicted = np.argmax(model.predict(x, verbose=0), -1)
    np.testing.assert_array_equal(
        correct, np.bincount(y[predicted == y], minlength=4))


def test_the_stream_is_scored_as_one_group_over_its_producers():
    model = _resnet()
    stream = next(g for g in keras_chex.channel_groups(model)
                  if "stem_conv" in g.producers)
    assert len(stream.producers) > 1
    scorer = scores_lib.RelevanceScorer(model)
    writers = {step.node.operation.name
               for step, segments in scorer._sites.values()
               if np.any((segments >= stream.start)
                         & (segments < stream.start + stream.size))}
    assert writers == set(stream.producers)


def test_the_scoring_pass_is_compiled_once():
    scorer = scores_lib.RelevanceScorer(_resnet())
    x, y = _data(32)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    for _ in range(3):
        scorer.accumulate(ds)
    assert scorer._accumulate.experimental_get_tracing_count() == 1


@keras.saving.register_keras_serializable(package="test_frs")
class Halve(layers.Layer):
    def call(self, x):
        return x * 0.5


def _with_unsupported():
    inp = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, padding="same", name="before")(inp)
    x = layers.ReLU()(x)
    # The analysis blocks the channels next to the custom layer ('middle'),
    # LRP cannot pass it: 'before' is a group with no complete relevance.
    x = layers.Conv2D(8, 3, padding="same", name="middle")(x)
    x = Halve(name="custom")(x)
    x = layers.Conv2D(8, 3, padding="same", name="after")(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, layers.Dense(4)(x))


def test_an_unsupported_layer_is_named_and_its_upstream_not_scored():
    model = _with_unsupported()
    x, y = _data(16)
    with pytest.warns(UserWarning, match="'custom'.*\\['before'\\]"):
        scores = keras_chex.relevance_scores(model, (x, y))
    assert np.all(np.isnan(scores["before"]))
    assert np.all(np.isfinite(scores["after"]))


def test_relevance_prune_leaves_unscored_groups_alone():
    with pytest.warns(UserWarning, match="'custom'"):
        model = keras_chex.relevance_prune(_with_unsupported(), channels=4,
                                           interval=1, until=1.0, seed=0)
    _compile(model)
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False,
                  callbacks=[keras_chex.RelevancePruning((x, y))])
    masks = {g.name: g.mask for g in keras_chex.channel_groups(model)}
    assert set(masks) == {"before", "after"}
    assert masks["before"].all()
    # Two steps of 4 would take all 8: the group keeps its last channel.
    assert masks["after"].sum() == 1


def test_relevance_passes_a_batchnorm_whose_channels_are_the_output():
    # A backbone without a classifier (MobileNetV2 with include_top=False):
    # the last BatchNorm's channels are the model's output, never pruned,
    # and relevance must still flow through it to the groups upstream.
    inp = keras.Input((8, 8, 3))
    x = layers.ReLU()(layers.BatchNormalization()(
        layers.Conv2D(8, 3, name="first")(inp)))
    x = layers.BatchNormalization(name="last_bn")(layers.Conv2D(6, 1)(x))
    model = keras.Model(inp, layers.GlobalAveragePooling2D()(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped = keras_chex.relevance_prune(model, flops=0.5, seed=0)
    x = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype("float32")
    y = np.arange(8) % 6
    scores = keras_chex.relevance_scores(wrapped, (x, y))
    assert set(scores) == {"first"}
    assert np.all(np.isfinite(scores["first"]))
    assert np.any(scores["first"] > 0)


def test_a_model_that_is_not_a_classifier_is_refused():
    inp = keras.Input((8, 8, 3))
    out = layers.Conv2D(4, 3)(layers.Conv2D(4, 3)(inp))
    with pytest.raises(ValueError, match="one output of shape"):
        keras_chex.relevance_prune(keras.Model(inp, out), flops=0.5)


# -- selection ---------------------------------------------------------------------
def test_selection_takes_the_globally_lowest_and_keeps_a_channel_per_group():
    groups = keras_chex.channel_groups(_resnet())
    n = sum(g.size for g in groups)
    rng = np.random.default_rng(0)
    scores = rng.random(n)
    kept = np.ones(n, bool)
    minimum = np.ones(len(groups), np.int64)
    units = selection.removal_units(scores, kept, groups, minimum, 1,
                                    np.arange(n))
    new = selection.remove_channels(kept, units, 10)
    removed = np.flatnonzero(~new)
    assert len(removed) == 10
    np.testing.assert_array_equal(np.sort(removed), np.sort(
        np.argsort(scores)[:10]))
    everything = selection.remove_channels(kept, units, n)
    for g in groups:
        assert everything[g.start:g.start + g.size].sum() == 1


def test_selection_with_round_to_keeps_multiples():
    groups = keras_chex.channel_groups(_resnet())
    n = sum(g.size for g in groups)
    scores = np.random.default_rng(1).random(n)
    units = selection.removal_units(scores, np.ones(n, bool), groups,
                                    np.ones(len(groups), np.int64), 4,
                                    np.arange(n))
    new = selection.remove_channels(np.ones(n, bool), units, 30)
    for g in groups:
        assert new[g.start:g.start + g.size].sum() % 4 == 0


# -- the method in fit -------------------------------------------------------------
def _frs(model=None, **kwargs):
    kwargs.setdefault("seed", 0)
    kwargs.setdefault("interval", 1)
    kwargs.setdefault("until", 0.75)
    kwargs.setdefault("score_batches", 2)
    if not any(k in kwargs for k in ("flops", "params", "channels")):
        kwargs["flops"] = 0.5
    return keras_chex.relevance_prune(model or _resnet(), **kwargs)


class MaskRecorder(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.masks = []

    def on_epoch_end(self, epoch, logs=None):
        self.masks.append(self.model.masks.numpy())


def _fit(model, epochs=4, callbacks=(), data=None):
    x, y = data or _data()
    return model.fit(x, y, batch_size=16, epochs=epochs, verbose=0,
                     shuffle=False,
                     callbacks=[keras_chex.RelevancePruning((x, y)),
                                *callbacks])


def test_fit_meets_a_latency_budget_priced_by_the_table():
    base = _resnet()
    table = synthetic_latency_table(base)
    model = _compile(keras_chex.relevance_prune(
        base, latency=0.6, cost_table=table, interval=1, seed=0))
    history = _fit(model)
    compact = keras_chex.strip(model)
    kept = table.predict(compact) / table.predict(base)
    assert 0.4 < kept <= 0.6 * (1 + 1e-9)
    assert history.history["frs_macs"][-1] == pytest.approx(kept, rel=1e-6)
    # MACs are not what it was held to: they fall elsewhere.
    assert keras_chex.count_macs(compact).macs != pytest.approx(
        0.6 * keras_chex.count_macs(base).macs, rel=1e-3)
    with pytest.raises(ValueError, match="needs `cost_table=`"):
        keras_chex.relevance_prune(base, latency=0.5)
    with pytest.raises(ValueError, match="`latency` target only"):
        keras_chex.relevance_prune(base, flops=0.5, cost_table=table)


@pytest.mark.parametrize("target", ["flops", "params"])
def test_fit_meets_the_target_in_steps_and_pruned_channels_never_return(
        target):
    model = _compile(_frs(**{target: 0.5}))
    recorder = MaskRecorder()
    history = _fit(model, callbacks=[recorder])
    logged = history.history["frs_macs"]
    # Steps at the ends of epochs 1 and 2 and at the freeze step (0.75 of
    # 16 steps = 12, the end of epoch 3): the cost falls to the target.
    assert logged[0] > logged[1] > logged[2] == logged[3]
    assert 0.45 <= logged[-1] <= 0.5
    assert model.pruning_state.last_stats.numpy()[2] == 3
    for before, after in zip(recorder.masks, recorder.masks[1:]):
        assert not np.any(after & ~before)  # Nothing regrown, ever.
    compact = keras_chex.strip(model)
    count = keras_chex.count_macs(compact)
    dense = keras_chex.count_macs(_resnet())
    kept = (count.macs / dense.macs if target == "flops"
            else count.params / dense.params)
    assert kept == pytest.approx(logged[-1]) and kept <= 0.5


def test_removed_channels_have_zero_weights_and_stay_zero():
    # Momentum from the steps before a channel is removed must not move its
    # zeroed weights afterwards.
    model = _compile(_frs())
    _fit(model)
    mask = model.masks.numpy()
    assert not mask.all()
    for s in model.analysis.weight_slices:
        value = np.asarray(s.variable().numpy())
        removed = np.zeros(value.shape[s.axis], bool)
        sel = s.classes >= 0
        removed[sel] = ~mask[s.classes[sel]]
        assert not np.any(np.take(value, np.flatnonzero(removed), s.axis))


def test_channels_target_removes_x_per_step():
    model = _compile(_frs(channels=5))
    history = _fit(model)
    assert history.history["frs_pruned"] == [5.0, 5.0, 5.0, 0.0]
    assert (~model.masks.numpy()).sum() == 15


def test_strip_is_exact_after_relevance_pruning():
    model = _compile(_frs())
    _fit(model)
    compact = keras_chex.strip(model)
    x, _ = _data(8, seed=3)
    np.testing.assert_allclose(np.asarray(compact(x, training=False)),
                               np.asarray(model(x, training=False)),
                               rtol=1e-4, atol=1e-5)
    assert keras_chex.count_macs(compact).macs == (
        keras_chex.count_macs(model).macs)


def test_l1_criterion_prunes_the_smallest_filters():
    model = _frs(criterion="l1", channels=3)
    state = model.pruning_state
    values = state.channel_scores(None)
    kept = model.masks.numpy()
    state.prune_step(None, 1, 1)
    removed = np.flatnonzero(kept & ~model.masks.numpy())
    np.testing.assert_array_equal(np.sort(removed),
                                  np.sort(np.argsort(values)[:3]))


def test_keras_file_mid_training_continues_identically(tmp_path):
    x, y = _data()
    assert_keras_file_continues(
        _compile(_frs()), lambda: keras_chex.RelevancePruning((x, y)),
        x, y, tmp_path, epochs=4)


@pytest.mark.parametrize("backup_first", [True, False])
def test_backup_and_restore_resumes_identically_in_either_order(
        tmp_path, backup_first):
    x, y = _data()
    assert_resumes_exactly(lambda: _compile(_frs(_resnet(1))),
                           lambda: keras_chex.RelevancePruning((x, y)),
                           x, y, tmp_path, backup_first)


def test_an_unreachable_target_warns():
    model = _frs(flops=0.01, min_channels=4)
    x, y = _data()
    with pytest.warns(UserWarning, match="cannot be met"):
        model.pruning_state.prune_step((x, y), 1, 1)
    for g in keras_chex.channel_groups(model):
        assert g.mask.sum() == min(4, g.size)


# -- errors ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(flops=None), "exactly one target"),
    (dict(flops=0.5, channels=3), "exactly one target"),
    (dict(flops=0.0), "`flops`"),
    (dict(flops=None, channels=0), "`channels`"),
    (dict(flops=None, channels=2.5), "`channels`"),
    (dict(interval=0), "`interval`"),
    (dict(until=1.5), "`until`"),
    (dict(score_batches=0), "`score_batches`"),
    (dict(criterion="taylor"), "`criterion`"),
    (dict(round_to=0), "`round_to`"),
    (dict(min_channels=0), "`min_channels`"),
    (dict(exclude=["nope"]), "nope"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _frs(**kwargs)


def test_the_callback_checks_its_data_and_its_model():
    with pytest.raises(ValueError, match="`data` must be"):
        keras_chex.RelevancePruning([1, 2, 3])
    x, y = _data()
    model = _compile(_frs())
    with pytest.raises(ValueError, match="needs the data"):
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[keras_chex.RelevancePruning()])
    chex = _compile(keras_chex.prune_and_regrow(_resnet(), flops=0.5))
    with pytest.raises(ValueError, match="relevance_prune"):
        chex.fit(x, y, epochs=1, verbose=0,
                 callbacks=[keras_chex.RelevancePruning((x, y))])
    with pytest.raises(ValueError, match="`batches`"):
        keras_chex.relevance_scores(_resnet(), (x, y), batches=0)
    endless = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    with pytest.raises(ValueError, match="repeats forever"):
        keras_chex.relevance_scores(_resnet(), endless)
