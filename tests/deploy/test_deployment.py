"""End-to-end deployment of pruned models: strip, TFLite, SavedModel, tool.

Unlike tests/deploy/test_export.py (plain models, a faked stripping step), these
tests export real keras-chex pruning models with random masks, so the
stripping, the conversion and the verification are checked together.
"""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_chex
from keras_chex.core import _graph
from keras_chex.cifar import resnet as cifar_resnet
from keras_chex.deploy import export
from keras_chex.deploy import litert

from conftest import load_tool, random_masks
from conftest import randomize_weights


def _small_cnn():
    """Conv-BN-ReLU, depthwise, 1x1 convs, a residual add and a dense head.

    Wide enough that weights, not per-tensor metadata, dominate the TFLite
    file sizes compared below.
    """
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False,
                            name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    y = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False,
                                     name="dw")(x)
    y = keras.layers.BatchNormalization(name="dw_bn")(y)
    y = keras.layers.ReLU(name="dw_relu")(y)
    y = keras.layers.Conv2D(192, 1, name="expand")(y)
    y = keras.layers.ReLU(name="expand_relu")(y)
    y = keras.layers.Conv2D(32, 1, name="project")(y)
    x = keras.layers.Add(name="add")([x, y])
    x = keras.layers.Conv2D(512, 3, strides=2, padding="same",
                            name="head_conv")(x)
    x = keras.layers.ReLU(name="head_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(256, name="logits")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def _mobilenet_v2():
    return keras.applications.MobileNetV2(
        input_shape=(96, 96, 3),
        alpha=0.35,
        weights=None,
        classifier_activation=None,
    )


ARCHITECTURES = {
    "small_cnn": _small_cnn,
    # Twice the default widths, for the same reason as in _small_cnn().
    "cifar_resnet8": lambda: cifar_resnet.cifar_resnet(8, widths=(32, 64, 128)),
    "mobilenet_v2_035": _mobilenet_v2,
}


def _build(name, seed=0):
    model = ARCHITECTURES[name]()
    randomize_weights(model, np.random.default_rng(seed))
    return model


def _images(model, n, seed):
    shape = (n,) + tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _keras_output(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def _single_input_name(path):
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path)).get_signature_runner()
    (name,) = runner.get_input_details()
    return name


def _relative_diff(expected, actual):
    scale = float(np.max(np.abs(expected)))
    assert scale > 0
    return float(np.max(np.abs(expected - actual))) / scale


# Exporting MobileNetV2 takes ~15 s per file here, so it is only exported
# once (float32); the quantized and SavedModel tests use the smaller models.
ALL = sorted(ARCHITECTURES)
SMALL = ["cifar_resnet8", "small_cnn"]


@pytest.fixture(scope="module")
def wrapped(request):
    """A wrapped model with random weights and random masks (~50% kept)."""
    model = _build(request.param)
    wrapped = keras_chex.wrap(model)
    random_masks(wrapped, np.random.default_rng(7), keep=0.5)
    return wrapped


@pytest.fixture(scope="module")
def float32_file(wrapped, tmp_path_factory):
    path = tmp_path_factory.mktemp("float32") / f"{wrapped.name}.tflite"
    return export.export_tflite(wrapped, path)


# --- (a) TFLite from a wrapped model ----------------------------------------


@pytest.mark.parametrize("wrapped", ALL, indirect=True)
def test_float32_tflite_of_wrapped_model_matches_keras(wrapped, float32_file):
    report = float32_file
    assert report.stripped
    assert report.verified and report.max_rel_diff <= 1e-4

    # Independent check on other inputs, batch of 3.
    x = _images(wrapped, 3, seed=11)
    (actual,) = litert.run_tflite(report.path, {report.inputs[0].name: x})
    assert _relative_diff(_keras_output(wrapped, x), actual) <= 1e-4

    # The channels are physically gone: the file holds about the compact
    # parameter count in float32, not the dense one.
    compact_params = keras_chex.count_macs(wrapped).params
    dense_params = sum(int(np.prod(w.shape)) for w in wrapped.weights
                       if "mask" not in w.path)
    assert compact_params < 0.8 * dense_params
    assert report.size_bytes < 4 * compact_params * 1.1 + 64 * 1024


