"""Wall-clock of a pruning `fit` (CHEX, SMCP or FRS) against a plain `fit`.

`--method=smcp` times SMCP instead: its train step accumulates Taylor
importance and decays pruned weights (the gradient hook), and its
recomputations are timed like CHEX's explorations. `--method=frs` times the
relevance method: its pruning steps (LRP scoring on 10 batches, then
removal) are timed the same way.


Both fits train the same CIFAR ResNet on the same data with the same
optimizer; the CHEX fit trains the wrapped model (masks in the graph) with
`ChannelExploration` running its steps every `--interval` epochs. Rounds are
interleaved (plain, CHEX, plain, CHEX, ...) so background load on a shared
machine hits both alike; every round builds and compiles fresh models, so the
times include tracing, as a user's fit does.

Reported per round: total fit seconds (tracing included); the median epoch
over the epochs (after the first) in which no exploration ran, i.e. the
cost of training through the masks; CHEX / plain ratios of both; and the
time of the first exploration (it traces the `tf.function`, once per fit)
and of the later ones. A short fit magnifies the one-time costs: a real
CIFAR-10 epoch has 11x the steps of one on the bundled sample.

    python tools/benchmark_chex_overhead.py --depth=20 --epochs=8 --rounds=3
"""

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import bench_report  # noqa: E402
import keras_chex  # noqa: E402
from keras_chex.cifar import resnet as cifar_resnet  # noqa: E402
from keras_chex.cifar import data as datasets  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "CIFAR-10 train.zip (default: the sample).")
flags.DEFINE_integer("train_per_class", 0,
                     "Use only this many training images per class (0: all).")
flags.DEFINE_integer("depth", 20, "CIFAR ResNet depth.")
flags.DEFINE_integer("epochs", 8, "Epochs per fit.")
flags.DEFINE_integer("rounds", 3, "Interleaved plain/CHEX rounds.")
flags.DEFINE_enum("method", "chex", ["chex", "smcp", "frs"],
                  "Pruning method.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_float("interval", 2.0, "CHEX exploration interval (epochs).")
flags.DEFINE_float("flops", 0.5, "CHEX MACs target.")
flags.DEFINE_integer("threads", 0,
                     "TensorFlow intra- and inter-op threads (0: default).")


class EpochTimer(keras.callbacks.Callback):
    """Seconds per epoch, and whether an exploration ran in that epoch."""

    def __init__(self):
        super().__init__()
        self.explore_seconds = []

    def on_train_begin(self, logs=None):
        self.epoch_seconds, self.explored = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._explorations = len(self.explore_seconds)
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_seconds.append(time.perf_counter() - self._start)
        self.explored.append(len(self.explore_seconds) > self._explorations)


def timed_fit(train, chex):
    keras.utils.set_random_seed(0)
    model = cifar_resnet.cifar_resnet(FLAGS.depth, weight_decay=5e-4)
    timer = EpochTimer()
    callbacks = [timer]
    if chex and FLAGS.method == "chex":
        model = keras_chex.prune_and_regrow(
            model, flops=FLAGS.flops, interval=FLAGS.interval, seed=0)
        callbacks.append(keras_chex.ChannelExploration())
        step_name = "explore"
    elif chex and FLAGS.method == "frs":
        model = keras_chex.relevance_prune(
            model, flops=FLAGS.flops, interval=FLAGS.interval, seed=0)
        # Scores on the training data, as a user would.
        callbacks.append(keras_chex.RelevancePruning(train))
        step_name = "prune_step"
    elif chex:
        model = keras_chex.soft_mask_prune(model, flops=FLAGS.flops, seed=0)
        callbacks.append(keras_chex.SoftMaskPruning())
        step_name = "recompute"
    if chex:
        state = model.pruning_state
        step = getattr(state, step_name)

        def timed_step(*args):
            start = time.perf_counter()
            stats = np.asarray(step(*args))
            timer.explore_seconds.append(time.perf_counter() - start)
            return stats

        # The callback calls the state's step: time each call (CHEX's first
        # includes tracing its tf.function).
        object.__setattr__(state, step_name, timed_step)
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    start = time.perf_counter()
    model.fit(train, epochs=FLAGS.epochs, verbose=0, callbacks=callbacks)
    total = time.perf_counter() - start
    return total, timer


def main(argv):
    del argv
    bench_report.set_threads(FLAGS.threads)
    info = bench_report.machine_info()
    (x, y), _ = datasets.load_cifar10(FLAGS.data)
    x, y = datasets.first_per_class(x, y, FLAGS.train_per_class)
    train = datasets.make_dataset(x, y, FLAGS.batch_size, training=True,
                                  seed=0)
    rows, totals, epochs = [], [], []
    for r in range(FLAGS.rounds):
        plain_total, plain = timed_fit(train, chex=False)
        chex_total, chex = timed_fit(train, chex=True)
        if not chex.explore_seconds:
            raise SystemExit("No exploration ran: use more epochs or a "
                             "shorter --interval.")
        # Steady state: epochs after the first (tracing) in which the CHEX
        # fit ran no exploration; the same epochs of the plain fit.
        quiet = [e for e in range(1, FLAGS.epochs) if not chex.explored[e]]
        if not quiet:
            raise SystemExit("Every epoch had an exploration: use more "
                             "epochs.")
        plain_epoch = statistics.median(plain.epoch_seconds[e] for e in quiet)
        chex_epoch = statistics.median(chex.epoch_seconds[e] for e in quiet)
        totals.append(chex_total / plain_total)
        epochs.append(chex_epoch / plain_epoch)
        later = chex.explore_seconds[1:]
        rows.append([
            r + 1, f"{plain_total:.1f}", f"{chex_total:.1f}",
            f"{totals[-1]:.3f}", f"{plain_epoch:.2f}", f"{chex_epoch:.2f}",
            f"{epochs[-1]:.3f}", len(chex.explore_seconds),
            f"{chex.explore_seconds[0]:.2f}",
            f"{1000 * statistics.median(later):.0f}" if later else "-",
        ])
        print(rows[-1], flush=True)
    print()
    print("Command: `" + bench_report.command_line() + "`")
    print(f"{len(x)} training images, {len(train)} steps per epoch.")
    for k, v in info.items():
        print(f"- {k}: {v}")
    print()
    name = FLAGS.method.upper()
    print(bench_report.markdown_table(
        ["round", "plain fit s", f"{name} fit s", "fit ratio",
         "plain epoch s", f"{name} epoch s", "epoch ratio", "pruning steps",
         "1st step s", "later steps ms"], rows))
    print()
    print(f"median ratio: fit {statistics.median(totals):.3f}, "
          f"steady-state epoch {statistics.median(epochs):.3f}")


if __name__ == "__main__":
    app.run(main)
