"""CHEX: prune and regrow channels during training (Hou et al., CVPR 2022).

`prune_and_regrow` wraps a model and sets the initial masks;
`ChexState` holds everything the method needs between exploration steps in
Keras variables (so `.keras` files and `BackupAndRestore` keep it) and runs
one exploration step as a compiled `tf.function`:

1. refresh the stored copy of every weight entry whose channels are active
   (so a pruned channel keeps its *most recently used* values);
2. rank all active channels by |BatchNorm gamma| (a channel shared by
   several BatchNorms, as on a residual stream, by the largest of its
   |gamma|s) and find the global channel
   sparsity `S` at which the masked model meets the MACs / params target
   (bisection on the closed-form `CostModel`), giving per-group keep counts;
   a second threshold at `S - delta_t` gives the counts after regrowth;
3. inside each group keep the channels with the highest leverage scores of
   the filter matrix (column subset selection);
4. regrow channels sampled with probability softmax(projection residual onto
   the kept filters), and restore their stored weights exactly;
5. write the new masks.

Regrowth is capped at half the target sparsity (`delta_t <= S / 2`): the
paper's delta0 = 0.3 assumes S around 0.7, and with a milder target (50% of
the MACs needs only S ~ 0.3) an uncapped delta would regrow everything it
prunes and explore nothing.

How `S` is derived: for `sparsity=S` it is `S`. For `flops=f` (or
`params=f`) it is recomputed at every step: the smallest global sparsity whose
allocation (by the current gamma ranking, with `min_channels` and
`round_to`) costs at most `f` times the dense MACs (params). The initial
uniform masks use the uniform sparsity meeting the target, minus `regrow`.
"""

import numpy as np
import tensorflow as tf

from keras_chex.core import method
from keras_chex.core import wrapping
from keras_chex.methods.chex import allocation
from keras_chex.methods.chex import regrowth
from keras_chex.methods.chex import subset_selection

METHOD = "chex"


