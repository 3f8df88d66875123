"""The base of every pruning method's `fit` callback.

A method's callback lays its steps over the planned length of the `fit`
call (`epochs` x steps per epoch), runs each planned step once after the
optimizer update it is due at, and adds the method's numbers to each
epoch's logs. What is shared lives here: finding the training length,
skipping steps a resumed run already had, catching up on every step inside
one `steps_per_execution` window, and the errors a user sees when the model
or the fit does not fit the method.
"""

import math
import os
import warnings

import keras
import numpy as np

from keras_chex.core import _trainer
from keras_chex.core import method as method_lib
from keras_chex.core import students
from keras_chex.core import wrapping


class PruningCallback(keras.callbacks.Callback):
    """Runs a pruning method's planned steps during `model.fit`.

    Subclasses set `method` (the registered method name), `entry_point`
    (how a user makes a model for it, for error messages) and the names of
    their epoch logs (`cost_log`, `pruned_log`, and `regrown_log` unless
    the method never regrows), and implement:

    - `plan(steps_per_epoch, epochs)`: a list of `(step, payload)` sorted
      by step, `step` counting completed optimizer updates;
    - `run_step(step, payload)`: one planned step, given the current step;
      returns `(stats, message)`: `stats` starts with the cost kept, the
      channels pruned and the channels regrown by the step, `message` is
      the line `verbose=1` prints.

    Each epoch's logs then get the cost kept at its end and the channels
    pruned and regrown by its steps.

    The plan is made at the first batch, not in `on_train_begin`: a
    `BackupAndRestore` callback listed after this one restores the step
    counter in its own `on_train_begin`, and the steps it already trained
    had their pruning steps then.

    Every callback records the width of each channel group after each of
    its steps in `widths` (for `keras_chex.plot_widths`), and with
    `log_dir` writes TensorBoard summaries there (under `pruning/`): each
    group's kept fraction (`kept/<group>`, and all of them as the histogram
    `kept_fractions`), the cost kept (`cost_kept`) and, per epoch, the
    method's logs (`epoch/<name>`). Without `log_dir`, a
    `keras.callbacks.TensorBoard` in the same `fit` lends its own, so its
    run and `pruning/` show side by side.

    Args:
        verbose: 1 prints one line per pruning step.
        log_dir: optional folder for TensorBoard summaries.
    """

    method = None
    entry_point = None
    cost_log = None
    pruned_log = None
    regrown_log = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.method is not None and "method" in cls.__dict__:
            method_lib.register_callback(cls.method, cls)

    def __init__(self, verbose=0, log_dir=None):
        super().__init__()
        self._changed = np.zeros(2)  # Pruned, regrown this epoch.
        self.verbose = verbose
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        if self.log_dir is not None:
            try:
                import tensorboard  # noqa: F401 (tf.summary writes via it)
            except ImportError:
                raise ImportError(
                    f"{type(self).__name__}(log_dir=...) writes TensorBoard "
                    "summaries, which needs the tensorboard package: pip "
                    "install 'keras-chex[tensorboard]' (or tensorboard)."
                ) from None
        self.widths = []
        self._writer = None
        self._writer_dir = None
        self._tensorboard_dir = None  # Lent by a TensorBoard of the fit.
        self._plan = None
        self._length = None

    @property
    def pruned(self):
        """The wrapped model being pruned: the model `fit` runs on, or the
        student of the `keras.distillation.Distiller` it runs on."""
        return students.trained_model_of(self.model)

    @property
    def state(self):
        """The method state of the model being pruned."""
        return self.pruned.pruning_state

    def on_train_begin(self, logs=None):
        model = self.pruned
        if not wrapping.is_method(model, self.method):
            got = (model.pruning_config.get("method")
                   if hasattr(model, "pruning_config") else None)
            inside = ("" if model is self.model else
                      f" as the student of '{self.model.name}'")
            raise ValueError(
                f"{type(self).__name__} needs a model from "
                f"`{self.entry_point}`{inside}; got '{model.name}' "
                f"({type(model).__name__}"
                + (f", wrapped for method '{got}'" if got else "")
                + "). Use the callback that goes with the model's method."
            )
        if not model.trainable_weights:
            raise ValueError(
                f"{type(self).__name__}: '{model.name}' has no trainable "
                "weights, so pruning it would train nothing. It was probably "
                "wrapped from a frozen model (a Distiller freezes its "
                "teacher: wrap the trained model before building the "
                "Distiller, or set `model.trainable = True` on the wrapped "
                "model).")
        steps = self.params.get("steps")
        epochs = self.params.get("epochs")
        if not steps:
            raise ValueError(
                f"{type(self).__name__} schedules its steps over the planned "
                "training steps, but this fit does not know its steps per "
                "epoch. Pass `steps_per_epoch=` to `fit`, or use a dataset "
                "of known cardinality."
            )
        # After every check: a fit refused here never reaches
        # `on_train_end`, which takes the hook out again.
        # The state reaches the optimizer and train step through the model
        # `fit` runs on: a Distiller's, when the wrapped model is its
        # student (which then has no optimizer of its own).
        self.state.attach_trainer(self.model)
        if students.mend_logits_distillation(self.model):
            warnings.warn(
                f"'{self.model.name}' distils with `LogitsDistillation`'s "
                "default loss 'kl_divergence', which this Keras version "
                "applies to raw logits instead of the softened "
                "probabilities, so the student's accuracy collapses. This "
                "fit uses `keras.losses.KLDivergence()` instead (softmax at "
                "the temperature, scaled by its square, as Keras documents). "
                "Pass `loss=keras.losses.KLDivergence()` to "
                "`LogitsDistillation` to make that explicit and silence "
                "this warning.", stacklevel=2)
            # The train function may be traced with the old loss already.
            self.model.make_train_function(force=True)
        dropped = students.dropped_regularization(self.model)
        if dropped:
            warnings.warn(
                f"'{self.model.name}' trains '{model.name}' without its "
                f"{dropped} regularization loss(es) (e.g. a "
                "`kernel_regularizer`'s weight decay): Keras' `Distiller` "
                "does not add a student's own losses to its loss. For weight "
                "decay while distilling, give the optimizer `weight_decay=` "
                "(e.g. `keras.optimizers.SGD(0.01, momentum=0.9, "
                "weight_decay=5e-4)`).", stacklevel=2)
        _trainer.install_gradient_hook(self.model, model)
        self._length = (steps, epochs)
        self._plan = None
        self._changed = np.zeros(2)

    def _current_step(self):
        return int(self.model.optimizer.iterations.numpy())

    def on_train_batch_begin(self, batch, logs=None):
        if self._plan is None and self._length is not None:
            # Steps already trained (a run resumed by BackupAndRestore, or a
            # second `fit`) had their pruning steps then.
            done = self._current_step()
            plan = self.plan(*self._length)
            if done == 0 and self.pruned.analysis.num_channels:
                message = self.short_plan_warning(plan, *self._length)
                if message:
                    warnings.warn(message, stacklevel=2)
            self._plan = [(step, payload) for step, payload in plan
                          if step > done]
            if not self.widths:
                self._record(done)

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
            stats, message = self.run_step(step, payload)
            self._changed += np.asarray(stats[1:3], float)
            if self.verbose:
                print(f"\n{message}")
            self._record(step)

    # -- what was pruned when ------------------------------------------------
    def group_names(self):
        """Names of the channel groups, in the order of `widths` entries."""
        return [g.name for g in self.pruned.analysis.groups]

    def group_sizes(self):
        return np.array([g.size for g in self.pruned.analysis.groups])

    def _record(self, step):
        counts = self.pruned.masks.counts()
        self.widths.append((int(step), counts))
        if self._summary_dir() is None:
            return
        import tensorflow as tf

        fractions = counts / np.maximum(self.group_sizes(), 1)
        with self._summary_writer().as_default(step=int(step)):
            for name, fraction in zip(self.group_names(), fractions):
                tf.summary.scalar(f"kept/{name}", float(fraction))
            if len(fractions):
                tf.summary.histogram("kept_fractions", fractions)
            tf.summary.scalar("cost_kept", float(self.state.kept_fraction()))

    def _summary_dir(self):
        base = self.log_dir if self.log_dir is not None else (
            self._tensorboard_dir)
        return None if base is None else os.path.join(base, "pruning")

    def _summary_writer(self):
        directory = self._summary_dir()
        if self._writer is None or self._writer_dir != directory:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(directory)
            self._writer_dir = directory
        return self._writer

    def on_train_end(self, logs=None):
        _trainer.remove_gradient_hook(self.model)
        if self._writer is not None:
            self._writer.flush()

    def _nonfinite_layers(self):
        """Layers whose weights hold NaN or inf (a diverged loss)."""
        from keras_chex.core import _graph

        broken = []
        for layer in _graph.all_layers(self.pruned) + [self.state]:
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
        values = self.epoch_logs()
        if logs is not None:
            logs.update(values)
        if self._summary_dir() is not None:
            import tensorflow as tf

            with self._summary_writer().as_default(step=epoch):
                for name, value in values.items():
                    tf.summary.scalar(f"epoch/{name}", float(value))

    def plan(self, steps_per_epoch, epochs):
        raise NotImplementedError

    def run_step(self, step, payload):
        raise NotImplementedError

    def short_plan_warning(self, plan, steps_per_epoch, epochs):
        """What the fit is too short for, if it is: a message, or None.

        Called once at the start of a fresh fit with the whole plan; the
        message is shown as a warning.
        """
        return None

    def single_step_warning(self, plan, steps_per_epoch, epochs,
                            consequence):
        """`short_plan_warning` of a method on a periodic schedule
        (`interval` epochs, `until`): a message if the plan has collapsed to
        one step, where `consequence` says what that means for the method.
        """
        if len(plan) > 1:
            return None
        config = self.state.config
        until = config.until
        suggested = max(0.01, math.floor(100 * until * epochs / 4) / 100)
        return (
            f"{self.method.upper()}: this fit ({epochs} epoch(s) of "
            f"{steps_per_epoch} steps) has room for one pruning step only "
            f"(at step {plan[0][0]}) with `interval={config.interval:g}` "
            f"epochs and `until={until:g}`, so {consequence}. For gradual "
            "pruning pass a smaller `interval` to "
            f"`{self.entry_point.split('(')[0]}` (e.g. interval="
            f"{suggested:g} for about four steps) or fit for more epochs.")

    def epoch_logs(self):
        """The numbers added to an epoch's logs (and reset for the next)."""
        logs = {self.cost_log: float(self.state.kept_fraction()),
                self.pruned_log: float(self._changed[0])}
        if self.regrown_log:
            logs[self.regrown_log] = float(self._changed[1])
        self._changed = np.zeros(2)
        return logs

    def get_config(self):
        return {"verbose": self.verbose, "log_dir": self.log_dir}
