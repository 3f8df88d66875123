"""A measured latency table: how long each layer takes at each width.

`build_latency_table(model)` times, through LiteRT on the machine it runs
on, every convolution and dense call of `model` on its own, over the input
and output channel counts that pruning can give it (multiples of
`round_to`), and caches the times in a JSON file. Calls that would compile
to the same TFLite op (same layer type and config, same input size) are
timed once. Each point is the fastest of its runs over interleaved rounds,
less the cost of an `invoke()` that computes (nearly) nothing: every
isolated layer pays that, the whole model only once. The rest of the
network (additions, pooling, the ops a TFLite file always has) is timed as
the whole dense model minus its table layers, and counted as a constant.

A table prices a pruned model without exporting it: `predict(compact)`
for a stripped model, and `group_cost(analysis)` as the cost model of SMCP's
knapsack. Unlike MACs it sees what the kernels do: XNNPACK computes
convolutions in blocks of output channels, so a width just above a block
boundary costs nearly a whole extra block.
"""

import datetime
import hashlib
import json
import os
import platform
import tempfile

import keras
import numpy as np

from keras_chex.core import _graph
from keras_chex.core import analysis as analysis_lib
from keras_chex.core import costs
from keras_chex.core import layer_registry
from keras_chex.core import layer_rules

FORMAT = "keras-chex-latency-table"
VERSION = 2
TIMED = (layer_rules.ConvRule, layer_rules.DepthwiseRule,
         layer_rules.DenseRule)
# Grid points per axis at most; widths in between are interpolated.
DEFAULT_MAX_POINTS = 16
# The calibration of a version-1 file, which did not record its model.
_LEGACY = "version 1"


