"""The inputs a TFLite export is fed: signature names, calibration and
verification batches, in every form `export_tflite` accepts (an array, one
array per input, a dict by input name, an `(x, y)` tuple, a dataset, a
callable).
"""

import re

import numpy as np
import tensorflow as tf

from keras_chex.deploy import litert

# Calibration statistics (min/max ranges) stop improving after a few hundred
# samples, and the cap also ends an infinite (`repeat()`ed) dataset.
MAX_CALIBRATION_SAMPLES = 500

# Default verification input for int8: this many calibration samples. Data the
# ranges were calibrated on can't be clipped, so a difference means a broken
# conversion rather than too little calibration data.
_INT8_DEFAULT_SAMPLES = 4


def signature_input_names(model):
    """Returns one valid, unique TFLite signature name per model input."""
    names = []
    for i, tensor in enumerate(model.inputs):
        name = re.sub(r"[^A-Za-z0-9_]", "_", tensor.name or "")
        if not re.match(r"[A-Za-z]", name):
            name = f"input_{i}"
        while name in names or name.startswith(litert.OUTPUT_PREFIX):
            name = f"{name}_{i}"
        names.append(name)
    return names


def input_structure(model):
    """Returns the structure `model` expects its inputs in."""
    try:
        return model.input
    except AttributeError:
        # A Sequential model started with keras.Input() has `inputs` but no
        # `input` until it is first called.
        return model.inputs[0] if len(model.inputs) == 1 else model.inputs


class Calibration:
    """Feeds calibration samples to the converter, keeping the first few.

    The kept samples become the default int8 verification input. Keeping them,
    rather than calling `representative_data` again, also works for callables
    that return different data on each call (e.g. a shared random generator)
    and reads expensive data only once.

    Args:
        representative_data: The user's `representative_data`.
        model: The Keras model being converted.
        names: Signature input names, in model input order.
    """

    def __init__(self, representative_data, model, names):
        self._representative_data = representative_data
        self._model = model
        self._names = names
        self.first_samples = []

    def __call__(self):
        """Yields batch-1 samples keyed by signature input name."""
        samples = _calibration_samples(
            self._representative_data, self._model, self._names
        )
        for sample in samples:
            if len(self.first_samples) < _INT8_DEFAULT_SAMPLES:
                self.first_samples.append(sample)
            yield dict(zip(self._names, sample))


def _calibration_samples(representative_data, model, names):
    """Yields lists of batch-1 input arrays from `representative_data`."""
    count = 0
    for batch in _iterate_batches(representative_data):
        arrays = as_input_arrays(batch, model, names, "representative_data")
        for i in range(len(arrays[0])):
            if count == MAX_CALIBRATION_SAMPLES:
                return
            # Batch-1 samples: the calibrator fixes the input shape from the
            # first sample it sees, so all samples must share one shape.
            yield [a[i : i + 1] for a in arrays]
            count += 1
    if count == 0:
        raise ValueError("`representative_data` yielded no samples.")


def check_representative_data(representative_data, model):
    """Raises unless `representative_data` is of an accepted type."""
    if isinstance(representative_data, tf.data.Dataset):
        return
    if isinstance(representative_data, np.ndarray):
        if len(model.inputs) != 1:
            raise ValueError(
                f"A NumPy array as `representative_data` only fits a "
                f"single-input model; {model.name!r} has "
                f"{len(model.inputs)} inputs. Pass a callable or a "
                "tf.data.Dataset yielding one array per input instead."
            )
        return
    if callable(representative_data):
        return
    hint = ""
    if hasattr(representative_data, "__next__"):
        hint = (
            " It looks like a generator or iterator, which can only be read "
            "once: pass the function that creates it instead."
        )
    raise TypeError(
        "`representative_data` must be a callable returning an iterable of "
        "input batches, a tf.data.Dataset, or a NumPy array; got "
        f"{type(representative_data).__name__}.{hint}"
    )


