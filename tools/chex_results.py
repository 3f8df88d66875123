"""Summarises `benchmark_chex.py` results over seeds as a Markdown table.

Reads the JSON lines that `tools/benchmark_chex.py --output=...` appends
(header lines are skipped), and prints, per variant, the held-out accuracy
of every seed, the mean and standard deviation, and the paired difference
`reference - variant` over the seeds both have (mean, how many seeds the
reference wins, and the paired t statistic). Pairing by seed matters: runs with the same seed share
the data order and the initial weights.

    python tools/chex_results.py runs/chex30_seeds.jsonl --reference=chex

A variant recorded under another name can be renamed: `--rename=chex_max=chex`.
Runs with entry-point options are listed as `name[key=value]` (e.g.
`smcp[importance=magnitude]`).
With `--widths`, a second table gives each variant's final widths per stage
of the CIFAR ResNet, "stream / each block's inner width", averaged over the
seeds. With `--plot=FILE`, a PNG shows the same widths (seed means) per
variant: every block's inner width and every stage's residual stream, so
where a method put its channels shows at a glance.
If a (variant, seed) appears more than once, the last record counts.
"""

import json
import os
import statistics

from absl import app
from absl import flags

import bench_report

FLAGS = flags.FLAGS
flags.DEFINE_string("reference", "chex", "Variant the others are paired with.")
flags.DEFINE_list("rename", [], "old=new variant renames.")
flags.DEFINE_list("variants", ["dense", "chex", "fixed", "narrow", "noregrow"],
                  "Row order (variants not listed are left out).")
flags.DEFINE_boolean("widths", False, "Also print the widths per stage.")
flags.DEFINE_string("plot", None,
                    "Also draw the final widths per variant (each block's "
                    "inner width, each stage's stream) to this PNG (needs "
                    "matplotlib; never overwrites).")


def records(paths, rename=None):
    """The result lines of `paths` (headers skipped), variants renamed."""
    rename = dict(rename or {})
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                record = json.loads(line)
                if "variant" not in record or record.get("stage"):
                    continue  # A header line, or a timing line.
                name = record["variant"] + _qualifier(record)
                record["variant"] = rename.get(name, name)
                yield record


def _qualifier(record):
    """What tells runs of one variant name apart: the entry-point options
    (`benchmark_finetune.py --options`), and for distilled runs recorded
    before the benchmark passed `KLDivergence()` explicitly, that their
    distillation loss compared raw logits (Keras' default at the time)."""
    options = record.get("options") or {}
    qualifier = "".join(f"[{k}={v}]" for k, v in sorted(options.items()))
    if record.get("distill") and "distillation_loss" not in record:
        qualifier += "[raw_logits]"
    return qualifier


def load(paths, rename=None):
    """{variant: {seed: accuracy %}} from result lines of `paths`."""
    results = {}
    for record in records(paths, rename):
        results.setdefault(record["variant"], {})[int(record["seed"])] = (
            100.0 * record["val_accuracy"])
    return results


def latency_fractions(paths, rename=None):
    """{variant: {seed: LiteRT latency / dense}} from the timing lines
    (`benchmark_finetune.py --stage=latency`); the last line counts."""
    rename = dict(rename or {})
    fractions = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                record = json.loads(line) if line.strip() else {}
                if record.get("stage") != "latency":
                    continue
                name = rename.get(record["variant"], record["variant"])
                fractions.setdefault(name, {})[int(record["seed"])] = (
                    record["latency_fraction"])
    return fractions


def stage_widths(conv_filters):
    """[(stream, [inner widths])] per stage of a CIFAR ResNet.

    `conv_filters` lists the filters of every Conv2D in layer order: the
    stem, then per block conv1 and conv2, with each later stage's first
    block holding a shortcut projection between them. A stage's stream is
    the stem's (stage 1) or the projection's width; conv1 sets the inner.
    """
    n = (len(conv_filters) - 3) // 6  # Blocks per stage.
    if len(conv_filters) != 6 * n + 3:
        raise ValueError(f"{len(conv_filters)} convolutions is not a CIFAR "
                         "ResNet (6n + 3).")
    stages, rest = [], list(conv_filters[1:])
    stream = conv_filters[0]
    for stage in range(3):
        size = 2 * n + (1 if stage else 0)
        convs, rest = rest[:size], rest[size:]
        if stage:
            stream = convs[1]
            convs = convs[:1] + convs[2:]
        stages.append((stream, convs[0::2]))
    return stages


