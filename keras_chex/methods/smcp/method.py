"""SMCP: soft-masking channel pruning under a cost budget (Humble et al., 2022).

`soft_mask_prune` wraps a model with straight-through channel masks: the
forward pass sees pruned channels as zeros, but the gradient reaches their
weights as if they were kept, so a pruned channel keeps learning and comes
back when the masks are recomputed and it ranks high again. `SmcpState`
holds the method's state in variables and does two things:

- inside every compiled train step (`transform_gradients`): accumulate each
  channel's first-order Taylor importance, and add an extra weight decay
  to the weights of pruned channels only;
- at every recomputation (from the `SoftMaskPruning` callback): choose each
  group's width by an exact multiple-choice knapsack (maximal summed
  importance, total cost within the budget of that step), keep each
  group's most important channels, and reset the accumulated importance.

The cost is the dense model's MACs, parameters, or its latency predicted
by a measured `LatencyTable` (`keras_chex.build_latency_table`).
"""


import numpy as np
import tensorflow as tf

from keras_chex.core import importance as weight_importance
from keras_chex.core import method
from keras_chex.core import wrapping
from keras_chex.methods.smcp import config as config_lib

METHOD = config_lib.SmcpConfig.method


def soft_mask_prune(model, *, latency=None, flops=None, params=None,
                    cost_table=None, importance="taylor", warmup=0.1,
                    ramp=0.6, interval_steps=None, freeze=0.25, round_to=8,
                    min_channels=0.05, exclude=(), pruned_decay=2e-4,
                    bn_rescale=False, seed=None, input_shape=None):
    """Prepares a model for SMCP soft-mask pruning during `model.fit`.

    Args:
        model: a Functional or Sequential Keras model (untouched; a wrapped
            copy is returned).
        latency: fraction of the dense model's latency to keep, as
            predicted by `cost_table` (measured on the target device).
        flops: fraction of the dense MACs to keep.
        params: fraction of the dense parameter count to keep. Give
            exactly one of `latency`, `flops`, `params`.
        cost_table: with `latency`: a `LatencyTable` from
            `keras_chex.build_latency_table(model)`, or the path of the
            JSON file it cached.
        importance: "taylor" (first-order Taylor of the loss, accumulated
            inside the train step) or "magnitude" (sum of |W|). For a
            trained model, "magnitude": a converged model's gradients are
            small and the Taylor ranking churned (docs/benchmarks.md,
            "Compressing a trained model").
        warmup: fraction of training before the first pruning.
        ramp: fraction of training over which the pruned share of the cost
            ramps up (exponentially) to the target.
        interval_steps: optimizer steps between mask recomputations (None:
            about 30 recomputations over the pruning window).
        freeze: fraction of training at the end with fixed masks.
        round_to: widths are multiples of this (8 suits XNNPACK and GPU
            kernels), except where a group is smaller.
        min_channels: fewest channels a group may keep: an int, or a float
            in (0, 1) for a fraction of the group's size (at least 1).
        exclude: names of layers never pruned (a nested model's or a
            composite layer's name excludes all inside it; "outer/inner"
            names one layer inside a nested model).
        input_shape: the input size the cost is counted at, without the
            batch axis (e.g. `(224, 224, 3)`; a list for several inputs).
            Needed for a model of free spatial size (`keras.Input((None,
            None, 3))`); the wrapped and stripped models keep the free size.
        pruned_decay: extra L2 decay on the weights of pruned channels only
            (added to their gradient), pushing them toward zero unless they
            earn their way back.
        bn_rescale: when a recomputation prunes channels out of a
            BatchNorm-fed group, scale the gamma of the channels it keeps so
            that the group's summed |gamma| is unchanged (damps the jump in
            the next layer's input).
        seed: breaks ties between channels of equal importance (drawn at
            random if None, and stored with the model).

    Returns:
        A `keras_chex.PrunableModel` to compile and fit with
        `callbacks=[keras_chex.SoftMaskPruning()]`.

    Example:

    ```python
    table = keras_chex.build_latency_table(model, "latency.json")
    model = keras_chex.soft_mask_prune(model, latency=0.5, cost_table=table)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=30, callbacks=[keras_chex.SoftMaskPruning()])
    ```
    """
    config = config_lib.SmcpConfig.from_arguments(
        {"latency": latency, "flops": flops, "params": params},
        importance=importance, warmup=warmup, ramp=ramp,
        interval_steps=interval_steps, freeze=freeze, round_to=round_to,
        min_channels=min_channels, pruned_decay=pruned_decay,
        bn_rescale=bn_rescale, seed=seed)
    config = config.replace(cost_table=method.latency_config(
        config.target, cost_table, model, input_shape))
    wrapped = wrapping.wrap(model, mode="straight_through", exclude=exclude,
                            pruning=config.to_dict(), input_shape=input_shape)
    if config.target == "latency":
        # Checked on the wrapped copy: its analysis names the layers the
        # table must cover.
        wrapped.pruning_state.group_cost()
    return wrapped


