"""When CHEX explores, and how much it regrows each time.

CHEX runs an exploration step (re-allocate widths, prune, regrow) every
`interval` epochs until a fraction `until` of the planned training, then a
last pruning-only step, after which the masks stay fixed. The fraction of
channels regrown at exploration `t` decays with a cosine from `delta0` to 0 at
the last exploration `t_max`.
"""

import math

import keras
import tensorflow as tf

from keras_chex.core import checks
from keras_chex.core import schedule


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
    if all(checks.is_number(x) for x in (t, t_max, delta0)):
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


@keras.saving.register_keras_serializable(package="keras_chex")
class ExplorationSchedule(schedule.PeriodicSchedule):
    """Global optimizer steps at which CHEX runs an exploration step.

    The steps of a `PeriodicSchedule` (every `interval` epochs until a
    fraction `until` of the planned training, and a last one at that freeze
    step). No exploration happens at step 0: the initial masks are set
    separately, and ranking BatchNorm gammas that are all still 1 would be
    meaningless. Explorations are numbered `t = 0, 1, ..., t_max` in
    order, so the first one regrows the full `delta0` (matching initial
    masks at sparsity `S - delta0`) and the last one, at the freeze step,
    regrows nothing (`regrow_fraction(t_max, t_max, delta0) == 0`).

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

    def exploration_steps(self, steps_per_epoch, epochs):
        """All exploration steps in increasing order (see `steps`)."""
        return self.steps(steps_per_epoch, epochs)

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
        step = schedule.check_step(step)
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
        step = schedule.check_step(step)
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
