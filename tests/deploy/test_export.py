"""Tests for keras_chex.deploy.export and `keras-chex export`."""

import os
import subprocess
import sys
import types

from ai_edge_litert.interpreter import Interpreter
import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_chex.deploy import export
from keras_chex.deploy.saved_model import export_saved_model



def _randomize_batchnorm(model, seed=0):
    """Gives every BatchNormalization non-trivial statistics.

    With the initial statistics (mean 0, variance 1) inference-mode and
    training-mode BatchNorm, or a dropped BatchNorm, can look alike; random
    ones make such conversion bugs show in the outputs.
    """
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0.0, 0.5, shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, shape))
            layer.gamma.assign(rng.uniform(0.5, 1.5, shape))
            layer.beta.assign(rng.normal(0.0, 0.2, shape))
    return model


def _small_cnn():
    inputs = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5)(x)
    return _randomize_batchnorm(keras.Model(inputs, outputs, name="small_cnn"))


def _two_input_model():
    # Same shapes on purpose: swapped inputs would convert and run without
    # error, so only the values can reveal a mix-up.
    a = keras.Input((8,), name="zeta")
    b = keras.Input((8,), name="alpha")
    mixed = keras.layers.Dense(4, name="mix_a")(a) - 3.0 * keras.layers.Dense(
        4, name="mix_b"
    )(b)
    head_1 = keras.layers.Dense(3, name="head_1")(mixed)
    head_2 = keras.layers.Dense(2, name="head_2")(keras.layers.ReLU()(mixed))
    return keras.Model([a, b], [head_1, head_2], name="two_input")


@pytest.fixture(scope="module")
def small_cnn():
    return _small_cnn()


@pytest.fixture(scope="module")
def two_input_model():
    return _two_input_model()


# Session scope: a worker may run other modules' tests between these, and
# a module fixture would be built (and exported) again after them.
@pytest.fixture(scope="session")
def mobilenet():
    # Logits instead of the default softmax: a softmax over 1000 random-init
    # classes is ~1e-3 everywhere, which hides errors in relative terms and is
    # below int8's fixed 1/256 output step.
    model = keras.applications.MobileNetV2(
        weights=None,
        input_shape=(96, 96, 3),
        alpha=0.35,
        classifier_activation=None,
    )
    return _randomize_batchnorm(model)


@pytest.fixture(scope="session")
def mobilenet_float32(mobilenet, tmp_path_factory):
    path = tmp_path_factory.mktemp("mobilenet") / "float32.tflite"
    return export.export_tflite(mobilenet, path)


def _tflite_outputs(path, feed):
    """Runs a file with LiteRT directly, independent of keras_chex.deploy.export."""
    runner = Interpreter(model_path=str(path)).get_signature_runner()
    results = runner(**feed)
    names = sorted(results, key=lambda n: int(n.rsplit("_", 1)[1]))
    return [np.array(results[n]) for n in names]


def _relative_diff(expected, actual):
    return np.max(np.abs(expected - actual)) / np.max(np.abs(expected))


def _images(n, seed, shape=(96, 96, 3)):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, (n,) + shape).astype("float32")


# --- MobileNetV2 -----------------------------------------------------------


def test_mobilenet_batchnorm_statistics_matter(mobilenet):
    # Guards the other MobileNet tests: if inference and training mode agreed,
    # a conversion that got BatchNorm wrong would still pass them.
    x = _images(2, seed=1)
    inference = keras.ops.convert_to_numpy(mobilenet(x, training=False))
    training = keras.ops.convert_to_numpy(mobilenet(x, training=True))
    assert _relative_diff(inference, training) > 0.1


def test_mobilenet_float32_matches_keras(mobilenet, mobilenet_float32):
    report = mobilenet_float32
    assert report.verified
    assert report.max_rel_diff <= 1e-4
    x = _images(2, seed=2)
    (actual,) = _tflite_outputs(report.path, {report.inputs[0].name: x})
    expected = keras.ops.convert_to_numpy(mobilenet(x, training=False))
    assert _relative_diff(expected, actual) <= 1e-4


