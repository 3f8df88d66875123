"""Do pruned models predict as well as they trained? BatchNorm statistics.

Issue 21's protocols on real CIFAR-10 images, for each variant: the
held-out accuracy of the model as `fit` leaves it (moving statistics: what
`evaluate`, `strip` and export use), with each held-out batch normalised by
its own statistics (training mode: what the weights can give), and after
`keras_chex.recalibrate_batchnorm` on augmented and on plain training
images (exact statistics with the final weights).

- `--protocol=scratch`: a ResNet trained from scratch for `--epochs` at a
  constant `--lr`, each method's masks changing late in training.
- `--protocol=finetune`: a dense ResNet pre-trained `--pretrain_epochs`
  (cosine-decayed from `--lr`, so its statistics are current), then each
  variant fine-tuned `--epochs` at `--finetune_lr` with its last mask
  change 10% before the end: compressing a trained model.

Variants: `plain` (the dense model, plain Keras) and the methods `chex`,
`smcp`, `frs` at `--flops`. `--restart=never` measures the behaviour
before issue 21 (no BatchNorm restarts after a mask change); `--modes`
runs several in one process (the pre-training is shared).

    python tools/benchmark_bn_statistics.py \\
        --data=../shared/data/cifar10/train.zip --protocol=finetune \\
        --epochs=2 --modes=never,all --output=docs/results/bn21_finetune.jsonl
"""

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import bench_report  # noqa: E402
import keras_chex  # noqa: E402
from keras_chex.cifar import data as datasets  # noqa: E402
from keras_chex.cifar import resnet as cifar_resnet  # noqa: E402
from keras_chex.core import statistics  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "CIFAR-10 train.zip (default: sample).")
flags.DEFINE_integer("train_per_class", 450, "Training images per class.")
flags.DEFINE_integer("val_per_class", 50, "Held-out images per class.")
flags.DEFINE_integer("depth", 20, "ResNet depth.")
flags.DEFINE_integer("epochs", 6, "Epochs.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_float("lr", 0.05, "Constant SGD learning rate (momentum 0.9).")
flags.DEFINE_float("flops", 0.5, "Fraction of the dense MACs to keep.")
flags.DEFINE_list("variants", ["plain", "chex", "smcp", "frs"],
                  "Variants to run, in order.")
flags.DEFINE_enum("restart", "all", ["all", "never"],
                  "all: the library's restart of every BatchNorm's "
                  "statistics after a mask change. never: Keras' moving "
                  "average alone (the behaviour before issue 21).")
flags.DEFINE_integer("recalibration_batches", 40,
                     "Training batches recalibrate_batchnorm averages.")
flags.DEFINE_enum("protocol", "scratch", ["scratch", "finetune"],
                  "scratch: train from scratch at --lr. finetune: train the "
                  "dense model --pretrain_epochs (cosine from --lr), then "
                  "each variant --epochs at --finetune_lr with masks "
                  "changing late.")
flags.DEFINE_integer("pretrain_epochs", 8, "finetune: dense pre-training.")
flags.DEFINE_float("finetune_lr", 0.005, "finetune: constant SGD rate.")
flags.DEFINE_list("modes", None, "Values of --restart to run, each "
                  "variant in turn, in one process (default: --restart).")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_integer("threads", 1, "TensorFlow threads.")
flags.DEFINE_string("output", None, "Append one JSON line per variant here.")


def build(name, dense, train):
    """(model, callbacks) of a variant."""
    if name == "plain":
        return dense, []
    if FLAGS.protocol == "finetune":
        # The last mask change 10% of the fine-tuning before its end.
        if name == "chex":
            return (keras_chex.prune_and_regrow(
                dense, flops=FLAGS.flops, interval=0.3, until=0.9,
                seed=FLAGS.seed), [keras_chex.ChannelExploration()])
        if name == "smcp":
            return (keras_chex.soft_mask_prune(
                dense, flops=FLAGS.flops, warmup=0.5, ramp=0.3, freeze=0.1,
                seed=FLAGS.seed), [keras_chex.SoftMaskPruning()])
        if name == "frs":
            return (keras_chex.relevance_prune(
                dense, flops=FLAGS.flops, interval=1, until=0.9,
                seed=FLAGS.seed), [keras_chex.RelevancePruning(train)])
    if name == "chex":
        return (keras_chex.prune_and_regrow(
            dense, flops=FLAGS.flops, regrow=0.3, interval=0.5, until=0.7,
            seed=FLAGS.seed), [keras_chex.ChannelExploration()])
    if name == "smcp":
        return (keras_chex.soft_mask_prune(dense, flops=FLAGS.flops,
                                           seed=FLAGS.seed),
                [keras_chex.SoftMaskPruning()])
    if name == "frs":
        return (keras_chex.relevance_prune(dense, flops=FLAGS.flops,
                                           seed=FLAGS.seed),
                [keras_chex.RelevancePruning(train)])
    raise app.UsageError(f"Unknown variant {name!r}.")


def batch_statistics_accuracy(model, val):
    """Accuracy with every batch normalised by its own statistics; the
    moving statistics this updates are put back."""
    saved = model.get_weights()
    correct = total = 0
    for x, y in val:
        pred = np.argmax(model(x, training=True), -1)
        correct += int(np.sum(pred == np.asarray(y)))
        total += len(y)
    model.set_weights(saved)
    return correct / total


def pretrain(x, y):
    """finetune: the dense model trained with a cosine-decayed rate, so its
    moving statistics are current when fine-tuning starts."""
    keras.utils.set_random_seed(FLAGS.seed)
    train = datasets.make_dataset(x, y, FLAGS.batch_size, training=True,
                                  seed=FLAGS.seed)
    dense = cifar_resnet.cifar_resnet(FLAGS.depth, weight_decay=5e-4)
    steps = FLAGS.pretrain_epochs * int(train.cardinality())
    dense.compile(
        optimizer=keras.optimizers.SGD(
            keras.optimizers.schedules.CosineDecay(FLAGS.lr, steps),
            momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])
    dense.fit(train, epochs=FLAGS.pretrain_epochs, verbose=2)
    return dense


def run_variant(name, mode, x, y, val, recalibration, base=None):
    keras.utils.set_random_seed(FLAGS.seed)
    # A fresh pipeline per variant: a reshuffling dataset iterated again
    # gives another order, and the variants must see the same batches.
    train = datasets.make_dataset(x, y, FLAGS.batch_size, training=True,
                                  seed=FLAGS.seed)
    if base is None:
        dense = cifar_resnet.cifar_resnet(FLAGS.depth, weight_decay=5e-4)
    else:
        dense = keras.models.clone_model(base)
        dense.set_weights(base.get_weights())
    model, callbacks = build(name, dense, train)
    lr = FLAGS.lr if base is None else FLAGS.finetune_lr
    model.compile(
        optimizer=keras.optimizers.SGD(lr, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])
    start = time.time()
    history = model.fit(train, epochs=FLAGS.epochs, verbose=2,
                        callbacks=callbacks, validation_data=val)
    seconds = time.time() - start
    result = {
        "variant": name,
        "protocol": FLAGS.protocol,
        "restart": mode,
        "seed": FLAGS.seed,
        "train_accuracy": float(history.history["accuracy"][-1]),
        "moving": datasets.accuracy(model, val),
        "batch_statistics": batch_statistics_accuracy(model, val),
        "fit_seconds": seconds,
        "epoch_val_accuracy": [float(a) for a in
                               history.history["val_accuracy"]],
    }
    if keras_chex.is_wrapped(model):
        result["stale_layers"] = len(statistics.stale_batchnorms(model))
        result["compact"] = datasets.accuracy(keras_chex.strip(model), val)
        result["macs_fraction"] = (keras_chex.count_macs(model).macs
                                   / keras_chex.count_macs(dense).macs)
    for label, data in recalibration.items():
        keras_chex.recalibrate_batchnorm(model, data)
        result[f"recalibrated_{label}"] = datasets.accuracy(model, val)
    return result


def main(argv):
    del argv
    bench_report.set_threads(FLAGS.threads)
    (x, y), (xv, yv) = datasets.load_cifar10(
        FLAGS.data, validation_per_class=FLAGS.val_per_class)
    x, y = datasets.first_per_class(x, y, FLAGS.train_per_class)
    rng = np.random.default_rng(FLAGS.seed)
    order = rng.permutation(len(x))
    # Exact statistics of what training sees (augmented) and of plain
    # training images, each over the same number of batches.
    recalibration = {
        "augmented": datasets.make_dataset(
            x, y, FLAGS.batch_size, training=True, seed=FLAGS.seed + 1000),
        "plain": datasets.make_dataset(x[order], y[order], FLAGS.batch_size,
                                       training=False),
    }
    recalibration = {k: v.take(FLAGS.recalibration_batches)
                     for k, v in recalibration.items()}
    # Shuffled once: batch statistics of a class-sorted batch are those of
    # one class.
    held_out = rng.permutation(len(xv))
    val = datasets.make_dataset(xv[held_out], yv[held_out], FLAGS.batch_size,
                                training=False)
    header = {
        "command": bench_report.command_line(),
        "cpu": bench_report.cpu_model(),
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "train_images": len(x), "val_images": len(xv),
        "date": bench_report.machine_info()["Date"],
    }
    print(json.dumps(header))
    if FLAGS.output:
        with open(FLAGS.output, "a") as f:
            f.write(json.dumps(header) + "\n")
    base = None
    if FLAGS.protocol == "finetune":
        base = pretrain(x, y)
        write({"variant": "pretrained", "protocol": "finetune",
               "seed": FLAGS.seed, "moving": datasets.accuracy(base, val),
               "batch_statistics": batch_statistics_accuracy(base, val)})
    original = statistics.TrackingBatchNormalization.restart_statistics
    modes = FLAGS.modes or [FLAGS.restart]
    for mode in modes:
        # "never" measures the behaviour before: no layer restarts.
        statistics.TrackingBatchNormalization.restart_statistics = (
            original if mode == "all" else lambda layer, when=True: None)
        for name in FLAGS.variants:
            if name == "plain" and mode != modes[0]:
                continue  # No masks: the same run in every mode.
            write(run_variant(name, mode, x, y, val, recalibration, base))


def write(result):
    print(json.dumps(result), flush=True)
    if FLAGS.output:
        with open(FLAGS.output, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    app.run(main)
