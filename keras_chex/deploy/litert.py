"""Running `.tflite` files with the LiteRT interpreter (`ai_edge_litert`).

One runner for every part of keras-chex that executes a file: export
verification, `run_tflite` for users, and latency measurement. LiteRT is
imported only when a file is run, so importing keras_chex does not load it.
"""

import dataclasses

import numpy as np

from keras_chex import _native_stderr

SIGNATURE_KEY = "serving_default"
OUTPUT_PREFIX = "output_"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One input or output tensor of a TFLite file.

    Attributes:
        name: Signature name of the tensor (the name to feed or read it by).
        shape: Shape with `None` for dynamic dimensions (usually the batch).
        dtype: NumPy dtype name, e.g. `"float32"` or `"int8"`.
        quantization: `(scale, zero_point)` for a quantized tensor, else
            `None`.
    """

    name: str
    shape: tuple
    dtype: str
    quantization: tuple | None = None

    def __str__(self):
        dims = ", ".join("None" if d is None else str(d) for d in self.shape)
        text = f"{self.name} ({dims}) {self.dtype}"
        if self.quantization is not None:
            scale, zero_point = self.quantization
            text += f" scale={scale:.4g} zero_point={zero_point}"
        return text


def run_tflite(path, inputs, num_threads=None):
    """Runs a `.tflite` file written by `export_tflite()` once.

    Float inputs are quantized and int8 outputs dequantized with the file's
    scales, so an `int8_io=True` file is used exactly like a float one.

    Args:
        path: Path of the `.tflite` file.
        inputs: Dict from signature input name (see `ExportReport.inputs`) to
            a NumPy array with a batch axis.
        num_threads: Interpreter threads; `None` uses the LiteRT default.

    Returns:
        A list of float NumPy arrays, one per output, in the model's output
        order.

    Example:

    ```python
    (logits,) = run_tflite("model.tflite", {"image": x})
    ```
    """
    interpreter = make_interpreter(path, num_threads)
    runner = interpreter.get_signature_runner(SIGNATURE_KEY)
    details = runner.get_input_details()
    feed = {
        name: _quantize(np.asarray(value), details[name])
        for name, value in inputs.items()
    }
    results = runner(**feed)
    output_details = runner.get_output_details()
    names = sorted(results, key=lambda n: int(n[len(OUTPUT_PREFIX) :]))
    # Copy: the arrays may alias interpreter memory that the next call reuses.
    return [
        _dequantize(np.array(results[n], copy=True), output_details[n])
        for n in names
    ]


def make_interpreter(path, num_threads=None, input_shape=None):
    """An allocated LiteRT interpreter of a `.tflite` file.

    Args:
        path: the file.
        num_threads: interpreter threads; `None` uses the LiteRT default.
        input_shape: optional `input_shape(detail) -> shape`: each input is
            resized to it before the tensors are allocated.
    """
    # Imported here so importing keras_chex does not load LiteRT.
    from ai_edge_litert import interpreter as lite

    interpreter = lite.Interpreter(model_path=path, num_threads=num_threads)
    if input_shape is not None:
        for detail in interpreter.get_input_details():
            interpreter.resize_tensor_input(detail["index"],
                                            input_shape(detail))
    # LiteRT applies its delegate, and prints that it did, on the first
    # allocation; later resizes reuse it silently.
    with _native_stderr.drop_native_lines(_native_stderr.XNNPACK_INFO):
        interpreter.allocate_tensors()
    return interpreter


def _quantize(array, detail):
    """Quantizes a float array for an integer input tensor."""
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail["quantization"]
    if dtype.kind not in "iu" or scale == 0 or array.dtype.kind in "iu":
        return array.astype(dtype)
    info = np.iinfo(dtype)
    q = np.round(array / scale + zero_point)
    return np.clip(q, info.min, info.max).astype(dtype)


def _dequantize(array, detail):
    """Dequantizes an integer output tensor to float32."""
    scale, zero_point = detail["quantization"]
    if array.dtype.kind not in "iu" or scale == 0:
        return array
    return ((array.astype(np.float32) - zero_point) * scale).astype(np.float32)


def tensor_infos(path, names):
    """Returns (inputs, outputs) as tuples of `TensorInfo`, in model order."""
    interpreter = make_interpreter(path)
    runner = interpreter.get_signature_runner(SIGNATURE_KEY)
    input_details = runner.get_input_details()
    inputs = tuple(_tensor_info(name, input_details[name]) for name in names)
    outputs = tuple(
        sorted(
            (
                _tensor_info(name, detail)
                for name, detail in runner.get_output_details().items()
            ),
            key=lambda t: int(t.name[len(OUTPUT_PREFIX) :]),
        )
    )
    return inputs, outputs


def _tensor_info(name, detail):
    shape = tuple(
        None if d < 0 else int(d) for d in detail["shape_signature"]
    )
    scale, zero_point = detail["quantization"]
    quantization = (float(scale), int(zero_point)) if scale else None
    return TensorInfo(
        name=name,
        shape=shape,
        dtype=np.dtype(detail["dtype"]).name,
        quantization=quantization,
    )
