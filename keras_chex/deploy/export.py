"""Export compact Keras models to TFLite and SavedModel, and prove them right.

`export_tflite()` converts a plain Keras 3 model (or a keras-chex pruning model,
which is stripped first) to a `.tflite` file with `tf.lite.TFLiteConverter`,
optionally quantized, then runs the file with the LiteRT interpreter
(`ai_edge_litert`) and compares it with Keras inference before keeping it.
(`saved_model.py` writes SavedModels, `litert.py` runs files, `input_data.py`
reads the batches users pass.)

Conversion path: the model is first written to a temporary SavedModel through
`keras.export.ExportArchive` with an endpoint that calls the model with
`training=False`, and that directory is converted with
`tf.lite.TFLiteConverter.from_saved_model()`. This is the path Keras 3's own
LiteRT exporter and TF 2.21's `from_keras_model()` take for Keras 3 models, but
done explicitly, because `from_keras_model()` silently falls back to a legacy
graph-freezing pipeline when the SavedModel step fails, and because writing our
own endpoint gives the TFLite signature stable input names (the Keras input
names) and output names (`output_0`, `output_1`, ... in `keras.tree.flatten()`
order of the model outputs), which verification relies on to feed and compare
multi-input and multi-output models correctly.
`from_concrete_functions()` is not used: with Keras 3 models it keeps the
variables as VAR_HANDLE/READ_VARIABLE ops instead of constants (a
MobileNetV2 file of 180 KB instead of 6.7 MB that outputs NaN).

Only TFLite builtin ops are allowed (no `SELECT_TF_OPS`), so every file this
module writes runs on a stock LiteRT runtime.

Example:

```python
report = keras_chex.export_tflite(model, "model.tflite")
print(report)  # size, inputs/outputs, max difference to Keras
```
"""

import contextlib
import dataclasses
import logging as std_logging
import os
import tempfile
import uuid
import warnings

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from keras_chex import _native_stderr
from keras_chex.deploy import input_data
from keras_chex.deploy import progress
from keras_chex.deploy import litert

QUANTIZATION_MODES = (None, "float16", "dynamic", "int8")

# Default verification tolerances on the relative difference (max abs
# difference / max abs Keras output). float32 and float16 are tight because
# only rounding differs. The quantized modes are meant to catch a broken
# conversion (e.g. BatchNorm in training mode, swapped inputs), which shows as
# an O(1) difference, not to judge quantization quality: judge that with your
# validation metric. Random-weight MobileNetV2-0.35 measures ~0.8% (dynamic)
# and ~1% (int8), trained models are often worse.
DEFAULT_TOLERANCES = {
    None: 1e-4,
    "float16": 1e-2,
    "dynamic": 5e-2,
    "int8": 2e-1,
}