@pytest.mark.parametrize("wrapped", SMALL, indirect=True)
def test_float16_tflite_of_wrapped_model(wrapped, float32_file, tmp_path):
    report = export.export_tflite(
        wrapped, tmp_path / "m_fp16.tflite", quantization="float16"
    )
    assert report.stripped
    assert report.max_rel_diff <= 1e-2
    x = _images(wrapped, 2, seed=12)
    (actual,) = litert.run_tflite(report.path, {report.inputs[0].name: x})
    assert _relative_diff(_keras_output(wrapped, x), actual) <= 1e-2
    assert report.size_bytes < 0.7 * float32_file.size_bytes


@pytest.mark.parametrize("wrapped", SMALL, indirect=True)
def test_int8_tflite_of_wrapped_model_is_4x_smaller_and_runs(
    wrapped, float32_file, tmp_path
):
    calibration = _images(wrapped, 16, seed=13)
    report = export.export_tflite(
        wrapped,
        tmp_path / "m_int8.tflite",
        quantization="int8",
        representative_data=calibration,
    )
    assert report.stripped
    assert float32_file.size_bytes / report.size_bytes >= 3.0
    x = calibration[:4]
    (actual,) = litert.run_tflite(report.path, {report.inputs[0].name: x})
    expected = _keras_output(wrapped, x)
    assert actual.shape == expected.shape
    assert np.all(np.isfinite(actual))
    corr = np.corrcoef(expected.ravel(), actual.ravel())[0, 1]
    assert corr > 0.9, corr


# --- (b) SavedModel of the compact model ------------------------------------


@pytest.mark.parametrize("wrapped", SMALL, indirect=True)
def test_saved_model_of_compact_model_serves_same_outputs(wrapped, tmp_path):
    compact = keras_chex.strip(wrapped)
    directory = keras_chex.export_saved_model(compact, tmp_path / "sm")
    x = _images(wrapped, 2, seed=14)
    # Keep the loaded object alive: its functions hold weak references to
    # the variables.
    loaded = tf.saved_model.load(directory)
    actual = loaded.serve(tf.constant(x)).numpy()
    assert _relative_diff(_keras_output(wrapped, x), actual) <= 1e-4
    np.testing.assert_allclose(
        actual, _keras_output(compact, x), rtol=1e-5, atol=1e-5
    )
    # It holds the compact weights, not masked dense ones.
    saved = sum(int(np.prod(v.shape)) for v in loaded.variables)
    assert saved == keras_chex.count_macs(compact).params


# --- (c) prune_and_regrow(round_to=8) + strip -------------------------------


def _conv_widths(model):
    widths = {}
    for layer in _graph.all_layers(model):
        if isinstance(layer, (keras.layers.Conv2D,
                              keras.layers.DepthwiseConv2D)):
            widths[layer.name] = int(layer.output.shape[-1])
    return widths


@pytest.mark.parametrize("name", ALL)
def test_round_to_8_gives_multiples_of_8_after_strip(name):
    model = _build(name)
    wrapped = keras_chex.prune_and_regrow(
        model, flops=0.5, regrow=0.0, round_to=8, seed=0
    )
    compact = keras_chex.strip(wrapped)

    dense_widths = _conv_widths(model)
    compact_widths = _conv_widths(compact)
    assert set(compact_widths) == set(dense_widths)
    pruned = {n: w for n, w in compact_widths.items() if w != dense_widths[n]}
    assert pruned, "nothing was pruned"
    bad = {n: (dense_widths[n], w) for n, w in pruned.items() if w % 8}
    assert not bad, f"(dense, compact) widths not multiples of 8: {bad}"

    wrapped_counts = keras_chex.count_macs(wrapped)
    compact_counts = keras_chex.count_macs(compact)
    assert compact_counts.macs == wrapped_counts.macs
    # The CHEX state's weight backups are not parameters of the model.
    assert compact_counts.params == wrapped_counts.params
    dense_macs = keras_chex.count_macs(model).macs
    assert compact_counts.macs <= 0.5 * dense_macs

    x = _images(model, 2, seed=15)
    assert _relative_diff(
        _keras_output(wrapped, x), _keras_output(compact, x)
    ) <= 1e-4


