"""The whole path for backbones of free spatial size, at a size the user gives.

For each keras.applications backbone built with `input_shape=(None, None,
3)` (random weights, `include_top=False, pooling="avg"`): wrap it for SMCP
with `input_shape=`, keep a random ~70% of the channels, strip, compare
the compact with the wrapped model at *another* size, and export the
compact to TFLite at the given size (verified against Keras), then time the
file with LiteRT. Prints one Markdown row per model.

    python tools/check_free_size.py --models=MobileNetV2,ConvNeXtTiny \\
        --size=224 --threads=1
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import bench_report  # noqa: E402
import keras_chex  # noqa: E402
from keras_chex.deploy import latency  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["MobileNetV2", "ConvNeXtTiny"],
                  "keras.applications constructors.")
flags.DEFINE_integer("size", 224, "Input size to count and export at.")
flags.DEFINE_float("keep", 0.7, "Fraction of channels kept at random.")
flags.DEFINE_integer("threads", 1, "TensorFlow and LiteRT threads.")
flags.DEFINE_string("output_dir", "/tmp/check_free_size",
                    "Where the .tflite files go.")


def check(name):
    shape = (FLAGS.size, FLAGS.size, 3)
    model = getattr(keras.applications, name)(
        include_top=False, weights=None, pooling="avg",
        input_shape=(None, None, 3))
    start = time.time()
    wrapped = keras_chex.soft_mask_prune(model, flops=0.5, input_shape=shape)
    wrap_s = time.time() - start
    rng = np.random.default_rng(0)
    wrapped.masks.assign(rng.random(wrapped.masks.numpy().shape)
                         < FLAGS.keep)
    dense = keras_chex.count_macs(model, input_shape=shape).macs
    kept = keras_chex.count_macs(wrapped).macs / dense
    compact = keras_chex.strip(wrapped)
    other = rng.normal(size=(1, FLAGS.size // 2 + 32, FLAGS.size // 2,
                             3)).astype("float32")
    want = np.asarray(wrapped(other, training=False))
    got = np.asarray(compact(other, training=False))
    strip_diff = float(np.abs(want - got).max() / np.abs(want).max())
    path = os.path.join(FLAGS.output_dir, f"{name}.tflite")
    start = time.time()
    report = keras_chex.export_tflite(wrapped, path, overwrite=True)
    export_s = time.time() - start
    ms = latency.measure_tflite_latency(path, num_threads=FLAGS.threads)
    return [name, f"{dense / 1e9:.2f}", f"{kept:.3f}", f"{strip_diff:.1e}",
            "x".join(map(str, report.inputs[0].shape[1:])),
            f"{report.max_rel_diff:.1e}", f"{ms.median_ms:.1f}",
            f"{wrap_s:.0f}", f"{export_s:.0f}"]


def main(argv):
    del argv
    bench_report.set_threads(FLAGS.threads)
    rows = [check(name) for name in FLAGS.models]
    print(bench_report.command_line(), bench_report.run_header(
        size=FLAGS.size, threads=FLAGS.threads))
    print(bench_report.markdown_table(
        ["model", "dense GMACs", "MACs kept", "strip diff (other size)",
         "TFLite input", "TFLite vs Keras", "LiteRT ms", "wrap s",
         "export s"], rows))


if __name__ == "__main__":
    app.run(main)
