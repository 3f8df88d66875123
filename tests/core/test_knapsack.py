"""Tests for keras_chex.core.knapsack against brute force."""

import doctest
import itertools
import math

import numpy as np
import pytest

from keras_chex.core import knapsack
from keras_chex.core.knapsack import solve

RTOL = 1e-12  # The solver's budget tolerance.


# ---------------------------------------------------------------------------
# References.
# ---------------------------------------------------------------------------


def brute_force(values, costs, budget):
    """(value, cost, choice) of the best choice: ties as the solver's rule.

    Highest value, then lowest cost, then the lexicographically smallest
    choice (itertools.product enumerates in that order).
    """
    best = None
    for choice in itertools.product(*(range(len(v)) for v in values)):
        cost = math.fsum(c[j] for c, j in zip(costs, choice))
        if cost > budget + RTOL * abs(budget):
            continue
        value = math.fsum(v[j] for v, j in zip(values, choice))
        if best is None or (value, -cost) > (best[0], -best[1]):
            best = (value, cost, choice)
    return best


def rounded_units(costs, budget, resolution):
    """Each option's cost above its group's cheapest, in DP units (ceil)."""
    mins = [min(c) for c in costs]
    unit = (budget - math.fsum(mins)) / resolution
    return [[math.ceil((x - m) / unit) for x in c]
            for c, m in zip(costs, mins)]


def random_problem(rng, integer=False, monotone=False):
    n_groups = int(rng.integers(2, 6))
    values, costs = [], []
    for _ in range(n_groups):
        n = int(rng.integers(1, 6))
        if integer:
            v = rng.integers(0, 10, n).astype(float)
            c = rng.integers(0, 10, n).astype(float)
        else:
            v = rng.uniform(0, 10, n)
            c = rng.uniform(0, 10, n)
        if monotone:
            v, c = np.sort(v), np.sort(c)
        values.append(v.tolist())
        costs.append(c.tolist())
    return values, costs


def random_budget(rng, costs, integer=False):
    low = math.fsum(min(c) for c in costs)
    high = math.fsum(max(c) for c in costs)
    budget = low + rng.uniform(0, 1) * (high - low)
    return float(math.floor(budget)) if integer else budget


def choice_cost(costs, choice):
    return math.fsum(c[j] for c, j in zip(costs, choice))


def choice_value(values, choice):
    return math.fsum(v[j] for v, j in zip(values, choice))


def check_solution(sol, values, costs, budget):
    """Shape, feasibility and self-consistency of a solution."""
    assert sol.choice.shape == (len(values),)
    assert np.issubdtype(sol.choice.dtype, np.integer)
    assert all(0 <= j < len(v) for v, j in zip(values, sol.choice))
    assert sol.cost == pytest.approx(choice_cost(costs, sol.choice),
                                     rel=1e-12, abs=1e-12)
    assert sol.value == pytest.approx(choice_value(values, sol.choice),
                                      rel=1e-12, abs=1e-12)
    assert sol.cost <= budget + RTOL * abs(budget)


# ---------------------------------------------------------------------------
# Exact path.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(200))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    values, costs = random_problem(rng, monotone=seed % 2 == 1)
    budget = random_budget(rng, costs)
    sol = solve(values, costs, budget)
    check_solution(sol, values, costs, budget)
    best_value, _, best_choice = brute_force(values, costs, budget)
    assert sol.optimal
    assert sol.value == pytest.approx(best_value, rel=1e-9, abs=1e-9)
    # Random floats: the optimum is unique.
    assert tuple(sol.choice) == best_choice


@pytest.mark.parametrize("seed", range(100))
def test_frontier_path_matches_brute_force(seed):
    # `solve` returns the per-group best at once when it fits: call the
    # frontier merge itself so that it is tested on every problem.
    rng = np.random.default_rng(1000 + seed)
    values, costs = random_problem(rng)
    budget = random_budget(rng, costs)
    vs = [np.asarray(v) for v in values]
    cs = [np.asarray(c) for c in costs]
    choice, _ = knapsack._frontier_solve(vs, cs, budget * (1 + RTOL), 10**6)
    best_value, _, best_choice = brute_force(values, costs, budget)
    assert tuple(choice) == best_choice
    assert choice_value(values, choice) == pytest.approx(best_value, abs=1e-9)