def _iterate_batches(representative_data):
    """Returns an iterable of raw batches from `representative_data`."""
    if isinstance(representative_data, tf.data.Dataset):
        return representative_data.as_numpy_iterator()
    if isinstance(representative_data, np.ndarray):
        return [representative_data]
    batches = representative_data()
    try:
        return iter(batches)
    except TypeError:
        raise TypeError(
            "`representative_data` is a callable, so it must return an "
            f"iterable of input batches; it returned {type(batches).__name__}."
        ) from None


def _is_array(value):
    return isinstance(value, (np.ndarray, np.generic)) or tf.is_tensor(value)


def as_input_arrays(value, model, names, arg_name):
    """Turns one batch into a list of arrays in model input order.

    Args:
        value: An array, a list/tuple of arrays (one per input), a dict keyed
            by Keras or signature input name, or an `(x, y[, w])` tuple.
        model: The Keras model the arrays are for.
        names: Signature input names, in model input order.
        arg_name: The user-facing argument name, for error messages.

    Returns:
        A list of NumPy arrays with the model's input dtypes.
    """
    arrays = _structure_to_list(value, model, names, arg_name)
    result = []
    for array, tensor in zip(arrays, model.inputs):
        array = np.asarray(array, dtype=tensor.dtype)
        expected = tuple(tensor.shape)
        fits = array.ndim == len(expected) and all(
            e is None or e == a for e, a in zip(expected, array.shape)
        )
        if not fits:
            raise ValueError(
                f"`{arg_name}`: input {tensor.name!r} has shape {array.shape}, "
                f"but the model expects {expected} (None = any size; the "
                "first axis is the batch)."
            )
        result.append(array)
    if len({a.shape[0] for a in result}) > 1:
        raise ValueError(
            f"`{arg_name}`: the inputs have different batch sizes "
            f"{[a.shape[0] for a in result]}."
        )
    return result


def _structure_to_list(value, model, names, arg_name):
    """Flattens one batch structure to a list with one entry per input."""
    num_inputs = len(model.inputs)
    if isinstance(value, dict):
        keras_names = [t.name for t in model.inputs]
        by_name = {}
        for keras_name, name in zip(keras_names, names):
            if keras_name in value:
                by_name[name] = value[keras_name]
            elif name in value:
                by_name[name] = value[name]
        if len(by_name) != num_inputs:
            raise ValueError(
                f"`{arg_name}`: a dict must have one entry per model input "
                f"{keras_names}; got keys {sorted(value)}."
            )
        return [by_name[name] for name in names]
    if _is_array(value):
        if num_inputs == 1:
            return [value]
    elif isinstance(value, (list, tuple)):
        if len(value) == num_inputs and all(_is_array(v) for v in value):
            return list(value)
        if 1 <= len(value) <= 3:
            # `(x,)`, `(x, y)` or `(x, y, sample_weight)` as in Model.fit().
            return _structure_to_list(value[0], model, names, arg_name)
    raise ValueError(
        f"`{arg_name}` must give {num_inputs} input array(s) for model "
        f"{model.name!r}: an array (single-input model), a list/tuple with one "
        "array per input, a dict keyed by input name, or an (x, y) tuple; got "
        f"{type(value).__name__}."
    )


def default_sample_input(model, calibration):
    """Returns a deterministic verification batch."""
    if calibration is not None:
        samples = calibration.first_samples
        return [np.concatenate(parts) for parts in zip(*samples)]
    rng = np.random.default_rng(0)
    arrays = []
    for tensor in model.inputs:
        shape = (1,) + tuple(tensor.shape[1:])
        if None in shape:
            raise ValueError(
                f"Input {tensor.name!r} has shape {tuple(tensor.shape)} with "
                "unknown non-batch dimensions, so no default verification "
                "input can be made: pass `sample_input=`."
            )
        dtype = np.dtype(tensor.dtype)
        if dtype.kind in "iub":
            arrays.append(rng.integers(0, 2, size=shape).astype(dtype))
        else:
            arrays.append(rng.standard_normal(shape).astype(dtype))
    return arrays
