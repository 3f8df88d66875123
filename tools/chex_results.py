"""Summarises `benchmark_chex.py` results over seeds as a Markdown table.

Reads the JSON lines that `tools/benchmark_chex.py --output=...` appends
(header lines are skipped), and prints, per variant, the held-out accuracy
of every seed, the mean and standard deviation, and the paired difference
`reference - variant` over the seeds both have (mean, how many seeds the
reference wins, and the paired t statistic). Pairing by seed matters: runs with the same seed share
the data order and the initial weights.

    python tools/chex_results.py runs/chex30_seeds.jsonl --reference=chex

A variant recorded under another name can be renamed: `--rename=chex_max=chex`.
If a (variant, seed) appears more than once, the last record counts.
"""

import json
import statistics

from absl import app
from absl import flags

import bench_report

FLAGS = flags.FLAGS
flags.DEFINE_string("reference", "chex", "Variant the others are paired with.")
flags.DEFINE_list("rename", [], "old=new variant renames.")
flags.DEFINE_list("variants", ["dense", "chex", "fixed", "narrow", "noregrow"],
                  "Row order (variants not listed are left out).")


def load(paths, rename=None):
    """{variant: {seed: accuracy %}} from result lines of `paths`."""
    rename = dict(rename or {})
    results = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                record = json.loads(line)
                if "variant" not in record:
                    continue  # A header line.
                name = rename.get(record["variant"], record["variant"])
                results.setdefault(name, {})[int(record["seed"])] = (
                    100.0 * record["val_accuracy"])
    return results


def paired_t(diffs):
    """t statistic of the mean paired difference ("-" below 2 pairs).

    With n pairs it has n - 1 degrees of freedom: |t| > 3.18 is p < 0.05
    (two-sided) for 4 pairs, > 2.78 for 5.
    """
    if len(diffs) < 2:
        return "-"
    sd = statistics.stdev(diffs)
    if sd == 0:
        return "-"
    return f"{statistics.mean(diffs) / (sd / len(diffs) ** 0.5):+.2f}"


def summary_rows(results, reference, variants):
    """Table rows: variant, per-seed accuracies, mean, sd, paired diff."""
    seeds = sorted({s for runs in results.values() for s in runs})
    ref = results.get(reference, {})
    rows = []
    for name in variants:
        runs = results.get(name)
        if not runs:
            continue
        values = list(runs.values())
        row = [name] + [f"{runs[s]:.2f}" if s in runs else "-" for s in seeds]
        row.append(f"{statistics.mean(values):.2f}")
        row.append(f"{statistics.stdev(values):.2f}" if len(values) > 1
                   else "-")
        common = sorted(set(runs) & set(ref))
        if name == reference or not common:
            row += ["", "", ""]
        else:
            diffs = [ref[s] - runs[s] for s in common]
            wins = sum(d > 0 for d in diffs)
            row.append(f"{statistics.mean(diffs):+.2f}")
            row.append(f"{wins} of {len(common)}")
            row.append(paired_t(diffs))
        rows.append(row)
    columns = (["variant"] + [f"seed {s}" for s in seeds]
               + ["mean", "sd", f"{reference} - variant (paired)",
                  f"{reference} better", "paired t"])
    return columns, rows


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("Give one or more JSON-lines result files.")
    rename = dict(item.split("=", 1) for item in FLAGS.rename)
    results = load(paths, rename)
    print(bench_report.markdown_table(
        *summary_rows(results, FLAGS.reference, FLAGS.variants)))


if __name__ == "__main__":
    app.run(main)
