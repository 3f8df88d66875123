"""Measure the on-device-style CPU latency of `.tflite` files with LiteRT.

Latency is measured with `ai_edge_litert.interpreter.Interpreter` (the same
runtime and XNNPACK CPU kernels a mobile app uses) on random input, timing
`invoke()` only: input copying and Python overhead outside the call are not
included.

Per-op profiling is not offered: the LiteRT Python interpreter (ai-edge-litert
2.3) exposes no op profiler, only the C++ `benchmark_model` tool has one
(`--enable_op_profiling=true`).

Example:

```python
print(measure_tflite_latency("model.tflite", num_threads=1))
```
"""

import dataclasses
import os
import time

import numpy as np

from keras_chex.deploy import litert


@dataclasses.dataclass(frozen=True)
class LatencyReport:
    """Latency statistics of one `.tflite` file.

    Attributes:
        path: The measured file.
        median_ms: Median time of one `invoke()`, in milliseconds.
        p90_ms: 90th percentile, in milliseconds.
        min_ms: Fastest run, in milliseconds (the least noisy statistic on a
            shared machine).
        runs: Number of timed runs.
        threads: Interpreter threads.
        batch_size: Batch size of the input.
    """

    path: str
    median_ms: float
    p90_ms: float
    min_ms: float
    runs: int
    threads: int
    batch_size: int

    def __str__(self):
        return (
            f"{os.path.basename(self.path)}: median {self.median_ms:.3f} ms, "
            f"p90 {self.p90_ms:.3f} ms, min {self.min_ms:.3f} ms "
            f"({self.runs} runs, {self.threads} thread(s), batch "
            f"{self.batch_size})"
        )


def measure_tflite_latency(
    path, *, num_threads=1, warmup=5, runs=50, batch_size=1
):
    """Times `invoke()` of a `.tflite` file on random input.

    Args:
        path: Path of the `.tflite` file.
        num_threads: Interpreter threads (>= 1).
        warmup: Untimed runs first (>= 0); the first runs pay for lazy kernel
            preparation and cold caches.
        runs: Timed runs (>= 1).
        batch_size: Batch size (>= 1). Needs a dynamic batch dimension unless
            it equals the file's fixed batch size.

    Returns:
        A `LatencyReport`.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: An argument is out of range, or the file has dynamic
            non-batch dimensions or a fixed batch size other than
            `batch_size`.

    Example:

    ```python
    report = measure_tflite_latency("model.tflite", num_threads=2, runs=100)
    print(report.median_ms)
    ```
    """
    path = os.fspath(path)
    _check_int("num_threads", num_threads, minimum=1)
    _check_int("warmup", warmup, minimum=0)
    _check_int("runs", runs, minimum=1)
    _check_int("batch_size", batch_size, minimum=1)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No .tflite file at `path` {path!r}.")

    interpreter = _prepared_interpreter(path, num_threads, batch_size)
    for _ in range(warmup):
        interpreter.invoke()
    times_ms = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        interpreter.invoke()
        times_ms[i] = (time.perf_counter() - start) * 1e3

    return LatencyReport(
        path=path,
        median_ms=float(np.median(times_ms)),
        p90_ms=float(np.percentile(times_ms, 90)),
        min_ms=float(np.min(times_ms)),
        runs=runs,
        threads=num_threads,
        batch_size=batch_size,
    )


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"`{name}` must be an int, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")


def _prepared_interpreter(path, num_threads, batch_size):
    """Returns an interpreter with random input of `batch_size` set."""
    interpreter = litert.make_interpreter(
        path, num_threads,
        input_shape=lambda detail: _input_shape(detail, batch_size, path))
    rng = np.random.default_rng(0)
    for detail in interpreter.get_input_details():
        shape = _input_shape(detail, batch_size, path)
        array = _random_array(rng, shape, detail)
        interpreter.set_tensor(detail["index"], array)
    return interpreter


def _input_shape(detail, batch_size, path):
    """Returns the concrete input shape for `batch_size`."""
    signature = [int(d) for d in detail["shape_signature"]]
    if any(d < 0 for d in signature[1:]):
        raise ValueError(
            f"Input {detail['name']!r} of {path!r} has dynamic non-batch "
            f"dimensions {signature}; latency needs fixed shapes. Export the "
            "model with fully defined input shapes (e.g. keras.Input((224, "
            "224, 3)))."
        )
    if signature and signature[0] >= 0 and signature[0] != batch_size:
        raise ValueError(
            f"Input {detail['name']!r} of {path!r} has a fixed batch size of "
            f"{signature[0]}; pass `batch_size={signature[0]}` or export with "
            "a dynamic batch dimension."
        )
    return [batch_size] + signature[1:] if signature else []


def _random_array(rng, shape, detail):
    """Returns random input for one tensor."""
    dtype = np.dtype(detail["dtype"])
    scale, _ = detail["quantization"]
    if dtype.kind in "iu" and scale:
        # A quantized (int8_io) input: any value of the type is valid.
        info = np.iinfo(dtype)
        return rng.integers(
            info.min, info.max, size=shape, endpoint=True
        ).astype(dtype)
    if dtype.kind in "iub":
        # Plain integers are usually indices (e.g. into an Embedding): 0 and 1
        # are valid for any table.
        return rng.integers(0, 2, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)
