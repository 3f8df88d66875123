"""Channel groups: the sets of channels that must be kept or removed together.

The analysis gives every channel position of every tensor in the graph an
integer id. Layers that create channels (convolutions, dense) allocate new
ids; layers that move channels (pooling, BatchNorm, Concatenate, Flatten, ...)
pass ids along; layers that tie channels together (Add, Multiply, a layer
called twice, a grouped convolution) unite ids. After the walk, each
union-find class of ids is one *logical channel*; the classes written by the
same layer(s) form one `ChannelGroup`. Channels of model inputs and outputs,
and channels touched by layers the analysis does not understand, are blocked:
they belong to no group and are never pruned.
"""

import collections
import warnings
import weakref

import numpy as np

from keras_chex.core import _graph
from keras_chex.core import composites
from keras_chex.core import layer_registry
from keras_chex.core import layer_rules
from keras_chex.core import masking
from keras_chex.core import masks as masks_lib
from keras_chex.core import union_find


class WeightSlice:
    """One axis of one layer weight whose entries belong to channels.

    Attributes:
        layer: the Keras layer owning the weight.
        name: the weight's leaf name ('kernel', 'bias', 'gamma', ...).
        axis: the axis along which entries belong to channels.
        classes: int array, the global channel index of each entry along
            `axis` (-1 for entries that are never pruned).
        filters: True when the entries along `axis` are the filters that
            write the channels (a producer's output axis), the matrix
            columns CHEX's subset selection works on.
    """

    def __init__(self, layer, name, axis, classes, filters=False):
        self.layer = layer
        self.name = name
        self.axis = axis
        self.classes = classes
        self.filters = filters

    def variable(self):
        for v in self.layer.weights:
            if layer_rules.weight_leaf_name(v) == self.name:
                return v
        return None


class ChannelGroup:
    """A set of channels that are kept or removed together.

    Obtain groups with `keras_chex.channel_groups(model)`. On a model
    returned by `keras_chex.prune_and_regrow` (or `keras_chex.wrap`) the
    group's mask can be read and set; this is the handle for custom pruning
    criteria.

    Attributes:
        name: name of the first layer that writes these channels.
        size: number of channels in the group.
        producers: names of the layers whose outputs are these channels.
        layers: names of every layer with weights indexed by these channels
            (producers, consumers, BatchNorms, depthwise convolutions, ...).
        start: offset of the group's channels in the model-wide channel
            vector used by `ModelAnalysis`.

    Example:

    ```python
    wrapped = keras_chex.wrap(model)
    for group in keras_chex.channel_groups(wrapped):
        mask = group.mask
        mask[: group.size // 2] = False
        group.set_mask(mask)
    ```
    """

    def __init__(self, analysis, index, name, start, size, producers, layers):
        self._analysis = analysis
        self.index = index
        self.name = name
        self.start = start
        self.size = size
        self.producers = producers
        self.layers = layers

    @property
    def mask(self):
        """Bool array of length `size`: True for kept channels."""
        return masks_lib.Masks.of(self._analysis).channels(
            self.start, self.start + self.size)

    def set_mask(self, mask):
        """Sets which channels of the group are kept.

        Args:
            mask: bool array-like of length `size` (True = keep).

        Raises:
            ValueError: wrong length, no channel kept, or the model carries
                no masks (a plain model: wrap it first).
        """
        mask = np.asarray(mask)
        if mask.shape != (self.size,):
            raise ValueError(
                f"Mask for channel group '{self.name}' must have shape "
                f"({self.size},), got {mask.shape}."
            )
        if not mask.any():
            raise ValueError(
                f"Mask for channel group '{self.name}' removes all "
                f"{self.size} channels; keep at least one (removing a whole "
                "group would disconnect the network)."
            )
        masks_lib.Masks.of(self._analysis).assign_channels(self.start, mask)

    def weight_slices(self):
        """The `WeightSlice`s that touch this group's channels."""
        lo, hi = self.start, self.start + self.size
        return [
            s for s in self._analysis.weight_slices
            if np.any((s.classes >= lo) & (s.classes < hi))
        ]

    def __repr__(self):
        return (
            f"<ChannelGroup '{self.name}' size={self.size} "
            f"kept={int(self.mask.sum())} layers={len(self.layers)}>"
        )


