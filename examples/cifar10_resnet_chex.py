"""Prune-train a CIFAR-10 ResNet-20 with CHEX (or SMCP, FRS), strip, export.

The README's main job. With no flags it runs in about three minutes on a
laptop CPU: ResNet-20 for 6 epochs on the small real CIFAR-10 sample shipped
with keras-chex. For a real run point `--data` at the full training set (a
zip or folder of `train/<class>/NNNN.jpg`):

    python examples/cifar10_resnet_chex.py --depth=56 --epochs=160 \
        --data=/path/to/cifar10/train.zip --target=0.5

`--depth` picks another CIFAR ResNet (32, 44, 56, 110). `--method=smcp`
prunes with SMCP instead, to `--target` of the MACs, or with `--latency=0.5`
to half the LiteRT latency predicted by a table measured on this machine
first (cached in the output directory). `--method=frs` prunes gradually by
feature relevance scores (LRP), scored on the first batches of the training
data.

After training it re-estimates the BatchNorm statistics from 50 training
batches (`keras_chex.recalibrate_batchnorm`) and prints the held-out
accuracy before and after. It prints the MACs, parameters and held-out
accuracy of the dense-shaped
pruning model and of the compact one, the TFLite file sizes and the
1-thread LiteRT latency of the dense and compact models, and draws the
width of every channel group over the run to `widths.png` (with
matplotlib, the `plots` extra).
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# First: keras-chex starts TensorFlow without its C++ start-up notes, which
# importing Keras first would print.
import keras_chex  # noqa: E402

import keras  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from keras_chex.cifar import resnet as cifar_resnet  # noqa: E402
from keras_chex.cifar import data as datasets  # noqa: E402
from keras_chex.deploy import export  # noqa: E402
from keras_chex.deploy import latency  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "CIFAR-10 train.zip or folder, or "
                    "'download' (needs internet); default: the real sample "
                    "bundled with keras-chex.")
flags.DEFINE_integer("val_per_class", None, "Images per class held out for "
                     "accuracy (default: 500 of --data, 100 of the sample).")
flags.DEFINE_integer("depth", 20, "ResNet depth (6n+2): 20, 32, 44, 56, 110.")
flags.DEFINE_integer("epochs", 6, "Training epochs.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_float("target", 0.5, "Fraction of the dense MACs to keep.",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_alias("flops", "target")
flags.DEFINE_enum("method", "chex", ["chex", "smcp", "frs"],
                  "Pruning method.")
flags.DEFINE_float("latency", None, "SMCP only: fraction of the dense LiteRT "
                   "latency to keep (replaces --target).", lower_bound=0.0,
                   upper_bound=1.0)
flags.DEFINE_float("learning_rate", 0.1, "Peak SGD learning rate.")
flags.DEFINE_float("weight_decay", 5e-4, "L2 weight decay.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("output_dir", "runs/cifar10_resnet_chex",
                    "Where the .keras and .tflite files go.")


def main(argv):
    del argv
    keras.utils.set_random_seed(FLAGS.seed)
    t0 = time.time()
    (x_train, y_train), (x_val, y_val) = datasets.load_cifar10(
        FLAGS.data, validation_per_class=FLAGS.val_per_class)
    print(f"data: {len(x_train)} training, {len(x_val)} held-out images "
          f"({FLAGS.data or 'bundled sample'})")
    train = datasets.make_dataset(x_train, y_train, FLAGS.batch_size,
                                  training=True, seed=FLAGS.seed)
    val = datasets.make_dataset(x_val, y_val, 256, training=False)

    dense = cifar_resnet.cifar_resnet(FLAGS.depth,
                                      weight_decay=FLAGS.weight_decay)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    if FLAGS.latency is not None and FLAGS.method != "smcp":
        raise app.UsageError("--latency needs --method=smcp.")
    if FLAGS.method == "chex":
        model = keras_chex.prune_and_regrow(dense, flops=FLAGS.target,
                                            seed=FLAGS.seed)
        callback = keras_chex.ChannelExploration(verbose=1)
    elif FLAGS.method == "frs":
        model = keras_chex.relevance_prune(dense, flops=FLAGS.target,
                                           interval=1.0, seed=FLAGS.seed)
        callback = keras_chex.RelevancePruning(train, verbose=1)
    elif FLAGS.latency is not None:
        table_path = os.path.join(FLAGS.output_dir, "latency_table.json")
        print(f"measuring the latency table ({table_path}) ...")
        table = keras_chex.build_latency_table(dense, table_path)
        model = keras_chex.soft_mask_prune(dense, latency=FLAGS.latency,
                                           cost_table=table, seed=FLAGS.seed)
        callback = keras_chex.SoftMaskPruning()
    else:
        model = keras_chex.soft_mask_prune(dense, flops=FLAGS.target,
                                           seed=FLAGS.seed)
        callback = keras_chex.SoftMaskPruning()
    steps = len(train) * FLAGS.epochs
    # One epoch of linear warm-up: ResNet-56 at 0.1 from the first step
    # often stalls near chance for several epochs.
    warmup = min(len(train), steps // 4)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, steps - warmup, warmup_target=FLAGS.learning_rate,
        warmup_steps=warmup,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    # The dataset shuffles itself; `shuffle=True` (the default) on a dataset
    # only earns a warning from Keras.
    model.fit(train, epochs=FLAGS.epochs, validation_data=val, verbose=2,
              shuffle=False, callbacks=[callback])

    # Moving averages lag the last steps' weights (and any late mask
    # change); one cheap pass with the final weights gives their statistics.
    acc_moving = datasets.accuracy(model, val)
    batches = min(50, len(train))
    keras_chex.recalibrate_batchnorm(model, train, batches=batches)
    print(f"BatchNorm statistics re-estimated on {batches} training batches: "
          f"held-out accuracy {acc_moving:.4f} -> "
          f"{datasets.accuracy(model, val):.4f}")

    compact = keras_chex.strip(model)
    widths_png = os.path.join(FLAGS.output_dir, "widths.png")
    try:
        keras_chex.plot_widths(
            callback, widths_png, overwrite=True,
            title=f"ResNet-{FLAGS.depth}, {FLAGS.method.upper()}")
    except ImportError:
        widths_png = None  # matplotlib is an extra: keras-chex[plots].
    model.save(os.path.join(FLAGS.output_dir, "pruning_model.keras"))
    compact.save(os.path.join(FLAGS.output_dir, "compact.keras"))

    dense_count = keras_chex.count_macs(dense)
    compact_count = keras_chex.count_macs(compact)
    acc_wrapped = datasets.accuracy(model, val)
    acc_compact = datasets.accuracy(compact, val)

    sample = x_val[:1].astype("float32") / 255.0
    reports = {}
    for name, net in (("dense", dense), ("compact", compact)):
        path = os.path.join(FLAGS.output_dir, f"{name}.tflite")
        reports[name] = export.export_tflite(net, path, overwrite=True,
                                             sample_input=sample)
    times = {
        name: latency.measure_tflite_latency(r.path, num_threads=1, runs=50)
        for name, r in reports.items()
    }

    goal = (f"{100 * FLAGS.latency:.0f}% of latency" if FLAGS.latency
            is not None else f"{100 * FLAGS.target:.0f}% of MACs")
    print(f"\n== keras-chex CIFAR-10 ResNet-{FLAGS.depth}, "
          f"{FLAGS.method.upper()}, target {goal} ==")
    print(f"{'':10} {'MACs':>12} {'params':>10} {'tflite KB':>10} "
          f"{'latency ms':>11}")
    for name, count in (("dense", dense_count), ("compact", compact_count)):
        print(f"{name:10} {count.macs:>12,} {count.params:>10,} "
              f"{reports[name].size_bytes / 1024:>10.1f} "
              f"{times[name].median_ms:>11.3f}")
    print(f"MACs kept: {compact_count.macs / dense_count.macs:.3f}; "
          f"held-out accuracy: {acc_compact:.4f} (compact) = "
          f"{acc_wrapped:.4f} (pruning model); TFLite max diff vs Keras: "
          f"{reports['compact'].max_abs_diff:.2e}")
    print(f"latency kept: {times['compact'].median_ms / times['dense'].median_ms:.3f}"
          " (LiteRT, 1 thread, median)")
    print("widths per group: " + (widths_png or "not drawn (pip install "
                                   "'keras-chex[plots]' for widths.png)"))
    print(f"total time {time.time() - t0:.0f} s; files in {FLAGS.output_dir}")


if __name__ == "__main__":
    app.run(main)