class LatencyTable:
    """Measured per-layer latencies on one machine, keyed by what each
    layer computes.

    An entry is one layer computation (layer type, input size, kernel,
    strides, ... and its full input and output widths) timed over a grid of
    widths, whatever the layer is called: a table measured on one model
    prices any model whose layers compute the same, a second instance of
    the same architecture or its pruned compacts. A layer the table lacks
    is named in the error, and `build_latency_table(model, path)` with the
    table's file measures only what is missing.

    Isolated layers do not add up to a whole model; each architecture (its
    sequence of timed layers, widths left out, so that a model and its
    compacts share it) has a calibration `(scale, other_ms)` fitted on two
    whole models: predicted latency = `other_ms + scale * sum(layers)`.

    Build with `keras_chex.build_latency_table`; load a cached one with
    `LatencyTable.load(path)`.

    Args:
        entries: dict entry key -> {"cin": [...], "cout": [...],
            "ms": [[...]]}.
        calibrations: dict architecture key (`architecture_key(model)`) ->
            {"scale": float, "other_ms": float}.
        threads: LiteRT threads the times were measured with.
        machine: a description of the machine.
        round_to: the channel step of the grids.
        created: when it was measured (ISO time), or None.

    Example:

    ```python
    table = keras_chex.build_latency_table(model, "latency.json")
    same = keras_chex.LatencyTable.load("latency.json")
    same.predict(another_instance_of_the_architecture)  # ms
    ```
    """

    def __init__(self, entries, calibrations, threads, machine, round_to,
                 created=None):
        self.entries = dict(entries)
        self.calibrations = {k: {"scale": float(v["scale"]),
                                 "other_ms": float(v["other_ms"])}
                             for k, v in dict(calibrations).items()}
        self.threads = int(threads)
        self.machine = machine
        self.round_to = int(round_to)
        self.created = created
        self.path = None  # Set by `load` and `save`: named in errors.
        self._by_signature = {}
        for key in self.entries:
            self._by_signature.setdefault(_signature_of_key(key), []).append(
                key)

    # -- lookups -------------------------------------------------------------
    def layer_ms(self, key, cin, cout):
        """Interpolated time of entry `key` at (cin, cout) channels."""
        entry = self.entries[key]
        return float(_bilinear(entry, np.asarray([cin], float),
                               np.asarray([cout], float))[0])

    def calibration(self, model):
        """`(scale, other_ms)` of `model`'s architecture.

        Raises:
            ValueError: if the table was not calibrated on this
                architecture (the error says how to add it).
        """
        key = architecture_key(model)
        found = self.calibrations.get(key) or self.calibrations.get(_LEGACY)
        if found is None:
            raise ValueError(
                f"The latency table{self._where()} has no calibration for "
                f"the architecture of model '{model.name}': its layers are "
                "timed one by one, and how they add up is measured once per "
                "architecture. Run `keras_chex.build_latency_table(model, "
                f"path={self._path_hint()})` on the target device with the "
                "dense model: it measures only the whole model and any "
                "layer the table lacks.")
        return found["scale"], found["other_ms"]

    def predict(self, model):
        """Predicted LiteRT latency (ms) of a plain model.

        Args:
            model: the dense model the table was built on, another instance
                of its architecture, or a `keras_chex.strip` result of
                either.

        Returns:
            Milliseconds, for `threads` threads.
        """
        layers_ms = self._layers_ms(model)  # A missing layer first.
        scale, other_ms = self.calibration(model)
        return other_ms + scale * layers_ms

    def _layers_ms(self, model):
        total = 0.0
        for name, node in _timed_nodes(model):
            cin, cout = _channels(node)
            total += self.layer_ms(self.key_for(name, node), cin, cout)
        return total

    def key_for(self, name, node):
        """The entry that prices layer call `node` (named `name` in errors):
        the one measured for this exact computation, or else one of the same
        computation at larger widths whose grid covers the node's widths
        (a pruned compact's layer)."""
        key = _entry_key(node)
        if key in self.entries:
            return key
        cin, cout = _channels(node)
        covering = []
        for other in self._by_signature.get(_signature_of_key(key), ()):
            entry = self.entries[other]
            if entry["cin"][-1] >= cin and (
                    entry["cout"] == [None] or entry["cout"][-1] >= cout):
                covering.append((entry["cin"][-1], entry["cout"][-1] or 0,
                                 other))
        if covering:
            return min(covering)[2]
        layer = name.rsplit("#", 1)[0]
        raise ValueError(
            f"The latency table{self._where()} has no entry for layer "
            f"'{layer}' ({type(node.operation).__name__}, {cin} -> {cout} "
            f"channels on input {tuple(node.inputs[0].shape[1:])}). Run "
            "`keras_chex.build_latency_table(model, "
            f"path={self._path_hint()})` on the target device with the "
            "dense model: it measures only the layers the table lacks.")

    def _where(self):
        return f" at {self.path!r}" if self.path else ""

    def _path_hint(self):
        return repr(self.path) if self.path else "<the table's file>"

    def subset(self, model):
        """A table with only the entries and calibration `model` uses.

        Args:
            model: a model this table prices (plain or wrapped).

        Returns:
            A new `LatencyTable` (what a pruning model stores in its
            config, so that its `.keras` file prices itself anywhere).
        """
        keys = {self.key_for(name, node) for name, node in _timed_nodes(model)}
        scale, other_ms = self.calibration(model)
        table = LatencyTable(
            {k: self.entries[k] for k in sorted(keys)},
            {architecture_key(model): {"scale": scale, "other_ms": other_ms}},
            self.threads, self.machine, self.round_to, self.created)
        table.path = self.path
        return table

    def group_cost(self, analysis):
        """The predicted latency as a `costs.GroupCost` of group widths.

        Args:
            analysis: the `ModelAnalysis` of the (wrapped) model to price.
        """
        fixed, weights, forms = [1.0], [np.zeros(len(analysis.groups))], {}

        def form(tensor):
            classes = analysis.classes_of(tensor)
            key = tuple(classes.tolist())
            if key not in forms:
                counts = np.zeros((1, analysis.num_channels))
                sel = classes >= 0
                np.add.at(counts[0], classes[sel], 1.0)
                forms[key] = len(fixed)
                fixed.append(float(np.sum(~sel)))
                weights.append(costs.group_weights(counts, analysis)[0])
            return forms[key]

        keys, i0, i1 = [], [], []
        for name, node in _timed_nodes(analysis.model):
            keys.append(self.key_for(name, node))
            i0.append(form(node.inputs[0]))
            i1.append(form(node.outputs[0]))
        scale, other_ms = self.calibration(analysis.model)
        # The constant rest: one more term on the constant form.
        keys.append(None)
        i0.append(0)
        i1.append(0)

        def term_fn(a0, a1, terms):
            a0, a1 = np.broadcast_arrays(np.asarray(a0, float),
                                         np.asarray(a1, float))
            out = np.empty(a0.shape)
            for j, t in enumerate(np.asarray(terms)):
                key = keys[t]
                if key is None:
                    out[..., j] = other_ms
                else:
                    flat = _bilinear(self.entries[key],
                                     a0[..., j].ravel(), a1[..., j].ravel())
                    out[..., j] = scale * flat.reshape(a0[..., j].shape)
            return out

        return costs.GroupCost(np.array(fixed), np.stack(weights), i0, i1,
                               term_fn)

    # -- files ---------------------------------------------------------------
    def to_json(self):
        return {
            "format": FORMAT, "version": VERSION, "threads": self.threads,
            "machine": self.machine, "round_to": self.round_to,
            "created": self.created, "calibrations": self.calibrations,
            "entries": self.entries,
        }

    @classmethod
    def from_json(cls, data):
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(
                "Not a keras-chex latency table (its 'format' is not "
                f"{FORMAT!r}). Build one with `keras_chex.build_latency_table`."
            )
        if data.get("version", 0) > VERSION:
            raise ValueError(
                f"This latency table has format version {data['version']}, "
                f"newer than this keras-chex reads ({VERSION}). Upgrade "
                "keras-chex or rebuild the table.")
        if data.get("version", 1) == 1:
            # Entries were already keyed by computation; the one calibration
            # did not record its model and serves every model.
            calibrations = {_LEGACY: {"scale": data.get("scale", 1.0),
                                      "other_ms": data["other_ms"]}}
        else:
            calibrations = data["calibrations"]
        return cls(data["entries"], calibrations, data["threads"],
                   data["machine"], data["round_to"], data.get("created"))

    def save(self, path):
        directory = os.path.dirname(os.path.abspath(path))
        with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp",
                                         delete=False) as f:
            json.dump(self.to_json(), f, indent=1)
        os.replace(f.name, path)
        self.path = os.fspath(path)

    @classmethod
    def load(cls, path):
        """Reads a table cached by `build_latency_table`."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No latency table at {path!r}.")
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path!r} is not a keras-chex latency table (not JSON: "
                    f"{e}).") from None
        table = cls.from_json(data)
        table.path = path
        return table

    def __repr__(self):
        return (f"<LatencyTable {len(self.entries)} entries, "
                f"{len(self.calibrations)} architecture(s), "
                f"{self.threads} thread(s)>")


def build_latency_table(model, path=None, threads=1, *, round_to=8,
                        max_points=DEFAULT_MAX_POINTS, runs=20, rounds=2,
                        warmup=3, verbose=0):
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

    Returns:
        A `LatencyTable`.

    Example:

    ```python
    table = keras_chex.build_latency_table(model, "latency.json")
    print(table.predict(model))  # ms, dense
    ```
    """
    from keras_chex.deploy import export
    from keras_chex.deploy import latency

    if _is_wrapped(model):
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
    cached, calibrations, old = {}, {}, None
    if path is not None and os.path.exists(path):
        old = LatencyTable.load(path)
        if (old.threads, old.round_to) != (threads, round_to):
            raise ValueError(
                f"The latency table at {os.fspath(path)!r} was measured with "
                f"threads={old.threads}, round_to={old.round_to}, not "
                f"threads={threads}, round_to={round_to}. Pass another "
                "`path` (or delete that file) to measure a new table.")
        cached = old.entries
        calibrations = {k: v for k, v in old.calibrations.items()
                        if k != _LEGACY}
    analysis = analysis_lib.ModelAnalysis(model, warn=False)
    options = _width_options(analysis, round_to, max_points)
    architecture = architecture_key(model)
    entries, todo = dict(cached), {}
    for _, node in _timed_nodes(model):
        key = _entry_key(node)
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
    sums = LatencyTable(entries, unit, threads, None, round_to)
    scale, other_ms = _calibrate(dense_ms, sums._layers_ms(model),
                                 half_ms, sums._layers_ms(half))
    calibrations[architecture] = {"scale": scale, "other_ms": other_ms}
    table = LatencyTable(
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
    from keras_chex.core import stripping
    from keras_chex.core import wrapping
    from keras_chex.core import method

    wrapped = wrapping.wrap(model)
    mask = []
    for g in wrapped.analysis.groups:
        widths = method.width_options(g.size, 1, round_to)
        k = widths[np.argmin(np.abs(widths - keep * g.size))]
        mask.append(np.arange(g.size) < k)
    if mask:
        wrapped.analysis.set_class_mask(np.concatenate(mask))
    return stripping.strip(wrapped)


def _is_wrapped(model):
    from keras_chex.core import wrapping

    return wrapping.is_wrapped(model)


# -- graph side ---------------------------------------------------------------
def _timed_nodes(model):
    """(name#call, node) of every timed call, nested models included."""
    seen = {}
    out = []

    def visit(graph):
        for node in _graph.nodes(graph):
            op = node.operation
            if _graph.is_graph_model(op):
                visit(op)
                continue
            if isinstance(layer_registry.rule_for(op), TIMED) and (
                    len(node.inputs) == 1):
                call = seen.get(op.name, 0)
                seen[op.name] = call + 1
                out.append((f"{op.name}#{call}", node))

    visit(model)
    return out


def architecture_key(model):
    """What a latency calibration is valid for: the sequence of `model`'s
    timed layer computations, names and widths left out, so that a model,
    another instance of it and their pruned compacts share one key."""
    parts = [_signature_of_key(_entry_key(node))
             for _, node in _timed_nodes(model)]
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]


