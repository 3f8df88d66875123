"""CHEX: prune and regrow channels during training (Hou et al., CVPR 2022).

`prune_and_regrow` wraps a model and sets the initial masks;
`ChexState` holds everything the method needs between exploration steps in
Keras variables (so `.keras` files and `BackupAndRestore` keep it) and runs
one exploration step:

1. refresh the stored copy of every weight entry whose channels are active
   (so a pruned channel keeps its *most recently used* values) and score
   every active channel by |BatchNorm gamma| (`importance`);
2. choose each group's width: with `allocator="threshold"` (the paper's),
   one global ranking of all channels, the threshold at the smallest global
   sparsity `S` whose widths meet the MACs / params target (bisection on
   the closed-form `CostModel`), and a second at `S - delta_t` for the
   widths after regrowth; with `allocator="knapsack"`, the allocator the
   methods share (`PruningState.allocate`: maximal summed |gamma| within
   the MACs, parameters or a latency table's prediction), regrowth adding
   `delta_t` of each group's size;
3. inside each group keep the channels with the highest leverage scores of
   the filter matrix (column subset selection);
4. regrow channels sampled with probability softmax(projection residual onto
   the kept filters), and restore their stored weights exactly;
5. write the new masks.

Regrowth is capped at half the target sparsity (`delta_t <= S / 2`): the
paper's delta0 = 0.3 assumes S around 0.7, and with a milder target (50% of
the MACs needs only S ~ 0.3) an uncapped delta would regrow everything it
prunes and explore nothing. The initial uniform masks use the uniform
sparsity meeting the target, minus `regrow`.
"""

import numpy as np
import tensorflow as tf

from keras_chex.core import method
from keras_chex.core import wrapping
from keras_chex.methods.chex import allocation
from keras_chex.methods.chex import backups as backups_lib
from keras_chex.methods.chex import config as config_lib
from keras_chex.methods.chex import importance
from keras_chex.methods.chex import initial
from keras_chex.methods.chex import regrowth
from keras_chex.methods.chex import subset_selection

METHOD = config_lib.ChexConfig.method