# --- (d) `keras-chex export` on a saved wrapped model -----------------------


def test_cli_export_of_a_saved_wrapped_model(tmp_path):
    model = _build("small_cnn")
    wrapped = keras_chex.prune_and_regrow(
        model, flops=0.5, regrow=0.0, round_to=8, seed=0
    )
    model_path = tmp_path / "pruned.keras"
    wrapped.save(model_path)
    counts = keras_chex.count_macs(keras_chex.strip(wrapped))
    tflite_path = tmp_path / "out" / "pruned.tflite"
    saved_model = tmp_path / "out" / "pruned_saved_model"

    command = os.path.join(os.path.dirname(sys.executable), "keras-chex")
    result = subprocess.run(
        [command, "export", str(model_path), "--tflite", str(tflite_path),
         "--saved_model", str(saved_model)],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [l for l in result.stdout.splitlines()
               if l.startswith("pruning")]
    # The masked model counts as the compact one it strips to.
    assert f"{counts.macs:,} MACs" in line and f"{counts.params:,} params" in (
        line)
    assert "[1/3] stripping the pruning model" in result.stdout

    assert tflite_path.read_bytes()[4:8] == b"TFL3"
    x = _images(wrapped, 2, seed=16)
    (actual,) = litert.run_tflite(
        str(tflite_path), {_single_input_name(tflite_path): x}
    )
    assert _relative_diff(_keras_output(wrapped, x), actual) <= 1e-4
    loaded = tf.saved_model.load(str(saved_model))
    served = loaded.serve(tf.constant(x)).numpy()
    assert _relative_diff(_keras_output(wrapped, x), served) <= 1e-4


# --- tools/benchmark_tflite_latency.py helpers -------------------------------


def _load_benchmark_tool():
    return load_tool("benchmark_tflite_latency.py", "benchmark_tflite")


def test_benchmark_interleaves_rounds_and_pairs_ratios():
    tool = _load_benchmark_tool()
    from keras_chex.deploy.latency import LatencyReport

    calls = []
    # Round r slows everything down by (r + 1): paired ratios stay exact.
    base = {"dense.tflite": 8.0, "c1.tflite": 2.0}

    def fake_measure(path, num_threads, runs, warmup):
        calls.append((path, num_threads))
        rnd = sum(1 for p, t in calls if p == path and t == num_threads) - 1
        ms = base[path] * (rnd + 1) / num_threads
        return LatencyReport(path, ms, ms, ms * 0.9, runs, num_threads, 1)

    paths = {"dense": "dense.tflite", "compact r=1": "c1.tflite"}
    results = tool.measure_interleaved(
        paths, [1, 2], rounds=3, runs=5, warmup=1, measure=fake_measure
    )
    # A B for both thread counts, then B A, then A B.
    assert [p for p, _ in calls] == [
        "dense.tflite", "c1.tflite", "dense.tflite", "c1.tflite",
        "c1.tflite", "dense.tflite", "c1.tflite", "dense.tflite",
        "dense.tflite", "c1.tflite", "dense.tflite", "c1.tflite",
    ]
    timing = tool.summarize(results, "compact r=1", "dense", 1)
    assert timing.speedup == pytest.approx(4.0)
    assert timing.median_ms == pytest.approx(4.0)
    assert timing.min_ms == pytest.approx(1.8)
