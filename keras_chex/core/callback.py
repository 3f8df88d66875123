"""The base of every pruning method's `fit` callback.

A method's callback lays its steps over the planned length of the `fit`
call (`epochs` x steps per epoch), runs each planned step once after the
optimizer update it is due at, and adds the method's numbers to each
epoch's logs. What is shared lives here: finding the training length,
skipping steps a resumed run already had, catching up on every step inside
one `steps_per_execution` window, and the errors a user sees when the model
or the fit does not fit the method.
"""

import warnings

import keras
import numpy as np


class PruningCallback(keras.callbacks.Callback):
    """Runs a pruning method's planned steps during `model.fit`.

    Subclasses set `method` (the registered method name) and
    `entry_point` (how a user makes a model for it, for error messages),
    and implement:

    - `plan(steps_per_epoch, epochs)`: a list of `(step, payload)` sorted
      by step, `step` counting completed optimizer updates;
    - `run_step(step, payload)`: one planned step, given the current step;
    - `epoch_logs()`: a dict of numbers added to the epoch's logs (then
      reset for the next epoch by the subclass).

    The plan is made at the first batch, not in `on_train_begin`: a
    `BackupAndRestore` callback listed after this one restores the step
    counter in its own `on_train_begin`, and the steps it already trained
    had their pruning steps then.

    Args:
        verbose: 1 prints one line per pruning step.
    """

    method = None
    entry_point = None

    def __init__(self, verbose=0):
        super().__init__()
        self.verbose = verbose
        self._plan = None
        self._length = None

    @property
    def state(self):
        """The method state of the model being trained."""
        return self.model.pruning_state

    def on_train_begin(self, logs=None):
        from keras_chex.core import method  # wrapping imports callbacks' users.

        model = self.model
        if not method.is_method(model, self.method):
            got = (model.pruning_config.get("method")
                   if hasattr(model, "pruning_config") else None)
            raise ValueError(
                f"{type(self).__name__} needs a model from "
                f"`{self.entry_point}`; got '{model.name}' "
                f"({type(model).__name__}"
                + (f", wrapped for method '{got}'" if got else "")
                + "). Use the callback that goes with the model's method."
            )
        steps = self.params.get("steps")
        epochs = self.params.get("epochs")
        if not steps:
            raise ValueError(
                f"{type(self).__name__} schedules its steps over the planned "
                "training steps, but this fit does not know its steps per "
                "epoch. Pass `steps_per_epoch=` to `fit`, or use a dataset "
                "of known cardinality."
            )
        self._length = (steps, epochs)
        self._plan = None

    def _current_step(self):
        return int(self.model.optimizer.iterations.numpy())

    def on_train_batch_begin(self, batch, logs=None):
        if self._plan is None and self._length is not None:
            # Steps already trained (a run resumed by BackupAndRestore, or a
            # second `fit`) had their pruning steps then.
            done = self._current_step()
            self._plan = [(step, payload)
                          for step, payload in self.plan(*self._length)
                          if step > done]

    def on_train_batch_end(self, batch, logs=None):
        if not self._plan:
            return
        step = self._current_step()
        # With `steps_per_execution > 1` the callback sees every k-th step
        # only: run every step that fell inside the last execution.
        while self._plan and self._plan[0][0] <= step:
            _, payload = self._plan.pop(0)
            broken = self._nonfinite_layers()
            if broken:
                self._skip(step, broken)
                continue
            self.run_step(step, payload)

    def _nonfinite_layers(self):
        """Layers whose weights hold NaN or inf (a diverged loss)."""
        from keras_chex.core import _graph

        broken = []
        for layer in _graph.all_layers(self.model) + [self.state]:
            if any(not np.all(np.isfinite(v.numpy()))
                   for v in layer.weights
                   if np.issubdtype(np.dtype(v.dtype), np.floating)):
                broken.append(layer.name)
        return broken

    def _skip(self, step, broken):
        names = ", ".join(f"'{n}'" for n in broken[:5]) + (
            f" and {len(broken) - 5} more" if len(broken) > 5 else "")
        warnings.warn(
            f"{type(self).__name__}: skipped the pruning step at step "
            f"{step}: the weights of {names} are NaN or inf (the loss "
            "diverged), so no channel can be ranked. The masks are "
            "unchanged and training goes on; lower the learning rate, or "
            "stop such runs with keras.callbacks.TerminateOnNaN().",
            stacklevel=2)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self.epoch_logs())

    def plan(self, steps_per_epoch, epochs):
        raise NotImplementedError

    def run_step(self, step, payload):
        raise NotImplementedError

    def epoch_logs(self):
        return {}

    def get_config(self):
        return {"verbose": self.verbose}
