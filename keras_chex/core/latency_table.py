"""A measured latency table: how long each layer takes at each width.

`build_latency_table(model)` (`table_builder.py`) times, through LiteRT on
the machine it runs on, every convolution and dense call of `model` on its
own, over the input and output channel counts that pruning can give it
(multiples of `round_to`), and caches the times in a JSON file. Calls that
would compile to the same TFLite op (same layer type and config, same
input size) are timed once. Each point is the fastest of its runs over interleaved rounds,
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

import hashlib
import json
import os
import tempfile

import numpy as np

from keras_chex.core import _graph
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
        (a pruned compact's layer): first one whose grid spans them, so
        they are interpolated, not clamped to another layer's fixed width
        (a stem's 3 input channels must not price a block's 1), which is
        the entry the wrapped model was priced by while it trained."""
        key = _entry_key(node)
        if key in self.entries:
            return key
        cin, cout = _channels(node)
        covering = []
        for other in self._by_signature.get(_signature_of_key(key), ()):
            entry = self.entries[other]
            if entry["cin"][-1] >= cin and (
                    entry["cout"] == [None] or entry["cout"][-1] >= cout):
                clamped = entry["cin"][0] > cin or (
                    entry["cout"] != [None] and entry["cout"][0] > cout)
                covering.append((clamped, entry["cin"][-1],
                                 entry["cout"][-1] or 0, other))
        if covering:
            return min(covering)[-1]
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
