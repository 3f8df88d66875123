"""How honest is the latency table? Its prediction vs measured LiteRT latency.

For each model, builds (or reuses) a latency table on this machine, then
makes compact models at several latency budgets with SMCP's allocation
(random importances: the point is the widths, not accuracy) and, for
comparison, at the same fractions of the MACs. Each compact is stripped,
exported to TFLite and timed with LiteRT (interleaved rounds, the fastest
run); the table's prediction is compared with that measurement. Also prints
one convolution's row of the table, which shows XNNPACK's channel blocking
that a MACs count cannot see.

    python tools/benchmark_latency_table.py --models=resnet20,mobilenetv2 \\
        --budgets=0.3,0.5,0.7 --output=runs/latency_table.jsonl
"""

import json
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import bench_report  # noqa: E402
import keras_chex  # noqa: E402
from keras_chex.cifar import resnet as cifar_resnet  # noqa: E402
from keras_chex.deploy import latency  # noqa: E402
from keras_chex.core import latency_table  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["resnet20", "mobilenetv2"], "Models to test.")
flags.DEFINE_list("budgets", ["0.3", "0.5", "0.7"], "Fractions kept.")
flags.DEFINE_list("seeds", ["0", "1"], "Importance draws per budget.")
flags.DEFINE_integer("threads", 1, "LiteRT threads.")
flags.DEFINE_integer("round_to", 8, "Width step.")
flags.DEFINE_integer("max_points", 0,
                     "Grid points per axis (0: 16 for ResNets, 8 else).")
flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds per file.")
flags.DEFINE_integer("runs", 100, "Timed runs per round.")
flags.DEFINE_string("table_dir", "runs", "Where tables are cached.")
flags.DEFINE_string("output", None, "Append JSON lines here.")


def build(name):
    keras.utils.set_random_seed(0)
    if name.startswith("resnet"):
        return cifar_resnet.cifar_resnet(int(name[len("resnet"):]))
    if name == "mobilenetv2":
        return keras.applications.MobileNetV2(
            weights=None, input_shape=(96, 96, 3), alpha=0.35, classes=10)
    raise ValueError(f"unknown model {name!r}")


def compact_for(model, table, target, budget, seed):
    kwargs = ({"latency": budget, "cost_table": table} if target == "latency"
              else {"flops": budget})
    wrapped = keras_chex.soft_mask_prune(model, round_to=FLAGS.round_to,
                                         seed=seed, **kwargs)
    state = wrapped.pruning_state
    rng = np.random.default_rng(seed)
    state.importance.assign(rng.random(state.importance.shape[0])
                            .astype("float32"))
    state.recompute(budget)
    return keras_chex.strip(wrapped)


def measure(paths):
    best = {p: float("inf") for p in paths}
    for _ in range(FLAGS.rounds):
        for p in paths:
            r = latency.measure_tflite_latency(
                p, num_threads=FLAGS.threads, runs=FLAGS.runs, warmup=10)
            best[p] = min(best[p], r.min_ms)
    return best


def blocking_row(model, table):
    """The widest square conv's time over output widths, vs MACs."""
    best = None
    for name, node in latency_table._timed_nodes(model):
        key = table.key_for(name, node)
        entry = table.entries[key]
        if entry["cout"] != [None] and len(entry["cout"]) > 2 and (
                best is None or len(entry["cout"]) > len(best[1]["cout"])):
            best = (name, entry)
    name, entry = best
    row = np.asarray(entry["ms"], float)[-1]
    return name, entry["cin"][-1], entry["cout"], row


def main(argv):
    del argv
    info = bench_report.machine_info()
    print(json.dumps({"machine": info, "flags": {
        k: getattr(FLAGS, k) for k in ("models", "budgets", "seeds",
                                       "threads", "round_to", "rounds",
                                       "runs")}}))
    os.makedirs(FLAGS.table_dir, exist_ok=True)
    rows = []
    for name in FLAGS.models:
        model = build(name)
        max_points = FLAGS.max_points or (16 if name.startswith("resnet")
                                          else 8)
        path = os.path.join(FLAGS.table_dir,
                            f"{name}_latency_t{FLAGS.threads}"
                            f"_r{FLAGS.round_to}_p{max_points}.json")
        start = time.time()
        table = keras_chex.build_latency_table(
            model, path, threads=FLAGS.threads, round_to=FLAGS.round_to,
            max_points=max_points)
        build_s = time.time() - start
        print(f"{name}: table {table} in {build_s:.0f} s "
              f"(other ops {table.calibration(model)[1]:.3f} ms)", flush=True)
        layer, cin, couts, row = blocking_row(model, table)
        print(f"{name}: {layer} at {cin} input channels, ms by output "
              "channels (MACs grow linearly):")
        for c, ms in zip(couts, row):
            print(f"  {c:5d}  {ms:.4f} ms  ({ms / row[-1]:.2f} of full, "
                  f"MACs {c / couts[-1]:.2f})")
        with tempfile.TemporaryDirectory() as tmp:
            files = {}
            dense_file = os.path.join(tmp, "dense.tflite")
            keras_chex.export_tflite(model, dense_file, verify=False)
            files["dense"] = (dense_file, table.predict(model),
                              keras_chex.count_macs(model).macs, None, None)
            for target in ("latency", "flops"):
                for budget in [float(b) for b in FLAGS.budgets]:
                    for seed in [int(s) for s in FLAGS.seeds]:
                        compact = compact_for(model, table, target, budget,
                                              seed)
                        f = os.path.join(tmp, f"{target}{budget}_{seed}"
                                         ".tflite")
                        keras_chex.export_tflite(compact, f, verify=False)
                        files[(target, budget, seed)] = (
                            f, table.predict(compact),
                            keras_chex.count_macs(compact).macs, budget,
                            target)
            measured = measure([v[0] for v in files.values()])
        dense_ms = measured[files["dense"][0]]
        dense_macs = files["dense"][2]
        for key, (f, predicted, macs, budget, target) in files.items():
            m = measured[f]
            row = {
                "model": name, "target": target or "dense",
                "budget": budget, "seed": None if key == "dense" else key[2],
                "macs_fraction": macs / dense_macs,
                "measured_ms": m, "predicted_ms": predicted,
                "measured_fraction": m / dense_ms,
                "error": (predicted - m) / m,
                "table_seconds": build_s,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            if FLAGS.output:
                with open(FLAGS.output, "a") as out:
                    out.write(json.dumps(row) + "\n")
    header = ["model", "target", "budget", "seed", "MACs kept",
              "measured ms", "predicted ms", "measured / dense",
              "prediction error"]
    table_rows = [[r["model"], r["target"], r["budget"] or "-",
                   "-" if r["seed"] is None else r["seed"],
                   f"{r['macs_fraction']:.3f}", f"{r['measured_ms']:.3f}",
                   f"{r['predicted_ms']:.3f}",
                   f"{r['measured_fraction']:.3f}", f"{r['error']:+.1%}"]
                  for r in rows]
    print(bench_report.markdown_table(header, table_rows))
    errors = [abs(r["error"]) for r in rows]
    print(f"mean |error| {np.mean(errors):.1%}, max {np.max(errors):.1%}")


if __name__ == "__main__":
    app.run(main)
