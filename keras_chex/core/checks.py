"""Argument checks every entry point shares.

Each raises a ValueError that names the argument, says what it takes and
what it got, so a user's mistake is reported where it was made, not as a
conversion error deep inside TensorFlow.
"""

import numbers

import numpy as np


def is_number(value):
    """A real Python or NumPy number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_fraction(name, value, low_open=True, high_closed=True,
                   optional=False):
    """Raises a ValueError naming `name` unless `value` is in the interval.

    The default interval is (0, 1]. `None` passes only when `optional` (a
    target that was not given).
    """
    if value is None and optional:
        return
    # Type first: comparing a string would raise an unhelpful TypeError, and
    # `True` would pass as 1. NumPy scalars (np.float32) are numbers.Real.
    ok = is_number(value) and (
        (value > 0 if low_open else value >= 0)
        and (value <= 1 if high_closed else value < 1)
    )
    if not ok:
        interval = ("(0" if low_open else "[0") + (
            ", 1]" if high_closed else ", 1)"
        )
        raise ValueError(f"`{name}` must be a number in {interval}, got "
                         f"{value!r}.")


def one_target(targets, descriptions):
    """The single target given: (name, value as float).

    Args:
        targets: dict name -> value or None.
        descriptions: dict name -> what the value means, for the error.

    Raises:
        ValueError: none or several targets are given, or the one given
            is not a number.
    """
    given = [k for k, v in targets.items() if v is not None]
    if len(given) != 1:
        listing = ", ".join(f"`{k}` ({descriptions[k]})" for k in targets)
        raise ValueError(
            f"Give exactly one target: {listing}; got "
            f"{', '.join(given) if given else 'none'}."
        )
    name = given[0]
    if not is_number(targets[name]):
        raise ValueError(f"`{name}` must be a number ({descriptions[name]}), "
                         f"got {targets[name]!r}.")
    return name, float(targets[name])


def check_positive(name, value, unit):
    """Raises unless `value` is a number > 0."""
    if not is_number(value) or value <= 0:
        raise ValueError(f"`{name}` must be a number > 0 ({unit}), got "
                         f"{value!r}.")


def check_choice(name, value, choices):
    """Raises a ValueError naming `name` unless `value` is one of `choices`."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got "
                         f"{value!r}.")


def check_round_to(round_to):
    if isinstance(round_to, bool) or not isinstance(
            round_to, numbers.Integral) or round_to < 1:
        raise ValueError(f"`round_to` must be an int >= 1, got {round_to!r}.")
    return int(round_to)


def check_min_channels(min_channels):
    if isinstance(min_channels, bool) or not (
        (isinstance(min_channels, numbers.Integral) and min_channels >= 1)
        or (isinstance(min_channels, float) and 0 < min_channels < 1)
    ):
        raise ValueError(
            "`min_channels` must be an int >= 1 or a fraction in (0, 1), "
            f"got {min_channels!r}."
        )
    return min_channels


def resolve_seed(seed):
    """`seed` as an int; a random one when None (stored with the model, so
    a loaded model continues with the same draws)."""
    if seed is None:
        return int(np.random.default_rng().integers(2**31 - 1))
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"`seed` must be an int or None, got {seed!r}.")
    return int(seed)
