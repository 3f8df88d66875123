"""Counting MACs and parameters of plain and wrapped models.

MACs are multiply-accumulates of convolution, depthwise, separable,
transposed-convolution and dense calls (what the pruning literature calls
"FLOPs"). On a wrapped model masked channels count as removed, so the count
equals the count of the stripped model.
"""

import dataclasses
import warnings

import keras
import numpy as np

from keras_chex.core import _graph
from keras_chex.core import analysis as cg
from keras_chex.core import input_shapes
from keras_chex.core import layer_rules
from keras_chex.core import masks as masks_lib


@dataclasses.dataclass(frozen=True)
class LayerCount:
    """MACs and parameters of one layer (all its calls).

    `channels` is the number of output channels a convolution or dense
    layer keeps (None for other layers).
    """

    name: str
    macs: int
    params: int
    channels: object = None


@dataclasses.dataclass(frozen=True)
class CountResult:
    """Result of `count_macs`.

    Attributes:
        macs: total multiply-accumulates for one input sample.
        params: total parameters (trainable and not, masks excluded).
        layers: per-layer `LayerCount`s in graph order.
        uncounted: names of the layers whose MACs are unknown (custom
            layers keras-chex cannot look inside, attention, ...): `macs`
            leaves them out (their parameters are in `params`).
    """

    macs: int
    params: int
    layers: tuple
    uncounted: tuple = ()

    def table(self, top=None, reference=None):
        """A text table of the per-layer counts (largest MACs first).

        Args:
            top: show only this many layers.
            reference: another `CountResult` of the same layers (the dense
                model, say): the table then shows channels and MACs before
                and after, and each layer's share of the total after.

        Returns:
            A string.
        """
        if reference is not None:
            return self._comparison(top, reference)
        rows = sorted(self.layers, key=lambda r: -r.macs)[:top]
        width = max([len(r.name) for r in rows] + [5])
        lines = [f"{'layer':<{width}}  {'MACs':>14}  {'params':>12}"]
        for r in rows:
            lines.append(f"{r.name:<{width}}  {r.macs:>14,}  {r.params:>12,}")
        lines.append(f"{'total':<{width}}  {self.macs:>14,}  {self.params:>12,}")
        return "\n".join(lines)

    def _comparison(self, top, reference):
        before = {r.name: r for r in reference.layers}
        rows = sorted(self.layers, key=lambda r: -before.get(
            r.name, r).macs)[:top]
        width = max([len(r.name) for r in rows] + [5])

        def channels(row, old):
            if row.channels is None:
                return "-"
            return f"{old.channels if old else '?'} -> {row.channels}"

        lines = [f"{'layer':<{width}}  {'channels':>12}  {'MACs before':>14}"
                 f"  {'MACs after':>14}  {'share':>6}"]
        for r in rows:
            old = before.get(r.name)
            share = r.macs / self.macs if self.macs else 0.0
            lines.append(
                f"{r.name:<{width}}  {channels(r, old):>12}  "
                f"{old.macs if old else 0:>14,}  {r.macs:>14,}  "
                f"{share:>6.1%}")
        kept = self.macs / reference.macs if reference.macs else 1.0
        lines.append(f"{'total':<{width}}  {'':>12}  {reference.macs:>14,}  "
                     f"{self.macs:>14,}  {kept:>6.1%} kept")
        return "\n".join(lines)

    def __str__(self):
        return f"{self.macs / 1e6:,.2f} M MACs, {self.params / 1e6:,.3f} M params"


def _has_free_nested_inputs(model):
    if any(d is None for t in _graph.inputs_of(model) for d in t.shape[1:]):
        return False  # Only `input_shape` can fix the model's own.
    return any(
        _graph.is_graph_model(node.operation) and any(
            d is None for t in _graph.inputs_of(node.operation)
            for d in t.shape[1:])
        for node in _graph.nodes(model))


# Layers whose matrices are looked up, not multiplied: no MACs to miss.
_LOOKUPS = (keras.layers.Embedding,)


def uncounted_layers(analysis):
    """Layers that compute with weight matrices the MACs count misses.

    A layer holding a matrix (a weight with two or more axes longer than
    1: a kernel) without a MACs rule multiplies with it somewhere
    keras-chex cannot see: a custom layer with a convolution inside,
    attention, an `EinsumDense`. Broadcast vectors (a `Normalization`'s
    mean of shape (1, 1, 1, 3)) are not matrices.

    Returns:
        (names, their share of the model's parameters).
    """
    names, hidden, total = [], 0, 0
    known = {id(term.operation) for term in analysis.macs_terms}
    for layer, weights in analysis.parameter_weights():
        size = sum(int(np.prod(v.shape)) for v in weights)
        total += size
        if (id(layer) not in known and not isinstance(layer, _LOOKUPS)
                and any(sum(d > 1 for d in v.shape) >= 2
                        for v in weights)):
            names.append(layer.name)
            hidden += size
    return names, (hidden / total if total else 0.0)


