"""Exact multiple-choice knapsack (MCKP) for SMCP's per-group width choice.

SMCP decides, for every channel group, which of a few options to take
("keep the k most important channels", for a handful of k), so that the
summed importance of the kept channels is maximal while the summed cost
(latency, MACs or parameters) stays within a budget. That is a
multiple-choice knapsack problem: exactly one option per group. A greedy or
LP-rounded answer can be off by up to one option per group, which matters
most at tight budgets, while the problems are small (tens of groups, up to a
few hundred options each), so `solve` finds the exact optimum.

It merges the groups one at a time into a Pareto frontier of the
(cost, value) sums of partial choices, with back-pointers to recover the
choice. Two exact prunings keep the frontier small: a partial sum is dropped
when even the cheapest completion overshoots the budget, or when the LP
relaxation of the remaining groups cannot lift it to the value of a known
feasible choice (the rounded LP solution). Should the frontier still grow
past a cap, or if the caller asks for it, a dynamic programme over integer
cost units takes over; its costs are rounded up, so its answer is always
feasible, though only optimal for the rounded problem.

Pure NumPy: it runs on the host between training steps, not in a graph.
"""

import math
import numbers
from typing import NamedTuple

import numpy as np

# Past this many Pareto points the exact merge is abandoned for the DP: the
# merge costs (frontier size) x (options of a group) per group, the DP a
# fixed (options) x (resolution).
MAX_FRONTIER = 200_000
FALLBACK_RESOLUTION = 20_000

# A choice costing exactly the budget must stay feasible after float sums
# in a different order.
_BUDGET_RTOL = 1e-12
# Bound pruning may only drop what is certainly worse: the LP bound and the
# incumbent are float sums too, so leave a margin far above their rounding.
_BOUND_RTOL = 1e-9
# Costs within this relative distance of a whole number of DP units count
# as exact (float division noise); far below `_BUDGET_RTOL`.
_UNIT_RTOL = 1e-13
# Candidates formed per vectorised merge step, to bound memory.
_MERGE_CHUNK = 1 << 21


class KnapsackSolution(NamedTuple):
    """The result of `solve`.

    Attributes:
        choice: int array, the option index chosen in each group.
        value: the total value of the choice.
        cost: the true (unrounded) total cost of the choice.
        optimal: whether the choice is proven optimal for the problem as
            given (False when found by the DP on rounded costs).
    """

    choice: np.ndarray
    value: float
    cost: float
    optimal: bool


def solve(values, costs, budget, *, resolution=None,
          max_frontier=MAX_FRONTIER):
    """Chooses one option per group: maximal total value within a budget.

    Exact by default (Pareto-frontier merging with bound pruning). Ties in
    value go to the cheaper choice, then to the lower option indices (the
    earlier groups first).

    Args:
        values: sequence of 1-D array-likes, one per group, the value of
            each option of that group. Groups may have different numbers of
            options. Values need not increase with the cost.
        costs: same structure as `values`: the non-negative cost of each
            option.
        budget: the total cost allowed (float). A choice whose cost equals
            the budget (up to a relative 1e-12) is feasible.
        resolution: None to solve exactly. An int instead solves a dynamic
            programme over `resolution` integer cost units spanning the
            budget left after every group's cheapest option; each option's
            cost above its group's cheapest is rounded up to whole units, so
            the choice never exceeds the budget, and it is the exact optimum
            of that rounded problem (`optimal` is True only if no cost
            needed rounding).
        max_frontier: with `resolution=None`, the Pareto frontier size past
            which the solver falls back to the DP with
            `resolution=FALLBACK_RESOLUTION` (and `optimal` False unless no
            cost needed rounding); 0 always falls back.

    Returns:
        A `KnapsackSolution(choice, value, cost, optimal)`.

    Raises:
        ValueError: if `values` and `costs` do not have the same number of
            groups, or a group's options differ in number, are empty or not
            1-D; if a cost is NaN, infinite or negative, or a value is NaN
            or infinite; if the budget is NaN or below the minimum
            achievable cost (the sum of each group's cheapest option); if
            `resolution` is not an int >= 1 or `max_frontier` not an
            int >= 0.

    Example:

    >>> values = [[0.0, 3.0, 4.0], [0.0, 2.0, 5.0]]
    >>> costs = [[0.0, 1.0, 2.0], [0.0, 1.0, 3.0]]
    >>> sol = solve(values, costs, budget=4.0)
    >>> sol.choice.tolist(), sol.value, sol.cost, sol.optimal
    ([1, 2], 8.0, 4.0, True)
    """
    vs, cs = _check_groups(values, costs)
    budget = _check_budget(budget)
    if resolution is not None:
        resolution = _check_int(resolution, "resolution", low=1)
    max_frontier = _check_int(max_frontier, "max_frontier", low=0)
    limit = budget + _BUDGET_RTOL * abs(budget)

    min_total = math.fsum(float(c.min()) for c in cs)
    if not min_total <= limit:
        raise ValueError(
            f"`budget` {budget!r} is infeasible: the minimum achievable cost "
            f"(each group's cheapest option) is {min_total!r}."
        )
    # The per-group best is optimal when it fits; this also covers an
    # infinite budget, which the DP could not divide into units.
    best_each = np.array([_best_option(v, c) for v, c in zip(vs, cs)],
                         dtype=np.intp)
    if _total(cs, best_each) <= limit:
        return _solution(vs, cs, best_each, optimal=True)

    if resolution is None:
        choice = _frontier_solve(vs, cs, limit, max_frontier)[0]
        if choice is not None:
            return _solution(vs, cs, choice, optimal=True)
        resolution = FALLBACK_RESOLUTION
    choice, exact = _dp_solve(vs, cs, budget, resolution)
    return _solution(vs, cs, choice, optimal=exact)