class _Context:
    """What `LayerRule.propagate` sees while the graph is walked."""

    def __init__(self, analysis):
        self._a = analysis
        self.uf = union_find.UnionFind()
        self.blocked = []
        self.fixed = []  # The blocked ids not blocked by an opaque layer.
        self.block_reasons = {}
        self.layer_blocks = {}
        self.block_order = []  # (layer, ids) in creation order.
        self.slices = {}  # (id(layer), name, axis) -> [layer, ids]
        self.macs = []  # (node, coef, layer, weight name)
        self.masks = []  # (mask layer, ids)
        self.opaque_inputs = []  # (layer name, ids it consumed)

    # -- ids of tensors ------------------------------------------------
    def ids(self, tensor):
        return self._a._tensor_ids[id(tensor)]

    def set_ids(self, tensor, ids):
        ids = np.asarray(ids, dtype=np.int64)
        channels = tensor.shape[-1] if len(tensor.shape) >= 2 else 0
        if channels is not None and len(ids) != channels:
            raise layer_rules.Unsupported(
                f"internal: {len(ids)} ids for {channels} channels"
            )
        self._a._tensor_ids[id(tensor)] = ids
        self._a._tensors[id(tensor)] = tensor

    def fresh(self, tensor, blocked_reason=None):
        shape = tensor.shape
        n = shape[-1] if len(shape) >= 2 else 0
        if n is None:
            n = 0
        ids = self.uf.new(n)
        if blocked_reason:
            self.block(ids, blocked_reason)
        self._a._tensor_ids[id(tensor)] = ids
        self._a._tensors[id(tensor)] = tensor
        return ids

    # -- coupling ------------------------------------------------------
    def layer_block(self, layer, n):
        """New channel ids written by `layer` (the same for every call)."""
        key = id(layer)
        if key not in self.layer_blocks:
            ids = self.uf.new(n)
            self.layer_blocks[key] = ids
            self.block_order.append((layer, ids))
        return self.layer_blocks[key]

    def union(self, a, b):
        for i, j in zip(a.tolist(), b.tolist()):
            self.uf.union(i, j)

    def block(self, ids, reason, opaque=None):
        ids = np.asarray(ids, dtype=np.int64)
        self.blocked.append(ids)
        if opaque is not None:
            self.opaque_inputs.append((opaque, ids))
        else:
            self.fixed.append(ids)
        for i in ids[:1].tolist():
            self.block_reasons.setdefault(i, reason)

    def couple_across_groups(self, ids, groups):
        per_group = ids.reshape(groups, -1)
        for g in range(1, groups):
            self.union(per_group[0], per_group[g])
        return ids

    # -- weights and costs ---------------------------------------------
    def weight_slice(self, layer, name, axis, ids, filters=False):
        if not any(layer_rules.weight_leaf_name(v) == name
                   for v in layer.weights):
            return  # e.g. use_bias=False
        key = (id(layer), name, axis)
        if key in self.slices:
            # A shared layer: each call must drop the same entries.
            self.union(self.slices[key][1], np.asarray(ids))
        else:
            self.slices[key] = [layer, np.asarray(ids, dtype=np.int64),
                                filters]

    def add_macs(self, node, coef, layer, name):
        self.macs.append((node, coef, layer, name))

    def mask_layer(self, layer, ids):
        self.masks.append((layer, np.asarray(ids, dtype=np.int64)))


# Traced graph -> its MACs terms: a model is analysed again at every
# count, and the traced graph of a closed layer does not change.
_COMPOSITE_TERMS = weakref.WeakKeyDictionary()


