"""What a pruning method plugs into: its state base, registry and checks.

A method is three things: an entry point that validates its arguments and
wraps a model (`keras_chex.prune_and_regrow`, `keras_chex.soft_mask_prune`,
...), a `PruningState` subclass that holds everything the method needs
between steps in Keras variables (so `.keras` files, `BackupAndRestore`
and `MirroredStrategy` keep it for free), and a `callback.PruningCallback`
subclass that runs its steps during `fit`. The wrapped model names its
method in `pruning_config["method"]`; `register_method` maps that name to
the state class, so a loaded model gets its state back, and
`register_callback` to its callbacks, so `fit` can tell when one is
missing.

What the entry point was given is a typed `config.MethodConfig` (the
state's `config`); the argument checks live in `checks`. The width
arithmetic every method shares (minimum widths, rounding, the widths a
group may take) lives here once.
"""

import os
import warnings
import weakref

import keras
import numpy as np

from keras_chex.core import allocation
from keras_chex.core import config as config_lib
from keras_chex.core import input_shapes
from keras_chex.core import costs
from keras_chex.core import masks as masks_lib
from keras_chex.core import latency_table

# method name -> class of the state object a wrapped model carries for it.
_METHOD_STATES = {}


def register_method(name, state_class):
    """Lets `PrunableModel`s whose config names `name` carry its state.

    Args:
        name: the method's name, as stored in `pruning_config["method"]`.
        state_class: a `PruningState` subclass, built as
            `state_class(model)`.
    """
    _METHOD_STATES[name] = state_class


# method name -> its `fit` callback classes (`PruningCallback` subclasses
# register themselves as they are defined).
_METHOD_CALLBACKS = {}


def register_callback(name, callback_class):
    """Records `callback_class` as a `fit` callback of method `name`."""
    _METHOD_CALLBACKS.setdefault(name, []).append(callback_class)


def callback_classes(name):
    """The callback classes of method `name`, the first registered first
    (none for a model wrapped without a method)."""
    return list(_METHOD_CALLBACKS.get(name, ()))


def every_callback_class():
    """The callback classes of every method."""
    return [c for classes in _METHOD_CALLBACKS.values() for c in classes]


def state_class(name, model_name):
    """The state class registered for method `name`.

    Raises:
        ValueError: no method of that name is registered.
    """
    if name not in _METHOD_STATES:
        raise ValueError(
            f"Model '{model_name}' was made for pruning method '{name}', "
            "which this keras-chex does not know (known: "
            f"{sorted(_METHOD_STATES)}). Upgrade keras-chex, or load the "
            "model with the version that saved it."
        )
    return _METHOD_STATES[name]