def prune_and_regrow(model, *, flops=None, params=None, sparsity=None,
                     latency=None, cost_table=None, allocator=None,
                     regrow=0.3, interval=2, until=0.72, min_channels=0.05,
                     round_to=1, exclude=(), seed=None,
                     input_shape=None, pruned_importance="zero",
                     streams="prune", gamma_l1=0.0):
    """Prepares a model for CHEX channel exploration during `model.fit`.

    Args:
        model: a Functional or Sequential Keras model (untouched; a wrapped
            copy is returned).
        flops: fraction of the dense MACs to keep (e.g. 0.5).
        params: fraction of the dense parameter count to keep.
        sparsity: fraction of prunable channels to remove (the paper's S).
        latency: fraction of the dense model's latency to keep, as
            predicted by `cost_table` (measured on the target device).
            Give exactly one of `flops`, `params`, `sparsity`, `latency`.
        cost_table: with `latency`: a `LatencyTable` from
            `keras_chex.build_latency_table(model)`, or the path of its
            JSON file.
        allocator: how the widths are re-allocated at each exploration:
            `"threshold"` (the paper's: one global ranking of all channels'
            |gamma|, the threshold bisected until the cost fits; the
            default for `flops`, `params`, `sparsity`) or `"knapsack"`
            (the allocator the methods share: the widths of maximal summed
            |gamma| within the cost, priced per group; the default for
            `latency`) or `"uniform"` (every group keeps the same fraction
            of its channels, the one that meets the target, as a uniformly
            narrow network; explorations choose only which channels).
            Being measured (docs/benchmarks.md, issue 24).
        regrow: initial regrowth fraction delta0, decayed to 0 with a cosine.
        interval: epochs between exploration steps (fractions allowed).
        until: fraction of the planned training after which masks freeze.
        min_channels: fewest channels a group may keep: an int, or a float
            in (0, 1) for a fraction of the group's size (at least 1).
        round_to: keep channel counts at multiples of this (8 or 16 suit
            CPU/GPU kernels), except where a group is smaller.
        exclude: names of layers never pruned (a nested model's or a
            composite layer's name excludes all inside it; "outer/inner"
            names one layer inside a nested model).
        input_shape: the input size the cost is counted at, without the
            batch axis (e.g. `(224, 224, 3)`; a list for several inputs).
            Needed for a model of free spatial size (`keras.Input((None,
            None, 3))`); the wrapped and stripped models keep the free size.
        seed: random seed for regrowth sampling (drawn at random if None,
            and stored with the model, so a loaded model continues the same).
        pruned_importance: how a pruned channel ranks at re-allocation:
            "zero" (the paper's: after every active channel) or "last"
            (with the |gamma| it had when last used, so a layer can widen
            on merit). Being measured (docs/benchmarks.md, issue 24).
        streams: "prune" (every group competes) or "keep" (groups written
            by several layers, a residual network's streams, keep every
            channel; only the blocks' inner widths are pruned, as the
            reference code does). Being measured.
        gamma_l1: an L1 pressure on the |gamma| of the BatchNorms that
            score channels (added to their gradient as `gamma_l1 *
            sign(gamma)`, as network slimming does), so that |gamma|
            separates channels early. 0 turns it off. Being measured.

    Returns:
        A `keras_chex.PrunableModel` to compile and fit with
        `callbacks=[keras_chex.ChannelExploration()]`.

    Example:

    ```python
    model = keras_chex.prune_and_regrow(model, flops=0.5)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=10, callbacks=[keras_chex.ChannelExploration()])
    compact = keras_chex.strip(model)
    ```
    """
    config = config_lib.ChexConfig.from_arguments(
        {"flops": flops, "params": params, "sparsity": sparsity,
         "latency": latency},
        allocator=allocator, regrow=regrow, interval=interval, until=until,
        min_channels=min_channels, round_to=round_to, seed=seed,
        pruned_importance=pruned_importance, streams=streams,
        gamma_l1=gamma_l1)
    config = config.replace(cost_table=method.latency_config(
        config.target, cost_table, model, input_shape))
    wrapped = wrapping.wrap(model, mode="hard", exclude=exclude,
                            pruning=config.to_dict(), input_shape=input_shape)
    wrapped.pruning_state.initialize()
    return wrapped