def _composite_macs(layer, node):
    """`(coefficient, layer, weight name)` MACs terms of a call of a
    composite layer left closed, from the graph of its `call` (all its
    channels are kept, so the full sizes count); none when the graph
    cannot be traced or has layers whose MACs are unknown."""
    from keras_chex.core import counting

    sub = composites.traced_for_cost(layer, node)
    if sub is None:
        return []
    if sub in _COMPOSITE_TERMS:
        return _COMPOSITE_TERMS[sub]
    inner = ModelAnalysis(sub, warn=False)
    terms = []
    if not counting.uncounted_layers(inner)[0] and all(
            t.coef is not None for t in inner.macs_terms):
        terms = [(t.coef, t.weight[0], t.weight[1])
                 for t in inner.macs_terms]
    _COMPOSITE_TERMS[sub] = terms
    return terms


class MaskSite:
    """A `ChannelMask` layer and the channel index of each position."""

    def __init__(self, layer, classes):
        self.layer = layer
        self.classes = classes


class MacsTerm:
    """MACs of one call: `coef` times the kept size of one weight."""

    def __init__(self, layer_name, coef, weight, operation=None):
        self.layer_name = layer_name
        self.coef = coef
        self.weight = weight  # (layer, weight name)
        # The layer called (names repeat across nested models).
        self.operation = operation