def describe_uncounted(names, share):
    """The layers `uncounted_layers` found, for a message."""
    listed = ", ".join(f"'{n}'" for n in names[:5]) + (
        f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (f"the MACs of {listed} are unknown to keras-chex (layers it "
            f"cannot look inside; {share:.0%} of the parameters)")


def _kept_size(variable, slices, class_mask):
    size = 1
    by_axis = {s.axis % len(variable.shape): s for s in slices}
    for axis, dim in enumerate(variable.shape):
        if axis in by_axis:
            size *= int(masks_lib.keep_mask(by_axis[axis].classes, class_mask).sum())
        else:
            size *= int(dim)
    return size


def count_macs(model, class_mask=None, input_shape=None):
    """Counts MACs and parameters of a model, honouring channel masks.

    Args:
        model: a Functional or Sequential model, plain or wrapped.
        class_mask: optional bool vector over all channels of all groups
            (see `ModelAnalysis.class_mask`), to count a hypothetical
            pruning without setting it; defaults to the model's masks.
        input_shape: the input shape to count at, without the batch axis
            (a list of shapes for several inputs). Needed when the model's
            spatial dimensions are free (`keras.Input((None, None, 3))`);
            MACs depend on them, parameters do not. A model wrapped with
            `input_shape=` is counted at that shape by default.

    Returns:
        A `CountResult` with totals and a per-layer breakdown.

    Raises:
        ValueError: spatial dimensions unknown and no `input_shape`, or an
            `input_shape` that does not fit the model's inputs.

    Example:

    ```python
    result = keras_chex.count_macs(keras.applications.ResNet50(weights=None))
    print(result.macs / 1e9)  # 3.86
    fcn = keras.applications.MobileNetV2(weights=None, include_top=False,
                                         input_shape=(None, None, 3))
    print(keras_chex.count_macs(fcn, input_shape=(160, 160, 3)))
    ```
    """
    # A model wrapped with `input_shape=` needs no rebuild: its own cached
    # analysis (below) is priced at that shape.
    if input_shape is not None:
        model = _graph.with_input_shapes(
            model, input_shapes.input_batch_shapes(model, input_shape))
    elif _has_free_nested_inputs(model):
        # A nested model built on free spatial dims, called at known ones.
        model = _graph.with_input_shapes(
            model, [tuple(t.shape) for t in _graph.inputs_of(model)])
    analysis = cg.analyze(model, warn=False)
    if class_mask is None:
        class_mask = masks_lib.Masks.of(analysis).numpy()
    class_mask = np.asarray(class_mask, dtype=bool)
    def kept(layer, variable):
        name = layer_rules.weight_leaf_name(variable)
        return _kept_size(variable, analysis.slices_for(layer, name),
                          class_mask)

    # By layer, not name: nested models may repeat names (keras-hub's
    # transformer blocks each hold a 'dense_1').
    macs = {}
    for term, coef, layer, variable in analysis.macs_weights():
        key = id(term.operation)
        macs[key] = macs.get(key, 0) + coef * kept(layer, variable)
    outputs = {}
    for s in analysis.weight_slices:
        if s.filters:
            outputs[id(s.layer)] = int(
                masks_lib.keep_mask(s.classes, class_mask).sum())
    uncounted, share = uncounted_layers(analysis)
    if uncounted:
        warnings.warn(
            f"count_macs('{model.name}'): "
            f"{describe_uncounted(uncounted, share)}, so the MACs total "
            "leaves them out.", stacklevel=2)
    rows = []
    for layer, weights in analysis.parameter_weights():
        params = sum(kept(layer, v) for v in weights)
        if not params and id(layer) not in macs:
            continue
        channels = outputs.get(id(layer), getattr(
            layer, "filters", getattr(layer, "units", None)))
        rows.append(LayerCount(layer.name, int(macs.get(id(layer), 0)),
                               int(params), channels))
    return CountResult(
        macs=int(sum(r.macs for r in rows)),
        params=int(sum(r.params for r in rows)),
        layers=tuple(rows),
        uncounted=tuple(uncounted),
    )