def _signature_of_key(key):
    """An entry key without its widths: the computation alone."""
    return json.dumps(json.loads(key)[:3], sort_keys=True)


def _channels(node):
    return int(node.inputs[0].shape[-1]), int(node.outputs[0].shape[-1])


def _entry_key(node):
    op = node.operation
    config = dict(op.get_config())
    for k in ("name", "filters", "units", "trainable", "dtype",
              "kernel_initializer", "bias_initializer", "kernel_regularizer",
              "bias_regularizer", "activity_regularizer", "kernel_constraint",
              "bias_constraint", "depthwise_initializer",
              "depthwise_regularizer", "depthwise_constraint"):
        config.pop(k, None)
    shape = tuple(node.inputs[0].shape[1:-1])
    return json.dumps([type(op).__name__, shape, config,
                       _channels(node)], sort_keys=True, default=str)


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

    from keras_chex.deploy import export

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


def _bilinear(entry, cin, cout):
    """Times at (cin, cout) points, linear between grid points."""
    xs = np.asarray(entry["cin"], float)
    ms = np.asarray(entry["ms"], float)
    if entry["cout"] == [None]:
        return np.interp(cin, xs, ms[:, 0])
    ys = np.asarray(entry["cout"], float)
    cin = np.clip(cin, xs[0], xs[-1])
    cout = np.clip(cout, ys[0], ys[-1])
    # Interpolate along cout for every cin row, then along cin.
    rows = np.stack([np.interp(cout, ys, ms[i]) for i in range(len(xs))])
    out = np.empty(len(cin))
    for j in range(len(cin)):
        out[j] = np.interp(cin[j], xs, rows[:, j])
    return out


def _machine():
    return {"platform": platform.platform(), "processor":
            platform.processor() or platform.machine(),
            "cpus": os.cpu_count()}