@pytest.mark.parametrize("seed", range(100))
def test_integer_ties_follow_the_rule(seed):
    # Integer data: many exact ties in value and cost, resolved as
    # "cheaper, then lower option index in the earlier group".
    rng = np.random.default_rng(2000 + seed)
    values, costs = random_problem(rng, integer=True)
    budget = random_budget(rng, costs, integer=True)
    value, cost, choice = brute_force(values, costs, budget)
    sol = solve(values, costs, budget)
    assert tuple(sol.choice) == choice
    assert (sol.value, sol.cost) == (value, cost)


def test_non_monotone_values():
    # Dearer options worth less (g0 option 2, g1 option 2) must be skipped,
    # and the best spends the budget unevenly.
    values = [[0.0, 5.0, 3.0, 6.0], [0.0, 4.0, 1.0, 7.0]]
    costs = [[0.0, 2.0, 3.0, 5.0], [0.0, 2.0, 4.0, 5.0]]
    for kwargs in ({}, {"resolution": 7}, {"resolution": 14}):
        sol = solve(values, costs, 7.0, **kwargs)
        assert sol.choice.tolist() == [1, 3]
        assert (sol.value, sol.cost, sol.optimal) == (12.0, 7.0, True)
    # With room for everything the dearest-but-worse options stay out.
    sol = solve(values, costs, 100.0)
    assert sol.choice.tolist() == [3, 3]
    sol = solve([[1.0, 9.0, 2.0]], [[0.0, 1.0, 5.0]], 6.0)
    assert sol.choice.tolist() == [1]
    assert (sol.value, sol.cost) == (9.0, 1.0)


