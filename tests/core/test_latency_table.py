"""The measured latency table: built through LiteRT, cached, and priced."""

import json

import keras
import numpy as np
import pytest
from keras import layers

import keras_chex
from keras_chex.deploy import export
from keras_chex.core import latency_table
from keras_chex.deploy import table_builder


def _model():
    keras.utils.set_random_seed(0)
    x = keras.Input((8, 8, 3))
    h = layers.Conv2D(8, 3, padding="same", use_bias=False, name="c1")(x)
    h = layers.BatchNormalization(name="bn1")(h)
    h = layers.ReLU()(h)
    h = layers.DepthwiseConv2D(3, padding="same", name="dw")(h)
    h = layers.Conv2D(8, 1, name="c2")(h)
    h = layers.GlobalAveragePooling2D()(h)
    return keras.Model(x, layers.Dense(4, name="head")(h))


@pytest.fixture(scope="module")
def built_and_warnings(tmp_path_factory):
    """(model, table, path) of a built table, and the warnings building it
    raised."""
    import warnings

    path = tmp_path_factory.mktemp("table") / "latency.json"
    model = _model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = keras_chex.build_latency_table(model, str(path), round_to=4,
                                               runs=3, rounds=1, warmup=1)
    return (model, table, path), [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def built(built_and_warnings):
    return built_and_warnings[0]


def test_building_a_table_does_not_warn_about_its_own_timing_models(
        built_and_warnings):
    # The builder strips masked copies (with bn1) only to time their
    # shapes; the stale-statistics warning meant for a user's strip must
    # stay silent.
    _, messages = built_and_warnings
    assert not [m for m in messages if "Stripping model" in m], messages


def _entry(table, model, layer):
    """The entry that prices layer `layer` of `model`."""
    for name, node in latency_table._timed_nodes(model):
        if name == f"{layer}#0":
            return table.entries[table.key_for(name, node)]
    raise KeyError(layer)


def test_every_timed_call_has_a_grid_of_measured_times(built):
    model, table, path = built
    assert len(table.entries) == 4
    c1 = _entry(table, model, "c1")
    assert c1["cin"] == [3]  # The input's channels are never pruned.
    assert c1["cout"] == [1, 4, 8]
    c2 = _entry(table, model, "c2")
    assert c2["cin"] == [1, 4, 8] and c2["cout"] == [1, 4, 8]
    dw = _entry(table, model, "dw")
    assert dw["cout"] == [None]  # Depthwise: out follows in.
    total = 0.0
    for entry in table.entries.values():
        ms = np.asarray(entry["ms"], float)
        assert ms.shape == (len(entry["cin"]), len(entry["cout"]))
        # Less the cost of an empty invoke(): a tiny layer may cost ~0.
        assert np.all(np.isfinite(ms)) and np.all(ms >= 0)
        total += ms.sum()
    assert total > 0
    saved = json.loads(path.read_text())
    assert saved["format"] == "keras-chex-latency-table"
    assert saved["threads"] == 1


def test_predicting_the_dense_model_gives_its_measured_time(built):
    model, table, _ = built
    parts = sum(table.layer_ms(table.key_for(n, nd),
                               *latency_table._channels(nd))
                for n, nd in latency_table._timed_nodes(model))
    scale, other_ms = table.calibration(model)
    assert table.predict(model) == pytest.approx(other_ms + scale * parts)
    assert other_ms >= 0 and scale > 0


def test_a_compact_model_is_priced_from_the_grid(built):
    model, table, _ = built
    wrapped = keras_chex.wrap(model)
    groups = {g.name: g for g in keras_chex.channel_groups(wrapped)}
    groups["c1"].set_mask(np.arange(8) < 4)
    compact = keras_chex.strip(wrapped)
    c1, dw, c2, head = (_entry(table, model, n)
                        for n in ("c1", "dw", "c2", "head"))
    scale, other_ms = table.calibration(model)
    expected = other_ms + scale * (
        c1["ms"][0][1] + dw["ms"][1][0] + c2["ms"][1][2] + head["ms"][2][0])
    assert table.predict(compact) == pytest.approx(expected)
    # The group cost of the wrapped model agrees with `predict`.
    cost = table.group_cost(wrapped.analysis)
    counts = np.array([4 if g.name == "c1" else g.size
                       for g in wrapped.analysis.groups])
    assert cost.total(counts) == pytest.approx(expected)


def test_a_compact_layer_is_priced_by_the_entry_it_trained_with(tmp_path):
    # The stem and the block are the same computation at other widths; the
    # block cut to 1 input channel lies inside its own grid but below the
    # stem's fixed 3 input channels, so it must not be priced by the stem.
    x = keras.Input((8, 8, 3))
    h = layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(x)
    h = layers.BatchNormalization()(h)
    h = layers.ReLU()(h)
    h = layers.Conv2D(8, 3, padding="same", use_bias=False, name="block")(h)
    h = layers.BatchNormalization()(h)
    h = layers.GlobalAveragePooling2D()(layers.ReLU()(h))
    model = keras.Model(x, layers.Dense(4, name="head")(h))
    table = keras_chex.build_latency_table(
        model, str(tmp_path / "t.json"), round_to=4, runs=3, rounds=1,
        warmup=1)
    stem, block = _entry(table, model, "stem"), _entry(table, model, "block")
    assert stem is not block and stem["cin"] == [3] and block["cin"][0] == 1
    wrapped = keras_chex.wrap(model)
    for group in keras_chex.channel_groups(wrapped):
        group.set_mask(np.arange(group.size) < 1)
    compact = keras_chex.strip(wrapped)
    assert _entry(table, compact, "block") is block
    counts = np.ones(len(wrapped.analysis.groups), int)
    trained_with = table.group_cost(wrapped.analysis).total(counts)
    assert table.predict(compact) == pytest.approx(trained_with)


def test_a_second_build_with_the_cache_measures_only_the_whole_model(
        built, monkeypatch):
    model, table, path = built
    exported, converted = [], []
    real_export, real_layer = export.export_tflite, table_builder.layer_tflite

    def counting_export(m, *args, **kwargs):
        exported.append(m.name)
        return real_export(m, *args, **kwargs)

    def counting_layer(layer, shape):
        converted.append(layer.name)
        return real_layer(layer, shape)

    monkeypatch.setattr(export, "export_tflite", counting_export)
    monkeypatch.setattr(table_builder, "layer_tflite", counting_layer)
    again = keras_chex.build_latency_table(model, str(path), round_to=4,
                                           runs=3, warmup=1)
    # Nothing measured again, calibration included.
    assert exported == [] and converted == []
    assert again.entries == table.entries
    assert again.calibrations == table.calibrations
    # A table of other settings is never replaced.
    before = path.read_text()
    with pytest.raises(ValueError, match="round_to=4"):
        keras_chex.build_latency_table(model, str(path), round_to=8)
    assert path.read_text() == before


def test_calibration_passes_through_both_whole_models():
    scale, other = table_builder._calibrate(1.0, 1.2, 0.6, 0.6)
    assert other + scale * 1.2 == pytest.approx(1.0)
    assert other + scale * 0.6 == pytest.approx(0.6)
    # A negative rest would be needed: proportional instead, between both.
    scale, other = table_builder._calibrate(0.8, 1.0, 0.35, 0.5)
    assert other == 0.0 and 0.35 / 0.5 <= scale <= 0.8 / 1.0
    # Degenerate (the half model is slower): a constant rest instead.
    assert table_builder._calibrate(1.0, 0.8, 1.1, 0.4) == pytest.approx(
        (1.0, 0.2))
    assert table_builder._calibrate(1.0, 1.2, 1.0, 1.2) == (1.0, 0.0)


def test_table_round_trips_and_bad_files_are_refused(built, tmp_path):
    _, table, path = built
    loaded = keras_chex.LatencyTable.load(str(path))
    assert loaded.entries == table.entries
    assert loaded.calibrations == table.calibrations
    assert loaded.path == str(path)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="Not a keras-chex latency table"):
        keras_chex.LatencyTable.load(str(bad))
    bad.write_text("not json")
    with pytest.raises(ValueError, match="not JSON"):
        keras_chex.LatencyTable.load(str(bad))
    with pytest.raises(FileNotFoundError):
        keras_chex.LatencyTable.load(str(tmp_path / "missing.json"))