class ModelAnalysis:
    """Channel analysis of a Functional or Sequential model.

    Args:
        model: the model.
        exclude: names of layers whose channels must not be pruned.
        warn: emit a warning naming every unsupported layer.
        input_shape: optional batch shape of each model input (batch axis
            first) to count MACs at, for a model whose spatial size is free
            (`keras.Input((None, None, 3))`); the channel analysis itself
            does not depend on it.

    Attributes:
        groups: list of prunable `ChannelGroup`s, in graph order.
        num_channels: total channels over all groups.
        unsupported: list of (layer name, reason) for layers left alone.
        weight_slices: list of `WeightSlice`.
        mask_sites: list of `MaskSite` (empty on a plain model).
        macs_terms: list of `MacsTerm`.
        sized: the analysis of the model's graph at `input_shape` (the same
            layers, groups and channels, with concrete tensor sizes), or
            this analysis when no `input_shape` is given.
    """

    def __init__(self, model, exclude=(), warn=True, input_shape=None):
        # Composite layers are analysed through the layers inside them.
        model = composites.open_composites(model)
        self.model = model
        self._excluded_depth = 0
        self.exclude = set(exclude)
        self._tensor_ids = {}
        self._tensors = {}
        self._nodes = {}  # id(graph model) -> [GraphNode]
        self._graphs = {}  # id(graph model) -> graph model
        self.unsupported = []
        self._slices_by_weight = None
        # Names of the nested models around the walk, and each layer's
        # "outer/inner" path: layer names repeat across nested models.
        self._path = []
        self._paths = {}
        ctx = _Context(self)
        self._ctx = ctx
        self._walk(model, top=True)
        unknown = (self.exclude - self._seen_names
                   - set(self._paths.values()))
        if unknown:
            raise ValueError(
                f"exclude names layers that are not in model "
                f"'{model.name}': {sorted(unknown)}."
            )
        self._finish(ctx)
        # The analysis of the same graph at concrete sizes, for costs that
        # depend on them (MACs, latency); this one where sizes are known.
        self.sized = self
        if input_shape is not None:
            self._count_macs_at(input_shape)
        harmful = self._harmful_opaque(ctx) | {
            n for n, r in self.unsupported if r == layer_rules.CHANNELS_FIRST}
        if warn and harmful:
            by_reason = {}
            for n, r in self.unsupported:
                if n in harmful:
                    by_reason.setdefault(r, []).append(f"'{n}'")
            listing = "; ".join(f"{', '.join(names)} ({r})"
                                for r, names in by_reason.items())
            warnings.warn(
                "keras-chex leaves the channels of these layers unpruned "
                f"because it cannot analyse them: {listing}.",
                stacklevel=3,
            )

    # -- walking -------------------------------------------------------
    @property
    def _seen_names(self):
        names = set()
        for nodes in self._nodes.values():
            names.update(n.operation.name for n in nodes)
        return names

    def _walk(self, model, top):
        ctx = self._ctx
        graph_nodes = _graph.nodes(model)
        self._nodes[id(model)] = graph_nodes
        self._graphs[id(model)] = model
        for t in _graph.inputs_of(model):
            ctx.fresh(t, "a model input" if top else None)
        for node in graph_nodes:
            self._visit(node)
        if top:
            for t in _graph.outputs_of(model):
                ctx.block(ctx.ids(t), "a model output")

    def _visit(self, node):
        ctx = self._ctx
        op = node.operation
        name = composites.origin_name(op.name) if _graph.is_graph_model(
            op) else op.name
        path = self._paths.setdefault(id(op), "/".join(self._path + [name]))
        if _graph.is_graph_model(op):
            if id(op) not in self._nodes:
                # Excluding a nested model (or an opened composite layer)
                # excludes every layer inside it.
                excluded = name in self.exclude or path in self.exclude
                self._excluded_depth += excluded
                self._path.append(name)
                self._walk(op, top=False)
                self._path.pop()
                self._excluded_depth -= excluded
            for outer, inner in zip(node.inputs, _graph.inputs_of(op)):
                ctx.union(ctx.ids(outer), ctx.ids(inner))
            for outer, inner in zip(node.outputs, _graph.outputs_of(op)):
                ctx.set_ids(outer, ctx.ids(inner))
            return
        rule = self.rule_for(op)
        reason, keeps_channels = None, False
        if rule is None:
            closed = composites.closed_reason(op)
            reason = (f"{type(op).__name__} is not a supported layer"
                      if closed is None else
                      f"{type(op).__name__} is made of layers, but keras-chex "
                      f"cannot look inside it: {closed}")
        elif any(
            t.shape[-1] is None for t in node.inputs + node.outputs
            if len(t.shape) >= 2
        ):
            reason = "its channel count is unknown"
        else:
            try:
                rule.propagate(ctx, node)
            except layer_rules.Unsupported as e:
                reason = str(e)
                keeps_channels = e.keeps_channels
        if reason is not None:
            self._opaque(node, reason, keeps_channels)
            if rule is None:
                for coef, layer, name in _composite_macs(op, node):
                    ctx.add_macs(node, coef, layer, name)
            for coef, name, *holder in rule.opaque_macs(node) if rule else ():
                if coef is not None:
                    ctx.add_macs(node, coef, holder[0] if holder else op,
                                 name)
        elif (op.name in self.exclude or path in self.exclude
              or self._excluded_depth):
            for t in node.inputs + node.outputs:
                ctx.block(ctx.ids(t), "excluded by the user")

    def _opaque(self, node, reason, keeps_channels=False):
        ctx = self._ctx
        if node.operation.name not in [n for n, _ in self.unsupported]:
            self.unsupported.append((node.operation.name, reason))
        for t in node.inputs:
            if id(t) in self._tensor_ids:
                ctx.block(ctx.ids(t), f"used by '{node.operation.name}'",
                          opaque=node.operation.name)
        if keeps_channels:
            ctx.set_ids(node.outputs[0], ctx.ids(node.inputs[0]))
            return
        for t in node.outputs:
            ctx.fresh(t, f"written by '{node.operation.name}'")

    @staticmethod
    def rule_for(op):
        # Mask layers know their own rule.
        if isinstance(op, masking.ChannelMask):
            return masking.MASK_RULE
        if isinstance(op, masking.MaskedBatchNormalization):
            return masking.MASKED_BATCHNORM_RULE
        if type(op) is masking.TrackingBatchNormalization:
            return masking.TRACKING_BATCHNORM_RULE
        return layer_registry.rule_for(op)

    def _harmful_opaque(self, ctx):
        """Unsupported layers that cost prunable channels (worth a warning).

        A softmax on the model's output, say, touches only channels that
        are fixed anyway; warning about it would be noise.
        """
        roots = ctx.uf.roots()
        fixed = np.zeros(len(roots), dtype=bool)
        for ids in ctx.fixed:
            fixed[roots[ids]] = True
        return {
            name for name, ids in ctx.opaque_inputs
            if len(ids) and not fixed[roots[ids]].all()
        }

    # -- groups ----------------------------------------------------------
    def _finish(self, ctx):
        roots = ctx.uf.roots()
        blocked = np.zeros(len(roots), dtype=bool)
        for ids in ctx.blocked:
            blocked[roots[ids]] = True
        if ctx.masks:
            # On a wrapped model a channel no mask covers cannot be pruned.
            covered = np.zeros(len(roots), dtype=bool)
            for _, ids in ctx.masks:
                covered[roots[ids]] = True
            blocked |= ~covered
        is_root = roots == np.arange(len(roots))
        prunable_root = is_root & ~blocked

        # Classes written by the same layer form one group; link them.
        link = union_find.UnionFind()
        link.new(len(roots))
        for _, ids in ctx.block_order:
            r = roots[ids]
            r = r[prunable_root[r]]
            for a in r[1:].tolist():
                link.union(int(r[0]), a)
        order, members, names, firsts = {}, {}, {}, {}
        for layer, ids in ctx.block_order:
            for r in roots[ids].tolist():
                if not prunable_root[r]:
                    continue
                g = link.find(r)
                if g not in order:
                    order[g] = len(order)
                    members[g] = []
                    names[g] = []
                    firsts[g] = layer
                if r not in members[g]:
                    members[g].append(r)
                if layer.name not in names[g]:
                    names[g].append(layer.name)
        class_of_root = np.full(len(roots), -1, dtype=np.int64)
        starts = []
        next_index = 0
        for g in sorted(order, key=order.get):
            starts.append(next_index)
            class_of_root[members[g]] = np.arange(
                next_index, next_index + len(members[g])
            )
            next_index += len(members[g])
        self.num_channels = next_index
        self._class_of_id = class_of_root[roots]

        def classes(ids):
            return self._class_of_id[ids] if len(ids) else ids

        self.weight_slices = [
            WeightSlice(layer, name, axis, classes(ids), filters)
            for (_, name, axis), (layer, ids, filters) in ctx.slices.items()
        ]
        self.mask_sites = [MaskSite(layer, classes(ids))
                           for layer, ids in ctx.masks]
        self.macs_terms = [
            MacsTerm(node.operation.name, coef, (layer, name),
                     node.operation)
            for node, coef, layer, name in ctx.macs
        ]
        # A group is named after its first producer; by its path when
        # another group's producer has the same name (keras-hub's
        # transformer blocks each hold a 'dense_1').
        counts = collections.Counter(names[g][0] for g in order)
        for g in order:
            if counts[names[g][0]] > 1:
                names[g][0] = self._paths.get(id(firsts[g]), names[g][0])
        # The layers whose weights each group's channels slice, in the
        # slices' order: one pass over the slices (a pass per group is
        # quadratic, seconds on a model of hundreds of groups).
        touching = [[] for _ in starts]
        for s in self.weight_slices:
            classes = s.classes[s.classes >= 0]
            if not len(classes):
                continue
            for i in np.unique(np.searchsorted(starts, classes,
                                               side="right") - 1).tolist():
                if s.layer.name not in touching[i]:
                    touching[i].append(s.layer.name)
        self.groups = []
        for i, g in enumerate(sorted(order, key=order.get)):
            self.groups.append(
                ChannelGroup(self, i, names[g][0], starts[i],
                             len(members[g]), list(names[g]), touching[i])
            )

    def _count_macs_at(self, batch_shapes):
        """Takes the MACs coefficients from the same graph at fixed input
        shapes (its layers are this model's, so only the sizes differ)."""
        shaped = ModelAnalysis(_graph.with_input_shapes(self.model,
                                                        batch_shapes),
                               exclude=self.exclude, warn=False)
        def structure(a):
            return ([(t.layer_name, t.weight[1]) for t in a.macs_terms],
                    [(g.name, g.size) for g in a.groups])

        if structure(self) != structure(shaped):
            raise ValueError(
                f"Model '{self.model.name}' computes differently at input "
                f"shape {[tuple(s[1:]) for s in batch_shapes]} than at its "
                "free size, so its MACs cannot be counted at that shape. "
                "Build the model with a fixed input shape instead.")
        for term, at_shape in zip(self.macs_terms, shaped.macs_terms):
            term.coef = at_shape.coef
        self.sized = shaped

    # -- per-weight views ------------------------------------------------
    def slices_for(self, layer, name):
        """The `WeightSlice`s of weight `name` of `layer` (maybe none)."""
        if self._slices_by_weight is None:
            self._slices_by_weight = {}
            for s in self.weight_slices:
                self._slices_by_weight.setdefault(
                    (id(s.layer), s.name), []).append(s)
        return self._slices_by_weight.get((id(layer), name), ())

    def macs_weights(self):
        """(term, coefficient, layer, variable) of every MACs term.

        A call's MACs are `coefficient` times the kept size of `variable`;
        `term.operation` is the layer whose call it is.

        Raises:
            ValueError: a call has an input of unknown spatial size.
        """
        result = []
        for term in self.macs_terms:
            layer, name = term.weight
            if term.coef is None:
                raise ValueError(
                    f"Layer '{term.layer_name}' has an input of unknown "
                    "spatial size, so its MACs are undefined. Give the size "
                    "to count at: `input_shape=(224, 224, 3)` (say) to the "
                    "pruning entry point (`prune_and_regrow`, "
                    "`soft_mask_prune`, `relevance_prune`, `wrap`) or to "
                    "`count_macs`, or build the model with a fixed input "
                    "shape."
                )
            variable = next(v for v in layer.weights
                            if layer_rules.weight_leaf_name(v) == name)
            result.append((term, term.coef, layer, variable))
        return result

    def parameter_weights(self):
        """(layer, its parameter variables) for every layer of the model.

        Masks are not parameters (see `masking.parameter_weights`).
        """
        return [(layer, masking.parameter_weights(layer))
                for layer in _graph.all_layers(self.model)]

    # -- per-tensor views ------------------------------------------------
    def classes_of(self, tensor):
        """Global channel index of each position of `tensor` (-1: fixed)."""
        return self._class_of_id[self._tensor_ids[id(tensor)]]

    def nodes_of(self, model=None):
        """The analysed `GraphNode`s of `model` (default: the top model)."""
        return self._nodes[id(model or self.model)]


def analyze(model, exclude=(), warn=True):
    """Runs the channel analysis; see `ModelAnalysis`."""
    cached = getattr(model, "analysis", None)
    if cached is not None and not exclude:
        return cached
    return ModelAnalysis(model, exclude=exclude, warn=warn)


def channel_groups(model):
    """Finds the channel groups of a Keras model.

    Args:
        model: a Functional or Sequential Keras model, plain or wrapped by
            `keras_chex.prune_and_regrow` / `keras_chex.wrap`.

    Returns:
        A list of `ChannelGroup`, one per set of channels that must be
        kept or removed together, in graph order. Unsupported layers are
        reported with a warning and their channels are in no group.

    Example:

    ```python
    model = keras.applications.ResNet50(weights=None)
    groups = keras_chex.channel_groups(model)
    print(len(groups), groups[0].name, groups[0].size)
    ```
    """
    return analyze(model).groups