class ExportVerificationError(RuntimeError):
    """The exported file's outputs differ from Keras beyond the tolerance."""


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What `export_tflite()` wrote and how closely it matches Keras.

    Attributes:
        path: Path of the written `.tflite` file.
        size_bytes: File size in bytes.
        quantization: The `quantization` argument (`None` means float32).
        int8_io: Whether the file's inputs and outputs are int8 (else float32).
        stripped: Whether the model was a keras-chex pruning model that was
            stripped to plain Keras layers before conversion.
        inputs: `litert.TensorInfo` per input, in the model's input order.
        outputs: `litert.TensorInfo` per output, in `keras.tree.flatten()`
            order of the model outputs.
        verified: Whether the file was run and compared with Keras.
        max_abs_diff: Max absolute difference over all outputs (`None` if not
            verified).
        max_rel_diff: Max over outputs of max absolute difference divided by
            the output's max absolute Keras value (`None` if not verified).
        tolerance: The `max_rel_diff` limit that was enforced (`None` if not
            verified).
        num_samples: Batch size of the verification input (0 if not
            verified).
    """

    path: str
    size_bytes: int
    quantization: str | None
    int8_io: bool
    stripped: bool
    inputs: tuple
    outputs: tuple
    verified: bool
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    tolerance: float | None = None
    num_samples: int = 0

    def __str__(self):
        quant = _describe_quantization(self.quantization, self.int8_io)
        lines = [
            f"TFLite file:   {self.path}",
            f"size:          {_format_size(self.size_bytes)} "
            f"({self.size_bytes:,} bytes)",
            f"quantization:  {quant}",
            "stripped:      "
            + ("yes (pruning wrappers removed)" if self.stripped else "no"),
        ]
        lines += [f"input:         {t}" for t in self.inputs]
        lines += [f"output:        {t}" for t in self.outputs]
        if self.verified:
            lines.append(
                f"verification:  max abs diff {self.max_abs_diff:.3g}, max rel "
                f"diff {self.max_rel_diff:.3g} (tolerance {self.tolerance:g}) "
                f"on {self.num_samples} sample(s)"
            )
        else:
            lines.append("verification:  skipped (verify=False)")
        return "\n".join(lines)


def strip_if_wrapped(model):
    """Returns a plain Keras model: `model` itself, or its stripped form.

    Args:
        model: A `keras.Model`, plain or a keras-chex pruning (wrapped) model.

    Returns:
        A tuple `(plain_model, stripped)` where `stripped` tells whether
        `keras_chex.strip()` was applied.

    Example:

    ```python
    plain, stripped = strip_if_wrapped(model)
    ```
    """
    try:
        from keras_chex.core import stripping
    except ModuleNotFoundError as e:
        # Without the stripping module no wrapped model can exist. Any other
        # missing module is a real error inside `stripping` and must surface.
        if e.name != "keras_chex.core.stripping":
            raise
        return model, False
    if not stripping.is_wrapped(model):
        return model, False
    logging.info(
        "Model %r is a keras-chex pruning model: stripping it to plain Keras "
        "layers before export.",
        model.name,
    )
    return stripping.strip(model), True


def export_tflite(
    model,
    path,
    *,
    quantization=None,
    representative_data=None,
    verify=True,
    sample_input=None,
    overwrite=False,
    int8_io=False,
    tolerance=None,
    verbose=False,
    input_shape=None,
):
    """Converts a Keras model to a `.tflite` file and checks it against Keras.

    A keras-chex pruning model is stripped to plain Keras layers first (logged,
    and recorded as `report.stripped`). The file is written to a temporary name
    next to `path`, verified, and only then moved to `path`, so a failed export
    never leaves a file behind nor replaces an existing one.

    Quantization modes:

    - `None`: float32.
    - `"float16"`: float16 weights (about half the size); computation is
      float32 on CPU.
    - `"dynamic"`: dynamic-range quantization: int8 weights, activations
      quantized on the fly (about 4x smaller, no calibration data).
    - `"int8"`: full integer quantization: int8 weights and activations,
      calibrated on `representative_data`. Inputs and outputs stay float32
      (quantize/dequantize ops are added at the edges) so the file is a
      drop-in replacement; pass `int8_io=True` for int8 inputs and outputs,
      as integer-only accelerators need.

    Verification runs the file with `ai_edge_litert.interpreter.Interpreter`
    and the model as passed (`training=False`; for a pruning model the
    wrapped model, so stripping is checked too) on the same input and
    compares every output.
    The relative difference is the max absolute difference divided by the max
    absolute Keras output. Default tolerances (`DEFAULT_TOLERANCES`): float32
    1e-4, float16 1e-2, dynamic 5e-2, int8 2e-1. The quantized limits only
    catch broken conversions; measure accuracy on real data for quality.

    Args:
        model: A built Functional or Sequential `keras.Model`, plain or a
            keras-chex pruning model.
        path: Destination file path (str or path-like). Parent directories are
            created.
        quantization: One of `None`, `"float16"`, `"dynamic"`, `"int8"`.
        representative_data: Calibration inputs, required for `"int8"` and
            rejected otherwise. One of: a callable returning an iterable of
            input batches, a `tf.data.Dataset` of input batches, or a NumPy
            array of samples (first axis) for a single-input model. A batch is
            an array (single input), a list/tuple with one array per model
            input, or a dict keyed by input name; `(x, y)` and
            `(x, y, sample_weight)` tuples are accepted as in `Model.fit()`
            and the targets ignored. At most 500 samples are used.
        verify: Whether to run and compare the file before keeping it.
        sample_input: Verification input in the same forms as a batch above.
            Defaults to a deterministic random batch of 1 (standard normal for
            float inputs, 0/1 for integer inputs), or for `"int8"` to the
            first few calibration samples.
        overwrite: Whether to replace an existing file at `path`.
        int8_io: Only for `"int8"`: make the file's inputs and outputs int8.
            Verification then quantizes `sample_input` and dequantizes the
            outputs with the file's scales.
        tolerance: Maximum allowed relative difference, overriding the default
            for the quantization mode.
        verbose: Print each stage (strip, convert, verify) as it starts and
            its time when done; conversion can take minutes on big models.
        input_shape: The input size the file is converted and verified at,
            without the batch axis (a list for several inputs). Required
            for a model of free spatial size (`keras.Input((None, None,
            3))`), whose TFLite file cannot run at a size it was not
            converted for; a model wrapped with `input_shape=` uses that
            one by default. A model of fixed size needs none.

    Returns:
        An `ExportReport`.

    Raises:
        ValueError: Unknown `quantization`, `"int8"` without
            `representative_data`, `representative_data` or `int8_io` with
            another mode, bad `tolerance`, or inputs of the wrong shape.
        TypeError: `model` is not a Keras model or `representative_data` is
            not one of the accepted types.
        FileExistsError: `path` exists and `overwrite` is False.
        ExportVerificationError: The outputs differ beyond the tolerance.

    Example:

    ```python
    report = export_tflite(
        model,
        "model_int8.tflite",
        quantization="int8",
        representative_data=x_train[:200],
    )
    print(report.size_bytes, report.max_rel_diff)
    ```
    """
    _check_quantization(quantization, representative_data, int8_io)
    tolerance = _resolve_tolerance(quantization, tolerance)
    path = os.fspath(path)
    _check_file_destination(path, overwrite)
    # Verification compares with the model as given, so for a pruning model
    # it also checks that stripping preserved its outputs.
    reference = _check_model(model)
    from keras_chex.core import stripping

    stages = progress.Stages(
        verbose, (["strip"] if stripping.is_wrapped(reference) else [])
        + ["convert"] + (["verify"] if verify else []))
    with stages.run("strip", "stripping the pruning model"):
        model, stripped = strip_if_wrapped(reference)
    model = _at_export_shape(model, reference, input_shape)
    names = input_data.signature_input_names(model)
    # Argument errors surface before the slow conversion, not after it.
    if representative_data is not None:
        input_data.check_representative_data(representative_data, model)
    if verify and sample_input is not None:
        sample_input = input_data.as_input_arrays(
            sample_input, model, names, "sample_input"
        )

    calibration = None
    if quantization == "int8":
        calibration = input_data.Calibration(representative_data, model, names)
    with stages.run("convert", "converting to TFLite ("
                    f"{_describe_quantization(quantization, int8_io)})"):
        tflite_bytes = _convert(model, names, quantization, calibration,
                                int8_io)

    with _staged_file(path, tflite_bytes) as staged_path:
        inputs, outputs = litert.tensor_infos(staged_path, names)
        if verify:
            if sample_input is None:
                sample_input = input_data.default_sample_input(
                    model, calibration)
            sample = input_data.as_input_arrays(
                sample_input, model, names, "sample_input"
            )
            with stages.run("verify", "verifying the file against Keras "
                            f"on {len(sample[0])} input(s)"):
                diffs = _compare_with_keras(reference, staged_path, names,
                                            sample)
            _check_tolerance(path, quantization, diffs, tolerance)

    return ExportReport(
        path=path,
        size_bytes=os.path.getsize(path),
        quantization=quantization,
        int8_io=int8_io,
        stripped=stripped,
        inputs=inputs,
        outputs=outputs,
        verified=verify,
        max_abs_diff=diffs[0] if verify else None,
        max_rel_diff=diffs[1] if verify else None,
        tolerance=tolerance if verify else None,
        num_samples=len(sample[0]) if verify else 0,
    )


@contextlib.contextmanager
def quiet_tensorflow_info():
    """Hides TensorFlow's INFO lines ("Assets written to", signature
    renames, fingerprints) while we convert; warnings and errors still show.

    TensorFlow logs them through its Python logger `tensorflow` and through
    absl, which `absl.app.run` sets to INFO. A user who asked for debug
    output (absl `--verbosity=1`) still gets them.
    """
    if logging.get_verbosity() > logging.INFO:  # DEBUG = 1 > INFO = 0.
        yield
        return
    tf_logger = std_logging.getLogger("tensorflow")
    before = logging.get_verbosity(), tf_logger.level
    logging.set_verbosity(min(before[0], logging.WARNING))
    tf_logger.setLevel(max(before[1], std_logging.WARNING))
    try:
        yield
    finally:
        logging.set_verbosity(before[0])
        tf_logger.setLevel(before[1])


@contextlib.contextmanager
def _staged_file(path, content):
    """Writes `content` next to `path`; moves it to `path` on a clean exit.

    Yields the temporary path. If the body raises, the temporary file is
    removed and `path` is left as it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    staged = os.path.join(
        directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp"
    )
    try:
        # Not tempfile.mkstemp: its 0600 mode would carry over to the result.
        with open(staged, "xb") as f:
            f.write(content)
        yield staged
        os.replace(staged, path)
    finally:
        if os.path.exists(staged):
            os.remove(staged)


