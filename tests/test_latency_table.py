"""The measured latency table: built through LiteRT, cached, and priced."""

import json

import keras
import numpy as np
import pytest
from keras import layers

import keras_chex
from keras_chex.deploy import export
from keras_chex.deploy import latency_table


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
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("table") / "latency.json"
    model = _model()
    table = keras_chex.build_latency_table(model, str(path), round_to=4,
                                           runs=3, rounds=1, warmup=1)
    return model, table, path


def test_every_timed_call_has_a_grid_of_measured_times(built):
    model, table, path = built
    assert set(table.layers) == {"c1#0", "dw#0", "c2#0", "head#0"}
    c1 = table.entries[table.layers["c1#0"]]
    assert c1["cin"] == [3]  # The input's channels are never pruned.
    assert c1["cout"] == [1, 4, 8]
    c2 = table.entries[table.layers["c2#0"]]
    assert c2["cin"] == [1, 4, 8] and c2["cout"] == [1, 4, 8]
    dw = table.entries[table.layers["dw#0"]]
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
    parts = sum(table.layer_ms(table.layers[n], *latency_table._channels(nd))
                for n, nd in latency_table._timed_nodes(model))
    assert table.predict(model) == pytest.approx(
        table.other_ms + table.scale * parts)
    assert table.other_ms >= 0 and table.scale > 0


def test_a_compact_model_is_priced_from_the_grid(built):
    model, table, _ = built
    wrapped = keras_chex.wrap(model)
    groups = {g.name: g for g in keras_chex.channel_groups(wrapped)}
    groups["c1"].set_mask(np.arange(8) < 4)
    compact = keras_chex.strip(wrapped)
    c2 = table.entries[table.layers["c2#0"]]
    c1 = table.entries[table.layers["c1#0"]]
    dw = table.entries[table.layers["dw#0"]]
    head = table.entries[table.layers["head#0"]]
    expected = table.other_ms + table.scale * (
        c1["ms"][0][1] + dw["ms"][1][0] + c2["ms"][1][2] + head["ms"][2][0])
    assert table.predict(compact) == pytest.approx(expected)
    # The group cost of the wrapped model agrees with `predict`.
    cost = table.group_cost(wrapped.analysis)
    counts = np.array([4 if g.name == "c1" else g.size
                       for g in wrapped.analysis.groups])
    assert cost.total(counts) == pytest.approx(expected)


def test_a_second_build_with_the_cache_measures_only_the_whole_model(
        built, monkeypatch):
    model, table, path = built
    exported, converted = [], []
    real_export, real_layer = export.export_tflite, latency_table.layer_tflite

    def counting_export(m, *args, **kwargs):
        exported.append(m.name)
        return real_export(m, *args, **kwargs)

    def counting_layer(layer, shape):
        converted.append(layer.name)
        return real_layer(layer, shape)

    monkeypatch.setattr(export, "export_tflite", counting_export)
    monkeypatch.setattr(latency_table, "layer_tflite", counting_layer)
    again = keras_chex.build_latency_table(model, str(path), round_to=4,
                                           runs=3, warmup=1)
    # Nothing measured again, calibration included.
    assert exported == [] and converted == []
    assert again.entries == table.entries
    assert (again.scale, again.other_ms) == (table.scale, table.other_ms)
    # A table of other settings is never replaced.
    before = path.read_text()
    with pytest.raises(ValueError, match="round_to=4"):
        keras_chex.build_latency_table(model, str(path), round_to=8)
    assert path.read_text() == before


def test_calibration_passes_through_both_whole_models():
    scale, other = latency_table._calibrate(1.0, 1.2, 0.6, 0.6)
    assert other + scale * 1.2 == pytest.approx(1.0)
    assert other + scale * 0.6 == pytest.approx(0.6)
    # A negative rest would be needed: proportional instead, between both.
    scale, other = latency_table._calibrate(0.8, 1.0, 0.35, 0.5)
    assert other == 0.0 and 0.35 / 0.5 <= scale <= 0.8 / 1.0
    # Degenerate (the half model is slower): a constant rest instead.
    assert latency_table._calibrate(1.0, 0.8, 1.1, 0.4) == pytest.approx(
        (1.0, 0.2))
    assert latency_table._calibrate(1.0, 1.2, 1.0, 1.2) == (1.0, 0.0)


def test_table_round_trips_and_bad_files_are_refused(built, tmp_path):
    _, table, path = built
    loaded = keras_chex.LatencyTable.load(str(path))
    assert loaded.entries == table.entries
    assert loaded.other_ms == pytest.approx(table.other_ms)
    assert loaded.scale == pytest.approx(table.scale)
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