def layer_means(paths, rename, variants):
    """{variant: [mean width of each convolution over seeds]}, in
    `variants` order, for the variants whose records have conv_filters."""
    by_variant = {}
    for record in records(paths, rename):
        if "conv_filters" in record:
            by_variant.setdefault(record["variant"], {})[record["seed"]] = (
                record["conv_filters"])
    return {name: [statistics.mean(widths)
                   for widths in zip(*by_variant[name].values())]
            for name in variants if name in by_variant}


def plot_layer_widths(means, path):
    """Draws `layer_means`' widths to a PNG: each block's inner width, and
    each stage's residual-stream width, one line per variant."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if os.path.exists(path):
        raise app.UsageError(f"{path} exists; choose another --plot file.")
    figure = Figure(figsize=(11, 3.8))
    FigureCanvasAgg(figure)
    inner_axes, stream_axes = figure.subplots(
        1, 2, gridspec_kw={"width_ratios": [4, 1]})
    for name, widths in means.items():
        stages = stage_widths(widths)
        inner = [w for _, block in stages for w in block]
        inner_axes.plot(range(1, len(inner) + 1), inner, marker="o",
                        markersize=3, label=name)
        stream_axes.plot([1, 2, 3], [stream for stream, _ in stages],
                         marker="o", label=name)
    n = len(stages[0][1])  # Blocks per stage, the same for every variant.
    for boundary in (n + 0.5, 2 * n + 0.5):
        inner_axes.axvline(boundary, color="grey", linewidth=0.8,
                           linestyle=":")
    inner_axes.set_xlabel("block (dotted: stage boundaries)")
    inner_axes.set_ylabel("channels kept (mean over seeds)")
    inner_axes.set_title("inner width of each block (conv1)")
    inner_axes.legend()
    inner_axes.set_ylim(bottom=0)
    stream_axes.set_ylim(bottom=0)
    stream_axes.set_xticks([1, 2, 3])
    stream_axes.set_xlabel("stage")
    stream_axes.set_title("residual stream")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return figure


def width_rows(paths, rename, variants):
    """Rows: variant, and per stage "stream / inner, ..." (seed means)."""
    rows = []
    # stage_widths only picks convolutions, so picking from the seed means
    # equals averaging each seed's picks.
    for name, widths in layer_means(paths, rename, variants).items():
        cells = [name]
        for stream, inner in stage_widths(widths):
            cells.append(f"{stream:.0f} / " + ",".join(f"{w:.0f}"
                                                       for w in inner))
        rows.append(cells)
    return ["variant", "stage 1", "stage 2", "stage 3"], rows


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
    columns, rows = summary_rows(results, FLAGS.reference, FLAGS.variants)
    timed = latency_fractions(paths, rename)
    if timed:
        columns.append("LiteRT latency / dense (seed mean)")
        for row in rows:
            seeds = timed.get(row[0], {})
            row.append(f"{statistics.mean(seeds.values()):.3f}" if seeds
                       else "-")
    print(bench_report.markdown_table(columns, rows))
    if FLAGS.widths:
        print()
        print(bench_report.markdown_table(
            *width_rows(paths, rename, FLAGS.variants)))
    if FLAGS.plot:
        means = layer_means(paths, rename, FLAGS.variants)
        if not means:
            raise app.UsageError("No result line of the listed --variants "
                                 "has conv_filters to plot.")
        plot_layer_widths(means, FLAGS.plot)
        print(f"\nwrote {FLAGS.plot}: " + ", ".join(
            f"{name} ({len(w)} convolutions, {sum(w):.0f} channels)"
            for name, w in means.items()))


if __name__ == "__main__":
    app.run(main)