def test_budget_equal_to_the_full_cost():
    # Costs whose float sums depend on the order: the budget summed in
    # another order than the solver's must still admit the full choice.
    costs = [[0.0, 0.1, 0.3], [0.0, 0.2, 0.7], [0.0, 0.3, 1.1], [0.01, 0.6]]
    values = [[0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [0.0, 1.0]]
    full = [len(c) - 1 for c in costs]
    budget = 0.0
    for c in reversed(costs):
        budget += c[-1]
    sol = solve(values, costs, budget)
    assert sol.choice.tolist() == full
    assert sol.optimal
    vs = [np.asarray(v) for v in values]
    cs = [np.asarray(c) for c in costs]
    limit = budget * (1 + RTOL)
    assert knapsack._frontier_solve(vs, cs, limit, 10**6)[0].tolist() == full


@pytest.mark.parametrize("seed", range(50))
def test_budget_equal_to_the_best_choice_cost(seed):
    rng = np.random.default_rng(3000 + seed)
    values, costs = random_problem(rng)
    _, _, best = brute_force(values, costs, random_budget(rng, costs))
    # Summed backwards: may differ from the solver's sum in the last bit.
    budget = 0.0
    for c, j in reversed(list(zip(costs, best))):
        budget += c[j]
    sol = solve(values, costs, budget)
    assert tuple(sol.choice) == best
    check_solution(sol, values, costs, budget)
    vs = [np.asarray(v) for v in values]
    cs = [np.asarray(c) for c in costs]
    choice, _ = knapsack._frontier_solve(vs, cs, budget * (1 + RTOL), 10**6)
    assert tuple(choice) == best


@pytest.mark.parametrize("seed", range(5))
def test_medium_problem_frontier_agrees_with_exact_dp(seed):
    # Beyond brute force: integer costs make the DP exact, and both paths
    # must give the same value and, by the common tie rule, the same choice.
    rng = np.random.default_rng(4000 + seed)
    values, costs = [], []
    for _ in range(20):
        n = int(rng.integers(1, 12))
        values.append(rng.integers(0, 30, n).astype(float))
        costs.append(rng.integers(0, 30, n).astype(float))
    low = sum(c.min() for c in costs)
    budget = low + int(rng.integers(1, 150))
    exact = solve(values, costs, budget)
    dp = solve(values, costs, budget, resolution=int(budget - low))
    assert exact.optimal and dp.optimal
    assert exact.value == dp.value
    assert exact.cost == dp.cost
    assert exact.choice.tolist() == dp.choice.tolist()


def synthetic_network(rng, n_groups=60):
    """A ResNet-50-sized problem: k = 8, 16, ..., size channels kept."""
    values, costs = [], []
    for size in rng.choice([64, 128, 256, 512, 1024, 2048], n_groups):
        ks = np.arange(8, size + 1, 8)
        importance = np.sort(rng.exponential(size=size))[::-1]
        values.append(np.cumsum(importance)[ks - 1])
        noise = 1 + 0.05 * rng.standard_normal(ks.size)
        costs.append(np.maximum(0.0, rng.uniform(0.5, 2.0) * ks * noise))
    return values, costs


def test_network_sized_problem():
    values, costs = synthetic_network(np.random.default_rng(0))
    dense = sum(c[-1] for c in costs)
    for fraction in (0.3, 0.6):
        budget = fraction * dense
        sol = solve(values, costs, budget)
        check_solution(sol, values, costs, budget)
        assert sol.optimal
        # No feasible choice beats the optimum, e.g. the DP's.
        dp = solve(values, costs, budget, resolution=2000)
        check_solution(dp, values, costs, budget)
        assert not dp.optimal
        assert dp.value <= sol.value
        # Nor can the optimum beat the LP relaxation.
        vs = [np.asarray(v) for v in values]
        cs = [np.asarray(c) for c in costs]
        lp = knapsack._suffix_bound(knapsack._hulls(vs, cs), 0)(budget)
        assert sol.value <= lp + 1e-9 * lp
        assert sol.value > 0.99 * lp


# ---------------------------------------------------------------------------
# DP path.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(100))
def test_dp_with_exact_units_matches_brute_force(seed):
    rng = np.random.default_rng(5000 + seed)
    values, costs = random_problem(rng, integer=True)
    budget = random_budget(rng, costs, integer=True)
    slack = int(budget - sum(min(c) for c in costs))
    value, cost, choice = brute_force(values, costs, budget)
    for resolution in {max(slack, 1), 2 * max(slack, 1)}:
        sol = solve(values, costs, budget, resolution=resolution)
        assert sol.optimal
        assert (sol.value, sol.cost) == (value, cost)
        assert tuple(sol.choice) == choice


@pytest.mark.parametrize("seed", range(100))
def test_dp_with_rounding_is_the_rounded_optimum(seed):
    rng = np.random.default_rng(6000 + seed)
    values, costs = random_problem(rng, monotone=seed % 2 == 1)
    budget = random_budget(rng, costs)
    resolution = int(rng.integers(2, 12))
    sol = solve(values, costs, budget, resolution=resolution)
    check_solution(sol, values, costs, budget)
    true_value = brute_force(values, costs, budget)[0]
    assert sol.value <= true_value + 1e-9
    if sol.optimal:  # The per-group best fitted: no DP needed.
        assert sol.value == pytest.approx(true_value, abs=1e-9)
        return
    # The rounded problem as integers: its optimum, by brute force.
    units = rounded_units(costs, budget, resolution)
    rounded_value = brute_force(values, units, resolution)[0]
    assert sol.value == pytest.approx(rounded_value, abs=1e-9)
    assert sum(u[j] for u, j in zip(units, sol.choice)) <= resolution


def test_dp_rounding_loses_value_but_stays_feasible():
    # Two groups whose best pair costs the budget exactly; a coarse unit
    # rounds them up past it, so the DP must settle for less.
    values = [[0.0, 10.0], [0.0, 10.0], [0.0, 1.0]]
    costs = [[0.0, 0.51], [0.0, 0.49], [0.0, 0.1]]
    sol = solve(values, costs, 1.0, resolution=2)
    assert not sol.optimal
    assert sol.cost <= 1.0
    assert sol.value == 11.0
    assert solve(values, costs, 1.0).value == 20.0


def test_budget_at_the_minimum_cost():
    values = [[1.0, 5.0, 7.0], [2.0, 3.0]]
    costs = [[1.0, 1.0, 2.0], [0.5, 0.7]]
    for kwargs in ({}, {"resolution": 100}):
        sol = solve(values, costs, 1.5, **kwargs)
        assert sol.choice.tolist() == [1, 0]
        assert sol.optimal


@pytest.mark.parametrize("seed", range(5))
def test_frontier_cap_falls_back_to_dp(seed):
    # max_frontier=0: every merge overflows, the DP answers.
    rng = np.random.default_rng(7000 + seed)
    # Sorted, so that the budget (below the dearest total) binds.
    values = [np.sort(rng.uniform(0, 10, 5)) for _ in range(6)]
    costs = [np.sort(rng.uniform(0, 10, 5)) for _ in range(6)]
    budget = random_budget(rng, costs)
    exact = solve(values, costs, budget)
    assert exact.optimal
    sol = solve(values, costs, budget, max_frontier=0)
    check_solution(sol, values, costs, budget)
    assert not sol.optimal
    assert sol.value <= exact.value + 1e-9
    # It is the DP at the fallback resolution.
    dp = solve(values, costs, budget,
               resolution=knapsack.FALLBACK_RESOLUTION)
    assert sol.choice.tolist() == dp.choice.tolist()
    # Rounding up adds less than a unit per group: anything that fits
    # with that much to spare is matched.
    low = sum(c.min() for c in costs)
    unit = (budget - low) / knapsack.FALLBACK_RESOLUTION
    spare = brute_force(values, costs, budget - len(costs) * unit)[0]
    assert sol.value >= spare - 1e-9


# ---------------------------------------------------------------------------
# Edge cases and errors.
# ---------------------------------------------------------------------------


def test_no_groups():
    sol = solve([], [], 0.0)
    assert sol.choice.shape == (0,)
    assert (sol.value, sol.cost, sol.optimal) == (0.0, 0.0, True)


def test_single_options_and_zero_costs():
    sol = solve([[3.0], [1.0, 2.0]], [[0.0], [0.0, 0.0]], 0.0)
    assert sol.choice.tolist() == [0, 1]
    assert sol.value == 3.0 + 2.0


def test_accepts_numpy_and_unlimited_budget():
    values = [np.array([1.0, 2.0]), np.array([0.5, 4.0, 3.0])]
    costs = [np.array([1, 2]), np.array([0, 3, 5])]
    assert solve(values, costs, np.inf).choice.tolist() == [1, 1]
    assert solve(values, costs, np.float32(4.0)).choice.tolist() == [0, 1]


@pytest.mark.parametrize(
    "values, costs, budget, kwargs, match",
    [
        ([[1.0], [1.0]], [[1.0]], 5.0, {}, "2 groups but `costs` has 1"),
        ([[1.0], [1.0, 2.0]], [[1.0], [1.0]], 5.0, {}, "Group 1"),
        ([[1.0], []], [[1.0], []], 5.0, {}, "Group 1.*empty"),
        ([[1.0], [[1.0]]], [[1.0], [[1.0]]], 5.0, {}, "Group 1.*1-D"),
        ([[1.0], [1.0]], [[1.0], [np.nan]], 5.0, {}, "Group 1.*NaN"),
        ([[1.0], [1.0]], [[np.inf], [1.0]], 5.0, {}, "Group 0.*inf"),
        ([[1.0, 1.0], [1.0]], [[1.0, -1.0], [1.0]], 5.0, {},
         "Group 0.*negative"),
        ([[1.0], [1.0], [np.nan]], [[1.0], [1.0], [1.0]], 5.0, {},
         "Group 2.*NaN"),
        ([[1.0], [np.inf]], [[1.0], [1.0]], 5.0, {}, "Group 1.*inf"),
        ([["a"]], [[1.0]], 5.0, {}, "Group 0"),
        ([[1.0, 2.0], [1.0]], [[1.0, 2.0], [2.0]], 2.5, {},
         r"budget.*minimum achievable cost.*3\.0"),
        ([[1.0]], [[1.0]], -1.0, {}, "budget.*minimum achievable cost"),
        ([[1.0]], [[1.0]], np.nan, {}, "budget"),
        ([[1.0]], [[1.0]], "cheap", {}, "budget"),
        ([[1.0]], [[1.0]], 5.0, {"resolution": 0}, "resolution"),
        ([[1.0]], [[1.0]], 5.0, {"resolution": 2.5}, "resolution"),
        ([[1.0]], [[1.0]], 5.0, {"resolution": True}, "resolution"),
        ([[1.0]], [[1.0]], 5.0, {"max_frontier": -1}, "max_frontier"),
    ],
)
def test_errors(values, costs, budget, kwargs, match):
    with pytest.raises(ValueError, match=match):
        solve(values, costs, budget, **kwargs)


def test_docstring_example():
    result = doctest.testmod(knapsack)
    assert result.attempted > 0
    assert result.failed == 0


def test_frontier_cap_trips_mid_merge():
    # A cap the frontier really outgrows after a few merges.
    values, costs = synthetic_network(np.random.default_rng(1), n_groups=20)
    budget = 0.5 * sum(c[-1] for c in costs)
    vs = [np.asarray(v) for v in values]
    cs = [np.asarray(c) for c in costs]
    choice, peak = knapsack._frontier_solve(vs, cs, budget, 10**6)
    assert choice is not None and peak > 10
    assert knapsack._frontier_solve(vs, cs, budget, peak - 1)[0] is None
    sol = solve(values, costs, budget, max_frontier=peak - 1)
    check_solution(sol, values, costs, budget)
    assert not sol.optimal
    assert sol.value <= solve(values, costs, budget).value
