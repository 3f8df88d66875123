"""CHEX vs. baselines on real CIFAR-10, same epochs, seed and data.

Variants (all ResNet-`depth`, SGD + momentum, cosine learning rate):
  dense     the unpruned model;
  narrow    a uniformly narrower model with about the same MACs as the target,
            trained from scratch;
  fixed     the initial CHEX masks (uniform, by filter L1 norm) fixed for the
            whole run: no exploration;
  noregrow  CHEX's initial masks (at S - delta0) and exploration steps with
            regrowth 0: one global re-allocation and prune to the target,
            nothing comes back;
  chex      CHEX.
Held-out accuracy is measured on the stripped (compact) model for the pruned
variants, on the last `--val_per_class` images of each class.

    python tools/benchmark_chex.py --data=../shared/data/cifar10/train.zip \
        --epochs=15 --train_per_class=1000 --output=runs/chex_bench.jsonl
"""

import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import bench_report  # noqa: E402
import keras_chex  # noqa: E402
from keras_chex.cifar import resnet as cifar_resnet  # noqa: E402
from keras_chex.cifar import data as datasets  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "CIFAR-10 train.zip (default: sample).")
flags.DEFINE_integer("train_per_class", 0,
                     "Use only this many training images per class (0: all).")
flags.DEFINE_integer("val_per_class", None, "Held-out images per class.")
flags.DEFINE_integer("depth", 20, "ResNet depth.")
flags.DEFINE_integer("epochs", 15, "Epochs for every variant.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_float("flops", 0.5, "Fraction of dense MACs to keep.")
flags.DEFINE_float("interval", 2.0, "CHEX exploration interval (epochs).")
flags.DEFINE_list("variants", ["dense", "narrow", "fixed", "noregrow", "chex"],
                  "Which variants to run, in order.")
flags.DEFINE_integer("seed", 0, "Seed shared by all variants.")
flags.DEFINE_string("output", None, "Append one JSON line per variant here.")
flags.DEFINE_integer("threads", 0,
                     "TensorFlow intra- and inter-op threads (0: TensorFlow's "
                     "default). "
                     "Two 1-thread runs side by side use a 2-core machine "
                     "~1.3x better than one 2-thread run.")


def subset(x, y, per_class):
    if not per_class:
        return x, y
    keep = np.concatenate([np.flatnonzero(y == c)[:per_class]
                           for c in range(10)])
    keep.sort()
    return x[keep], y[keep]


def narrow_widths(target_macs, depth):
    """Uniform width factor whose MACs are closest to (not over) target."""
    best = None
    for f in np.linspace(0.3, 1.0, 141):
        widths = tuple(max(1, int(round(w * f))) for w in (16, 32, 64))
        macs = keras_chex.count_macs(cifar_resnet.cifar_resnet(
            depth, widths=widths)).macs
        if macs <= target_macs and (best is None or macs > best[1]):
            best = (widths, macs)
    return best[0]


def accuracy(model, ds):
    correct = total = 0
    for x, y in ds:
        pred = np.argmax(model(x, training=False), -1)
        correct += int(np.sum(pred == y.numpy()))
        total += len(y)
    return correct / total


def run_variant(name, train, val, steps):
    keras.utils.set_random_seed(FLAGS.seed)
    dense = cifar_resnet.cifar_resnet(FLAGS.depth, weight_decay=5e-4)
    dense_macs = keras_chex.count_macs(dense).macs
    callbacks = []
    if name == "dense":
        model = dense
    elif name == "narrow":
        widths = narrow_widths(FLAGS.flops * dense_macs, FLAGS.depth)
        model = cifar_resnet.cifar_resnet(FLAGS.depth, widths=widths,
                                          weight_decay=5e-4)
    else:
        regrow = 0.0 if name == "fixed" else 0.3
        model = keras_chex.prune_and_regrow(
            dense, flops=FLAGS.flops, regrow=regrow, seed=FLAGS.seed,
            interval=FLAGS.interval,
        )
        if name == "noregrow":
            # Ablation only: same start as CHEX, but the callback's schedule
            # regrows nothing (the initial masks are already set).
            config = dict(model.pruning_config, regrow=0.0)
            model._pruning_config_json = json.dumps(config)
        if name != "fixed":
            callbacks = [keras_chex.ChannelExploration(verbose=1)]
    lr = keras.optimizers.schedules.CosineDecay(0.1, steps * FLAGS.epochs)
    model.compile(
        optimizer=keras.optimizers.SGD(lr, momentum=0.9, nesterov=True),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.time()
    model.fit(train, epochs=FLAGS.epochs, verbose=2, callbacks=callbacks)
    fit_seconds = time.time() - start
    final = keras_chex.strip(model) if keras_chex.is_wrapped(model) else model
    return {
        "variant": name,
        "val_accuracy": accuracy(final, val),
        "macs": keras_chex.count_macs(final).macs,
        "macs_fraction": keras_chex.count_macs(final).macs / dense_macs,
        "params": keras_chex.count_macs(final).params,
        "fit_seconds": fit_seconds,
        "seconds_per_epoch": fit_seconds / FLAGS.epochs,
        "seed": FLAGS.seed,
        "conv_filters": [layer.filters for layer in final.layers
                         if isinstance(layer, keras.layers.Conv2D)],
    }


def main(argv):
    del argv
    bench_report.set_threads(FLAGS.threads)
    (x, y), (xv, yv) = datasets.load_cifar10(
        FLAGS.data, validation_per_class=FLAGS.val_per_class)
    x, y = subset(x, y, FLAGS.train_per_class)
    train = datasets.make_dataset(x, y, FLAGS.batch_size, training=True,
                                  seed=FLAGS.seed)
    val = datasets.make_dataset(xv, yv, 500, training=False)
    steps = len(train)
    header = {
        "command": "python tools/benchmark_chex.py " + " ".join(
            f"--{k}={getattr(FLAGS, k)}" for k in (
                "data", "train_per_class", "depth", "epochs", "flops",
                "interval", "seed", "threads")),
        "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "train_images": len(x),
        "val_images": len(xv),
    }
    print(json.dumps(header))
    if FLAGS.output:
        with open(FLAGS.output, "a") as f:
            f.write(json.dumps(header) + "\n")
    for name in FLAGS.variants:
        result = run_variant(name, train, val, steps)
        print(json.dumps(result), flush=True)
        if FLAGS.output:
            with open(FLAGS.output, "a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    app.run(main)
