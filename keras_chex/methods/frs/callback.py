"""The callback that runs relevance pruning steps during `model.fit`."""

import keras
import tensorflow as tf

from keras_chex.core import callback
from keras_chex.methods.frs import scores as scores_lib


@keras.saving.register_keras_serializable(package="keras_chex")
class RelevancePruning(callback.PruningCallback):
    """Removes the least relevant channels on schedule during `model.fit`.

    Goes with a model from `keras_chex.relevance_prune`, which holds the
    target and schedule. At each pruning step the feature relevance scores
    are computed on the first `score_batches` batches of `data` (one
    compiled pass), and the lowest-scored channels are removed for good.
    Each epoch's logs get `frs_macs` (fraction of the dense MACs kept, or of
    the parameters or predicted latency for a `params` or `latency` target)
    and `frs_pruned` (channels removed in that epoch). The schedule is laid
    over the planned length of the `fit` call, so its steps per epoch must
    be known. It may be listed before or after a `BackupAndRestore`
    callback.

    Args:
        data: the images the scores are computed on: a `tf.data.Dataset`
            of `(x, y)` batches (the training set or a part of it), or an
            `(x, y)` tuple of arrays. Not saved by `get_config`.
        verbose: 1 prints one line per pruning step.
        log_dir: optional folder for TensorBoard summaries (per-group
            widths, cost kept; see `PruningCallback`).

    Example:

    ```python
    model.fit(train, epochs=30,
              callbacks=[keras_chex.RelevancePruning(train)])
    ```
    """

    method = "frs"
    entry_point = "keras_chex.relevance_prune(model, ...)"
    cost_log, pruned_log = "frs_macs", "frs_pruned"

    def __init__(self, data=None, verbose=0, log_dir=None):
        super().__init__(verbose=verbose, log_dir=log_dir)
        # Arrays become a dataset once, not at every pruning step; a bad
        # `data` fails here, before any training. A dataset may be endless:
        # each step takes `score_batches` of it.
        if data is not None and not isinstance(data, tf.data.Dataset):
            data = scores_lib.as_dataset(data)
        self.data = data

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if (self.data is None
                and self.state.config.criterion != "l1"):
            raise ValueError(
                "RelevancePruning needs the data to score channels on: "
                "`keras_chex.RelevancePruning(train_dataset)` (a dataset of "
                "(x, y) batches or an (x, y) tuple of arrays).")

    def plan(self, steps_per_epoch, epochs):
        schedule = self.state.config.schedule()
        steps = schedule.steps(steps_per_epoch, epochs)
        return [(step, (step, i + 1, len(steps)))
                for i, step in enumerate(steps)]

    def short_plan_warning(self, plan, steps_per_epoch, epochs):
        return self.single_step_warning(
            plan, steps_per_epoch, epochs,
            "it removes every channel it prunes at once, not gradually")

    def run_step(self, step, payload):
        planned, index, total = payload
        stats = self.state.prune_step(self.data, index, total)
        # Cost kept, channels removed, none regrown (FRS never regrows).
        return (stats[0], stats[1], 0.0), (
            f"FRS pruning step {index}/{total} at step {step} (planned "
            f"{planned}): removed {int(stats[1])} channels, kept "
            f"{stats[0]:.3f} of dense")