def test_mobilenet_float16_matches_keras_and_halves_size(
    mobilenet, mobilenet_float32, tmp_path
):
    report = export.export_tflite(
        mobilenet, tmp_path / "f16.tflite", quantization="float16"
    )
    assert report.max_rel_diff <= 1e-2
    assert report.size_bytes < 0.6 * mobilenet_float32.size_bytes
    x = _images(2, seed=3)
    (actual,) = _tflite_outputs(report.path, {report.inputs[0].name: x})
    expected = keras.ops.convert_to_numpy(mobilenet(x, training=False))
    assert _relative_diff(expected, actual) <= 1e-2


def test_mobilenet_int8_is_small_and_correlated(
    mobilenet, mobilenet_float32, tmp_path
):
    calibration = _images(16, seed=5)
    report = export.export_tflite(
        mobilenet,
        tmp_path / "int8.tflite",
        quantization="int8",
        representative_data=calibration,
    )
    assert mobilenet_float32.size_bytes / report.size_bytes >= 3.0
    assert report.inputs[0].dtype == "float32"
    assert report.outputs[0].dtype == "float32"
    x = _images(4, seed=6)
    (actual,) = _tflite_outputs(report.path, {report.inputs[0].name: x})
    expected = keras.ops.convert_to_numpy(mobilenet(x, training=False))
    assert np.corrcoef(expected.ravel(), actual.ravel())[0, 1] > 0.95


# --- Small CNN: report, quantization inputs, verification ------------------


def test_float32_report_describes_file(small_cnn, tmp_path):
    path = tmp_path / "sub" / "cnn.tflite"
    report = export.export_tflite(small_cnn, path)
    assert report.path == str(path)
    assert report.size_bytes == os.path.getsize(path)
    assert report.quantization is None
    assert not report.stripped
    assert report.verified and report.num_samples == 1
    assert report.tolerance == 1e-4
    assert report.max_rel_diff <= 1e-4
    assert [(t.name, t.shape, t.dtype) for t in report.inputs] == [
        ("image", (None, 16, 16, 3), "float32")
    ]
    assert [(t.name, t.shape) for t in report.outputs] == [
        ("output_0", (None, 5))
    ]
    text = str(report)
    assert str(path) in text and "max rel diff" in text
    # No temporary file may be left next to the result.
    assert os.listdir(path.parent) == ["cnn.tflite"]
    # Same permissions as any new file (a private temp-file mode would stick).
    reference = tmp_path / "reference"
    reference.write_bytes(b"")
    assert os.stat(path).st_mode == os.stat(reference).st_mode


def test_sample_input_is_used_for_verification(small_cnn, tmp_path):
    x = np.random.default_rng(0).normal(size=(3, 16, 16, 3))
    report = export.export_tflite(
        small_cnn, tmp_path / "cnn.tflite", sample_input=x
    )
    assert report.num_samples == 3
    assert report.max_rel_diff <= 1e-4


def test_verify_false_skips_comparison(small_cnn, tmp_path):
    report = export.export_tflite(
        small_cnn, tmp_path / "cnn.tflite", verify=False
    )
    assert not report.verified
    assert report.max_rel_diff is None
    assert "skipped" in str(report)


def test_dynamic_range_quantizes_weights(tmp_path):
    # Dense weights large enough to be quantized: the converter leaves tensors
    # under 1024 elements in float32.
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    float32 = export.export_tflite(model, tmp_path / "f32.tflite")
    report = export.export_tflite(
        model, tmp_path / "dynamic.tflite", quantization="dynamic"
    )
    assert report.max_rel_diff <= export.DEFAULT_TOLERANCES["dynamic"]
    assert report.size_bytes < 0.5 * float32.size_bytes
    assert report.inputs[0].dtype == report.outputs[0].dtype == "float32"
    details = Interpreter(model_path=report.path).get_tensor_details()
    assert any(d["dtype"] == np.int8 for d in details)
    x = np.random.default_rng(4).normal(size=(3, 64)).astype("float32")
    (actual,) = _tflite_outputs(report.path, {report.inputs[0].name: x})
    expected = keras.ops.convert_to_numpy(model(x))
    tolerance = export.DEFAULT_TOLERANCES["dynamic"]
    assert _relative_diff(expected, actual) <= tolerance


