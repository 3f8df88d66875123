"""Prunes a trained keras-hub DeepLabV3 segmenter to a MACs budget with SMCP.

A small, download-free segmentation task: synthetic 64x64 images with
filled circles (class 1) and squares (class 2) of random colours, sizes
and places on a noisy background of random colour (class 0). The tool

1. trains a dense `keras_hub.models.DeepLabV3ImageSegmenter` (a small
   ResNet encoder, its atrous spatial pyramid pooling and decoder) for
   `--epochs`;
2. prunes it with `keras_chex.soft_mask_prune(model, flops=--flops)` while
   fine-tuning `--finetune_epochs` (the pyramid pooling is a layer made of
   layers, opened by keras-chex, so its convolutions are pruned too);
3. strips it, exports both models to TFLite (verified), and reports the
   held-out mean IoU of dense, just-wrapped and compact models and of the
   dense model trained the same extra epochs without pruning (the
   baseline), the MACs, and the LiteRT latency of both files (1 thread,
   best of 5 rounds).

    python tools/segmentation_finetune.py --output=docs/results/segmentation25.jsonl

Appends one JSON line to `--output`. Runs on one CPU core in a few
minutes.
"""

import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_report  # noqa: E402
import keras_chex  # noqa: E402

FLAGS = flags.FLAGS
CLASSES = 3
SIZE = 64


def define_flags():
    """The command's flags, defined when run as a script only: tests import
    the module's functions."""
    flags.DEFINE_integer("train_images", 2000, "Synthetic training images.")
    flags.DEFINE_integer("val_images", 400, "Held-out synthetic images.")
    flags.DEFINE_integer("epochs", 12, "Dense training epochs.")
    flags.DEFINE_integer("finetune_epochs", 4, "Pruning fine-tune epochs.")
    flags.DEFINE_float("flops", 0.5, "Fraction of the MACs to keep.")
    flags.DEFINE_integer("seed", 0, "Seed of data, weights and masks.")
    flags.DEFINE_integer("threads", 1, "TensorFlow threads (0: default).")
    flags.DEFINE_string("output", None, "Append one JSON line here.")


def shapes_dataset(n, seed, size=SIZE):
    """`n` synthetic images (float32 in [0, 1]) and their label maps."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.empty((n, size, size, 3), np.float32)
    labels = np.zeros((n, size, size), np.int32)
    for i in range(n):
        image = rng.uniform(0, 1, 3) * np.ones((size, size, 3))
        image += rng.normal(0, 0.08, (size, size, 3))
        for _ in range(rng.integers(1, 4)):
            cls = rng.integers(1, CLASSES)
            r = rng.integers(5, 14)
            cy, cx = rng.integers(r, size - r, 2)
            if cls == 1:
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                inside = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
            image[inside] = rng.uniform(0, 1, 3)
            labels[i][inside] = cls
        images[i] = np.clip(image, 0, 1)
    return images, labels


def segmenter(seed):
    """A small DeepLabV3 on a ResNet encoder (keras-hub constructors)."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    encoder = keras_hub.models.ResNetBackbone(
        # keras-hub wants 64 filters in the first stack (and the stem, for
        # basic blocks).
        input_conv_filters=[64], input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 32, 32], stackwise_num_blocks=[1, 1, 1],
        stackwise_num_strides=[1, 2, 2], block_type="basic_block",
        image_shape=(SIZE, SIZE, 3))
    backbone = keras_hub.models.DeepLabV3Backbone(
        image_encoder=encoder, low_level_feature_key="P2",
        spatial_pyramid_pooling_key="P4", dilation_rates=[2, 4],
        upsampling_size=4, projection_filters=32,
        image_shape=(SIZE, SIZE, 3))
    return keras_hub.models.DeepLabV3ImageSegmenter(backbone=backbone,
                                                    num_classes=CLASSES)


def mean_iou(model, images, labels, batch_size=50):
    """Mean over classes of intersection over union on `images`."""
    predicted = np.argmax(model.predict(images, batch_size=batch_size,
                                        verbose=0), -1)
    ious = []
    for c in range(CLASSES):
        union = np.sum((predicted == c) | (labels == c))
        if union:
            ious.append(np.sum((predicted == c) & (labels == c)) / union)
    return float(np.mean(ious))


def _compile(model, lr):
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[])  # keras-hub's default metrics do not fit label maps.


def _latency_ms(model, path, rounds=5):
    from keras_chex.deploy import latency

    report = keras_chex.export_tflite(model, path)
    best = min(latency.measure_tflite_latency(path, runs=50,
                                              warmup=5).min_ms
               for _ in range(rounds))
    return best, report.max_abs_diff


def run(train, val, *, epochs, finetune_epochs, flops, seed,
        batch_size=32):
    """Trains, prunes, strips and exports; returns the result dict."""
    (x, y), (xv, yv) = train, val
    dense = segmenter(seed)
    _compile(dense, 2e-3)
    start = time.time()
    dense.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=2)
    train_seconds = time.time() - start
    result = {"dense_miou": mean_iou(dense, xv, yv),
              "dense_macs": keras_chex.count_macs(dense).macs,
              "train_seconds": train_seconds}

    wrapped = keras_chex.soft_mask_prune(dense, flops=flops, seed=seed)
    result["wrapped_miou"] = mean_iou(wrapped, xv, yv)
    _compile(wrapped, 5e-4)
    start = time.time()
    wrapped.fit(x, y, batch_size=batch_size, epochs=finetune_epochs,
                verbose=2, callbacks=[keras_chex.SoftMaskPruning()])
    result["finetune_seconds"] = time.time() - start
    compact = keras_chex.strip(wrapped)
    result["compact_miou"] = mean_iou(compact, xv, yv)
    result["compact_macs"] = keras_chex.count_macs(compact).macs
    result["macs_fraction"] = result["compact_macs"] / result["dense_macs"]
    result["groups"] = len(keras_chex.channel_groups(wrapped))
    # The baseline: the dense model (untouched by wrapping) trained the
    # same extra epochs at the same rate, without pruning.
    _compile(dense, 5e-4)
    dense.fit(x, y, batch_size=batch_size, epochs=finetune_epochs, verbose=2)
    result["dense_more_miou"] = mean_iou(dense, xv, yv)
    with tempfile.TemporaryDirectory() as tmp:
        for label, model in (("dense", dense), ("compact", compact)):
            ms, diff = _latency_ms(model, os.path.join(tmp, f"{label}.tflite"))
            result[f"{label}_latency_ms"] = ms
            result[f"{label}_tflite_max_diff"] = diff
    result["latency_fraction"] = (result["compact_latency_ms"]
                                  / result["dense_latency_ms"])
    return result


def main(argv):
    del argv
    bench_report.set_threads(FLAGS.threads)
    train = shapes_dataset(FLAGS.train_images, FLAGS.seed)
    val = shapes_dataset(FLAGS.val_images, FLAGS.seed + 1000)
    result = run(train, val, epochs=FLAGS.epochs,
                 finetune_epochs=FLAGS.finetune_epochs, flops=FLAGS.flops,
                 seed=FLAGS.seed)
    result.update(seed=FLAGS.seed, flops_target=FLAGS.flops,
                  epochs=FLAGS.epochs, finetune_epochs=FLAGS.finetune_epochs,
                  train_images=FLAGS.train_images,
                  val_images=FLAGS.val_images,
                  cpu=bench_report.cpu_model(), machine=platform.machine(),
                  keras=keras.__version__)
    print(json.dumps(result))
    if FLAGS.output:
        with open(FLAGS.output, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    define_flags()
    app.run(main)
