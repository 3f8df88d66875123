"""Width allocation shared by the methods: a multiple-choice knapsack under
a cost budget (MACs, parameters or a latency table).

Each channel group may keep one of a few widths (multiples of `round_to`);
keeping `k` channels is worth the summed importance of its `k` most
important channels and costs what every layer that reads or writes the
group costs at that width. One width per group is chosen so that the total
cost fits the budget and the total importance is maximal, solved exactly by
`knapsack.solve`.

Costs are not separable: a convolution between two groups costs in
proportion to both widths. The knapsack therefore prices each group's
options with the other groups at the current widths (`GroupCost
.linearized`), and the solution becomes the new current widths, a few
times over. The true cost of the result is then checked, and where the
linearisation was optimistic the budget handed to the knapsack shrinks
(bisection) until the true cost fits.
"""

import dataclasses

import numpy as np

from keras_chex.core import knapsack

_ROUNDS = 4
_SHRINK_STEPS = 20


@dataclasses.dataclass(frozen=True)
class Allocation:
    """The widths chosen by `allocate`.

    Attributes:
        counts: int array, channels kept per group.
        cost: the true cost of `counts`.
        feasible: False when even the narrowest widths exceed the budget
            (then every group takes its narrowest width).
    """

    counts: np.ndarray
    cost: float
    feasible: bool


def option_values(importance, group_sizes, widths, priority=None):
    """Knapsack values: the summed importance of each group's top channels.

    Args:
        importance: (N,) per-channel importance, groups concatenated.
        group_sizes: (G,) channels per group.
        widths: list of G int arrays, the widths each group may take.
        priority: optional (N,) tie-breaker, higher first among equals.

    Returns:
        (values, orders): values[g][j] is the importance of the best
        `widths[g][j]` channels of group g; orders[g] ranks its channels,
        best first.
    """
    values, orders = [], []
    start = 0
    for size, w in zip(group_sizes, widths):
        imp = np.asarray(importance[start:start + size], np.float64)
        tie = (np.zeros(size) if priority is None
               else priority[start:start + size])
        order = np.lexsort((-tie, -imp))
        cumulative = np.concatenate([[0.0], np.cumsum(imp[order])])
        values.append(cumulative[np.asarray(w)])
        orders.append(order)
        start += size
    return values, orders


def allocate(values, widths, group_cost, budget, start_counts):
    """The widths of maximal value whose true cost fits `budget`.

    Args:
        values: list of G arrays, the value of each width option.
        widths: list of G int arrays, the width options (ascending).
        group_cost: a `costs.GroupCost` (MACs, params, or a latency table).
        budget: the cost allowed.
        start_counts: (G,) widths to linearise around first (the current
            ones).

    Returns:
        An `Allocation`.
    """
    narrowest = np.array([w[0] for w in widths], np.int64)
    if group_cost.total(narrowest) > budget:
        return Allocation(narrowest, group_cost.total(narrowest), False)

    def solve(allowed):
        counts = np.asarray(start_counts, np.int64)
        for _ in range(_ROUNDS):
            costs, offset = group_cost.linearized(counts, widths)
            limit = allowed + offset
            floor = sum(float(np.min(c)) for c in costs)
            if limit < floor:
                # The linearisation around `counts` cannot fit at all:
                # restart from the narrowest widths, where it is exact for
                # the cheapest choice.
                counts = narrowest
                costs, offset = group_cost.linearized(counts, widths)
                limit = max(allowed + offset,
                            sum(float(np.min(c)) for c in costs))
            choice = knapsack.solve(values, costs, limit).choice
            new = np.array([w[j] for w, j in zip(widths, choice)], np.int64)
            if np.array_equal(new, counts):
                break
            counts = new
        return counts

    counts = solve(budget)
    cost = group_cost.total(counts)
    if cost <= budget * (1 + 1e-12):
        return Allocation(counts, cost, True)
    # The linearisation was optimistic: hand the knapsack less until the
    # true cost fits. The narrowest widths always fit (checked above).
    lo, hi = 0.0, budget
    best = narrowest
    for _ in range(_SHRINK_STEPS):
        mid = (lo + hi) / 2
        trial = solve(mid)
        if group_cost.total(trial) <= budget * (1 + 1e-12):
            lo, best = mid, trial
        else:
            hi = mid
    return Allocation(best, group_cost.total(best), True)


def mask_from_counts(orders, group_sizes, counts):
    """(N,) bool: each group keeps its `counts[g]` best-ranked channels."""
    parts = []
    for order, size, k in zip(orders, group_sizes, counts):
        keep = np.zeros(size, bool)
        keep[order[:k]] = True
        parts.append(keep)
    return np.concatenate(parts) if parts else np.zeros(0, bool)
