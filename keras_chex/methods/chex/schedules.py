"""When CHEX explores, and how much it regrows each time.

CHEX runs an exploration step (re-allocate widths, prune, regrow) every
`interval` epochs until a fraction `until` of the planned training, then a
last pruning-only step, after which the masks stay fixed. The fraction of
channels regrown at exploration `t` decays with a cosine from `delta0` to 0 at
the last exploration `t_max`.
"""

import functools
import math
import numbers

import keras
import tensorflow as tf


def _is_python_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def regrow_fraction(t, t_max, delta0):
    """Cosine-decayed regrowth fraction of exploration `t`.

    Returns `delta0 * (1 + cos(pi * t / t_max)) / 2` for `t < t_max` and 0
    for `t >= t_max` (so `t_max = 0` gives 0).

    Args:
        t: Index of the exploration step, `>= 0`.
        t_max: Index of the last exploration step, `>= 0`.
        delta0: Regrowth fraction at `t = 0`, in `[0, 1]`.

    Returns:
        A Python float when all three arguments are Python (or NumPy scalar)
        numbers; otherwise a scalar tensor (float64 if any argument is a
        float64 tensor, float32 otherwise). Tensor inputs are not validated,
        so that the function can run inside `tf.function`.

    Raises:
        ValueError: If Python-number arguments are out of range.

    Example:

    >>> regrow_fraction(0, 4, 0.3)
    0.3
    >>> round(regrow_fraction(2, 4, 0.3), 6)
    0.15
    >>> regrow_fraction(4, 4, 0.3)
    0.0
    """
    if all(_is_python_number(x) for x in (t, t_max, delta0)):
        if t < 0:
            raise ValueError(f"`t` must be >= 0, got {t}.")
        if t_max < 0:
            raise ValueError(f"`t_max` must be >= 0, got {t_max}.")
        if not 0 <= delta0 <= 1:
            raise ValueError(f"`delta0` must be in [0, 1], got {delta0}.")
        if t >= t_max:
            return 0.0
        return float(delta0 * (1 + math.cos(math.pi * t / t_max)) / 2)

    dtype = tf.float32
    for x in (t, t_max, delta0):
        if isinstance(x, (tf.Tensor, tf.Variable)) and x.dtype == tf.float64:
            dtype = tf.float64
    t = tf.cast(t, dtype)
    t_max = tf.cast(t_max, dtype)
    delta0 = tf.cast(delta0, dtype)
    # A safe denominator keeps t_max = 0 from producing NaN in the branch
    # that tf.where discards (NaN would still poison gradients).
    safe_t_max = tf.where(t_max > 0, t_max, tf.ones_like(t_max))
    cosine = delta0 * (1 + tf.cos(math.pi * t / safe_t_max)) / 2
    return tf.where(t >= t_max, tf.zeros_like(cosine), cosine)


def _round_half_up(x):
    # The small epsilon absorbs float error just below a half, such as
    # 0.29 * 50 = 14.499999999999998, which should round to 15.
    return int(math.floor(x + 0.5 + 1e-9))