class PruningState(keras.layers.Layer):
    """Base of a pruning method's state: one per wrapped model.

    Built by `PrunableModel` from the model's `pruning_config`; users do
    not build it. Subclasses add their variables with `add_weight` (saved
    with the model) and keep references to the model's own objects in
    `self._plain`, out of Keras' tracking, so that the model's variables
    are not counted twice as this layer's weights.

    A subclass may define `transform_gradients(grads, variables)`: the
    wrapped model's train step then calls it inside the compiled step with
    the gradients of the trainable variables, and applies what it returns
    (importance accumulation and extra decay live there).

    Args:
        model: the `PrunableModel`.
        name: the layer name of the state.

    A subclass sets `config_class`, its `config.MethodConfig` subclass:
    the state reads the model's stored configuration back as one.

    Attributes:
        config: the model's pruning configuration (a `config_class`).
        analysis: the model's `ModelAnalysis`.
        cost: the `costs.CostModel` of the analysis.
        group_sizes: int array, channels per group.
        group_ids: int array, the group of every channel.
        min_counts: int array, fewest channels each group keeps.
    """

    config_class = config_lib.MethodConfig

    def __init__(self, model, name, **kwargs):
        super().__init__(name=name, **kwargs)
        object.__setattr__(self, "_plain", {})
        # A weak reference: Keras walks `_plain` when saving, and the model
        # inside it would lead the walk round in a circle.
        self._plain["model"] = weakref.ref(model)
        analysis = model.analysis
        self._plain["config"] = self.config_class.from_dict(
            model.pruning_config)
        self._plain["analysis"] = analysis
        self.cost = costs.CostModel(analysis)
        self.num_channels = analysis.num_channels
        self.group_sizes = np.array([g.size for g in analysis.groups],
                                    dtype=np.int64)
        self.group_ids = costs.channel_groups_of(analysis)
        self.min_counts = min_counts(self.config.min_channels,
                                     self.group_sizes)

    def attach_trainer(self, model):
        """Records the model `fit` runs on (the wrapped model, or a
        Distiller whose student it is): its optimizer is the one that
        trains the wrapped model's weights."""
        self._plain["trainer"] = weakref.ref(model)

    def optimizer(self):
        """The optimizer training the wrapped model (None before `fit`)."""
        trainer = self._plain.get("trainer")
        model = trainer() if trainer is not None else None
        if model is None:
            model = self._plain["model"]()
        return getattr(model, "optimizer", None)

    config = property(lambda self: self._plain["config"])
    analysis = property(lambda self: self._plain["analysis"])
    masks = property(lambda self: masks_lib.Masks.of(self.analysis))

    def resource(self):
        """'macs', 'params' or 'latency': what the method's target counts
        (MACs for targets that count channels)."""
        return {"params": "params", "latency": "latency"}.get(
            self.config.target, "macs")

    def group_cost(self):
        """The target's cost as a `costs.GroupCost` of group widths: MACs,
        parameters, or the latency table stored with the model."""
        if self._plain.get("group_cost") is None:
            if self.resource() == "latency":
                table = latency_table.LatencyTable.from_json(
                    self.config.cost_table)
                cost = table.group_cost(self.analysis.sized)
            else:
                cost = self.cost.group_cost(self.analysis, self.resource())
            self._plain["group_cost"] = cost
        return self._plain["group_cost"]

    def current_counts(self):
        """Channels kept per group now."""
        return self.masks.counts()

    def cost_of(self, mask):
        """The target's cost of a model-wide mask (exact for MACs and
        parameters; for latency, the table's prediction)."""
        if self.resource() == "latency":
            return self.group_cost().total(self.masks.counts(mask))
        return self.cost.cost(mask, self.resource())

    def widths(self):
        """The widths each group may take (`width_options`)."""
        return [width_options(size, minimum, self.config.round_to)
                for size, minimum in zip(self.group_sizes, self.min_counts)]

    def allocate(self, importance, fraction, priority=None):
        """Widths of maximal summed importance within a cost budget.

        The one allocator the methods share: each group keeps one of its
        `widths()`, worth the summed `importance` of its best channels, and
        the total cost of the target's kind (MACs, parameters or the
        latency table) stays within `fraction` of dense, by the exact
        knapsack of `core.allocation`. Warns once when even the narrowest
        widths cost more.

        Args:
            importance: float array over all channels.
            fraction: the budget, a fraction of the dense cost.
            priority: optional array over all channels breaking ties
                (higher first).

        Returns:
            (counts, mask, cost): channels kept per group, the bool mask
            keeping each group's best channels (and one per producer), and
            the cost of `counts` as a fraction of dense.
        """
        cost = self.group_cost()
        dense = cost.total(self.group_sizes)
        widths = self.widths()
        values, orders = allocation.option_values(
            importance, self.group_sizes, widths, priority)
        chosen = allocation.allocate(values, widths, cost, fraction * dense,
                                     self.current_counts())
        if not chosen.feasible:
            self.warn_unreachable(chosen.cost / dense, step_budget=fraction)
        mask = keep_a_channel_per_producer(
            allocation.mask_from_counts(orders, self.group_sizes,
                                        chosen.counts),
            importance, self.masks.producer_segments())
        return chosen.counts, mask, chosen.cost / dense if dense else 1.0

    def warn_unreachable(self, reachable, step_budget=None):
        """Warns, once for this model, that no allowed widths meet the
        target, and names what does: the first allocation and every later
        one find the same floor.

        Args:
            reachable: the narrowest widths' cost, a fraction of dense.
            step_budget: the budget of the step that found it, when a
                schedule approaches the target in steps (named if it is not
                the target).
        """
        if self._plain.get("warned"):
            return
        self._plain["warned"] = True
        target, value = self.config.target, self.config.target_value
        step = ("" if step_budget is None or abs(step_budget - value) < 1e-9
                else f", more than even this step's budget of "
                     f"{step_budget:.3f}")
        warnings.warn(
            f"The target {target}={value:g} cannot be met: even the "
            f"narrowest widths allowed keep {reachable:.3f} of the dense "
            f"cost{step} (the `min_channels` and `round_to` floors). The "
            "model is pruned to those widths. Lower `min_channels` or "
            "`round_to`, or raise the target.", stacklevel=3)

    def kept_fraction(self):
        """Current cost of the target's kind over the dense cost."""
        dense = self.cost_of(np.ones(self.num_channels, bool))
        return self.cost_of(self.masks.numpy()) / dense if dense else 1.0

    def load_own_variables(self, store):
        super().load_own_variables(store)
        # A file of keras-chex 0.1.0 has been read: save the new way now.
        model = self._plain["model"]()
        if model is not None:
            model._legacy_state_path = False

    def get_config(self):
        return {"name": self.name}