def _check_tolerance(path, quantization, diffs, tolerance):
    """Raises `ExportVerificationError` if the difference is too large."""
    max_abs, max_rel = diffs
    if max_rel <= tolerance:
        return
    raise ExportVerificationError(
        f"TFLite verification failed for {path!r} "
        f"(quantization={quantization!r}): max relative difference "
        f"{max_rel:.3g} (max abs difference {max_abs:.3g}) exceeds the "
        f"tolerance {tolerance:g}. Nothing was written. If the model is "
        "correct and the difference expected, pass a larger `tolerance=` or "
        "`verify=False`."
    )


def _check_quantization(quantization, representative_data, int8_io):
    """Raises if the quantization arguments don't fit together."""
    if quantization not in QUANTIZATION_MODES:
        raise ValueError(
            f"Unknown quantization={quantization!r}. Valid values are: "
            f"{', '.join(repr(q) for q in QUANTIZATION_MODES)}."
        )
    if quantization == "int8" and representative_data is None:
        raise ValueError(
            "quantization='int8' needs calibration data: pass "
            "`representative_data=` a NumPy array of input samples, a "
            "tf.data.Dataset of input batches, or a callable returning an "
            "iterable of input batches (a few hundred samples from the "
            "training set are enough)."
        )
    if quantization != "int8" and representative_data is not None:
        raise ValueError(
            "`representative_data` is only used with quantization='int8', "
            f"got quantization={quantization!r}. Drop the argument, or use "
            "quantization='int8' for calibrated full-integer quantization."
        )
    if int8_io and quantization != "int8":
        raise ValueError(
            "`int8_io=True` needs quantization='int8', got "
            f"quantization={quantization!r}."
        )


