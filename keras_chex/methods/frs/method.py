"""Gradual channel pruning by feature relevance scores (Aketi et al., 2020).

`relevance_prune` wraps a model with permanent channel masks. During `fit`,
the `RelevancePruning` callback runs a pruning step every `interval` epochs
until a fraction `until` of the training: it scores every channel by its
feature relevance (LRP from the true class, see `scores.py`) on a few
batches of data, and removes the globally lowest-scored channels, for good
(their weights are zeroed and they never come back). There is no separate
fine-tuning stage: training simply goes on.

The target is a fraction of the dense MACs (`flops`), parameters
(`params`) or latency (`latency`, predicted by a measured latency table)
kept, reached in equal steps of cost, or `channels=x`, the paper's fixed
number of channels removed per step.
"""


import numpy as np

from keras_chex.core import importance as weight_importance
from keras_chex.core import method
from keras_chex.core import wrapping
from keras_chex.methods.frs import config as config_lib
from keras_chex.methods.frs import scores as scores_lib
from keras_chex.methods.frs import selection

METHOD = config_lib.FrsConfig.method


def relevance_prune(model, *, flops=None, params=None, latency=None,
                    channels=None, cost_table=None, interval=2.0,
                    until=0.75, score_batches=10, min_channels=0.05,
                    round_to=1, exclude=(), seed=None,
                    criterion="relevance", input_shape=None):
    """Prepares a model for gradual pruning by feature relevance scores.

    Args:
        model: a Functional or Sequential classifier (untouched; a wrapped
            copy is returned) with one `(batch, classes)` output.
        flops: fraction of the dense MACs to keep at the end.
        params: fraction of the dense parameter count to keep.
        latency: fraction of the dense model's latency to keep, as
            predicted by `cost_table` (measured on the target device).
        channels: channels removed per pruning step (the paper's `x`).
            Give exactly one of `flops`, `params`, `latency`, `channels`.
        cost_table: with `latency`: a `LatencyTable` from
            `keras_chex.build_latency_table(model)`, or the path of its
            JSON file.
        interval: epochs between pruning steps (may be fractional).
        until: fraction of the planned training after which nothing more
            is pruned; the last step runs there.
        score_batches: batches of the callback's data each scoring uses.
        min_channels: fewest channels a group keeps: an int, or a float in
            (0, 1) for a fraction of its size (never fewer than 1).
        round_to: keep channel counts at multiples of this, except where a
            group is smaller.
        exclude: names of layers never pruned (a nested model's or a
            composite layer's name excludes all inside it; "outer/inner"
            names one layer inside a nested model).
        input_shape: the input size the cost is counted at, without the
            batch axis (e.g. `(224, 224, 3)`; a list for several inputs).
            Needed for a model of free spatial size (`keras.Input((None,
            None, 3))`); the wrapped and stripped models keep the free size.
        seed: breaks ties between channels of equal score (drawn at random
            if None, and stored with the model).
        criterion: "relevance" (the method), or "l1" (the L1 norm of each
            channel's filters, on the same schedule: a baseline).

    Returns:
        A `keras_chex.PrunableModel` (masks in "permanent" mode) to compile
        and fit with `callbacks=[keras_chex.RelevancePruning(data)]`.

    Example:

    ```python
    model = keras_chex.relevance_prune(model, flops=0.5)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(train, epochs=30,
              callbacks=[keras_chex.RelevancePruning(train)])
    compact = keras_chex.strip(model)
    ```
    """
    config = config_lib.FrsConfig.from_arguments(
        {"flops": flops, "params": params, "latency": latency,
         "channels": channels},
        interval=interval, until=until, score_batches=score_batches,
        min_channels=min_channels, round_to=round_to, seed=seed,
        criterion=criterion)
    config = config.replace(cost_table=method.latency_config(
        config.target, cost_table, model, input_shape))
    wrapped = wrapping.wrap(model, mode="permanent", exclude=exclude,
                            pruning=config.to_dict(), input_shape=input_shape)
    if criterion == "relevance":
        # Checked now, not at the first pruning step: a model LRP cannot
        # score should fail (or warn) before any training.
        wrapped.pruning_state.scorer()
    return wrapped


class FrsState(method.PruningState):
    """The relevance method's state: pruning statistics and last scores.

    The masks themselves live in the model's mask layers (permanent: the
    weights of removed channels are zeroed). Created by `PrunableModel` for
    models from `relevance_prune`.

    Args:
        model: the `PrunableModel`.
    """

    config_class = config_lib.FrsConfig

    def __init__(self, model, **kwargs):
        super().__init__(model, name="frs_state", **kwargs)
        n = max(self.num_channels, 1)
        self.scores = self.add_weight(
            name="scores", shape=(n,), initializer="zeros", trainable=False)
        # cost fraction kept, channels removed by the last step, steps done,
        # channels removed in all.
        self.last_stats = self.add_weight(
            name="last_stats", shape=(4,), initializer="zeros",
            trainable=False)
        self._plain["scorer"] = None
        self.built = True

    def scorer(self):
        """The model's `RelevanceScorer` (built once)."""
        if self._plain["scorer"] is None:
            self._plain["scorer"] = scores_lib.RelevanceScorer(
                self._plain["model"](), self.analysis)
        return self._plain["scorer"]

    def channel_scores(self, data):
        """Normalised scores of every channel (NaN: not scored)."""
        if self.config.criterion == "l1":
            plan = weight_importance.ImportancePlan(self.analysis,
                                                    filters_only=True)
            return scores_lib.normalise_per_group(plan.magnitude(),
                                                  self.analysis.groups)
        dataset = scores_lib.as_dataset(data, self.config.score_batches)
        return self.scorer().scores(dataset)

    def prune_step(self, data, index, steps):
        """Runs pruning step `index` (1-based) of `steps`.

        Returns:
            [cost fraction kept, channels removed, steps done, channels
            removed in all] (also stored in `last_stats`).
        """
        stats = np.asarray(self.last_stats.numpy()).copy()
        if not self.num_channels:
            return stats
        values = self.channel_scores(data)
        kept = self.masks.numpy()
        rng = np.random.default_rng(self.config.seed + int(index))
        units = selection.removal_units(
            values, kept, self.analysis.groups, self.min_counts,
            self.config.round_to, rng.permutation(self.num_channels))
        if self.config.target == "channels":
            new = selection.remove_channels(
                kept, units, int(self.config.target_value))
        else:
            dense = self.cost_of(np.ones(self.num_channels, bool))
            goal = 1.0 - (1.0 - self.config.target_value) * index / steps
            new, reached = selection.remove_to_cost(
                kept, units, self.cost_of, goal * dense)
            if not reached:
                self.warn_unreachable(self.cost_of(new) / dense)
        # Never a layer's last channel (a concatenation inside a group);
        # only a channel still kept may stay.
        new = method.keep_a_channel_per_producer(
            new, np.where(kept, np.nan_to_num(values, nan=0.0), -np.inf),
            self.masks.producer_segments())
        removed = int(np.sum(kept & ~new))
        if removed:
            self.masks.assign(new)
            self.masks.clear_optimizer_state(self.optimizer(), kept & ~new)
        self.scores.assign(np.nan_to_num(values, nan=-1.0).astype(np.float32))
        stats = np.array([self.kept_fraction(), removed, stats[2] + 1,
                          stats[3] + removed], np.float32)
        self.last_stats.assign(stats)
        return stats


method.register_method(METHOD, FrsState)