# -- latency tables -----------------------------------------------------------
def latency_config(target, cost_table, model, input_shape=None):
    """What a model stores of `cost_table` (None unless `target` is
    "latency"): the entries and calibration it uses, so its `.keras` file
    prices itself anywhere and a table shared by many models does not grow
    each config. `input_shape` is the size a free-size model is priced at.

    Raises:
        ValueError: a latency target without a table, a table without a
            latency target, not a table, or a table that lacks `model`'s
            layers (named).
    """
    if target != "latency":
        if cost_table is not None:
            raise ValueError(
                "`cost_table` is used with a `latency` target only; drop it, "
                f"or give `latency=` instead of `{target}=`.")
        return None
    if cost_table is None:
        raise ValueError(
            "A `latency` target needs `cost_table=`: build one on the target "
            "device with `keras_chex.build_latency_table(model, path)` and "
            "pass it (or its JSON path).")
    if isinstance(cost_table, (str, os.PathLike)):
        cost_table = latency_table.LatencyTable.load(cost_table)
    if not isinstance(cost_table, latency_table.LatencyTable):
        raise ValueError(
            "`cost_table` must be a LatencyTable or the path of its JSON "
            f"file, got {type(cost_table).__name__}.")
    model = input_shapes.at_fixed_size(
        model, input_shape, "and its latency depends on the size",
        "`input_shape=(224, 224, 3)` (say) to the pruning entry point, the "
        "size the table was built at (`build_latency_table(model, path, "
        "input_shape=...)`)")
    return cost_table.subset(model).to_json()


# -- widths -------------------------------------------------------------------
def min_counts(min_channels, sizes):
    """Fewest channels each group keeps (at least 1, at most its size).

    Args:
        min_channels: an int, or a float in (0, 1) for a fraction of each
            group's size (rounded up).
        sizes: int array of group sizes.
    """
    sizes = np.asarray(sizes)
    if isinstance(min_channels, float):
        counts = np.maximum(1, np.ceil(min_channels * sizes))
    else:
        counts = np.full(len(sizes), min_channels)
    return np.minimum(counts, sizes).astype(np.int32)


def round_counts(counts, sizes, round_to, minimums, ops=np):
    """Rounds keep counts down to the widths `width_options` allows.

    The one rounding rule of every method: a group keeps a multiple of
    `round_to` or its full size (so it can always be kept whole), never
    fewer than its minimum (a minimum between two multiples rounds up to
    the next), and a count below the narrowest allowed width becomes that
    width. Groups smaller than `round_to` keep their count. `ops` is
    `numpy` or `tensorflow` (it needs `where`, `maximum` and `minimum`), so
    CHEX's compiled step and the NumPy planners round the same way.

    Returns:
        For every group, the largest allowed width that is at most
        `max(count, minimum)` (or the narrowest allowed width).
    """
    if round_to <= 1:
        return counts
    sizes, minimums = np.asarray(sizes), np.asarray(minimums)
    if ops is not np:
        dtype = counts.dtype.as_numpy_dtype
        sizes, minimums = sizes.astype(dtype), minimums.astype(dtype)
    counts = ops.minimum(ops.maximum(counts, minimums), sizes)
    down = (counts // round_to) * round_to
    narrowest = np.minimum(
        -(-np.maximum(minimums, 1) // round_to) * round_to, sizes)
    rounded = ops.where(counts >= sizes, sizes, ops.maximum(down, narrowest))
    return ops.where(sizes < round_to, counts, rounded)


def width_options(size, minimum, round_to):
    """The widths a group may take: multiples of `round_to` and the full
    size, none below `minimum` (a group smaller than `round_to` may take
    any width from `minimum` up; a minimum between two multiples rounds up
    to the next).

    Returns:
        A sorted int array, never empty.
    """
    size, minimum = int(size), int(min(minimum, size))
    if round_to <= 1 or size < round_to:
        return np.arange(max(minimum, 1), size + 1)
    widths = np.arange(round_to, size + 1, round_to)
    widths = widths[widths >= minimum]
    if not len(widths) or widths[-1] != size:
        widths = np.append(widths, size)
    return widths.astype(np.int64)


def keep_a_channel_per_producer(mask, scores, segments):
    """`mask` with the best-scored channel of every emptied segment kept.

    Args:
        mask: bool array over all channels.
        scores: float array over all channels (NaN counts as lowest).
        segments: `Masks.producer_segments()`.

    Returns:
        A new bool array; equal to `mask` when no segment is empty.
    """
    mask = np.array(mask, dtype=bool)
    scores = np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf)
    for _, seg in segments:
        if not mask[seg].any():
            mask[seg[np.argmax(scores[seg])]] = True
    return mask


def keep_a_channel_per_producer_tf(mask, scores, segments):
    """The same inside a compiled step: float32 mask and scores tensors."""
    import tensorflow as tf

    for _, seg in segments:
        empty = tf.reduce_sum(tf.gather(mask, seg)) < 0.5
        best = tf.gather(seg, tf.argmax(tf.gather(scores, seg)))
        mask = tf.tensor_scatter_nd_max(
            mask, tf.reshape(best, [1, 1]),
            tf.reshape(tf.cast(empty, mask.dtype), [1]))
    return mask