def _cnn_calibration(n=8, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 16, 16, 3)).astype("f")


@pytest.mark.parametrize(
    "make_data",
    [
        pytest.param(lambda: _cnn_calibration(), id="numpy"),
        pytest.param(
            lambda: lambda: (_cnn_calibration(4, s) for s in range(2)),
            id="callable",
        ),
        pytest.param(
            # (x, y) batches, as a training dataset yields them.
            lambda: tf.data.Dataset.from_tensor_slices(
                (_cnn_calibration(), np.zeros((8, 5), "f"))
            ).batch(4),
            id="dataset",
        ),
    ],
)
def test_int8_accepts_representative_data_forms(small_cnn, tmp_path, make_data):
    report = export.export_tflite(
        small_cnn,
        tmp_path / "int8.tflite",
        quantization="int8",
        representative_data=make_data(),
    )
    assert report.quantization == "int8"
    assert report.max_rel_diff <= export.DEFAULT_TOLERANCES["int8"]
    details = Interpreter(model_path=report.path).get_tensor_details()
    assert any(d["dtype"] == np.int8 for d in details)


def test_int8_io_makes_integer_inputs_and_outputs(small_cnn, tmp_path):
    report = export.export_tflite(
        small_cnn,
        tmp_path / "int8_io.tflite",
        quantization="int8",
        representative_data=_cnn_calibration(),
        int8_io=True,
    )
    assert report.inputs[0].dtype == "int8"
    assert report.inputs[0].quantization is not None
    assert report.outputs[0].dtype == "int8"
    assert report.max_rel_diff <= export.DEFAULT_TOLERANCES["int8"]
    assert "int8 inputs/outputs" in str(report)


def test_two_input_model_feeds_inputs_by_name(two_input_model, tmp_path):
    report = export.export_tflite(two_input_model, tmp_path / "two.tflite")
    assert [t.name for t in report.inputs] == ["zeta", "alpha"]
    assert [t.shape for t in report.outputs] == [(None, 3), (None, 2)]
    assert report.max_rel_diff <= 1e-4

    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(2, 4, 8)).astype("float32")
    expected = [
        keras.ops.convert_to_numpy(t) for t in two_input_model([a, b])
    ]
    actual = _tflite_outputs(report.path, {"zeta": a, "alpha": b})
    for want, got in zip(expected, actual):
        assert _relative_diff(want, got) <= 1e-4
    swapped = _tflite_outputs(report.path, {"zeta": b, "alpha": a})
    assert _relative_diff(expected[0], swapped[0]) > 1e-2


def test_two_input_model_int8_with_tuple_batches(two_input_model, tmp_path):
    rng = np.random.default_rng(8)

    def batches():
        # A shared generator: each call yields new data, so verification must
        # use the samples the converter calibrated on, not a second call.
        for _ in range(16):
            yield tuple(rng.normal(size=(2, 4, 8)).astype("float32"))

    report = export.export_tflite(
        two_input_model,
        tmp_path / "two_int8.tflite",
        quantization="int8",
        representative_data=batches,
    )
    assert report.num_samples == 4
    assert report.max_rel_diff <= export.DEFAULT_TOLERANCES["int8"]


# --- Errors -----------------------------------------------------------------


def test_unknown_quantization_lists_valid_values(small_cnn, tmp_path):
    with pytest.raises(ValueError, match="'float16', 'dynamic', 'int8'"):
        export.export_tflite(
            small_cnn, tmp_path / "m.tflite", quantization="int4"
        )


def test_int8_without_representative_data(small_cnn, tmp_path):
    with pytest.raises(ValueError, match="representative_data="):
        export.export_tflite(
            small_cnn, tmp_path / "m.tflite", quantization="int8"
        )