def _resolve_tolerance(quantization, tolerance):
    """Returns the relative tolerance to enforce."""
    if tolerance is None:
        return DEFAULT_TOLERANCES[quantization]
    if isinstance(tolerance, bool) or not np.isfinite(tolerance):
        raise ValueError(
            f"`tolerance` must be a finite number, got {tolerance!r}."
        )
    if tolerance < 0:
        raise ValueError(f"`tolerance` must be >= 0, got {tolerance!r}.")
    return float(tolerance)


def _at_export_shape(model, reference, input_shape):
    """`model` at the size to convert at: `input_shape`, else the one the
    pruning model was wrapped with, else its own fixed size."""
    from keras_chex.core import input_shapes

    if input_shape is None and hasattr(reference, "pruning_config"):
        input_shape = reference.pruning_config.get("input_shape")
    return input_shapes.at_fixed_size(
        model, input_shape, "and a TFLite file runs only at the size it was "
        "converted for", "`export_tflite(model, path, input_shape=(224, 224, "
        "3))`, say")


def _check_model(model):
    """Raises unless `model` is a Keras model with known inputs."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a keras.Model, got {type(model).__name__}."
        )
    try:
        model.inputs
    except (AttributeError, ValueError) as e:
        raise ValueError(
            f"`model` {model.name!r} has no defined inputs. Export needs a "
            "Functional model or a Sequential model that starts with "
            "keras.Input(); wrap a subclassed model with "
            "`inputs = keras.Input(shape); keras.Model(inputs, model(inputs))`."
        ) from e
    if not model.inputs:
        raise ValueError(
            f"`model` {model.name!r} has no inputs; build it first."
        )
    return model


def _check_file_destination(path, overwrite):
    """Raises if `path` can't or mustn't be written."""
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"`path` {path!r} is a directory; pass a file path such as "
            f"{os.path.join(path, 'model.tflite')!r}."
        )
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"{path!r} already exists. Pass `overwrite=True` to replace it, or "
            "choose another path."
        )


def _convert(model, names, quantization, calibration, int8_io):
    """Converts `model` to TFLite flatbuffer bytes."""
    with tempfile.TemporaryDirectory() as saved_model_dir, \
            quiet_tensorflow_info():
        _write_inference_saved_model(model, names, saved_model_dir)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantization is not None:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantization == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if quantization == "int8":
            converter.representative_dataset = calibration
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.TFLITE_BUILTINS_INT8
            ]
            if int8_io:
                converter.inference_input_type = tf.int8
                converter.inference_output_type = tf.int8
        with warnings.catch_warnings():
            # TF's int8 calibrator uses tf.lite.Interpreter internally; its
            # deprecation warning is not actionable for our callers.
            warnings.filterwarnings(
                "ignore", message=r"(?s).*tf\.lite\.Interpreter is deprecated"
            )
            with _native_stderr.drop_native_lines(
                    *_native_stderr.TFLITE_CONVERTER):
                return converter.convert()


def _write_inference_saved_model(model, names, directory):
    """Writes a SavedModel whose endpoint runs `model` with training=False."""
    specs = [
        tf.TensorSpec(tuple(t.shape), t.dtype, name=name)
        for t, name in zip(model.inputs, names)
    ]

    def serve(*flat_inputs):
        inputs = keras.tree.pack_sequence_as(
            input_data.input_structure(model), list(flat_inputs)
        )
        outputs = keras.tree.flatten(model(inputs, training=False))
        return {f"{litert.OUTPUT_PREFIX}{i}": t for i, t in enumerate(outputs)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", serve, input_signature=specs)
    archive.write_out(directory, verbose=False)


def _compare_with_keras(model, tflite_path, names, inputs):
    """Returns (max abs diff, max rel diff) of the file versus `model`."""
    keras_inputs = keras.tree.pack_sequence_as(
        input_data.input_structure(model), list(inputs)
    )
    expected = [
        keras.ops.convert_to_numpy(t)
        for t in keras.tree.flatten(model(keras_inputs, training=False))
    ]
    actual = litert.run_tflite(tflite_path, dict(zip(names, inputs)))
    if len(actual) != len(expected):
        raise ExportVerificationError(
            f"{tflite_path!r} has {len(actual)} outputs, Keras {len(expected)}."
        )
    max_abs, max_rel = 0.0, 0.0
    for want, got in zip(expected, actual):
        if want.shape != got.shape:
            raise ExportVerificationError(
                f"TFLite output shape {got.shape} differs from Keras "
                f"{want.shape} for {tflite_path!r}."
            )
        abs_diff = float(np.max(np.abs(want.astype(np.float64) - got)))
        scale = float(np.max(np.abs(want)))
        # An all-zero Keras output has no scale; the absolute difference is
        # then the only meaningful measure.
        rel_diff = abs_diff / scale if scale > 0 else abs_diff
        max_abs, max_rel = max(max_abs, abs_diff), max(max_rel, rel_diff)
    return max_abs, max_rel


def _describe_quantization(quantization, int8_io):
    if quantization is None:
        return "none (float32)"
    if quantization == "float16":
        return "float16 (float16 weights)"
    if quantization == "dynamic":
        return "dynamic (int8 weights, float activations)"
    io = "int8" if int8_io else "float32"
    return f"int8 (int8 weights and activations, {io} inputs/outputs)"


def _format_size(num_bytes):
    if num_bytes >= 1 << 20:
        return f"{num_bytes / (1 << 20):.2f} MiB"
    return f"{num_bytes / 1024:.1f} KiB"
