r"""Export a `.keras` model (plain or keras-chex pruning model) for deployment.

Strips a pruning model to plain Keras layers, writes a verified TFLite file
and/or a SavedModel into `--output_dir`, and prints MACs, parameters and file
sizes before and after.

Usage:

```
python tools/export_model.py --model=run/pruned.keras --output_dir=export \
    --tflite --saved_model --quantization=int8 \
    --representative_data=calibration.npy
```

`--representative_data` is a `.npy` array of input samples (first axis =
samples) for a single-input model; it is required for `--quantization=int8`.
Outputs are named after the model file: `<name>.tflite` (or
`<name>_<quantization>.tflite`) and `<name>_saved_model/`.
"""

import os

from absl import app
from absl import flags
from absl import logging
import numpy as np

_MODEL = flags.DEFINE_string(
    "model", None, "Path to a .keras file (plain or keras-chex pruning model)."
)
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Directory for the exported files."
)
_TFLITE = flags.DEFINE_bool("tflite", True, "Write a verified .tflite file.")
_SAVED_MODEL = flags.DEFINE_bool(
    "saved_model", False, "Write a TensorFlow SavedModel directory."
)
_QUANTIZATION = flags.DEFINE_enum(
    "quantization",
    "none",
    ["none", "float16", "dynamic", "int8"],
    "TFLite quantization.",
)
_REPRESENTATIVE_DATA = flags.DEFINE_string(
    "representative_data",
    None,
    "Path to a .npy array of input samples for int8 calibration.",
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace existing output files."
)
flags.mark_flags_as_required(["model", "output_dir"])


def count_model(model, dense=False):
    """Returns `(macs, params)` or `(None, None)` if counting isn't available.

    With `dense=True`, a keras-chex pruning model is counted with all its
    channels (what it was before pruning).

    Args:
        model: A Keras model.

    Returns:
        A tuple of two ints, or of two `None`s when `keras_chex.counting` is
        not importable.

    Example:

    ```python
    macs, params = count_model(model)
    ```
    """
    try:
        from keras_chex.core.counting import count_macs
    except ImportError as e:
        # Only a missing counting module (or name) means "not available"; an
        # ImportError from inside it is a real bug.
        if e.name != "keras_chex.counting":
            raise
        return None, None
    mask = None
    if dense and getattr(model, "analysis", None) is not None:
        import numpy as np

        mask = np.ones(model.analysis.num_channels, bool)
    counts = count_macs(model, class_mask=mask)
    return counts.macs, counts.params


def directory_size(path):
    """Returns the total size in bytes of the files under `path`."""
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def format_count(value):
    return "n/a" if value is None else f"{value:,}"


def format_size(num_bytes):
    if num_bytes is None:
        return "-"
    if num_bytes >= 1 << 20:
        return f"{num_bytes / (1 << 20):.2f} MiB"
    return f"{num_bytes / 1024:.1f} KiB"


def format_table(rows):
    """Formats `(label, before, after)` rows as an aligned text table."""
    rows = [("", "before", "after")] + list(rows)
    widths = [max(len(str(r[i])) for r in rows) for i in range(3)]
    return "\n".join(
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip()
        for row in rows
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not (_TFLITE.value or _SAVED_MODEL.value):
        raise app.UsageError(
            "Nothing to do: pass --tflite and/or --saved_model."
        )
    quantization = _QUANTIZATION.value
    if quantization == "none":
        quantization = None
    if quantization == "int8" and not _REPRESENTATIVE_DATA.value:
        raise app.UsageError(
            "--quantization=int8 needs --representative_data=<samples.npy>."
        )
    if _REPRESENTATIVE_DATA.value and quantization != "int8":
        raise app.UsageError(
            "--representative_data is only used with --quantization=int8."
        )

    if not flags.FLAGS["verbosity"].present:
        # TensorFlow logs every SavedModel write at INFO level; keep the
        # table readable unless the user asked for more.
        logging.set_verbosity(logging.WARNING)

    # Imported after flag parsing so --help is fast. keras_chex registers the
    # pruning layers that load_model needs for a wrapped model.
    import keras
    import keras_chex  # noqa: F401
    from keras_chex.deploy import export

    model = keras.saving.load_model(_MODEL.value)
    # "before" is the unpruned network: for a pruning model, all masks at 1.
    macs_before, params_before = count_model(model, dense=True)
    # Stripped here only to count; the exporters get the original model so
    # that verification compares the file with the model as trained.
    plain, stripped = export.strip_if_wrapped(model)
    macs_after, params_after = count_model(plain)
    kind = "keras-chex pruning model" if stripped else "plain Keras model"
    print(f"Loaded {_MODEL.value}: {kind}")

    name = os.path.splitext(os.path.basename(_MODEL.value))[0]
    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    rows = [
        ("MACs", format_count(macs_before), format_count(macs_after)),
        ("params", format_count(params_before), format_count(params_after)),
        (".keras file", format_size(os.path.getsize(_MODEL.value)), "-"),
    ]
    if _TFLITE.value:
        suffix = f"_{quantization}" if quantization else ""
        path = os.path.join(_OUTPUT_DIR.value, f"{name}{suffix}.tflite")
        representative_data = None
        if _REPRESENTATIVE_DATA.value:
            representative_data = np.load(_REPRESENTATIVE_DATA.value)
        report = export.export_tflite(
            model,
            path,
            quantization=quantization,
            representative_data=representative_data,
            overwrite=_OVERWRITE.value,
        )
        print(report)
        label = f"TFLite ({quantization or 'float32'})"
        rows.append((label, "-", f"{format_size(report.size_bytes)}  {path}"))
    if _SAVED_MODEL.value:
        directory = os.path.join(_OUTPUT_DIR.value, f"{name}_saved_model")
        export.export_saved_model(model, directory, overwrite=_OVERWRITE.value)
        size = format_size(directory_size(directory))
        rows.append(("SavedModel", "-", f"{size}  {directory}"))
    print()
    print(format_table(rows))


if __name__ == "__main__":
    app.run(main)
