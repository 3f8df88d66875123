"""The callback that drives CHEX's channel exploration during `model.fit`."""

import keras
import numpy as np

from keras_chex.core import callback
from keras_chex.methods.chex import schedules


@keras.saving.register_keras_serializable(package="keras_chex")
class ChannelExploration(callback.PruningCallback):
    """Runs CHEX's exploration steps during `model.fit`.

    Everything it needs (target, schedule, seed) travels with the model
    returned by `keras_chex.prune_and_regrow`, so it takes no required
    arguments. Each epoch's logs get `chex_macs` (fraction of the dense MACs
    kept, or of the parameters or predicted latency for such a target),
    `chex_pruned` and `chex_regrown` (channels changed by the explorations
    in that epoch), so they show in the progress bar, `History` and
    TensorBoard.

    The schedule is laid over the planned length of the `fit` call
    (`epochs` x steps per epoch), so the number of steps per epoch must be
    known: arrays, datasets of known cardinality, or `steps_per_epoch`.
    It may be listed before or after a `BackupAndRestore` callback.

    Args:
        verbose: 1 prints one line per exploration step.
        log_dir: optional folder for TensorBoard summaries (per-group
            widths, cost kept; see `PruningCallback`).

    Example:

    ```python
    model.fit(ds, epochs=30, callbacks=[keras_chex.ChannelExploration()])
    ```
    """

    method = "chex"
    entry_point = "keras_chex.prune_and_regrow(model, ...)"
    cost_log, pruned_log, regrown_log = "chex_macs", "chex_pruned", (
        "chex_regrown")

    def plan(self, steps_per_epoch, epochs):
        config = self.state.config
        schedule = config.schedule()
        t_max = schedule.t_max(steps_per_epoch, epochs)
        plan = []
        for step in schedule.exploration_steps(steps_per_epoch, epochs):
            t = schedule.exploration_index(step, steps_per_epoch, epochs)
            delta = schedules.regrow_fraction(t, t_max, config.regrow)
            plan.append((step, (step, t, delta)))
        return plan

    def short_plan_warning(self, plan, steps_per_epoch, epochs):
        return self.single_step_warning(
            plan, steps_per_epoch, epochs,
            "it prunes once to the budget and never regrows a channel")

    def run_step(self, step, payload):
        planned, t, delta = payload
        stats = np.asarray(self.state.explore(delta, t))
        return stats, (
            f"CHEX exploration {t} at step {step} (planned {planned}): "
            f"regrow {delta:.3f}, kept {stats[0]:.3f} of dense cost, pruned "
            f"{int(stats[1])}, regrown {int(stats[2])}")