def test_build_refuses_a_wrapped_model_and_bad_arguments():
    with pytest.raises(ValueError, match="plain model"):
        keras_chex.build_latency_table(keras_chex.wrap(_model()))
    with pytest.raises(ValueError, match="threads"):
        keras_chex.build_latency_table(_model(), threads=0)


def _renamed_instance():
    """Another instance of `_model()`'s architecture: other layer names,
    other weights."""
    keras.utils.set_random_seed(1)
    x = keras.Input((8, 8, 3))
    h = layers.Conv2D(8, 3, padding="same", use_bias=False)(x)
    h = layers.BatchNormalization()(h)
    h = layers.ReLU()(h)
    h = layers.DepthwiseConv2D(3, padding="same")(h)
    h = layers.Conv2D(8, 1)(h)
    h = layers.GlobalAveragePooling2D()(h)
    return keras.Model(x, layers.Dense(4)(h))


def test_a_table_serves_another_instance_of_the_architecture(
        built, monkeypatch):
    model, table, path = built
    other = _renamed_instance()
    assert table.predict(other) == pytest.approx(table.predict(model))
    # Its compacts too, and pruning it under a latency budget.
    pruned = keras_chex.soft_mask_prune(other, latency=0.6, cost_table=table)
    assert pruned.pruning_state.group_cost().total(
        pruned.pruning_state.group_sizes) == pytest.approx(
            table.predict(model))
    # Building "again" for it measures nothing at all.
    measured = []
    monkeypatch.setattr(table_builder, "layer_tflite",
                        lambda *a: measured.append(a))
    monkeypatch.setattr(export, "export_tflite",
                        lambda *a, **k: measured.append(a))
    again = keras_chex.build_latency_table(other, str(path), round_to=4)
    assert measured == [] and again.entries == table.entries