class SmcpState(method.PruningState):
    """SMCP's state: accumulated importance, channel mask, statistics.

    Created by `PrunableModel` for models from `soft_mask_prune`.

    Args:
        model: the `PrunableModel`.
    """

    config_class = config_lib.SmcpConfig

    def __init__(self, model, **kwargs):
        super().__init__(model, name="smcp_state", **kwargs)
        analysis = self.analysis
        self._plain["plan"] = weight_importance.ImportancePlan(analysis)
        n = max(self.num_channels, 1)
        # Mean over replicas: each replica sees its own gradients; the sum
        # they agree on must be the same everywhere.
        self.importance = self.add_weight(
            name="importance", shape=(n,), initializer="zeros",
            trainable=False, aggregation="mean")
        self.channel_mask = self.add_weight(
            name="channel_mask", shape=(n,), initializer="ones",
            trainable=False)
        # cost fraction kept, channels pruned and regrown by the last
        # recomputation, recomputations done.
        self.last_stats = self.add_weight(
            name="last_stats", shape=(4,), initializer="zeros",
            trainable=False)
        self._plain["decay_plan"] = self._decay_plan(analysis)
        self.built = True

    # -- inside the train step ---------------------------------------------
    def _decay_plan(self, analysis):
        """Per variable: the slices whose pruned entries decay."""
        plan = {}
        for s in analysis.weight_slices:
            v = s.variable()
            plan.setdefault(id(v), []).append((s.axis, s.classes))
        return plan

    def _entry_keep(self, variable, parts, mask):
        rank = len(variable.shape)
        keep = tf.ones(variable.shape, tf.float32)
        for axis, classes in parts:
            values = tf.where(classes >= 0,
                              tf.gather(mask, np.maximum(classes, 0)), 1.0)
            shape = [1] * rank
            shape[axis % rank] = -1
            keep = keep * tf.reshape(values, shape)
        return keep

    def transform_gradients(self, grads, variables):
        """Accumulates Taylor importance; decays pruned weights."""
        if not self.num_channels:
            return grads
        if self.config.importance == "taylor":
            step = self._plain["plan"].taylor(grads, variables)
            # A step whose gradients overflowed (mixed precision) is
            # skipped by the optimizer; it must not count here either.
            self.importance.assign_add(tf.where(
                tf.reduce_all(tf.math.is_finite(step)), step, 0.0))
        decay = self.config.pruned_decay
        if not decay:
            return grads
        mask = tf.convert_to_tensor(self.channel_mask)
        plan = self._plain["decay_plan"]
        out = []
        for g, v in zip(grads, variables):
            parts = plan.get(id(v))
            if g is None or not parts:
                out.append(g)
                continue
            pruned = 1.0 - self._entry_keep(v, parts, mask)
            out.append(g + tf.cast(decay * pruned, g.dtype) * tf.cast(
                v, g.dtype))
        return out

    # -- recomputation -------------------------------------------------------
    def scores(self):
        """Per-channel importance used by the next recomputation."""
        if self.config.importance == "magnitude":
            return self._plain["plan"].magnitude()
        return np.asarray(self.importance.numpy())[:self.num_channels]

    def recompute(self, kept_fraction):
        """Recomputes the masks for a budget of `kept_fraction` of dense.

        Returns:
            [cost fraction kept, channels pruned, channels regrown,
            recomputations done] (also stored in `last_stats`).
        """
        if not self.num_channels:
            return np.asarray(self.last_stats.numpy())
        rng = np.random.default_rng(self.config.seed)
        priority = rng.permutation(self.num_channels)
        _, new, fraction = self.allocate(self.scores(), kept_fraction,
                                         priority)
        old = self.masks.numpy()
        if self.config.bn_rescale:
            self._rescale_gammas(old, new)
        self.masks.assign(new)
        self.channel_mask.assign(new.astype(np.float32))
        self.importance.assign(tf.zeros_like(self.importance))
        stats = np.array([
            fraction, np.sum(old & ~new), np.sum(new & ~old),
            self.last_stats.numpy()[3] + 1,
        ], np.float32)
        self.last_stats.assign(stats)
        return stats

    def _rescale_gammas(self, old, new):
        for s in self.analysis.weight_slices:
            if s.name != "gamma":
                continue
            variable = s.variable()
            gamma = np.array(variable.numpy())
            sel = s.classes >= 0
            before = np.zeros(len(gamma), bool)
            after = np.zeros(len(gamma), bool)
            before[sel] = old[s.classes[sel]]
            after[sel] = new[s.classes[sel]]
            after |= ~sel
            before |= ~sel
            lost = np.abs(gamma[before & ~after]).sum()
            kept = np.abs(gamma[after]).sum()
            if lost > 0 and kept > 0:
                gamma[after] *= (kept + lost) / kept
                variable.assign(gamma)


method.register_method(METHOD, SmcpState)
