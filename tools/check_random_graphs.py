"""Runs the random-graph property check on many models and reports.

Every model comes from `keras_chex.testing.random_graphs.build_model` with
`RandomChooser(seed)` for consecutive seeds, and must pass
`check_model` (strip exact, MACs equal, `.keras` round trip, TFLite export
matches, relevance scores). A failure is listed with its seed, so it can
be rebuilt:

    python tools/check_random_graphs.py --graphs=1000
    python tools/check_random_graphs.py --start=417 --graphs=1 --verbose

Prints a summary (passed, failed, seconds per graph, constructs seen) as
Markdown for docs/benchmarks.md.
"""

import collections
import os
import sys
import time
import traceback
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_report  # noqa: E402

from keras_chex.testing import random_graphs  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("graphs", 1000, "How many random models.")
flags.DEFINE_integer("start", 0, "First seed.")
flags.DEFINE_boolean("tflite", True, "Also export and verify TFLite.")
flags.DEFINE_boolean("verbose", False, "Print each failure's traceback.")
flags.DEFINE_integer("threads", 1, "TensorFlow threads (0: default).")


def main(argv):
    del argv
    bench_report.set_threads(FLAGS.threads)
    # Each model is new, so TensorFlow's "retracing" notice (a thousand
    # compiled scoring passes) and the export's "stripping" line are noise
    # here; failures are caught and listed below.
    warnings.simplefilter("ignore")
    tf.get_logger().setLevel("ERROR")
    logging.set_verbosity(logging.WARNING)
    failures, kinds = [], collections.Counter()
    totals = collections.Counter()
    start = time.time()
    for seed in range(FLAGS.start, FLAGS.start + FLAGS.graphs):
        keras.utils.set_random_seed(seed)
        try:
            model = random_graphs.build_model(
                random_graphs.RandomChooser(seed))
            kinds.update({type(l).__name__ for l in model.layers})
            totals["inputs>1"] += len(model.inputs) > 1
            totals["outputs>1"] += len(model.outputs) > 1
            report = random_graphs.check_model(model, seed,
                                               tflite=FLAGS.tflite)
            totals["groups"] += report["groups"]
            totals["with unsupported layers"] += report["unsupported"] > 0
            totals["with unscored groups"] += report.get(
                "unscored_groups", 0) > 0
        except Exception as e:  # A failure is a finding, not a stop.
            failures.append((seed, type(e).__name__,
                             str(e).splitlines()[0][:200] if str(e) else ""))
            print(f"seed {seed}: {failures[-1][1]}: {failures[-1][2]}",
                  flush=True)
            if FLAGS.verbose:
                traceback.print_exc()
        done = seed - FLAGS.start + 1
        if done % 50 == 0:
            print(f"{done} graphs, {len(failures)} failed, "
                  f"{time.time() - start:.0f} s", flush=True)
    seconds = time.time() - start
    print()
    print("Command: `" + bench_report.command_line() + "`")
    for k, v in bench_report.machine_info().items():
        print(f"- {k}: {v}")
    print()
    print(f"{FLAGS.graphs} graphs (seeds {FLAGS.start}-"
          f"{FLAGS.start + FLAGS.graphs - 1}): "
          f"{FLAGS.graphs - len(failures)} passed, {len(failures)} failed; "
          f"{seconds:.0f} s ({seconds / FLAGS.graphs:.2f} s per graph).")
    print("Models with several inputs: {}, several outputs: {}, an "
          "unsupported layer: {}, unscored groups: {}; {} channel groups "
          "in all.".format(totals["inputs>1"], totals["outputs>1"],
                           totals["with unsupported layers"],
                           totals["with unscored groups"], totals["groups"]))
    print()
    print(bench_report.markdown_table(
        ["layer class", "models using it"],
        sorted(kinds.items(), key=lambda kv: -kv[1])))
    if failures:
        print()
        print(bench_report.markdown_table(["seed", "error", "message"],
                                          failures))


if __name__ == "__main__":
    app.run(main)