class ChexState(method.PruningState):
    """CHEX's state and exploration step for one wrapped model.

    Created by `PrunableModel` for models from `prune_and_regrow`; users do
    not build it. All state lives in non-trainable variables: the stored
    weights of every prunable weight tensor (`WeightBackups`, for exact
    restoration) and the statistics of the last exploration.

    Args:
        model: the `PrunableModel`.
    """

    config_class = config_lib.ChexConfig

    def __init__(self, model, **kwargs):
        super().__init__(model, name="chex_state", **kwargs)
        self._plain["backups"] = backups_lib.WeightBackups(self,
                                                           self.analysis)
        self.last_stats = self.add_weight(
            name="last_stats", shape=(4,), initializer="zeros",
            trainable=False,
        )  # cost fraction, pruned, regrown, explorations done.
        self._plain["fns"] = None
        if self.config.streams == "keep":
            streams = np.array([len(g.producers) > 1
                                for g in self.analysis.groups], bool)
            self.min_counts = np.where(streams, self.group_sizes,
                                       self.min_counts).astype(np.int32)
        if self.config.gamma_l1:
            # The scoring gammas the L1 pressure pushes (see `_slimming`).
            self._plain["gammas"] = {
                id(s.variable()) for s in self.analysis.weight_slices
                if s.name == "gamma"}
        self.built = True

    backups = property(lambda self: self._plain["backups"].copies)

    @property
    def transform_gradients(self):
        """The train step's gradient hook: the L1 pressure on |gamma| when
        `gamma_l1` is set, else None (a plain train step)."""
        return self._slimming if self.config.gamma_l1 else None

    def _slimming(self, grads, variables):
        rate = self.config.gamma_l1
        return [g + tf.cast(rate, g.dtype) * tf.sign(tf.cast(v, g.dtype))
                if g is not None and id(v) in self._plain["gammas"] else g
                for g, v in zip(grads, variables)]

    def allocator(self):
        """'threshold' (one global ranking), 'knapsack' (cost-aware) or
        'uniform' (the same fraction of every group)."""
        return self.config.allocator

    # -- one exploration, in three compiled parts ----------------------------
    def _score(self):
        """Refreshes the stored weights; returns every channel's score."""
        stored = self._plain["backups"]
        mask = self.masks.tensor()
        stored.refresh(mask)
        matrices = [stored.filter_matrix(g)
                    for g in range(len(self.group_sizes))]
        return importance.channel_scores(stored, mask, matrices,
                                         self.group_sizes,
                                         self.config.pruned_importance)

    def _threshold_counts(self, scores, delta):
        """CHEX's global ranking: counts at the target and after regrowth."""
        if self.config.target == "sparsity":
            sparsity = tf.constant(self.config.target_value, tf.float64)
        else:
            sparsity = allocation.sparsity_for_budget(
                lambda s: self._mask_from_counts(scores, self._counts(
                    scores, s)),
                self.cost.tf_cost(self.resource()),
                self.config.target_value * (
                    self.cost.dense_params if self.resource() == "params"
                    else self.cost.dense_macs))
        delta = tf.minimum(tf.cast(delta, tf.float64), sparsity / 2)
        # Rounded too: unrounded, it would regrow what rounding just pruned
        # (even at the last, regrowth-free step), breaking `round_to` and
        # the target.
        return (self._counts(scores, sparsity),
                self._counts(scores, sparsity - delta))

    def _knapsack_counts(self, scores, delta):
        """The shared allocator's counts at the target; regrowth adds
        `delta` of each group's size, as the paper's per-layer rule."""
        counts, _, _ = self.allocate(scores, self.config.target_value)
        delta = min(float(delta), (1 - counts.sum() / self.num_channels) / 2)
        grown = np.minimum(counts + np.floor(delta * self.group_sizes + 0.5),
                           self.group_sizes).astype(np.int64)
        grown = method.round_counts(grown, self.group_sizes,
                                    self.config.round_to, self.min_counts)
        return counts.astype(np.int32), np.maximum(grown, counts).astype(
            np.int32)

    def _uniform_counts(self, delta):
        """Every group cut by the one fraction that meets the target;
        regrowth adds `delta` of each group's size."""
        if "uniform_sparsity" not in self._plain:
            # Only the counts matter to the cost, so any norms will do.
            zeros = [np.zeros(size) for size in self.group_sizes]
            self._plain["uniform_sparsity"] = (
                self.config.target_value if self.config.target == "sparsity"
                else initial.uniform_sparsity(self, zeros,
                                              self.config.target_value))
        s = self._plain["uniform_sparsity"]
        counts = initial.uniform_counts(self, s)
        grown = initial.uniform_counts(self, s - min(float(delta), s / 2))
        return (counts.astype(np.int32),
                np.maximum(grown, counts).astype(np.int32))

    def _counts(self, scores, sparsity):
        counts = allocation.global_keep_counts(
            scores, self.group_ids, len(self.group_sizes), sparsity,
            self.min_counts)
        return method.round_counts(counts, self.group_sizes,
                                   self.config.round_to, self.min_counts,
                                   ops=tf)

    def _mask_from_counts(self, scores, counts):
        ranks = tf.concat([
            subset_selection.descending_ranks(scores[lo:lo + size])
            for lo, size in zip(np.cumsum(self.group_sizes) - self.group_sizes,
                                self.group_sizes)], 0)
        return tf.cast(ranks < tf.gather(counts, self.group_ids), tf.float32)

    def _step(self, scores, counts, grown, seed):
        """Keeps `counts[g]` channels of each group by column subset
        selection, regrows up to `grown[g]`, writes masks and weights."""
        stored = self._plain["backups"]
        old = self.masks.tensor()
        new, lo = [], 0
        for g, size in enumerate(self.group_sizes):
            w = stored.filter_matrix(g)
            active = old[lo:lo + size] > 0.5
            lo += size
            # CSS works on the layer as it is: pruned filters are zero there.
            # Their stored values (kept for regrowth) must not shape the SVD.
            kept = subset_selection.css_keep_mask(
                w * tf.cast(active, w.dtype)[tf.newaxis, :], counts[g], active
            )
            short = counts[g] - tf.reduce_sum(tf.cast(kept, tf.int32))
            n_regrow = tf.maximum(grown[g] - counts[g], 0) + short
            residuals = regrowth.projection_residuals(w, kept)
            # Stateless: the draw depends only on (seed, t, group), so a
            # resumed or reloaded run samples what an uninterrupted one would.
            back = regrowth.sample_without_replacement(
                residuals, n_regrow, tf.logical_not(kept),
                tf.stack([seed, tf.constant(g, tf.int64)]),
            )
            new.append(tf.cast(kept | back, tf.float32))
        new = method.keep_a_channel_per_producer_tf(
            tf.concat(new, 0), scores, self.masks.producer_segments())
        self.masks.assign_tensor(new, old)
        stored.restore(old, new)
        return tf.stack([tf.reduce_sum(old * (1 - new)),
                         tf.reduce_sum(new * (1 - old))])

    def explore(self, delta, index):
        """Runs one exploration step.

        Args:
            delta: regrowth fraction for this step (0 at the last one).
            index: exploration index t (seeds the sampling).

        Returns:
            A float vector: [kept cost fraction (MACs, parameters or
            predicted latency), channels pruned, channels regrown,
            explorations done so far].
        """
        if not self.num_channels:
            # Nothing to prune (warned at wrapping): the fit is a plain one.
            return np.asarray(self.last_stats.numpy())
        if self._plain["fns"] is None:
            # Plain Python control flow over static structure: nothing for
            # AutoGraph to convert (and it cannot parse the method anyway).
            self._plain["fns"] = [
                tf.function(tf.autograph.experimental.do_not_convert(f))
                for f in (self._score, self._threshold_counts, self._step)]
        score, threshold, step = self._plain["fns"]
        scores = score()
        if self.allocator() == "knapsack":
            counts, grown = self._knapsack_counts(scores.numpy(), delta)
        elif self.allocator() == "uniform":
            counts, grown = self._uniform_counts(delta)
        else:
            counts, grown = threshold(scores, tf.constant(delta, tf.float32))
        seed = self.config.seed * 1000003 + int(index)
        changed = step(scores, tf.constant(counts, tf.int32),
                       tf.constant(grown, tf.int32),
                       tf.constant(seed, tf.int64))
        stats = np.concatenate([[self.kept_fraction()], changed.numpy(),
                                [self.last_stats.numpy()[3] + 1]])
        self.last_stats.assign(stats.astype(np.float32))
        return self.last_stats.numpy()

    # -- initial masks (NumPy, once) -------------------------------------------
    def initialize(self):
        """Uniform masks at the target minus `regrow`, by filter L1 norm."""
        stored = self._plain["backups"]
        stored.copy_all()
        l1 = [np.abs(np.asarray(stored.filter_matrix(g))).sum(0)
              for g in range(len(self.group_sizes))]
        s = self.config.target_value
        if self.config.target != "sparsity":
            s = initial.uniform_sparsity(self, l1, s)
        start = s - min(self.config.regrow, s / 2)
        if self.num_channels:
            self.masks.assign(method.keep_a_channel_per_producer(
                initial.uniform_mask(self, l1, start), np.concatenate(l1),
                self.masks.producer_segments()))


# Registered with the wrapper so models loaded from `.keras` get their state.
method.register_method(METHOD, ChexState)
