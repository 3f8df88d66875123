"""Wall-clock of a CHEX `fit` against a plain `fit` of the same model.

Both fits train the same CIFAR ResNet on the same data with the same
optimizer; the CHEX fit trains the wrapped model (masks in the graph) with
`ChannelExploration` running its steps every `--interval` epochs. Rounds are
interleaved (plain, CHEX, plain, CHEX, ...) so background load on a shared
machine hits both alike; every round builds and compiles fresh models, so the
times include tracing, as a user's fit does.

Reported per round: total fit seconds (tracing included) and the median
epoch after the first (steady state), and the CHEX / plain ratios.

    python tools/benchmark_chex_overhead.py --depth=20 --epochs=8 --rounds=3
"""

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import bench_report  # noqa: E402
import keras_chex  # noqa: E402
from keras_chex import cifar_resnet  # noqa: E402
from keras_chex import datasets  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "CIFAR-10 train.zip (default: the sample).")
flags.DEFINE_integer("depth", 20, "CIFAR ResNet depth.")
flags.DEFINE_integer("epochs", 8, "Epochs per fit.")
flags.DEFINE_integer("rounds", 3, "Interleaved plain/CHEX rounds.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_float("interval", 2.0, "CHEX exploration interval (epochs).")
flags.DEFINE_float("flops", 0.5, "CHEX MACs target.")
flags.DEFINE_integer("threads", 0, "TensorFlow intra-op threads (0: default).")


class EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.epoch_seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_seconds.append(time.perf_counter() - self._start)


def timed_fit(train, chex):
    keras.utils.set_random_seed(0)
    model = cifar_resnet.cifar_resnet(FLAGS.depth, weight_decay=5e-4)
    callbacks = [EpochTimer()]
    if chex:
        model = keras_chex.prune_and_regrow(
            model, flops=FLAGS.flops, interval=FLAGS.interval, seed=0)
        callbacks.append(keras_chex.ChannelExploration())
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    start = time.perf_counter()
    history = model.fit(train, epochs=FLAGS.epochs, verbose=0,
                        callbacks=callbacks)
    total = time.perf_counter() - start
    explorations = int(model.chex_state.last_stats[3]) if chex else 0
    if chex:
        assert history.history["chex_pruned"], "no exploration logged"
    return total, statistics.median(callbacks[0].epoch_seconds[1:]), (
        explorations)


def main(argv):
    del argv
    if FLAGS.threads:
        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
    info = bench_report.machine_info()
    (x, y), _ = datasets.load_cifar10(FLAGS.data)
    train = datasets.make_dataset(x, y, FLAGS.batch_size, training=True,
                                  seed=0)
    rows, totals, epochs = [], [], []
    for r in range(FLAGS.rounds):
        plain_total, plain_epoch, _ = timed_fit(train, chex=False)
        chex_total, chex_epoch, n = timed_fit(train, chex=True)
        totals.append(chex_total / plain_total)
        epochs.append(chex_epoch / plain_epoch)
        rows.append([r + 1, f"{plain_total:.1f}", f"{chex_total:.1f}",
                     f"{totals[-1]:.3f}", f"{plain_epoch:.2f}",
                     f"{chex_epoch:.2f}", f"{epochs[-1]:.3f}", n])
        print(rows[-1], flush=True)
    print()
    print("Command: `" + bench_report.command_line() + "`")
    print(f"{len(x)} training images, {len(train)} steps per epoch.")
    for k, v in info.items():
        print(f"- {k}: {v}")
    print()
    print(bench_report.markdown_table(
        ["round", "plain fit s", "CHEX fit s", "ratio", "plain epoch s",
         "CHEX epoch s", "epoch ratio", "explorations"], rows))
    print()
    print(f"median ratio: fit {statistics.median(totals):.3f}, "
          f"steady-state epoch {statistics.median(epochs):.3f}")


if __name__ == "__main__":
    app.run(main)