@pytest.mark.parametrize(
    "data, message",
    [
        ([np.zeros((16, 16, 3))], "got list"),
        ((np.zeros((1, 16, 16, 3)) for _ in range(2)), "generator"),
    ],
    ids=["list", "generator"],
)
def test_bad_representative_data_type(small_cnn, tmp_path, data, message):
    with pytest.raises(TypeError, match=message):
        export.export_tflite(
            small_cnn,
            tmp_path / "m.tflite",
            quantization="int8",
            representative_data=data,
        )
    assert not (tmp_path / "m.tflite").exists()


def test_representative_data_needs_int8(small_cnn, tmp_path):
    with pytest.raises(ValueError, match="only used with quantization='int8'"):
        export.export_tflite(
            small_cnn,
            tmp_path / "m.tflite",
            quantization="dynamic",
            representative_data=_cnn_calibration(),
        )


def test_int8_io_needs_int8(small_cnn, tmp_path):
    with pytest.raises(ValueError, match="int8_io"):
        export.export_tflite(small_cnn, tmp_path / "m.tflite", int8_io=True)


def test_wrong_sample_input_shape_names_argument(small_cnn, tmp_path):
    with pytest.raises(ValueError, match="sample_input.*expects"):
        export.export_tflite(
            small_cnn,
            tmp_path / "m.tflite",
            sample_input=np.zeros((1, 8, 8, 3)),
        )
    assert not (tmp_path / "m.tflite").exists()


def test_not_a_model(tmp_path):
    with pytest.raises(TypeError, match="keras.Model"):
        export.export_tflite(lambda x: x, tmp_path / "m.tflite")


def test_existing_file_is_not_overwritten(small_cnn, tmp_path):
    path = tmp_path / "m.tflite"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export.export_tflite(small_cnn, path)
    assert path.read_bytes() == b"keep me"

    export.export_tflite(small_cnn, path, overwrite=True)
    # Bytes 4..8 of a TFLite flatbuffer are its file identifier.
    assert path.read_bytes()[4:8] == b"TFL3"


def test_verification_failure_names_file_and_keeps_old_one(small_cnn, tmp_path):
    path = tmp_path / "m.tflite"
    path.write_bytes(b"previous export")
    # float16 rounding differs from float32 Keras, so a zero tolerance fails.
    with pytest.raises(export.ExportVerificationError) as info:
        export.export_tflite(
            small_cnn, path, quantization="float16", tolerance=0.0,
            overwrite=True,
        )
    message = str(info.value)
    assert str(path) in message and "max relative difference" in message
    assert path.read_bytes() == b"previous export"
    assert os.listdir(tmp_path) == ["m.tflite"]


def test_negative_tolerance(small_cnn, tmp_path):
    with pytest.raises(ValueError, match="tolerance"):
        export.export_tflite(small_cnn, tmp_path / "m.tflite", tolerance=-1.0)


# --- Stripping hook ---------------------------------------------------------


def _fake_stripping(monkeypatch, wrapped, strip):
    """Installs a stand-in for keras_chex.core.stripping.

    The real module needs pruning wrappers; here `wrapped` is simply declared
    wrapped, and `strip` decides what stripping returns.
    """
    fake = types.ModuleType("keras_chex.core.stripping")
    fake.is_wrapped = lambda model: model is wrapped
    fake.strip = strip
    monkeypatch.setitem(sys.modules, "keras_chex.core.stripping", fake)
    monkeypatch.setattr(
        sys.modules["keras_chex.core"], "stripping", fake, raising=False
    )


def _renamed_copy(model, input_name, weight_scale=1.0):
    """A copy of `model` with a new input name and optionally scaled weights."""
    copy = keras.models.clone_model(
        model, input_tensors=keras.Input(model.input_shape[1:], name=input_name)
    )
    copy.set_weights([w * weight_scale for w in model.get_weights()])
    return copy