def prune_and_regrow(model, *, flops=None, params=None, sparsity=None,
                     regrow=0.3, interval=2, until=0.72, min_channels=0.05,
                     round_to=1, exclude=(), seed=None):
    """Prepares a model for CHEX channel exploration during `model.fit`.

    Args:
        model: a Functional or Sequential Keras model (untouched; a wrapped
            copy is returned).
        flops: fraction of the dense MACs to keep (e.g. 0.5).
        params: fraction of the dense parameter count to keep.
        sparsity: fraction of prunable channels to remove (the paper's S).
            Give exactly one of `flops`, `params`, `sparsity`.
        regrow: initial regrowth fraction delta0, decayed to 0 with a cosine.
        interval: epochs between exploration steps (fractions allowed).
        until: fraction of the planned training after which masks freeze.
        min_channels: fewest channels a group may keep: an int, or a float
            in (0, 1) for a fraction of the group's size (at least 1).
        round_to: keep channel counts at multiples of this (8 or 16 suit
            CPU/GPU kernels), except where a group is smaller.
        exclude: names of layers never pruned.
        seed: random seed for regrowth sampling (drawn at random if None,
            and stored with the model, so a loaded model continues the same).

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
    target, value = method.one_target(
        {"flops": flops, "params": params, "sparsity": sparsity},
        {"flops": "fraction of MACs to keep",
         "params": "fraction of parameters to keep",
         "sparsity": "fraction of channels to remove"},
    )
    method.check_fraction("flops", flops, optional=True)
    method.check_fraction("params", params, optional=True)
    method.check_fraction("sparsity", sparsity, low_open=False,
                          high_closed=False, optional=True)
    method.check_fraction("regrow", regrow, low_open=False,
                          high_closed=False)
    method.check_fraction("until", until)
    method.check_positive("interval", interval, "epochs")
    round_to = method.check_round_to(round_to)
    method.check_min_channels(min_channels)
    seed = method.resolve_seed(seed)
    config = {
        "method": METHOD,
        "target": target,
        "target_value": value,
        "regrow": float(regrow),
        "interval": float(interval),
        "until": float(until),
        "min_channels": min_channels,
        "round_to": round_to,
        "seed": int(seed),
    }
    wrapped = wrapping.wrap(model, mode="hard", exclude=exclude,
                            pruning=config)
    wrapped.pruning_state.initialize()
    return wrapped


class ChexState(method.PruningState):
    """CHEX's state and exploration step for one wrapped model.

    Created by `PrunableModel` for models from `prune_and_regrow`; users do
    not build it. All state lives in non-trainable variables: the stored
    weights of every prunable weight tensor (for exact restoration) and the
    statistics of the last exploration.

    Args:
        model: the `PrunableModel`.
    """

    def __init__(self, model, **kwargs):
        super().__init__(model, name="chex_state", **kwargs)
        analysis = self.analysis
        self._plain["_by_var"] = {}
        for s in analysis.weight_slices:
            v = s.variable()
            self._by_var.setdefault(id(v), (v, []))[1].append(s)
        self.backups = []
        self._plain["_vars"] = []
        for i, (v, _) in enumerate(self._by_var.values()):
            self._vars.append(v)
            self.backups.append(self.add_weight(
                name=f"backup_{i}", shape=tuple(v.shape), dtype=v.dtype,
                initializer="zeros", trainable=False,
            ))
        self.last_stats = self.add_weight(
            name="last_stats", shape=(4,), initializer="zeros",
            trainable=False,
        )  # macs fraction, pruned, regrown, explorations done.
        self._plan_groups(analysis)
        self._cost_fn = self.cost.tf_cost(self.resource())
        self._explore_fn = None
        self.built = True

    _by_var = property(lambda self: self._plain["_by_var"])
    _vars = property(lambda self: self._plain["_vars"])
    _var_index = property(lambda self: self._plain["_var_index"])
    _filters = property(lambda self: self._plain["_filters"])
    _gammas = property(lambda self: self._plain["_gammas"])

    # -- static plans ------------------------------------------------------
    def _plan_groups(self, analysis):
        """Constant index tensors for the filter matrices."""
        self._plain["_var_index"] = {id(v): i for i, v in enumerate(self._vars)}
        self._plain["_filters"] = []  # per group: list of (var index, axis, P matrix)
        self._plain["_gammas"] = []  # (var index, classes)
        for s in analysis.weight_slices:
            if s.name == "gamma":
                self._gammas.append((self._var_index[id(s.variable())],
                                     s.classes))
        for g in analysis.groups:
            parts = []
            for s in analysis.weight_slices:
                if not s.filters:
                    continue
                inside = (s.classes >= g.start) & (s.classes < g.start + g.size)
                if not inside.any():
                    continue
                P = np.zeros((len(s.classes), g.size), dtype=np.float32)
                P[np.flatnonzero(inside), s.classes[inside] - g.start] = 1.0
                parts.append((self._var_index[id(s.variable())], s.axis, P))
            self._filters.append(parts)

    def _entry_active(self, var_index, mask):
        variable = self._vars[var_index]
        slices = self._by_var[id(variable)][1]
        rank = len(variable.shape)
        active = tf.ones(variable.shape, tf.bool)
        for s in slices:
            keep = tf.where(s.classes >= 0,
                            tf.gather(mask, np.maximum(s.classes, 0)), 1.0)
            shape = [1] * rank
            shape[s.axis % rank] = -1
            active = active & (tf.reshape(keep, shape) > 0.5)
        return active

    # -- one exploration -------------------------------------------------------
    def _filter_matrix(self, g):
        blocks = []
        for var_index, axis, P in self._filters[g]:
            w = tf.convert_to_tensor(self.backups[var_index])
            rank = len(w.shape)
            axis = axis % rank
            perm = [a for a in range(rank) if a != axis] + [axis]
            w = tf.reshape(tf.transpose(w, perm), [-1, w.shape[axis]])
            blocks.append(tf.matmul(tf.cast(w, tf.float32), P))
        return tf.concat(blocks, 0)

    def _scores(self, mask, matrices):
        """|gamma| per channel (the largest over a coupled group's
        BatchNorms); groups without BatchNorm use filter norms."""
        n = self.num_channels
        has_bn = np.zeros(n, bool)
        # A coupled group (a residual stream) feeds several BatchNorms; a
        # channel that any of them scales up is needed there. The mean
        # dilutes it by the number of blocks sharing the stream (and lost
        # accuracy at 25% of the MACs; the sum was even with the max). A
        # "fair" score (a stream's mean level, one BatchNorm's spread) cut
        # ResNet-56's last stream to 4-9 of 64 channels and lost 8.8 points
        # at 25% of the MACs: see docs/benchmarks.md, "CHEX quality".
        gamma = tf.zeros([n])
        for var_index, classes in self._gammas:
            sel = np.flatnonzero(classes >= 0)
            has_bn[classes[sel]] = True
            g = tf.abs(tf.gather(tf.cast(self.backups[var_index], tf.float32),
                                 sel))
            gamma = tf.tensor_scatter_nd_max(gamma, classes[sel][:, None], g)
        bn_mean = tf.math.divide_no_nan(
            tf.reduce_sum(tf.where(has_bn, gamma * mask, 0.0)),
            tf.reduce_sum(tf.where(has_bn, mask, 0.0)),
        )
        bn_mean = tf.where(bn_mean > 0, bn_mean, 1.0)
        norms = []
        for g, w in enumerate(matrices):
            norm = tf.norm(w, axis=0)
            active = mask[self.group_sizes[:g].sum():][:self.group_sizes[g]]
            mean = tf.math.divide_no_nan(tf.reduce_sum(norm * active),
                                         tf.reduce_sum(active))
            # Scale-matched so filter norms rank fairly against gammas.
            norms.append(tf.math.divide_no_nan(norm, mean) * bn_mean)
        fallback = tf.concat(norms, 0) if norms else tf.zeros([n])
        return tf.where(has_bn, gamma, fallback) * mask

    def _counts(self, scores, sparsity, rounded):
        counts = allocation.global_keep_counts(
            scores, self.group_ids, len(self.group_sizes), sparsity,
            self.min_counts,
        )
        if rounded:
            counts = method.round_counts(counts, self.group_sizes,
                                         self.config["round_to"],
                                         self.min_counts, ops=tf)
        return counts

    def _mask_from_counts(self, scores, counts):
        ranks_in_group = []
        for g in range(len(self.group_sizes)):
            lo = int(self.group_sizes[:g].sum())
            s = scores[lo:lo + self.group_sizes[g]]
            ranks_in_group.append(subset_selection.descending_ranks(s))
        ranks = tf.concat(ranks_in_group, 0)
        return tf.cast(ranks < tf.gather(counts, self.group_ids), tf.float32)

    def _sparsity_for_target(self, scores):
        if self.config["target"] == "sparsity":
            return tf.constant(self.config["target_value"], tf.float64)
        budget = self.config["target_value"] * (
            self.cost.dense_params if self.config["target"] == "params"
            else self.cost.dense_macs
        )

        def bisect(lo, hi):
            mid = (lo + hi) / 2
            counts = self._counts(scores, mid, rounded=True)
            fits = self._cost_fn(self._mask_from_counts(scores, counts)) <= (
                budget
            )
            return tf.where(fits, lo, mid), tf.where(fits, mid, hi)

        # A graph loop, not a Python one: 40 unrolled copies of the sorts
        # made tracing take ~15 s even on a tiny ResNet.
        start = (tf.constant(0.0, tf.float64),
                 tf.constant(1.0 - 1e-9, tf.float64))
        _, hi = tf.while_loop(lambda lo, hi: True, bisect, start,
                              maximum_iterations=40)
        return hi

    def _explore(self, delta, seed):
        old = self.masks.tensor()
        for i, (variable, backup) in enumerate(zip(self._vars, self.backups)):
            backup.assign(tf.where(self._entry_active(i, old), variable,
                                   backup))
        matrices = [self._filter_matrix(g) for g in range(len(self.group_sizes))]
        scores = self._scores(old, matrices)
        sparsity = self._sparsity_for_target(scores)
        counts = self._counts(scores, sparsity, rounded=True)
        delta = tf.minimum(tf.cast(delta, tf.float64), sparsity / 2)
        # Rounded too: unrounded, it would regrow what rounding just pruned
        # (even at the last, regrowth-free step), breaking `round_to` and
        # the MACs / params target.
        grown = self._counts(scores, sparsity - delta, rounded=True)
        new = []
        for g, w in enumerate(matrices):
            lo = int(self.group_sizes[:g].sum())
            active = old[lo:lo + self.group_sizes[g]] > 0.5
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
        for i, (variable, backup) in enumerate(zip(self._vars, self.backups)):
            regrown = self._entry_active(i, new) & ~self._entry_active(i, old)
            variable.assign(tf.where(regrown, backup, variable))
        pruned = tf.reduce_sum(old * (1 - new))
        regrown_count = tf.reduce_sum(new * (1 - old))
        fraction = tf.cast(self._cost_fn(new), tf.float32) / float(
            self.cost.dense_macs if self.config["target"] != "params"
            else self.cost.dense_params
        )
        self.last_stats.assign(tf.stack([
            fraction, pruned, regrown_count, self.last_stats[3] + 1.0
        ]))
        return self.last_stats

    def explore(self, delta, index):
        """Runs one exploration step.

        Args:
            delta: regrowth fraction for this step (0 at the last one).
            index: exploration index t (seeds the sampling).

        Returns:
            A float vector: [kept MACs (or params) fraction, channels pruned,
            channels regrown, explorations done so far].
        """
        if not self.num_channels:
            # Nothing to prune (warned at wrapping): the fit is a plain one.
            return np.asarray(self.last_stats.numpy())
        if self._explore_fn is None:
            # Plain Python control flow over static structure: nothing for
            # AutoGraph to convert (and it cannot parse the method anyway).
            self._explore_fn = tf.function(
                tf.autograph.experimental.do_not_convert(self._explore)
            )
        seed = tf.constant([self.config["seed"], int(index)], tf.int64)
        seed = seed[0] * 1000003 + seed[1]
        return self._explore_fn(tf.constant(delta, tf.float32), seed)

    # -- initial masks (NumPy, once) -------------------------------------------
    def initialize(self):
        """Uniform masks at sparsity `S - regrow`, chosen by filter L1 norm."""
        for v, b in zip(self._vars, self.backups):
            b.assign(v)
        sizes = self.group_sizes
        cost = self.cost
        target = self.config["target"]
        resource = self.resource()

        def uniform_counts(s):
            counts = np.maximum(np.floor((1 - s) * sizes + 0.5),
                                self.min_counts)
            counts = method.round_counts(counts, sizes,
                                         self.config["round_to"],
                                         self.min_counts)
            return np.minimum(counts, sizes).astype(int)

        l1 = [np.abs(np.asarray(self._filter_matrix(g))).sum(0)
              for g in range(len(sizes))]

        def mask_for(counts):
            parts = []
            for g, k in enumerate(counts):
                order = np.argsort(-l1[g], kind="stable")
                m = np.zeros(sizes[g], bool)
                m[order[:k]] = True
                parts.append(m)
            return np.concatenate(parts) if parts else np.zeros(0, bool)

        if target == "sparsity":
            s = self.config["target_value"]
        else:
            budget = self.config["target_value"] * cost.cost(
                np.ones(self.num_channels), resource)
            lo, hi = 0.0, 1.0 - 1e-9
            for _ in range(40):
                mid = (lo + hi) / 2
                c = cost.cost(mask_for(uniform_counts(mid)), resource)
                lo, hi = (lo, mid) if c <= budget else (mid, hi)
            s = hi
            narrowest = cost.cost(mask_for(uniform_counts(hi)), resource)
            # Without channels the wrapper has already said so.
            if self.num_channels and narrowest > budget * (1 + 1e-9):
                method.warn_unreachable(
                    target, self.config["target_value"],
                    narrowest / cost.cost(np.ones(self.num_channels),
                                          resource))
        start = s - min(self.config["regrow"], s / 2)
        if self.num_channels:
            self.masks.assign(method.keep_a_channel_per_producer(
                mask_for(uniform_counts(start)), np.concatenate(l1),
                self.masks.producer_segments()))

# Registered with the wrapper so models loaded from `.keras` get their state.
method.register_method(METHOD, ChexState)
