"""The callback that recomputes SMCP's masks during `model.fit`."""

import keras

from keras_chex.core import callback


@keras.saving.register_keras_serializable(package="keras_chex")
class SoftMaskPruning(callback.PruningCallback):
    """Recomputes SMCP's soft masks on schedule during `model.fit`.

    Everything it needs travels with the model returned by
    `keras_chex.soft_mask_prune`. Each epoch's logs get `smcp_cost` (the
    fraction of the dense cost the masks keep now, under the model's cost:
    latency, MACs or parameters) and `smcp_pruned` (channels newly pruned
    by the recomputations in that epoch); regrown channels are logged as
    `smcp_regrown`. The schedule is laid over the planned length of the
    `fit` call, so its steps per epoch must be known. It may be listed
    before or after a `BackupAndRestore` callback.

    Args:
        verbose: 1 prints one line per recomputation.
        log_dir: optional folder for TensorBoard summaries (per-group
            widths, cost kept; see `PruningCallback`).

    Example:

    ```python
    model.fit(ds, epochs=30, callbacks=[keras_chex.SoftMaskPruning()])
    ```
    """

    method = "smcp"
    entry_point = "keras_chex.soft_mask_prune(model, ...)"
    cost_log, pruned_log, regrown_log = "smcp_cost", "smcp_pruned", (
        "smcp_regrown")

    def plan(self, steps_per_epoch, epochs):
        config = self.state.config
        schedule = config.schedule()
        total = steps_per_epoch * epochs
        return [
            (step, (step, schedule.kept_fraction(step, total,
                                                 config.target_value)))
            for step in schedule.recompute_steps(total)
        ]

    def run_step(self, step, payload):
        planned, budget = payload
        stats = self.state.recompute(budget)
        return stats, (
            f"SMCP recomputation at step {step} (planned {planned}): "
            f"budget {budget:.3f}, kept {stats[0]:.3f} of dense cost, "
            f"pruned {int(stats[1])}, regrown {int(stats[2])}")