def test_wrapped_model_is_stripped_first(small_cnn, tmp_path, monkeypatch):
    stripped = _renamed_copy(small_cnn, "stripped_image")
    _fake_stripping(monkeypatch, small_cnn, lambda model: stripped)

    report = export.export_tflite(small_cnn, tmp_path / "m.tflite")
    assert report.stripped
    assert report.inputs[0].name == "stripped_image"
    assert "stripped:      yes" in str(report)

    path = export_saved_model(small_cnn, tmp_path / "sm")
    reloaded = tf.saved_model.load(path)
    signature = reloaded.signatures["serve"].structured_input_signature
    assert "stripped_image" in str(signature)


def test_verification_compares_with_the_wrapped_model(
    small_cnn, tmp_path, monkeypatch
):
    # A stripping bug (here: changed weights) must fail verification, since
    # the file is compared with the model as passed, not the stripped one.
    broken = _renamed_copy(small_cnn, "stripped_image", weight_scale=1.5)
    _fake_stripping(monkeypatch, small_cnn, lambda model: broken)
    with pytest.raises(export.ExportVerificationError):
        export.export_tflite(small_cnn, tmp_path / "m.tflite")
    assert not (tmp_path / "m.tflite").exists()


# --- SavedModel -------------------------------------------------------------


def test_saved_model_round_trip(small_cnn, tmp_path):
    path = export_saved_model(small_cnn, tmp_path / "sm")
    assert path == str(tmp_path / "sm")
    x = np.random.default_rng(9).normal(size=(2, 16, 16, 3)).astype("float32")
    reloaded = tf.saved_model.load(path)
    actual = reloaded.serve(tf.constant(x)).numpy()
    expected = keras.ops.convert_to_numpy(small_cnn(x, training=False))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_saved_model_round_trip_two_inputs(two_input_model, tmp_path):
    path = export_saved_model(two_input_model, tmp_path / "sm")
    a, b = np.random.default_rng(10).normal(size=(2, 3, 8)).astype("float32")
    # Keep the loaded object alive: its functions only hold weak references
    # to the variables.
    reloaded = tf.saved_model.load(path)
    actual = reloaded.serve([tf.constant(a), tf.constant(b)])
    expected = two_input_model([a, b])
    for want, got in zip(expected, actual):
        np.testing.assert_allclose(
            got.numpy(), keras.ops.convert_to_numpy(want), rtol=1e-5, atol=1e-6
        )


def test_saved_model_overwrite_rules(small_cnn, tmp_path):
    path = export_saved_model(small_cnn, tmp_path / "sm")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_saved_model(small_cnn, path)
    assert export_saved_model(small_cnn, path, overwrite=True) == path
    assert os.path.exists(os.path.join(path, "saved_model.pb"))

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="saved_model.pb"):
        export_saved_model(small_cnn, other, overwrite=True)
    assert (other / "todo.txt").read_text() == "mine"


# --- `keras-chex export` ----------------------------------------------------


def _run_cli(*args):
    command = os.path.join(os.path.dirname(sys.executable), "keras-chex")
    return subprocess.run(
        [command, "export", *map(str, args)], capture_output=True, text=True,
        timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))