@keras.saving.register_keras_serializable(package="keras_chex")
class ExplorationSchedule:
    """Global optimizer steps at which CHEX runs an exploration step.

    Steps count completed optimizer updates (the value of
    `optimizer.iterations` after the update), so "an exploration at step 200"
    runs after 200 updates, before update 201. No exploration happens at step
    0: the initial masks are set separately, and ranking BatchNorm gammas
    that are all still 1 would be meaningless.

    With `s = steps_per_epoch`:

    - the freeze step is `F = round(until * epochs * s)` (at least 1);
    - regular explorations happen at `round(i * interval * s)` for
      `i = 1, 2, ...` as long as that step is `< F`;
    - a last exploration happens at `F` itself;
    - explorations are numbered `t = 0, 1, ..., t_max` in order, so the
      first one regrows the full `delta0` (matching initial masks at
      sparsity `S - delta0`) and the last one, at the freeze step, regrows
      nothing (`regrow_fraction(t_max, t_max, delta0) == 0`).

    Rounding is half up. Because each regular step is rounded from
    `i * interval * s` rather than accumulated, a fractional interval does
    not drift: `interval=0.5` with 25 steps per epoch explores at steps
    13, 25, 38, 50, ...

    Example: 10 epochs of 100 steps, `interval=2`, `until=0.72`. The freeze
    step is 720, so the explorations are at steps 200, 400, 600 and 720 (the
    ends of epochs 2, 4 and 6, and 20% into epoch 8), with `t = 0, 1, 2, 3`
    and `t_max = 3`. With `delta0 = 0.3` they regrow 0.3, 0.225, 0.075 and 0.

    >>> schedule = ExplorationSchedule(interval=2, until=0.72)
    >>> schedule.exploration_steps(steps_per_epoch=100, epochs=10)
    [200, 400, 600, 720]
    >>> schedule.exploration_index(600, steps_per_epoch=100, epochs=10)
    2
    >>> schedule.t_max(steps_per_epoch=100, epochs=10)
    3

    Args:
        interval: Epochs between exploration steps, `> 0`; may be fractional.
        until: Fraction of the planned training after which the masks
            freeze, in `(0, 1]`.
    """

    def __init__(self, interval=2.0, until=0.72):
        if not _is_python_number(interval) or not interval > 0:
            raise ValueError(
                f"`interval` must be a number > 0 (epochs), got {interval!r}."
            )
        if not _is_python_number(until) or not 0 < until <= 1:
            raise ValueError(
                f"`until` must be a number in (0, 1] (a fraction of the "
                f"planned training), got {until!r}."
            )
        self.interval = float(interval)
        self.until = float(until)

    def freeze_step(self, steps_per_epoch, epochs):
        """Step of the last exploration, after which the masks are fixed.

        Args:
            steps_per_epoch: Optimizer steps per epoch, an int `>= 1`.
            epochs: Planned number of epochs, `> 0`.

        Returns:
            An int `>= 1`.
        """
        _check_training_length(steps_per_epoch, epochs)
        return _freeze_step(self.until, steps_per_epoch, epochs)

    def exploration_steps(self, steps_per_epoch, epochs):
        """All exploration steps in increasing order.

        Args:
            steps_per_epoch: Optimizer steps per epoch, an int `>= 1`.
            epochs: Planned number of epochs, `> 0`.

        Returns:
            A list of distinct ints; the last one is the freeze step.
        """
        _check_training_length(steps_per_epoch, epochs)
        return list(
            _exploration_steps(
                self.interval, self.until, steps_per_epoch, epochs
            )
        )

    def t_max(self, steps_per_epoch, epochs):
        """Index of the last exploration step (the freeze step).

        Args:
            steps_per_epoch: Optimizer steps per epoch, an int `>= 1`.
            epochs: Planned number of epochs, `> 0`.

        Returns:
            An int `>= 0`.
        """
        return len(self.exploration_steps(steps_per_epoch, epochs)) - 1

    def is_exploration_step(self, step, steps_per_epoch, epochs):
        """Whether an exploration runs at global optimizer step `step`.

        Args:
            step: Number of completed optimizer updates, an int.
            steps_per_epoch: Optimizer steps per epoch, an int `>= 1`.
            epochs: Planned number of epochs, `> 0`.

        Returns:
            A bool.
        """
        step = _check_step(step)
        return step in self.exploration_steps(steps_per_epoch, epochs)

    def exploration_index(self, step, steps_per_epoch, epochs):
        """Index `t` of the exploration that runs at step `step`.

        Args:
            step: Number of completed optimizer updates, an int.
            steps_per_epoch: Optimizer steps per epoch, an int `>= 1`.
            epochs: Planned number of epochs, `> 0`.

        Returns:
            An int in `[0, t_max]`.

        Raises:
            ValueError: If no exploration runs at `step`.
        """
        step = _check_step(step)
        steps = self.exploration_steps(steps_per_epoch, epochs)
        if step not in steps:
            raise ValueError(
                f"`step` {step} is not an exploration step; exploration "
                f"steps are {steps}."
            )
        return steps.index(step)

    def regrow_fraction(self, step, steps_per_epoch, epochs, delta0):
        """Regrowth fraction of the exploration at step `step`.

        Args:
            step: An exploration step (see `exploration_steps`).
            steps_per_epoch: Optimizer steps per epoch, an int `>= 1`.
            epochs: Planned number of epochs, `> 0`.
            delta0: Regrowth fraction of the first exploration, in `[0, 1]`.

        Returns:
            A Python float.

        Raises:
            ValueError: If no exploration runs at `step`.
        """
        t = self.exploration_index(step, steps_per_epoch, epochs)
        return regrow_fraction(t, self.t_max(steps_per_epoch, epochs), delta0)

    def get_config(self):
        return {"interval": self.interval, "until": self.until}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return (
            f"ExplorationSchedule(interval={self.interval}, "
            f"until={self.until})"
        )


def _freeze_step(until, steps_per_epoch, epochs):
    return max(1, _round_half_up(until * epochs * steps_per_epoch))


# Callbacks ask at every batch; the list only depends on these four numbers.
@functools.lru_cache(maxsize=64)
def _exploration_steps(interval, until, steps_per_epoch, epochs):
    freeze = _freeze_step(until, steps_per_epoch, epochs)
    stride = interval * steps_per_epoch
    steps = []
    i = 1
    while True:
        step = _round_half_up(i * stride)
        if step >= freeze:
            break
        # A stride below half a step can round two i to the same step.
        if step > 0 and (not steps or step > steps[-1]):
            steps.append(step)
        i += 1
    steps.append(freeze)
    return tuple(steps)


def _check_training_length(steps_per_epoch, epochs):
    if (
        not isinstance(steps_per_epoch, numbers.Integral)
        or isinstance(steps_per_epoch, bool)
        or steps_per_epoch < 1
    ):
        raise ValueError(
            f"`steps_per_epoch` must be an int >= 1, got {steps_per_epoch!r}."
        )
    if not _is_python_number(epochs) or not epochs > 0:
        raise ValueError(f"`epochs` must be a number > 0, got {epochs!r}.")


def _check_step(step):
    # Accept NumPy integers and eager scalar tensors such as
    # `optimizer.iterations.numpy()`.
    if hasattr(step, "numpy"):
        step = step.numpy()
    if not isinstance(step, numbers.Integral) or isinstance(step, bool):
        raise ValueError(f"`step` must be an int, got {step!r}.")
    return int(step)
