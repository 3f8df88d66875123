"""Periodic pruning steps over the planned length of a `fit` call.

CHEX explores and relevance pruning removes channels on the same clock:
every `interval` epochs until a fraction `until` of the planned training,
with a last step at that freeze point, after which the masks stay fixed.
"""

import functools
import math
import numbers

from keras_chex.core import checks


def _round_half_up(x):
    # The small epsilon absorbs float error just below a half, such as
    # 0.29 * 50 = 14.499999999999998, which should round to 15.
    return int(math.floor(x + 0.5 + 1e-9))


class PeriodicSchedule:
    """Global optimizer steps at which a method runs a pruning step.

    Steps count completed optimizer updates (the value of
    `optimizer.iterations` after the update), so "a step at 200" runs after
    200 updates, before update 201. No step happens at step 0.

    With `s = steps_per_epoch`:

    - the freeze step is `F = round(until * epochs * s)` (at least 1);
    - regular steps happen at `round(i * interval * s)` for `i = 1, 2, ...`
      as long as that step is `< F`;
    - a last step happens at `F` itself.

    Rounding is half up. Because each regular step is rounded from
    `i * interval * s` rather than accumulated, a fractional interval does
    not drift: `interval=0.5` with 25 steps per epoch runs at steps 13, 25,
    38, 50, ...

    Example: 10 epochs of 100 steps, `interval=2`, `until=0.72`: the
    freeze step is 720, so the steps are 200, 400, 600 and 720 (the ends of
    epochs 2, 4 and 6, and 20% into epoch 8).

    >>> PeriodicSchedule(interval=2, until=0.72).steps(100, 10)
    [200, 400, 600, 720]

    Args:
        interval: Epochs between steps, `> 0`; may be fractional.
        until: Fraction of the planned training after which the masks
            freeze, in `(0, 1]`.
    """

    def __init__(self, interval=2.0, until=0.72):
        if not checks.is_number(interval) or not interval > 0:
            raise ValueError(
                f"`interval` must be a number > 0 (epochs), got {interval!r}."
            )
        if not checks.is_number(until) or not 0 < until <= 1:
            raise ValueError(
                f"`until` must be a number in (0, 1] (a fraction of the "
                f"planned training), got {until!r}."
            )
        self.interval = float(interval)
        self.until = float(until)

    def freeze_step(self, steps_per_epoch, epochs):
        """Step of the last pruning step, after which the masks are fixed.

        Args:
            steps_per_epoch: Optimizer steps per epoch, an int `>= 1`.
            epochs: Planned number of epochs, `> 0`.

        Returns:
            An int `>= 1`.
        """
        check_training_length(steps_per_epoch, epochs)
        return _freeze_step(self.until, steps_per_epoch, epochs)

    def steps(self, steps_per_epoch, epochs):
        """All pruning steps in increasing order.

        Args:
            steps_per_epoch: Optimizer steps per epoch, an int `>= 1`.
            epochs: Planned number of epochs, `> 0`.

        Returns:
            A list of distinct ints; the last one is the freeze step.
        """
        check_training_length(steps_per_epoch, epochs)
        return list(_periodic_steps(self.interval, self.until,
                                    steps_per_epoch, epochs))

    def get_config(self):
        return {"interval": self.interval, "until": self.until}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return (f"{type(self).__name__}(interval={self.interval}, "
                f"until={self.until})")


def _freeze_step(until, steps_per_epoch, epochs):
    return max(1, _round_half_up(until * epochs * steps_per_epoch))


# Callbacks ask at every batch; the list only depends on these four numbers.
@functools.lru_cache(maxsize=64)
def _periodic_steps(interval, until, steps_per_epoch, epochs):
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


def check_training_length(steps_per_epoch, epochs):
    if (
        not isinstance(steps_per_epoch, numbers.Integral)
        or isinstance(steps_per_epoch, bool)
        or steps_per_epoch < 1
    ):
        raise ValueError(
            f"`steps_per_epoch` must be an int >= 1, got {steps_per_epoch!r}."
        )
    if not checks.is_number(epochs) or not epochs > 0:
        raise ValueError(f"`epochs` must be a number > 0, got {epochs!r}.")


def check_step(step):
    """`step` as an int (NumPy ints and eager scalar tensors accepted)."""
    if hasattr(step, "numpy"):
        step = step.numpy()
    if not isinstance(step, numbers.Integral) or isinstance(step, bool):
        raise ValueError(f"`step` must be an int, got {step!r}.")
    return int(step)
