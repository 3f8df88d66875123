"""When SMCP recomputes its masks, and how much cost each recomputation keeps.

Training is split, as fractions of the planned optimizer steps, into a
warm-up without pruning, a ramp over which the pruned share of the cost
grows as a normalised exponential (the reference's `1 - exp(-0.05 t)` over
~55 of 90 ImageNet epochs: a rate of 2.75 over the ramp), a stretch at the
final budget, and a frozen end (`freeze`) in which the masks no longer
change. Masks are recomputed every `interval_steps` from the end of the
warm-up up to the freeze step, and once more at the freeze step itself, at
the final budget, so the frozen masks always meet it.
"""

import math

from keras_chex.core import checks

# The reference ramp `1 - exp(-0.05 t)` over ~55 epochs, normalised to [0, 1].
RAMP_RATE = 2.75
# Recomputations over the pruning window when `interval_steps` is None.
DEFAULT_RECOMPUTATIONS = 30


class SoftMaskSchedule:
    """The recomputation steps and cost targets of an SMCP run.

    Steps count completed optimizer updates. With `T` planned steps, the
    warm-up ends at `W = round(warmup * T)`, the ramp at
    `W + round(ramp * T)`, and masks freeze at `F = round((1 - freeze) * T)`.

    Args:
        warmup: fraction of training before any pruning, in [0, 1).
        ramp: fraction of training over which the target ramps up, in
            (0, 1].
        freeze: fraction of training at the end with fixed masks, in
            [0, 1); `warmup + ramp <= 1 - freeze`.
        interval_steps: optimizer steps between recomputations (an int
            >= 1), or None for about 30 over the pruning window.

    Example:

    >>> s = SoftMaskSchedule(warmup=0.1, ramp=0.6, freeze=0.25,
    ...                      interval_steps=10)
    >>> s.recompute_steps(100)
    [20, 30, 40, 50, 60, 70, 75]
    >>> round(s.kept_fraction(75, 100, 0.5), 3)
    0.5
    """

    def __init__(self, warmup=0.1, ramp=0.6, freeze=0.25,
                 interval_steps=None):
        checks.check_fraction("warmup", warmup, low_open=False,
                              high_closed=False)
        checks.check_fraction("ramp", ramp)
        checks.check_fraction("freeze", freeze, low_open=False,
                              high_closed=False)
        if warmup + ramp > 1 - freeze + 1e-9:
            raise ValueError(
                f"`warmup` + `ramp` ({warmup} + {ramp}) must be at most "
                f"1 - `freeze` ({1 - freeze:g}): the budget must be reached "
                "before the masks freeze. Shorten the ramp or the freeze."
            )
        if interval_steps is not None and (
                isinstance(interval_steps, bool)
                or not isinstance(interval_steps, int) or interval_steps < 1):
            raise ValueError("`interval_steps` must be an int >= 1 or None, "
                             f"got {interval_steps!r}.")
        self.warmup = float(warmup)
        self.ramp = float(ramp)
        self.freeze = float(freeze)
        self.interval_steps = interval_steps

    def _bounds(self, total_steps):
        start = _round(self.warmup * total_steps)
        end = max(start + 1, _round((1 - self.freeze) * total_steps))
        ramp = max(1, _round(self.ramp * total_steps))
        return start, min(start + ramp, end), end

    def interval(self, total_steps):
        """Steps between recomputations for a run of `total_steps`."""
        if self.interval_steps is not None:
            return self.interval_steps
        start, _, end = self._bounds(total_steps)
        return max(1, _round((end - start) / DEFAULT_RECOMPUTATIONS))

    def recompute_steps(self, total_steps):
        """The steps after which masks are recomputed, ascending."""
        start, _, end = self._bounds(total_steps)
        step = self.interval(total_steps)
        steps = list(range(start + step, end, step))
        return steps + [end]

    def kept_fraction(self, step, total_steps, target):
        """Fraction of the dense cost the masks keep after `step`.

        Args:
            step: a recomputation step.
            total_steps: planned optimizer steps.
            target: the final fraction kept, in (0, 1].
        """
        start, ramp_end, end = self._bounds(total_steps)
        if step >= end:
            return float(target)
        tau = min(1.0, max(0.0, (step - start) / (ramp_end - start)))
        shape = (1 - math.exp(-RAMP_RATE * tau)) / (1 - math.exp(-RAMP_RATE))
        return float(1 - (1 - target) * shape)

    def get_config(self):
        return {"warmup": self.warmup, "ramp": self.ramp,
                "freeze": self.freeze, "interval_steps": self.interval_steps}


def _round(x):
    # Half up, with an epsilon for float error just below a half.
    return int(math.floor(x + 0.5 + 1e-9))
