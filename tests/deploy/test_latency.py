"""Tests for keras_chex.deploy.latency."""

import keras
import numpy as np
import pytest

from keras_chex.deploy import export
from keras_chex.deploy import latency


def _mlp(batch_size=None):
    inputs = keras.Input((16,), batch_size=batch_size)
    outputs = keras.layers.Dense(4)(inputs)
    return keras.Model(inputs, outputs)


def _heavy_cnn():
    # ~190M MACs against 64 for _mlp().
    inputs = keras.Input((64, 64, 16))
    x = keras.layers.Conv2D(64, 3, padding="same")(inputs)
    x = keras.layers.Conv2D(64, 3, padding="same")(x)
    outputs = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("latency") / "mlp.tflite"
    return export.export_tflite(_mlp(), path).path


def test_report_statistics_are_consistent(mlp_path):
    report = latency.measure_tflite_latency(mlp_path, runs=20, warmup=2)
    assert report.runs == 20
    assert report.threads == 1
    assert report.batch_size == 1
    assert 0 < report.min_ms <= report.median_ms <= report.p90_ms
    assert "median" in str(report) and "mlp.tflite" in str(report)


def test_batch_size_and_threads_are_applied(mlp_path):
    report = latency.measure_tflite_latency(
        mlp_path, num_threads=2, batch_size=8, runs=5
    )
    assert report.threads == 2
    assert report.batch_size == 8


def test_heavier_model_is_slower(tmp_path, mlp_path):
    heavy = export.export_tflite(
        _heavy_cnn(), tmp_path / "heavy.tflite", verify=False
    )
    # The minimum is the statistic least disturbed by a shared, noisy CPU.
    light_ms = latency.measure_tflite_latency(mlp_path, runs=10).min_ms
    heavy_ms = latency.measure_tflite_latency(heavy.path, runs=10).min_ms
    assert heavy_ms > 10 * light_ms


def test_int8_inputs_are_supported(tmp_path):
    model = _mlp()
    report = export.export_tflite(
        model,
        tmp_path / "int8.tflite",
        quantization="int8",
        representative_data=np.random.default_rng(0).normal(size=(8, 16)),
        int8_io=True,
    )
    assert report.inputs[0].dtype == "int8"
    result = latency.measure_tflite_latency(report.path, runs=3)
    assert result.median_ms > 0


def test_fixed_batch_size_mismatch(tmp_path):
    path = export.export_tflite(_mlp(batch_size=1), tmp_path / "b1.tflite").path
    assert latency.measure_tflite_latency(path, runs=2).batch_size == 1
    with pytest.raises(ValueError, match="fixed batch size of 1"):
        latency.measure_tflite_latency(path, batch_size=4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_threads": 0}, "num_threads"),
        ({"num_threads": 1.5}, "num_threads"),
        ({"warmup": -1}, "warmup"),
        ({"runs": 0}, "runs"),
        ({"batch_size": True}, "batch_size"),
    ],
)
def test_invalid_arguments(mlp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        latency.measure_tflite_latency(mlp_path, **kwargs)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.tflite"):
        latency.measure_tflite_latency(tmp_path / "missing.tflite")
