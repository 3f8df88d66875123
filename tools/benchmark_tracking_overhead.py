r"""What TrackingBatchNormalization costs a training step, A/B against Keras'.

Three copies of one `cifar_resnet` (same weights) train side by side with
`model.fit`, one epoch of `--train_steps` steps each, interleaved (A B C, C B A,
...) for `--train_rounds` rounds: the plain model, a second plain copy (an A/A
control: how far apart two identical models measure on this machine) and
a copy whose BatchNorms are `keras_chex.TrackingBatchNormalization`. Each
epoch's process CPU time per step is recorded; the ratios are medians of
the per-round ratios to the first plain copy. No masks, no wrapping: the
statistics restart's own cost.

    python tools/benchmark_tracking_overhead.py --train_rounds=15 --train_steps=4
"""

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import bench_report  # noqa: E402
import benchmark_core  # noqa: E402

# --depth, --train_rounds and --train_steps are benchmark_core's flags.
flags.DEFINE_integer("threads", 0, "TensorFlow threads (0: default).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if FLAGS.threads:
        bench_report.set_threads(FLAGS.threads)
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_chex.cifar.resnet import cifar_resnet

    rng = np.random.default_rng(0)
    n = 128 * FLAGS.train_steps
    x = rng.normal(size=(n, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, n)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(128).cache()
    plain = cifar_resnet(FLAGS.depth)

    def copy():
        model = keras.models.clone_model(plain)
        model.set_weights(plain.get_weights())
        return model

    models = {"plain": copy(), "plain again (A/A control)": copy(),
              "TrackingBatchNormalization": (
                  benchmark_core._with_tracking_batchnorms(plain))}
    for model in models.values():
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"])
        model.fit(data, epochs=1, verbose=0)  # Tracing.
    cpu = {name: [] for name in models}
    order = list(models)
    for r in range(FLAGS.train_rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            start = time.process_time()
            models[name].fit(data, epochs=1, verbose=0)
            cpu[name].append((time.process_time() - start) / FLAGS.train_steps)
    print(bench_report.command_line())
    info = bench_report.machine_info()
    print(f"\n- CPU: {info['CPU']}\n- Date: {info['Date']}\n"
          f"- Load average at the end: {bench_report.load_average()}\n")
    rows = []
    for name in models:
        ratios = [a / b for a, b in zip(cpu[name], cpu["plain"])]
        rows.append([name, f"{1000 * statistics.median(cpu[name]):.1f}",
                     f"{statistics.median(ratios):.3f}",
                     f"{min(ratios):.3f} to {max(ratios):.3f}"])
    print(bench_report.markdown_table(
        ["model", "CPU time / step (ms)", "CPU ratio (median)",
         "per-round ratios"], rows))


if __name__ == "__main__":
    app.run(main)
