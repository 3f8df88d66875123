"""Which channels a gradual pruning step removes: the globally lowest scores.

Every scored group offers its kept channels from the lowest score up, in
units that keep its width allowed (one channel with `round_to=1`; with
`round_to=r`, down to the next multiple of `r`; never below the group's
minimum, so never its last channel). The units of all groups are ranked by
their mean score, and a step removes a prefix of that ranking: `x`
channels, or the shortest prefix that brings the cost down to the step's
goal.
"""

import numpy as np

from keras_chex.core import method


def removal_units(scores, kept, groups, min_counts, round_to, tiebreak):
    """The removable units of channels, lowest mean score first.

    Args:
        scores: float array over all channels (NaN: not scored, not removed).
        kept: bool array over all channels.
        groups: the `ChannelGroup`s.
        min_counts: int array, fewest channels each group keeps.
        round_to: widths stay multiples of this (see `width_options`).
        tiebreak: int array over all channels; lower goes first among equal
            scores.

    Returns:
        A list of int arrays of channel indices.
    """
    units = []
    for g, minimum in zip(groups, min_counts):
        part = np.arange(g.start, g.start + g.size)
        if np.isnan(scores[part]).any():
            continue
        alive = part[kept[part]]
        order = alive[np.lexsort((tiebreak[alive], scores[alive]))]
        widths = method.width_options(g.size, minimum, round_to)
        lower = sorted((w for w in widths if w < len(alive)), reverse=True)
        taken = 0
        for index, width in enumerate(lower):
            chunk = order[taken:len(alive) - width]
            taken = len(alive) - width
            units.append((float(np.mean(scores[chunk])), g.index, index,
                          chunk))
    units.sort(key=lambda u: u[:3])
    return [u[3] for u in units]


def remove_channels(kept, units, count):
    """Removes whole units, lowest first, until `count` channels are gone.

    Returns:
        The new kept mask.
    """
    kept = kept.copy()
    removed = 0
    for unit in units:
        if removed >= count:
            break
        kept[unit] = False
        removed += len(unit)
    return kept


def remove_to_cost(kept, units, cost_of, goal):
    """Removes the shortest prefix of `units` whose result costs <= `goal`.

    Args:
        kept: bool array over all channels.
        units: from `removal_units`.
        cost_of: `fn(kept) -> cost`; removing channels never raises it.
        goal: the cost to reach.

    Returns:
        (new kept mask, reached): `reached` is False when even removing
        every unit leaves the cost above `goal` (then all are removed).
    """
    def after(n):
        new = kept.copy()
        for unit in units[:n]:
            new[unit] = False
        return new

    if cost_of(kept) <= goal:
        return kept.copy(), True
    if not units or cost_of(after(len(units))) > goal:
        return after(len(units)), False
    lo, hi = 0, len(units)  # cost(after(lo)) > goal >= cost(after(hi))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost_of(after(mid)) <= goal:
            hi = mid
        else:
            lo = mid
    return after(hi), True
