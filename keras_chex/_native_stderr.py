"""Filters lines that native (C++) code writes straight to file descriptor 2.

TensorFlow and LiteRT print some INFO lines from C++ before, or outside,
any log level Python can set: LiteRT's "Created TensorFlow Lite XNNPACK
delegate for CPU." on every interpreter, TensorFlow's oneDNN and CPU-feature
notes at import. Python's `warnings` and `logging` cannot see them; the only
place to catch them is the file descriptor. This module is the one place
that redirects it.
"""

import contextlib
import os
import re
import sys
import tempfile

# One INFO line per LiteRT interpreter; it says nothing a user can act on.
XNNPACK_INFO = re.compile(r"^INFO: Created TensorFlow Lite XNNPACK delegate")

# What TensorFlow prints from C++ when it starts on a machine without a GPU,
# before its log level applies: notes about CPU features and oneDNN, and the
# CUDA probe's "no drivers" lines (one logged as an error). None of them is
# something a CPU user can act on; anything else still gets through.
TENSORFLOW_STARTUP = tuple(re.compile(p) for p in (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called",
    r"cudart_stub\.cc:\d+\] Could not find cuda drivers",
    r"cuda_platform\.cc:\d+\] failed call to cuInit",
    r"cuda_executor\.cc:\d+\] .*(NUMA node|cuInit)",
    r"cpu_feature_guard\.cc:\d+\]",
    r"oneDNN custom operations are on",
    r"rebuild TensorFlow with the appropriate compiler flags",
    r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"computation_placer\.cc:\d+\] computation placer already registered",
    r"TF-TRT Warning: Could not find TensorRT",
))

# What the TFLite converter prints from C++ on every conversion: reading and
# loading its temporary SavedModel, flags it ignores, MLIR pass notes and the
# quantizer's settings line. Progress notes, none a user can act on.
TFLITE_CONVERTER = tuple(re.compile(p) for p in (
    r"tf_tfl_flatbuffer_helpers\.cc:\d+\] Ignored (output_format|"
    r"drop_control_dependency)",
    r"reader\.cc:\d+\] Reading (SavedModel|meta graph)",
    r"loader\.cc:\d+\] (Restoring SavedModel bundle|Running initialization "
    r"op|SavedModel load for tags)",
    r"mlir_graph_optimization_pass\.cc:\d+\] MLIR V1 optimization pass is "
    r"not enabled",
    r"dump_mlir_util\.cc:\d+\] disabling MLIR crash reproducer",
    r"^fully_quantize: \d+, inference_type: ",
    r"flatbuffer_export\.cc:\d+\] Skipping runtime version metadata",
))


def start_tensorflow_quietly(drop_all=False):
    """Imports TensorFlow and lists its devices, hiding the start-up notes.

    The lines in `TENSORFLOW_STARTUP` are dropped; every other line written
    meanwhile (a real warning or error) is kept, unless `drop_all`.

    Args:
        drop_all: drop every line (the `keras-chex` command, not
            `--verbose`).

    Returns:
        The `tensorflow` module.

    Example:

    ```python
    tf = start_tensorflow_quietly()
    ```
    """
    with drop_native_lines(*TENSORFLOW_STARTUP, drop_all=drop_all):
        import tensorflow as tf

        # The CUDA probe runs at the first device query, not at import.
        # Listing physical devices leaves the runtime uninitialised: thread
        # counts and visible devices can still be set afterwards.
        tf.config.list_physical_devices()
    return tf


@contextlib.contextmanager
def drop_native_lines(*patterns, drop_all=False):
    """Hides the stderr lines matching `patterns` written inside the block.

    Everything else written to file descriptor 2 meanwhile (real warnings
    and errors, from C++ or Python) is written to `sys.stderr` when the
    block ends, in order.

    Args:
        *patterns: compiled regular expressions; a line matching any of them
            is dropped.
        drop_all: drop every line (TensorFlow's start-up notes, for a
            command-line tool that hides them unless asked).

    Example:

    ```python
    with drop_native_lines(XNNPACK_INFO):
        interpreter.allocate_tensors()
    ```
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # No usable fd 2 (embedded interpreter).
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except ValueError:
                pass
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace")
            if not drop_all:
                kept = [line for line in text.splitlines(keepends=True)
                        if not any(p.search(line) for p in patterns)]
                if kept:
                    sys.stderr.write("".join(kept))
                    sys.stderr.flush()