# ---------------------------------------------------------------------------
# Input checks.
# ---------------------------------------------------------------------------


def _check_groups(values, costs):
    """Both as lists of float64 vectors; ValueError naming the bad group."""
    values, costs = list(values), list(costs)
    if len(values) != len(costs):
        raise ValueError(
            f"`values` has {len(values)} groups but `costs` has "
            f"{len(costs)} groups."
        )
    vs, cs = [], []
    for g, (v, c) in enumerate(zip(values, costs)):
        v = _as_vector(v, "values", g)
        c = _as_vector(c, "costs", g)
        if v.size == 0 or c.size == 0:
            raise ValueError(f"Group {g} has an empty option list.")
        if v.size != c.size:
            raise ValueError(
                f"Group {g}: `values` has {v.size} options but `costs` has "
                f"{c.size}."
            )
        if np.isnan(v).any():
            raise ValueError(f"Group {g}: `values` contains NaN.")
        if np.isinf(v).any():
            raise ValueError(f"Group {g}: `values` contains inf.")
        if not np.isfinite(c).all():
            raise ValueError(f"Group {g}: `costs` contains NaN or inf.")
        if (c < 0).any():
            raise ValueError(f"Group {g}: `costs` contains negative costs.")
        vs.append(v)
        cs.append(c)
    return vs, cs


def _as_vector(x, name, g):
    try:
        x = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"Group {g}: `{name}` must be numbers: {e}") from e
    if x.ndim != 1:
        raise ValueError(
            f"Group {g}: `{name}` must be 1-D, got shape {x.shape}."
        )
    return x


def _check_budget(budget):
    try:
        budget = float(budget)
    except (TypeError, ValueError) as e:
        raise ValueError(f"`budget` must be a number, got {budget!r}.") from e
    if math.isnan(budget):
        raise ValueError("`budget` must be a number, got NaN.")
    return budget


def _check_int(x, name, low):
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < low:
        raise ValueError(f"`{name}` must be an int >= {low}, got {x!r}.")
    return int(x)


# ---------------------------------------------------------------------------
# Shared helpers.
# ---------------------------------------------------------------------------


def _best_option(v, c):
    """The highest value, then the cheapest, then the first option."""
    top = np.flatnonzero(v == v.max())
    return int(top[np.argmin(c[top])])


def _total(arrays, choice):
    return math.fsum(float(a[j]) for a, j in zip(arrays, choice))


def _solution(vs, cs, choice, optimal):
    choice = np.asarray(choice, dtype=np.intp)
    return KnapsackSolution(choice=choice, value=_total(vs, choice),
                            cost=_total(cs, choice), optimal=bool(optimal))


# ---------------------------------------------------------------------------
# Exact path: Pareto-frontier merging.
# ---------------------------------------------------------------------------


class _Hulls(NamedTuple):
    """Every group's upper concave hull, for the LP relaxation.

    Each group starts at its base (cheapest, then most valuable) option; the
    segments of all groups are sorted by decreasing slope, which is the
    order in which the LP spends budget.
    """

    base_cost: np.ndarray  # [G]
    base_value: np.ndarray  # [G]
    seg_group: np.ndarray  # [S]
    seg_cost: np.ndarray  # [S]
    seg_gain: np.ndarray  # [S]


