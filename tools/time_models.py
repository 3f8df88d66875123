"""Times saved Keras models with LiteRT in one interleaved pass.

Exports each `.keras` file to TFLite and measures them round-robin (1
thread by default, the fastest run of each round, the fastest round), so a
slow moment of a shared machine hits every model alike. With `--table`, a
latency table's prediction is printed beside each measurement.

    python tools/time_models.py --table=runs/resnet20_latency.json \\
        --reference=runs/models/dense_seed0.keras runs/models/*.keras
"""

import json
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import bench_report  # noqa: E402
import keras_chex  # noqa: E402
from keras_chex.deploy import latency  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("table", None, "Latency table JSON for predictions.")
flags.DEFINE_string("reference", None, "Model the fractions are relative to.")
flags.DEFINE_integer("threads", 1, "LiteRT threads.")
flags.DEFINE_integer("rounds", 7, "Interleaved rounds.")
flags.DEFINE_integer("runs", 100, "Timed runs per round.")
flags.DEFINE_string("output", None, "Append JSON lines here.")


def main(argv):
    paths = list(argv[1:])
    if FLAGS.reference and FLAGS.reference not in paths:
        paths.insert(0, FLAGS.reference)
    if not paths:
        raise app.UsageError("Give the .keras files to time.")
    table = keras_chex.LatencyTable.load(FLAGS.table) if FLAGS.table else None
    models, files = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, path in enumerate(paths):
            model = keras.saving.load_model(path)
            if keras_chex.is_wrapped(model):
                model = keras_chex.strip(model)
            models[path] = model
            files[path] = os.path.join(tmp, f"{i}.tflite")
            keras_chex.export_tflite(model, files[path], verify=False)
        best = {p: float("inf") for p in paths}
        for _ in range(FLAGS.rounds):
            for p in paths:
                best[p] = min(best[p], latency.measure_tflite_latency(
                    files[p], num_threads=FLAGS.threads, runs=FLAGS.runs,
                    warmup=10).min_ms)
    ref = FLAGS.reference
    rows, out = [], []
    for p in paths:
        row = {"model": os.path.basename(p), "ms": best[p],
               "macs": keras_chex.count_macs(models[p]).macs}
        if ref:
            row["fraction"] = best[p] / best[ref]
            row["macs_fraction"] = row["macs"] / keras_chex.count_macs(
                models[ref]).macs
        if table is not None:
            row["predicted_ms"] = table.predict(models[p])
            row["error"] = (row["predicted_ms"] - best[p]) / best[p]
        out.append(row)
        rows.append([row["model"], f"{row['ms']:.3f}",
                     f"{row.get('fraction', float('nan')):.3f}",
                     f"{row.get('macs_fraction', float('nan')):.3f}",
                     f"{row.get('predicted_ms', float('nan')):.3f}",
                     f"{row.get('error', float('nan')):+.1%}"])
    print(bench_report.markdown_table(
        ["model", "LiteRT ms", "of reference", "MACs of reference",
         "table ms", "table error"], rows))
    if FLAGS.output:
        with open(FLAGS.output, "a") as f:
            f.write(json.dumps({"machine": bench_report.machine_info(),
                                "threads": FLAGS.threads}) + "\n")
            for row in out:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    app.run(main)
