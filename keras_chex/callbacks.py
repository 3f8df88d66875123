"""The callback that drives channel exploration during `model.fit`."""

import keras
import numpy as np

from keras_chex import schedules
from keras_chex import wrapping


@keras.saving.register_keras_serializable(package="keras_chex")
class ChannelExploration(keras.callbacks.Callback):
    """Runs the pruning method's exploration steps during `model.fit`.

    Everything it needs (target, schedule, seed) travels with the model
    returned by `keras_chex.prune_and_regrow`, so it takes no required
    arguments. Each epoch's logs get `chex_macs` (fraction of the dense MACs
    kept, or of the parameters for a `params` target), `chex_pruned` and
    `chex_regrown` (channels changed by the explorations in that epoch), so
    they show in the progress bar, `History` and TensorBoard.

    The schedule is laid over the planned length of the `fit` call
    (`epochs` x steps per epoch), so the number of steps per epoch must be
    known: arrays, datasets of known cardinality, or `steps_per_epoch`.

    Args:
        verbose: 1 prints one line per exploration step.

    Example:

    ```python
    model.fit(ds, epochs=30, callbacks=[keras_chex.ChannelExploration()])
    ```
    """

    def __init__(self, verbose=0):
        super().__init__()
        self.verbose = verbose
        self._plan = []
        self._changed = np.zeros(2)

    def on_train_begin(self, logs=None):
        model = self.model
        if not wrapping.is_wrapped(model) or "chex_state" not in dir(model):
            raise ValueError(
                "ChannelExploration needs a model from "
                "`keras_chex.prune_and_regrow(model, ...)`; got "
                f"'{model.name}' ({type(model).__name__})."
            )
        config = model.chex_config
        steps = self.params.get("steps")
        epochs = self.params.get("epochs")
        if not steps:
            raise ValueError(
                "ChannelExploration schedules explorations over the planned "
                "training steps, but this fit does not know its steps per "
                "epoch. Pass `steps_per_epoch=` to `fit`, or use a dataset "
                "of known cardinality."
            )
        schedule = schedules.ExplorationSchedule(
            interval=config["interval"], until=config["until"]
        )
        t_max = schedule.t_max(steps, epochs)
        # Steps already trained (a run resumed by BackupAndRestore, or a
        # second `fit`) had their explorations then.
        done = int(self.model.optimizer.iterations.numpy())
        self._plan = []
        for step in schedule.exploration_steps(steps, epochs):
            if step <= done:
                continue
            t = schedule.exploration_index(step, steps, epochs)
            self._plan.append(
                (step, t, schedules.regrow_fraction(t, t_max,
                                                    config["regrow"]))
            )
        self._changed = np.zeros(2)

    def on_train_batch_end(self, batch, logs=None):
        if not self._plan:
            return
        step = int(self.model.optimizer.iterations.numpy())
        # With `steps_per_execution > 1` the callback sees every k-th step
        # only: run every exploration that fell inside the last execution.
        while self._plan and self._plan[0][0] <= step:
            planned, t, delta = self._plan.pop(0)
            stats = np.asarray(self.model.chex_state.explore(delta, t))
            self._changed += stats[1:3]
            if self.verbose:
                print(
                    f"\nCHEX exploration {t} at step {step} (planned "
                    f"{planned}): regrow {delta:.3f}, kept {stats[0]:.3f} of "
                    f"dense cost, pruned {int(stats[1])}, regrown "
                    f"{int(stats[2])}"
                )

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        state = self.model.chex_state
        logs["chex_macs"] = float(state.kept_fraction())
        logs["chex_pruned"] = float(self._changed[0])
        logs["chex_regrown"] = float(self._changed[1])
        self._changed = np.zeros(2)

    def get_config(self):
        return {"verbose": self.verbose}