def _group_hull(v, c):
    """(base index, segment cost and gain arrays) of one group's hull."""
    order = np.lexsort((-v, c))
    c, v = c[order], v[order]
    # Pareto points only: strictly more value for more cost.
    running = np.maximum.accumulate(v)
    pareto = np.concatenate([[True], v[1:] > running[:-1]])
    c, v = c[pareto], v[pareto]
    hull = []
    for p in zip(c.tolist(), v.tolist()):
        while len(hull) >= 2:
            (c0, v0), (c1, v1) = hull[-2], hull[-1]
            # Drop the middle point unless it lies strictly above the chord.
            if (v1 - v0) * (p[0] - c0) <= (p[1] - v0) * (c1 - c0):
                hull.pop()
            else:
                break
        hull.append(p)
    hull = np.array(hull, dtype=np.float64).reshape(-1, 2)
    return c[0], v[0], np.diff(hull[:, 0]), np.diff(hull[:, 1])


def _hulls(vs, cs):
    base_c, base_v, groups, seg_c, seg_v = [], [], [], [], []
    for g, (v, c) in enumerate(zip(vs, cs)):
        bc, bv, dc, dv = _group_hull(v, c)
        base_c.append(bc)
        base_v.append(bv)
        groups.append(np.full(dc.size, g))
        seg_c.append(dc)
        seg_v.append(dv)
    seg_c, seg_v = np.concatenate(seg_c), np.concatenate(seg_v)
    # Stable, so that a group's segments keep their (decreasing) order.
    order = np.argsort(-seg_v / seg_c, kind="stable")
    return _Hulls(np.array(base_c), np.array(base_v),
                  np.concatenate(groups)[order], seg_c[order], seg_v[order])


def _incumbent(hulls, limit):
    """The value of a feasible choice: the LP solution rounded down.

    Takes whole hull segments in slope order while they fit; a group whose
    segment does not fit stops there (its later segments need it first),
    the others go on.
    """
    room = limit - math.fsum(hulls.base_cost)
    value = math.fsum(hulls.base_value)
    blocked = set()
    for g, dc, dv in zip(hulls.seg_group.tolist(), hulls.seg_cost.tolist(),
                         hulls.seg_gain.tolist()):
        if g in blocked:
            continue
        if dc <= room:
            room -= dc
            value += dv
        else:
            blocked.add(g)
    return value


class _Bound(NamedTuple):
    """The LP relaxation of a set of groups, as a function of the budget."""

    base_cost: float
    base_value: float
    cum_cost: np.ndarray
    cum_gain: np.ndarray

    def __call__(self, room):
        # Room below the base cost is pruned as infeasible beforehand.
        return self.base_value + np.interp(room - self.base_cost,
                                           self.cum_cost, self.cum_gain)


def _suffix_bound(hulls, first):
    """The LP bound of groups `first`, `first + 1`, ... ."""
    mask = hulls.seg_group >= first
    zero = np.zeros(1)
    return _Bound(
        float(hulls.base_cost[first:].sum()),
        float(hulls.base_value[first:].sum()),
        np.concatenate([zero, np.cumsum(hulls.seg_cost[mask])]),
        np.concatenate([zero, np.cumsum(hulls.seg_gain[mask])]),
    )


class _Frontier(NamedTuple):
    """Pareto partial sums: cost ascending, value strictly ascending."""

    cost: np.ndarray
    value: np.ndarray
    # Rank of each point's partial choice in lexicographic order, so that
    # exact (cost, value) ties go to the lower option indices.
    rank: np.ndarray
    parent: np.ndarray  # Index into the previous frontier.
    option: np.ndarray  # Option taken in the group just merged.


def _pareto(cost, value, key, parent, option):
    """Keeps the non-dominated points, sorted by cost; ties by `key`."""
    order = np.lexsort((key, -value, cost))
    value = value[order]
    keep = np.ones(value.size, dtype=bool)
    keep[1:] = value[1:] > np.maximum.accumulate(value)[:-1]
    order = order[keep]
    return cost[order], value[keep], key[order], parent[order], option[order]