def test_cli_exports_int8_and_saved_model_and_never_overwrites(
        small_cnn, tmp_path):
    model_path = tmp_path / "cnn.keras"
    small_cnn.save(model_path)
    data_path = tmp_path / "calibration.npy"
    np.save(data_path, _cnn_calibration())
    tflite_path = tmp_path / "out" / "cnn_int8.tflite"
    saved_model = tmp_path / "out" / "cnn_saved_model"

    result = _run_cli(model_path, "--tflite", tflite_path, "--saved_model",
                      saved_model, "--quantization=int8",
                      "--representative", data_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert tflite_path.read_bytes()[4:8] == b"TFL3"
    assert (saved_model / "saved_model.pb").exists()
    assert result.stdout.startswith("model ")
    assert "converting to TFLite (int8 (int8 weights and activations" in (
        result.stdout)
    # SavedModel's INFO lines ("Assets written", signatures) stay hidden.
    assert "Assets written" not in result.stdout + result.stderr

    # A second run must refuse to replace the files, and leave them.
    size = tflite_path.stat().st_size
    again = _run_cli(model_path, "--saved_model", saved_model)
    assert again.returncode == 2
    assert "exists; pass --overwrite" in again.stderr
    assert again.stderr.count("\n") == 1  # One line, no traceback.
    assert tflite_path.stat().st_size == size
    assert (saved_model / "saved_model.pb").exists()


def test_export_hides_tensorflow_info_lines_but_not_warnings(
        small_cnn, tmp_path):
    import logging as std_logging

    from absl import logging as absl_logging

    records = []

    class Catch(std_logging.Handler):
        def emit(self, record):
            records.append((record.levelno, record.getMessage()))

    handler = Catch(level=std_logging.DEBUG)
    tf_logger = std_logging.getLogger("tensorflow")
    tf_logger.addHandler(handler)
    before = absl_logging.get_verbosity(), tf_logger.level
    absl_logging.set_verbosity(absl_logging.INFO)  # As absl.app.run does.
    tf_logger.setLevel(std_logging.INFO)
    try:
        export.export_tflite(small_cnn, tmp_path / "m.tflite")
        export_saved_model(small_cnn, tmp_path / "sm")
        with export.quiet_tensorflow_info():
            tf_logger.warning("a real warning")
    finally:
        tf_logger.removeHandler(handler)
        absl_logging.set_verbosity(before[0])
        tf_logger.setLevel(before[1])
    assert not any("Assets written" in m for _, m in records), records
    assert (std_logging.WARNING, "a real warning") in records
    assert tf_logger.level == before[1]


# --- what the user sees: stage lines, no LiteRT INFO line ---------------------


def test_verbose_export_prints_each_stage_and_quiet_prints_nothing(
        tmp_path, capsys):
    model = _small_cnn()
    export.export_tflite(model, tmp_path / "quiet.tflite")
    assert capsys.readouterr().out == ""
    export.export_tflite(model, tmp_path / "loud.tflite", verbose=True)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("[1/2] converting to TFLite (none (float32)) ")
    assert lines[1].startswith("[2/2] verifying the file against Keras on 1 ")
    assert all(line.endswith(" s") for line in lines)
    export.export_tflite(model, tmp_path / "unverified.tflite", verify=False,
                         verbose=True)
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("[1/1] converting")


_ALLOCATE = """
import sys
from ai_edge_litert.interpreter import Interpreter
import numpy as np
from keras_chex.deploy import litert
if sys.argv[2] == "raw":
    Interpreter(model_path=sys.argv[1]).allocate_tensors()
else:
    litert.run_tflite(sys.argv[1], {"image": np.zeros((2, 16, 16, 3),
                                                     np.float32)})
print("ran")
"""


def test_litert_delegate_line_is_dropped(tmp_path):
    # LiteRT prints the line once per process, so each case is a process.
    path = tmp_path / "m.tflite"
    export.export_tflite(_small_cnn(), path, verify=False)
    err = {}
    for mode in ("raw", "ours"):
        result = subprocess.run(
            [sys.executable, "-c", _ALLOCATE, str(path), mode],
            capture_output=True, text=True, timeout=300)
        assert result.stdout.strip() == "ran", result.stderr[-2000:]
        err[mode] = result.stderr
    assert "XNNPACK delegate" in err["raw"]  # Control: LiteRT writes it.
    assert "XNNPACK" not in err["ours"]


_STARTUP = """
import {module} as m
import tensorflow as tf
tf.config.list_physical_devices()
print("ran")
"""


def _stderr_of(script, *args):
    """stderr of `python -c script *args` with TensorFlow's full log; the
    script must print "ran"."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES="",
                 TF_CPP_MIN_LOG_LEVEL="0"))
    assert result.stdout.strip() == "ran", result.stderr[-3000:]
    return result.stderr


def _lines_matching(text, patterns):
    return [line for line in text.splitlines()
            if any(p.search(line) for p in patterns)]


def test_importing_keras_chex_hides_tensorflows_start_up_notes():
    from keras_chex import _native_stderr

    err = {module: _stderr_of(_STARTUP.format(module=module))
           for module in ("tensorflow", "keras_chex")}
    notes = _native_stderr.TENSORFLOW_STARTUP
    # Control: on this machine a plain import writes some of them.
    assert _lines_matching(err["tensorflow"], notes)
    assert _lines_matching(err["keras_chex"], notes) == []


def test_start_up_filter_keeps_other_lines(capfd):
    from keras_chex import _native_stderr

    with _native_stderr.drop_native_lines(*_native_stderr.TENSORFLOW_STARTUP):
        os.write(2, b"I0000 00:00:1.0 1 cudart_stub.cc:31] Could not find "
                    b"cuda drivers on your machine, GPU will not be used.\n")
        os.write(2, b"W0000 00:00:1.0 1 op_kernel.cc:1] a real warning\n")
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() "
                    b"is called are written to STDERR\n")
    assert capfd.readouterr().err == (
        "W0000 00:00:1.0 1 op_kernel.cc:1] a real warning\n")


def test_dropping_native_lines_keeps_everything_else(capfd):
    from keras_chex import _native_stderr

    with _native_stderr.drop_native_lines(_native_stderr.XNNPACK_INFO):
        os.write(2, b"a real warning\n")
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for "
                    b"CPU.\n")
        os.write(2, b"an error\n")
    assert capfd.readouterr().err == "a real warning\nan error\n"
    with _native_stderr.drop_native_lines(drop_all=True):
        os.write(2, b"start-up note\n")
    assert capfd.readouterr().err == ""


_CONVERT = """
import sys
import keras_chex
import keras
import numpy as np
import tensorflow as tf
from keras import layers

inp = keras.Input((8, 8, 3))
x = layers.BatchNormalization()(layers.Conv2D(8, 3)(inp))
model = keras.Model(inp, layers.Dense(2)(layers.GlobalAveragePooling2D()(x)))
calibration = np.random.default_rng(0).uniform(size=(4, 8, 8, 3))
if sys.argv[1] == "raw":
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        model.export(d, verbose=False)
        tf.lite.TFLiteConverter.from_saved_model(d).convert()
else:
    keras_chex.export_tflite(model, sys.argv[2] + "/f.tflite")
    keras_chex.export_tflite(
        model, sys.argv[2] + "/q.tflite", quantization="int8",
        representative_data=calibration.astype("float32"))
    # A pruning model saved right after its masks changed: a real warning.
    keras_chex.export_tflite(keras_chex.prune_and_regrow(model, flops=0.5),
                             sys.argv[2] + "/p.tflite")
print("ran")
"""


def test_export_from_python_hides_the_converters_notes_not_warnings(
        tmp_path):
    from keras_chex import _native_stderr

    err = {mode: _stderr_of(_CONVERT, mode, str(tmp_path))
           for mode in ("raw", "ours")}
    notes = _native_stderr.TFLITE_CONVERTER
    # Control: the converter prints them.
    assert len(_lines_matching(err["raw"], notes)) >= 5
    assert _lines_matching(err["ours"], notes) == [], err["ours"]
    assert "fully_quantize" not in err["ours"]
    assert "recalibrate_batchnorm" in err["ours"]  # The real warning stays.


def test_converter_filter_keeps_other_lines(capfd):
    from keras_chex import _native_stderr

    with _native_stderr.drop_native_lines(*_native_stderr.TFLITE_CONVERTER):
        os.write(2, b"I0000 00:00:1.0 1 reader.cc:83] Reading SavedModel "
                    b"from: /tmp/x\n")
        os.write(2, b"fully_quantize: 0, inference_type: 6, "
                    b"input_inference_type: FLOAT32\n")
        os.write(2, b"W0000 00:00:1.0 1 convert.cc:1] op not supported\n")
    assert capfd.readouterr().err == (
        "W0000 00:00:1.0 1 convert.cc:1] op not supported\n")
