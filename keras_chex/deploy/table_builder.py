"""Measuring a latency table: `build_latency_table`.

Every convolution, depthwise convolution and dense call of a model is
exported on its own (`layer_tflite`) at the widths pruning can give it and
timed through LiteRT; then the dense model and a uniformly half-wide copy
are timed whole to calibrate how the isolated times add up. What a cache
file already holds is never measured again. The table itself, and how it
prices a model, is `latency_table.py`.
"""

import datetime
import os
import platform
import tempfile
import warnings

import keras
import numpy as np

from keras_chex.core import _graph
from keras_chex.core import analysis as analysis_lib
from keras_chex.core import input_shapes
from keras_chex.core import layer_registry
from keras_chex.core import layer_rules
from keras_chex.core import method
from keras_chex.core import stripping
from keras_chex.core import wrapping
from keras_chex.deploy import export
from keras_chex.deploy import latency
from keras_chex.core import latency_table


def build_latency_table(model, path=None, threads=1, *, round_to=8,
                        max_points=latency_table.DEFAULT_MAX_POINTS, runs=20, rounds=2,
                        warmup=3, verbose=0, input_shape=None):
    """Measures the per-layer LiteRT latency of `model` over its widths.

    Every convolution, depthwise convolution and dense call is exported on
    its own and timed with the LiteRT interpreter (XNNPACK, `threads`
    threads, batch 1, the fastest of `runs`) at every input and output
    channel count pruning can give it: multiples of `round_to` up to the
    full width (`max_points` of them at most per axis; widths in between
    are interpolated). Equal computations are timed once, whatever the
    layers are called. Then the dense model and a uniformly half-wide copy
    are timed whole, to calibrate how the isolated times add up for this
    architecture. With `path`, what that file holds is reused: a second
    call for the same model, or for another instance of its architecture,
    returns the cached table without measuring anything; one for another
    model measures only the layer computations that are new, and calibrates
    that architecture. A file measured with other `threads` or `round_to`
    is refused, never replaced.

    Args:
        model: a plain Functional or Sequential model with fixed input
            shapes (the dense model you will prune).
        path: optional JSON cache file.
        threads: LiteRT threads (measure what the device will use).
        round_to: channel step of the grid; use the `round_to` you prune
            with.
        max_points: grid points per axis at most.
        runs: timed runs per point and round.
        rounds: interleaved passes over an entry's points; each point keeps
            its fastest run.
        warmup: untimed runs first.
        verbose: 1 prints progress.
        input_shape: the input size to measure at, without the batch axis,
            for a model of free spatial size (pass the same one to the
            pruning entry point).

    Returns:
        A `latency_table.LatencyTable`.

    Example:

    ```python
    table = keras_chex.build_latency_table(model, "latency.json")
    print(table.predict(model))  # ms, dense
    ```
    """
    if wrapping.is_wrapped(model):
        raise ValueError(
            f"Model '{model.name}' is a keras-chex wrapped model; build the "
            "latency table from the plain model you are about to prune.")
    for name, value, low in (("threads", threads, 1),
                             ("round_to", round_to, 1),
                             ("max_points", max_points, 2),
                             ("runs", runs, 1), ("rounds", rounds, 1),
                             ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or (
                value < low):
            raise ValueError(f"`{name}` must be an int >= {low}, got "
                             f"{value!r}.")
    model = input_shapes.at_fixed_size(
        model, input_shape, "and its latency depends on the size",
        "`build_latency_table(model, path, input_shape=(224, 224, 3))`, say "
        "(and the same `input_shape=` to the pruning entry point)")
    cached, calibrations, old = {}, {}, None
    if path is not None and os.path.exists(path):
        old = latency_table.LatencyTable.load(path)
        if (old.threads, old.round_to) != (threads, round_to):
            raise ValueError(
                f"The latency table at {os.fspath(path)!r} was measured with "
                f"threads={old.threads}, round_to={old.round_to}, not "
                f"threads={threads}, round_to={round_to}. Pass another "
                "`path` (or delete that file) to measure a new table.")
        cached = old.entries
        calibrations = {k: v for k, v in old.calibrations.items()
                        if k != latency_table._LEGACY}
    analysis = analysis_lib.ModelAnalysis(model, warn=False)
    options = _width_options(analysis, round_to, max_points)
    architecture = latency_table.architecture_key(model)
    entries, todo = dict(cached), {}
    for _, node in latency_table._timed_nodes(model):
        key = latency_table._entry_key(node)
        if key not in entries and key not in todo:
            todo[key] = (node, options(node))
    if old is not None and not todo and architecture in calibrations:
        # Everything is measured, calibration included: measuring the
        # whole models again would only move it with the machine's load.
        return old
    with tempfile.TemporaryDirectory() as tmp:
        def time_files(files, runs=runs, rounds=rounds):
            # Interleaved rounds, the fastest run of each: on a shared
            # machine a slow moment then costs one round, not one point.
            best = [float("inf")] * len(files)
            for _ in range(rounds):
                for j, file in enumerate(files):
                    best[j] = min(best[j], latency.measure_tflite_latency(
                        file, num_threads=threads, warmup=warmup,
                        runs=runs).min_ms)
            return best

        def layer_file(layer, shape, j):
            file = os.path.join(tmp, f"layer_{j}.tflite")
            with open(file, "wb") as f:
                f.write(layer_tflite(layer, shape))
            return file

        # What one `invoke()` costs with (nearly) nothing to compute: every
        # isolated layer pays it, the whole model only once.
        invoke_ms = time_files([layer_file(
            *_built(keras.layers.ReLU(), (1, 1, 1, 1)), "invoke")])[0] if (
                todo) else 0.0
        for i, (key, (node, (cins, couts))) in enumerate(todo.items()):
            if verbose:
                print(f"latency table: {i + 1}/{len(todo)} "
                      f"{node.operation.name}: {len(cins)} x {len(couts)}")
            points = [(cin, cout) for cin in cins for cout in couts]
            files = [layer_file(*_variant(node, cin, cout), j)
                     for j, (cin, cout) in enumerate(points)]
            times = np.maximum(np.asarray(time_files(files)) - invoke_ms,
                               0.0).reshape(len(cins), len(couts))
            entries[key] = {"cin": [int(c) for c in cins],
                            "cout": [None if c is None else int(c)
                                     for c in couts],
                            "ms": times.tolist()}
        # Calibration: two whole models, dense and uniformly half as wide,
        # measured as the device runs them. Isolated layers do not sum to a
        # whole model (each pays its own invoke and cold caches; fused ops
        # and the rest of the graph add their share), so the prediction is
        # `other + scale * sum(layers)`, fitted through both points.
        half = _uniform_compact(model, analysis, 0.5, round_to)
        whole = []
        for label, m in (("dense", model), ("half", half)):
            file = os.path.join(tmp, f"{label}.tflite")
            export.export_tflite(m, file, verify=False, overwrite=True)
            whole.append(file)
        # Timed longer than a layer point: the calibration scales them all.
        dense_ms, half_ms = time_files(whole, runs=max(runs, 100),
                                       rounds=max(rounds, 5))
    unit = {architecture: {"scale": 1.0, "other_ms": 0.0}}
    sums = latency_table.LatencyTable(entries, unit, threads, None, round_to)
    scale, other_ms = _calibrate(dense_ms, sums._layers_ms(model),
                                 half_ms, sums._layers_ms(half))
    calibrations[architecture] = {"scale": scale, "other_ms": other_ms}
    table = latency_table.LatencyTable(
        entries, calibrations, threads,
        old.machine if old is not None else _machine(), round_to,
        datetime.datetime.now().isoformat(timespec="seconds"))
    if path is not None:
        table.save(path)
    return table


def _calibrate(dense_ms, dense_sum, half_ms, half_sum):
    """(scale, other): `other + scale * sum` through both points; where that
    needs a negative rest, the proportional least-squares fit (`other` 0);
    a constant rest (scale 1) when the half model was not faster."""
    if dense_sum - half_sum > 1e-9 and dense_ms > half_ms:
        scale = (dense_ms - half_ms) / (dense_sum - half_sum)
        other = dense_ms - scale * dense_sum
        if other >= 0:
            return float(scale), float(other)
        scale = (dense_ms * dense_sum + half_ms * half_sum) / (
            dense_sum ** 2 + half_sum ** 2)
        return float(scale), 0.0
    return 1.0, max(0.0, dense_ms - dense_sum)


def _uniform_compact(model, analysis, keep, round_to):
    """`model` stripped to about `keep` of every group's channels."""
    wrapped = wrapping.wrap(model)
    mask = []
    for g in wrapped.analysis.groups:
        widths = method.width_options(g.size, 1, round_to)
        k = widths[np.argmin(np.abs(widths - keep * g.size))]
        mask.append(np.arange(g.size) < k)
    if mask:
        wrapped.masks.assign(np.concatenate(mask))
    # Only its shape is timed: the statistics the strip warns about when
    # stale do not matter here, and the user never sees this model.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Stripping model")
        return stripping.strip(wrapped)


def _width_options(analysis, round_to, max_points):
    """options(node) -> (cin grid, cout grid) of a timed call."""

    def grid(tensor):
        classes = analysis.classes_of(tensor)
        full = len(classes)
        fixed = int(np.sum(classes < 0))
        if fixed == full:
            return [full]
        low = max(1, fixed + 1)
        points = list(range(fixed + round_to, full, round_to))
        points = sorted({max(low, min(p, full)) for p in points}
                        | {low, full})
        if len(points) > max_points:
            pick = np.linspace(0, len(points) - 1, max_points).round()
            points = [points[int(i)] for i in np.unique(pick)]
        return points

    def options(node):
        cins = grid(node.inputs[0])
        if isinstance(layer_registry.rule_for(node.operation),
                      layer_rules.DepthwiseRule):
            # Output channels follow the input: a diagonal, kept 2-D.
            return cins, [None]
        return cins, grid(node.outputs[0])

    return options


def _variant(node, cin, cout):
    """`node`'s layer rebuilt at `cin` -> `cout` channels, and its input
    shape (batch 1)."""
    op = node.operation
    rule = layer_registry.rule_for(op)
    kept = {id(node.inputs[0]): cin,
            id(node.outputs[0]): cin if cout is None else cout}
    config = rule.stripped_config(op.get_config(), node,
                                  lambda t: kept[id(t)])
    shape = (1,) + tuple(node.inputs[0].shape[1:-1]) + (int(cin),)
    return _built(_graph.clone_layer(op, config), shape)


def _built(layer, shape):
    layer.build(shape)
    return layer, shape


def layer_tflite(layer, shape):
    """A TFLite file (bytes) computing one built layer, weights constant.

    The layer runs as a `stateless_call` on constant weights, so the
    converter sees a frozen graph: ~0.06 s per file instead of the ~0.5 s of
    a SavedModel round trip, and the same builtin op (CONV_2D, ...).
    """
    import tensorflow as tf


    trainable = [tf.constant(v.numpy()) for v in layer.trainable_variables]
    fixed = [tf.constant(v.numpy()) for v in layer.non_trainable_variables]

    @tf.function(input_signature=[tf.TensorSpec(shape, layer.compute_dtype)])
    def call(x):
        return layer.stateless_call(trainable, fixed, x)[0]

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [call.get_concrete_function()], call)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    with export.quiet_tensorflow_info():
        return converter.convert()


def _machine():
    return {"platform": platform.platform(), "processor":
            platform.processor() or platform.machine(),
            "cpus": os.cpu_count()}