def test_a_missing_layer_is_named_with_how_to_measure_just_that(
        built, tmp_path, monkeypatch):
    model, table, path = built
    x = keras.Input((8, 8, 3))
    h = layers.Conv2D(8, 3, padding="same", use_bias=False, name="c1")(x)
    h = layers.Conv2D(8, 5, padding="same", name="new_conv")(h)
    h = layers.GlobalAveragePooling2D()(h)
    grown = keras.Model(x, layers.Dense(4, name="head")(h))
    loaded = keras_chex.LatencyTable.load(str(path))
    with pytest.raises(ValueError) as info:
        loaded.predict(grown)
    message = str(info.value)
    assert "'new_conv'" in message
    assert "Conv2D, 8 -> 8 channels" in message
    assert repr(str(path)) in message and "only the layers" in message
    # Doing what it says measures the new computation and nothing else.
    copy = tmp_path / "copy.json"
    copy.write_text(path.read_text())
    converted = []
    real_layer = table_builder.layer_tflite

    def counting_layer(layer, shape):
        converted.append(layer.__class__.__name__)
        return real_layer(layer, shape)

    monkeypatch.setattr(table_builder, "layer_tflite", counting_layer)
    grown_table = keras_chex.build_latency_table(
        grown, str(copy), round_to=4, runs=2, rounds=1, warmup=1)
    # The empty-invoke probe is a ReLU; every other file is new_conv's grid
    # (c1 and the head compute what they computed in the first model).
    assert set(converted) == {"ReLU", "Conv2D"}
    assert len(grown_table.entries) == len(table.entries) + 1
    assert grown_table.predict(grown) > 0
    # The first model is still priced as before, from the same file.
    assert grown_table.predict(model) == pytest.approx(table.predict(model))


def test_a_compact_uses_the_calibration_of_its_dense_architecture(built):
    model, table, _ = built
    other = keras.Sequential([keras.Input((8, 8, 3)),
                              layers.Conv2D(8, 3, padding="same",
                                            use_bias=False)])
    assert latency_table.architecture_key(other) != (
        latency_table.architecture_key(model))
    with pytest.raises(ValueError, match="no calibration for the archi"):
        table.predict(other)
    wrapped = keras_chex.wrap(model)
    keras_chex.channel_groups(wrapped)[0].set_mask(np.arange(8) < 4)
    compact = keras_chex.strip(wrapped)
    for m in (wrapped, compact, _renamed_instance()):
        assert latency_table.architecture_key(m) == (
            latency_table.architecture_key(model))


def test_a_version_1_table_still_loads_and_prices(built, tmp_path):
    model, table, _ = built
    scale, other_ms = table.calibration(model)
    names = {}
    for name, node in latency_table._timed_nodes(model):
        names[name] = table.key_for(name, node)
    old = {"format": "keras-chex-latency-table", "version": 1, "threads": 1,
           "machine": {}, "round_to": 4, "created": None,
           "other_ms": other_ms, "scale": scale, "layers": names,
           "entries": table.entries}
    file = tmp_path / "v1.json"
    file.write_text(json.dumps(old))
    loaded = keras_chex.LatencyTable.load(str(file))
    assert loaded.predict(model) == pytest.approx(table.predict(model))
