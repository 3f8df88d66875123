"""How much do stale BatchNorm statistics cost a trained compact model?

Issue 13's measure (b) asks whether regrown channels should get their
BatchNorm moving statistics re-estimated instead of restored. Training uses
batch statistics, so the moving ones only act at evaluation: re-estimating
*every* BatchNorm of the final model exactly, on training images, bounds from
above what any re-estimation of regrown channels could gain.

For each saved model (the `--save_dir` output of benchmark_chex.py), this
prints its held-out accuracy as saved and after the moving mean and variance
of every BatchNorm are replaced by their average over `--batches` batches of
training images (un-augmented, or augmented as in training with
`--augment`).

    python tools/bn_recalibration.py --data=../shared/data/cifar10/train.zip \
        --train_per_class=1000 runs/ablation_models/*.keras
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import bench_report  # noqa: E402
import keras_chex  # noqa: E402, F401 (registers the layers to load)
from keras_chex.cifar import data as datasets  # noqa: E402

flags.DEFINE_string("data", None, "CIFAR-10 train.zip (default: sample).")
flags.DEFINE_integer("train_per_class", 0,
                     "Training images per class the models were fit on.")
flags.DEFINE_integer("val_per_class", None, "Held-out images per class.")
flags.DEFINE_integer("batches", 40, "Training batches of 128 to average.")
flags.DEFINE_integer("threads", 1, "TensorFlow threads.")
flags.DEFINE_boolean("augment", False,
                     "Average over augmented batches (as in training).")
FLAGS = flags.FLAGS


def recalibrate(model, ds, batches):
    """Sets every BatchNorm's moving statistics to their mean over batches.

    With momentum i / (i + 1) at the i-th batch, Keras' moving-average
    update is the running mean of the batch statistics.
    """
    norms = [layer for layer in model.layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [layer.momentum for layer in norms]
    for i, (x, _) in enumerate(ds.take(batches)):
        for layer in norms:
            layer.momentum = i / (i + 1)
        model(x, training=True)
    for layer, momentum in zip(norms, saved):
        layer.momentum = momentum
    return len(norms)


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("Give the .keras files to check.")
    bench_report.set_threads(FLAGS.threads)
    (x, y), (xv, yv) = datasets.load_cifar10(
        FLAGS.data, validation_per_class=FLAGS.val_per_class)
    x, y = datasets.first_per_class(x, y, FLAGS.train_per_class)
    if FLAGS.augment:
        train = datasets.make_dataset(x, y, 128, training=True, seed=0)
    else:
        rng = np.random.default_rng(0)
        order = rng.permutation(len(x))  # Mixed classes in every batch.
        train = datasets.make_dataset(x[order], y[order], 128,
                                      training=False)
    val = datasets.make_dataset(xv, yv, 500, training=False)
    for path in paths:
        model = keras.saving.load_model(path)
        before = datasets.accuracy(model, val)
        norms = recalibrate(model, train, FLAGS.batches)
        after = datasets.accuracy(model, val)
        print(json.dumps({"model": os.path.basename(path),
                          "augment": FLAGS.augment, "batches": FLAGS.batches,
                          "batchnorms": norms, "accuracy_saved": before,
                          "accuracy_recalibrated": after,
                          "difference": after - before}), flush=True)


if __name__ == "__main__":
    app.run(main)