def _merge(front, c, v, cost_cap, bound, floor):
    """The frontier after adding one group with option costs c, values v.

    Drops the candidates costing more than `cost_cap` (the budget less the
    cheapest options of the groups still to come) and those whose value
    plus `bound(cost)` (the LP bound of the groups to come) falls below
    `floor`, then the dominated ones.
    """
    n, m = front.cost.size, c.size
    step = max(1, _MERGE_CHUNK // n)
    pieces = []
    for start in range(0, m, step):
        opts = np.arange(start, min(m, start + step))
        cand_c = (front.cost[:, None] + c[opts]).ravel()
        cand_v = (front.value[:, None] + v[opts]).ravel()
        fits = np.flatnonzero(cand_c <= cost_cap)
        cand_c, cand_v = cand_c[fits], cand_v[fits]
        good = cand_v + bound(cand_c) >= floor
        fits, cand_c, cand_v = fits[good], cand_c[good], cand_v[good]
        parent = fits // opts.size
        option = opts[fits % opts.size]
        key = front.rank[parent] * m + option
        pieces.append(_pareto(cand_c, cand_v, key, parent, option))
    parts = [np.concatenate(p) for p in zip(*pieces)]
    cost, value, key, parent, option = (
        _pareto(*parts) if len(pieces) > 1 else parts)
    rank = np.empty(key.size, dtype=np.int64)
    rank[np.argsort(key)] = np.arange(key.size)
    return _Frontier(cost, value, rank, parent, option)


def _frontier_solve(vs, cs, limit, max_frontier):
    """(choice or None if the frontier outgrew the cap, peak size)."""
    hulls = _hulls(vs, cs)
    min_cost = np.array([c.min() for c in cs])
    # Suffix sums: the least the groups after g can cost.
    rest_min = np.concatenate([np.cumsum(min_cost[::-1])[::-1][1:], [0.0]])
    scale = math.fsum(float(np.abs(v).max()) for v in vs)
    floor = _incumbent(hulls, limit) - _BOUND_RTOL * scale - 1e-300
    front = _Frontier(np.zeros(1), np.zeros(1), np.zeros(1, np.int64),
                      np.zeros(1, np.intp), np.zeros(1, np.intp))
    history, peak = [], 1
    for g in range(len(vs)):
        if g + 1 < len(vs):
            rest = _suffix_bound(hulls, g + 1)
            bound = lambda cost, rest=rest: rest(limit - cost)
        else:
            bound = lambda cost: 0.0
        front = _merge(front, cs[g], vs[g], limit - rest_min[g], bound,
                       floor)
        peak = max(peak, front.cost.size)
        if front.cost.size > max_frontier:
            return None, peak
        if front.cost.size == 0:
            raise RuntimeError("Knapsack bound pruning dropped every choice.")
        history.append((front.parent, front.option))
    choice = np.empty(len(vs), dtype=np.intp)
    i = front.cost.size - 1  # The most valuable; the cheapest such.
    for g in range(len(vs) - 1, -1, -1):
        parent, option = history[g]
        choice[g] = option[i]
        i = parent[i]
    return choice, peak


# ---------------------------------------------------------------------------
# Fallback: dynamic programme over integer cost units.
# ---------------------------------------------------------------------------


def _units(cs, budget, resolution):
    """(costs above each group's cheapest in whole units, all exact?).

    Units span the budget left after every group's cheapest option, so the
    all-cheapest choice always fits and the resolution is spent where the
    choices differ. Rounding up keeps every DP-feasible choice feasible.
    """
    mins = [float(c.min()) for c in cs]
    slack = budget - math.fsum(mins)
    units, exact = [], True
    for c, low in zip(cs, mins):
        extra = c - low
        if slack <= 0:
            # Only the cheapest options fit at all.
            units.append(np.where(extra == 0, 0, resolution + 1))
            continue
        u = np.minimum(extra / (slack / resolution), resolution + 1.0)
        whole = np.rint(u)
        snap = np.abs(u - whole) <= _UNIT_RTOL * whole
        snap |= extra == 0
        exact &= bool(snap.all())
        units.append(np.where(snap, whole, np.ceil(u)).astype(np.int64))
    return units, exact


def _dp_solve(vs, cs, budget, resolution):
    """(choice, exact?) by a DP over the rounded costs."""
    units, exact = _units(cs, budget, resolution)
    width = resolution + 1
    widest = max(v.size for v in vs)
    table = np.zeros((len(vs), width),
                     dtype=np.int16 if widest <= 2 ** 15 else np.int32)
    # best[c]: the highest value of the groups from g on within c units.
    # Running from the last group lets the backtrack pick the lowest index
    # in the first group first, the tie rule of the exact path.
    best = np.zeros(width)
    for g in range(len(vs) - 1, -1, -1):
        v, w = vs[g], units[g]
        new = np.full(width, -np.inf)
        row = table[g]
        for j in np.flatnonzero(w < width).tolist():
            shift = int(w[j])
            cand = best[:width - shift] + v[j]
            target = new[shift:]
            better = cand > target  # Strict: the lower option index wins.
            np.copyto(target, cand, where=better)
            np.copyto(row[shift:], j, where=better)
        best = new
    # The least capacity reaching the optimum: ties go to the cheaper.
    room = int(np.flatnonzero(best == best[-1])[0])
    choice = np.empty(len(vs), dtype=np.intp)
    for g in range(len(vs)):
        j = int(table[g, room])
        choice[g] = j
        room -= int(units[g][j])
    return choice, exact
