r"""Benchmark of SMCP's exact knapsack (`keras_chex.core.knapsack`).

Times `knapsack.solve` on synthetic problems of the size SMCP meets:

* ResNet-50-sized: 60 channel groups, each of a size drawn from
  {64, 128, ..., 2048}, with options "keep k = 8, 16, ..., size channels";
* MobileNetV2-sized: 35 groups of sizes drawn from {16, 24, ..., 1280}.

An option's value is the sum of the k largest of the group's random
(exponential) importances, so concave increasing in k; its cost is linear in
k with a per-group slope and 5% noise. Budgets are fractions of the dense
total cost. For each problem and budget the table gives the median wall time
of `--repeats` runs of `solve` (exact by default), the path it took (the
Pareto frontier, or the DP fallback past `max_frontier`), the peak frontier
size, whether the answer is proven optimal, and for comparison the time and
value gap of the DP at `--resolution` units.

Usage:

```
python tools/benchmark_knapsack.py
python tools/benchmark_knapsack.py --repeats=3 --budgets 0.1 0.5 --seed=1
```
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_report import usable_cores  # noqa: E402

from keras_chex.core import knapsack  # noqa: E402

NETWORKS = {
    "ResNet-50": (60, [64, 128, 256, 512, 1024, 2048]),
    "MobileNetV2": (35, [16, 24, 32, 64, 96, 144, 192, 320, 384, 576, 960,
                         1280]),
}


def synthetic_problem(rng, n_groups, sizes):
    """(values, costs): options keep k = 8, 16, ..., size channels."""
    values, costs = [], []
    for size in rng.choice(sizes, n_groups):
        ks = np.arange(8, size + 1, 8)
        importance = np.sort(rng.exponential(size=size))[::-1]
        values.append(np.cumsum(importance)[ks - 1])
        noise = 1 + 0.05 * rng.standard_normal(ks.size)
        costs.append(np.maximum(0.0, rng.uniform(0.5, 2.0) * ks * noise))
    return values, costs


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def run(args):
    rows = []
    for name in args.networks:
        n_groups, sizes = NETWORKS[name]
        values, costs = synthetic_problem(np.random.default_rng(args.seed),
                                          n_groups, sizes)
        dense = sum(float(c[-1]) for c in costs)
        n_options = sum(v.size for v in values)
        for fraction in args.budgets:
            budget = fraction * dense
            seconds, sol = median_time(
                lambda: knapsack.solve(values, costs, budget), args.repeats)
            # The same merge `solve` runs, for its path and peak size.
            limit = budget * (1 + knapsack._BUDGET_RTOL)
            choice, peak = knapsack._frontier_solve(
                values, costs, limit, knapsack.MAX_FRONTIER)
            dp_seconds, dp = median_time(
                lambda: knapsack.solve(values, costs, budget,
                                       resolution=args.resolution),
                args.repeats)
            rows.append([
                name, str(n_groups), str(n_options), f"{fraction:.2f}",
                f"{seconds:.4f}", "frontier" if choice is not None else "DP",
                str(peak), str(sol.optimal), f"{dp_seconds:.4f}",
                f"{(sol.value - dp.value) / sol.value:.1e}",
            ])
    return rows


def print_table(rows):
    header = ["problem", "groups", "options", "budget", "median s", "path",
              "peak frontier", "optimal", "DP median s", "DP value gap"]
    widths = [max(len(r[i]) for r in rows + [header])
              for i in range(len(header))]
    line = lambda r: "| " + " | ".join(
        c.ljust(w) for c, w in zip(r, widths)) + " |"
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS),
                        choices=list(NETWORKS))
    parser.add_argument("--budgets", nargs="+", type=float,
                        default=[0.25, 0.5, 0.75],
                        help="Budgets as fractions of the dense cost.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resolution", type=int,
                        default=knapsack.FALLBACK_RESOLUTION,
                        help="Units of the DP timed for comparison.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{usable_cores()} usable cores; median of {args.repeats} runs; "
          f"seed {args.seed}.\n")
    print_table(run(args))


if __name__ == "__main__":
    main()
