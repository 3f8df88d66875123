"""Models of free spatial size (`keras.Input((None, None, 3))`): every entry
point takes `input_shape=` for the cost, and export converts at a size."""

import keras
import numpy as np
import pytest

import keras_chex
from conftest import compile_sgd, synthetic_latency_table
from keras_chex.cifar.resnet import cifar_resnet
from keras_chex.core import input_shapes

SIZE = (8, 8, 3)
ENTRY_POINTS = {
    "chex": (keras_chex.prune_and_regrow, keras_chex.ChannelExploration,
             dict(interval=0.5)),
    "smcp": (keras_chex.soft_mask_prune, keras_chex.SoftMaskPruning,
             dict(round_to=4, interval_steps=2)),
    "frs": (keras_chex.relevance_prune, None, dict(interval=0.5)),
}


def free_resnet(seed=0):
    keras.utils.set_random_seed(seed)
    return cifar_resnet(8, num_classes=4, widths=(8, 16, 16),
                        input_shape=(None, None, 3))


def free_data(n=64, size=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, size, size, 3)).astype("float32")
    y = (x[..., 0].mean(axis=(1, 2)) > 0).astype("int64") + 2 * (
        x[..., 1].mean(axis=(1, 2)) > 0).astype("int64")
    return x, y


def _callback(method, data):
    entry, callback, _ = ENTRY_POINTS[method]
    return (callback() if callback is not None
            else keras_chex.RelevancePruning(data))


@pytest.mark.parametrize("method", sorted(ENTRY_POINTS))
def test_every_entry_point_prunes_a_free_size_model_to_its_target(method):
    model = free_resnet()
    entry, _, options = ENTRY_POINTS[method]
    wrapped = entry(model, flops=0.5, seed=0, input_shape=SIZE, **options)
    dense = keras_chex.count_macs(model, input_shape=SIZE).macs
    # Nothing pruned yet by SMCP and FRS; CHEX starts below the dense cost.
    assert keras_chex.count_macs(wrapped).macs <= dense
    x, y = free_data()
    compile_sgd(wrapped)
    wrapped.fit(x, y, batch_size=16, epochs=4, verbose=0,
                callbacks=[_callback(method, (x, y))])
    kept = keras_chex.count_macs(wrapped).macs / dense
    assert kept <= 0.5 + 1e-9
    compact = keras_chex.strip(wrapped)
    # The compact model keeps the free size and computes the same at
    # another size than the one its cost was counted at.
    assert tuple(compact.inputs[0].shape) == (None, None, None, 3)
    other = free_data(4, size=12)[0]
    np.testing.assert_allclose(
        np.asarray(compact(other, training=False)),
        np.asarray(wrapped(other, training=False)), rtol=1e-4, atol=1e-5)
    assert keras_chex.count_macs(compact, input_shape=SIZE).macs == (
        keras_chex.count_macs(wrapped).macs)


@pytest.mark.parametrize("method", sorted(ENTRY_POINTS))
def test_a_free_size_model_without_input_shape_names_the_argument(method):
    entry, _, options = ENTRY_POINTS[method]
    with pytest.raises(ValueError, match=r"input_shape=.*entry point.*"
                       + entry.__name__):
        entry(free_resnet(), flops=0.5, **options)


@pytest.mark.parametrize("bad, message", [
    (8, "must be one shape"),
    ("8,8,3", "must be one shape"),
    ((8, 8), r"does not fit input"),
    ((0, 8, 3), r"does not fit input"),
    ([(8, 8, 3), (8, 8, 3)], r"gives 2 shape\(s\) for the 1 input"),
])
def test_a_bad_input_shape_is_refused_clearly(bad, message):
    with pytest.raises(ValueError, match=message):
        keras_chex.soft_mask_prune(free_resnet(), flops=0.5, input_shape=bad)


def test_a_fixed_size_model_refuses_another_input_shape():
    fixed = cifar_resnet(8, num_classes=4, widths=(8, 16, 16),
                         input_shape=SIZE)
    with pytest.raises(ValueError, match="equal to the fixed ones"):
        keras_chex.prune_and_regrow(fixed, flops=0.5, input_shape=(16, 16, 3))


def test_the_input_shape_is_saved_with_the_model(tmp_path):
    wrapped = keras_chex.soft_mask_prune(free_resnet(), flops=0.5,
                                         input_shape=SIZE, round_to=4)
    wrapped.masks.assign(np.random.default_rng(0).random(
        wrapped.masks.numpy().shape) < 0.6)
    wrapped.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.pruning_config["input_shape"] == [list(SIZE)]
    assert keras_chex.count_macs(loaded).macs == (
        keras_chex.count_macs(wrapped).macs)
    # Its MACs at the stored size, and another size on request.
    bigger = keras_chex.count_macs(loaded, input_shape=(16, 16, 3)).macs
    smaller = keras_chex.count_macs(loaded).macs
    # Four times the pixels; the classifier's MACs do not grow with them.
    assert 3.9 * smaller < bigger < 4 * smaller


def test_the_sized_analysis_has_the_same_groups():
    wrapped = keras_chex.wrap(free_resnet(), input_shape=SIZE)
    a = wrapped.analysis
    assert a.sized is not a
    assert [(g.name, g.size) for g in a.sized.groups] == [
        (g.name, g.size) for g in a.groups]
    assert all(t.coef is not None for t in a.macs_terms)
    assert input_shapes.free_input_axes(wrapped)
    assert not input_shapes.free_input_axes(a.sized.model)


@pytest.mark.parametrize("method", sorted(ENTRY_POINTS))
def test_a_latency_target_prices_a_free_size_model_at_its_input_shape(
        method):
    model = free_resnet()
    table = synthetic_latency_table(input_shapes.at_input_shape(model, SIZE))
    entry, _, options = ENTRY_POINTS[method]
    wrapped = entry(model, latency=0.5, cost_table=table, input_shape=SIZE,
                    seed=0, **options)
    state = wrapped.pruning_state
    dense = state.group_cost().total(state.group_sizes)
    np.testing.assert_allclose(dense, table.predict(
        input_shapes.at_input_shape(model, SIZE)), rtol=1e-6)
    with pytest.raises(ValueError, match="input_shape"):
        entry(model, latency=0.5, cost_table=table, seed=0, **options)


def test_build_latency_table_asks_for_the_size_of_a_free_size_model(
        tmp_path):
    with pytest.raises(ValueError, match=r"input_shape=\(224, 224, 3\)"):
        keras_chex.build_latency_table(free_resnet(), tmp_path / "t.json")


def test_export_converts_a_free_size_model_at_the_size_given(tmp_path):
    model = free_resnet()
    with pytest.raises(ValueError, match=r"free size.*input_shape="):
        keras_chex.export_tflite(model, tmp_path / "a.tflite")
    assert not (tmp_path / "a.tflite").exists()
    report = keras_chex.export_tflite(model, tmp_path / "a.tflite",
                                      input_shape=(12, 16, 3))
    assert report.inputs[0].shape == (None, 12, 16, 3)
    assert report.verified and report.max_rel_diff < 1e-4


def test_export_of_a_wrapped_free_size_model_uses_its_input_shape(tmp_path):
    wrapped = keras_chex.soft_mask_prune(free_resnet(), flops=0.5,
                                         input_shape=SIZE, round_to=4)
    wrapped.masks.assign(np.random.default_rng(1).random(
        wrapped.masks.numpy().shape) < 0.6)
    report = keras_chex.export_tflite(wrapped, tmp_path / "w.tflite")
    assert report.stripped
    assert report.inputs[0].shape == (None,) + SIZE
    assert report.max_rel_diff < 1e-4
