"""Pruning methods vs. baselines on real CIFAR-10, same epochs, seed and data.

Variants (all ResNet-`depth`, SGD + momentum, cosine learning rate):
  dense     the unpruned model;
  narrow    a uniformly narrower model with about the same MACs as the target,
            trained from scratch;
  narrow_wideinit  narrow, each kernel scaled to the spread of the dense
            layer's initialisation (what a network pruned at init keeps)
  fixed     the initial CHEX masks (uniform, by filter L1 norm) fixed for the
            whole run: no exploration;
  noregrow  CHEX's initial masks (at S - delta0) and exploration steps with
            regrowth 0: one global re-allocation and prune to the target,
            nothing comes back;
  chex      CHEX;
  chex8     CHEX with widths in multiples of 8;
  chex16    CHEX with widths in multiples of 16 (XNNPACK's blocking);
  chex_knapsack  CHEX re-allocating widths with the shared knapsack;
  chex_merit  CHEX with pruned channels ranked by their last-used |gamma|
            (`pruned_importance="last"`: a layer can widen on merit);
  chex_streams  CHEX keeping residual streams whole (`streams="keep"`);
  chex_slim<x>  CHEX with an L1 pressure x on |gamma| (`gamma_l1=x`);
  chex_regrow<x>, chex_interval<x>, chex_until<x>  CHEX with regrowth
            fraction delta0 = x, explorations every x epochs, or
            explorations only until x of the training;
  smcp      SMCP at `--latency` of the dense LiteRT latency, priced by a
            latency table measured on this machine (`--latency_table`,
            built there if missing);
  smcp_flops  SMCP at `--flops` of the dense MACs;
  chex_latency, frs_latency  CHEX and FRS at `--latency`, priced by the
            same table (CHEX through the shared knapsack allocator).
With `--measure_latency`, every final model is exported to TFLite and timed
with LiteRT (1 thread, fastest of interleaved rounds), next to the table's
prediction.
Held-out accuracy is measured on the stripped (compact) model for the pruned
variants, on the last `--val_per_class` images of each class.

    python tools/benchmark_chex.py --data=../shared/data/cifar10/train.zip \
        --epochs=15 --train_per_class=1000 --output=runs/chex_bench.jsonl
"""

import json
import os
import platform
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import baselines  # noqa: E402
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
flags.DEFINE_float("warmup_epochs", 0.0,
                   "Linear learning-rate warm-up from 0 (epochs); ResNet-56 "
                   "at 0.1 from the first step sits near chance for epochs.")
flags.DEFINE_list("variants", ["dense", "narrow", "fixed", "noregrow", "chex"],
                  "Which variants to run, in order.")
flags.DEFINE_float("latency", 0.5, "SMCP: fraction of dense latency to keep.")
flags.DEFINE_string("latency_table", None,
                    "SMCP latency table JSON (default: "
                    "runs/resnet<depth>_latency.json).")
flags.DEFINE_boolean("measure_latency", False,
                     "Export each final model and time it with LiteRT.")
flags.DEFINE_string("save_dir", None,
                    "Save each final (compact) model here as "
                    "<variant>_seed<seed>.keras, to time them all later in "
                    "one quiet pass (tools/time_models.py).")
flags.DEFINE_integer("seed", 0, "Seed shared by all variants.")
flags.DEFINE_integer("recalibrate_batches", 0,
                     "Re-estimate the BatchNorm statistics of every pruned "
                     "variant on this many training batches when its fit "
                     "ends (`RecalibrateBatchNorm`; 0: off, as the runs "
                     "before issue 21).")
flags.DEFINE_string("output", None, "Append one JSON line per variant here.")
flags.DEFINE_integer("threads", 0,
                     "TensorFlow intra- and inter-op threads (0: TensorFlow's "
                     "default). "
                     "Two 1-thread runs side by side use a 2-core machine "
                     "~1.3x better than one 2-thread run.")


def chex_options(name):
    """prune_and_regrow arguments of a CHEX variant or ablation.

    "chex" is the default; "fixed" regrows nothing and is never explored;
    "chex8" and "chex16" round widths to 8 and 16; "chex_regrow<x>" and
    "chex_interval<x>" change delta0 and the exploration interval;
    "chex_until<x>" ends the explorations at x of the training;
    "chex_min<x>" sets min_channels (a fraction of each group's size);
    "chex_knapsack" re-allocates widths with the shared knapsack (cost
    per group) instead of the global |gamma| threshold; "chex_uniform"
    keeps the same fraction of every group; "chex_merit" ranks
    pruned channels by their last-used |gamma|; "chex_streams" keeps the
    residual streams whole; "chex_slim<x>" adds an L1 pressure x on |gamma|.
    """
    options = {"regrow": 0.3, "interval": FLAGS.interval}
    if name == "fixed":
        options["regrow"] = 0.0
    elif name in ("chex8", "chex16"):
        options["round_to"] = int(name[len("chex"):])
    elif name.startswith("chex_regrow"):
        options["regrow"] = float(name[len("chex_regrow"):])
    elif name.startswith("chex_interval"):
        options["interval"] = float(name[len("chex_interval"):])
    elif name.startswith("chex_until"):
        options["until"] = float(name[len("chex_until"):])
    elif name.startswith("chex_min"):
        options["min_channels"] = float(name[len("chex_min"):])
    elif name == "chex_knapsack":
        options["allocator"] = "knapsack"
    elif name == "chex_uniform":
        options["allocator"] = "uniform"
    elif name == "chex_merit":
        options["pruned_importance"] = "last"
    elif name == "chex_streams":
        options["streams"] = "keep"
    elif name.startswith("chex_slim"):
        options["gamma_l1"] = float(name[len("chex_slim"):])
    elif name not in ("chex", "noregrow"):
        raise app.UsageError(f"Unknown variant {name!r}.")
    return options


def wide_init_scale(narrow, dense):
    """Scales each kernel of `narrow` to the spread the same layer has in
    `dense` (He-normal: std ~ 1/sqrt(fan-in)), as a network pruned from
    `dense` at initialisation keeps it: the control that tells a pruned
    start's initial scale from its choice of filters."""
    for layer in narrow.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            continue
        fan_in = np.prod(kernel.shape[:-1])
        dense_fan_in = np.prod(dense.get_layer(layer.name).kernel.shape[:-1])
        if isinstance(layer, keras.layers.Dense):  # Glorot: fan-in + out.
            fan_in, dense_fan_in = (fan_in + kernel.shape[-1],
                                    dense_fan_in + kernel.shape[-1])
        kernel.assign(kernel * np.sqrt(fan_in / dense_fan_in))


def run_variant(name, train, val, steps):
    keras.utils.set_random_seed(FLAGS.seed)
    dense = cifar_resnet.cifar_resnet(FLAGS.depth, weight_decay=5e-4)
    dense_macs = keras_chex.count_macs(dense).macs
    callbacks = []
    if name == "dense":
        model = dense
    elif name in ("narrow", "narrow_wideinit"):
        widths = baselines.narrow_widths(FLAGS.flops * dense_macs, FLAGS.depth)
        model = cifar_resnet.cifar_resnet(FLAGS.depth, widths=widths,
                                          weight_decay=5e-4)
        if name == "narrow_wideinit":
            wide_init_scale(model, dense)
    elif name in ("smcp", "smcp_flops"):
        target = ({"latency": FLAGS.latency, "cost_table": latency_table()}
                  if name == "smcp" else {"flops": FLAGS.flops})
        model = keras_chex.soft_mask_prune(dense, seed=FLAGS.seed, **target)
        callbacks = [keras_chex.SoftMaskPruning()]
    elif name in ("frs", "l1", "frs_latency"):
        target = ({"latency": FLAGS.latency, "cost_table": latency_table()}
                  if name == "frs_latency" else {"flops": FLAGS.flops})
        model = keras_chex.relevance_prune(
            dense, **target, interval=FLAGS.interval,
            seed=FLAGS.seed, criterion="l1" if name == "l1" else "relevance")
        # Scored on the first batches of the (shuffled) training data.
        callbacks = [keras_chex.RelevancePruning(train, verbose=1)]
    elif name == "chex_latency":
        model = keras_chex.prune_and_regrow(
            dense, latency=FLAGS.latency, cost_table=latency_table(),
            seed=FLAGS.seed, **chex_options("chex"))
        callbacks = [keras_chex.ChannelExploration(verbose=1)]
    else:
        model = keras_chex.prune_and_regrow(
            dense, flops=FLAGS.flops, seed=FLAGS.seed,
            **chex_options(name))
        if name == "noregrow":
            # Ablation only: same start as CHEX, but the callback's schedule
            # regrows nothing (the initial masks are already set).
            config = dict(model.pruning_config, regrow=0.0)
            model._pruning_config_json = json.dumps(config)
            state = model.pruning_state
            state._plain["config"] = state.config.replace(regrow=0.0)
        if name != "fixed":
            callbacks = [keras_chex.ChannelExploration(verbose=1)]
    if FLAGS.recalibrate_batches and keras_chex.is_wrapped(model):
        callbacks.append(keras_chex.RecalibrateBatchNorm(
            train, batches=FLAGS.recalibrate_batches))
    warmup = round(FLAGS.warmup_epochs * steps)
    # With warmup_steps=0 this is the plain cosine from 0.1 (same values).
    lr = keras.optimizers.schedules.CosineDecay(
        0.0, steps * FLAGS.epochs - warmup, warmup_target=0.1,
        warmup_steps=warmup)
    model.compile(
        optimizer=keras.optimizers.SGD(lr, momentum=0.9, nesterov=True),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.time()
    model.fit(train, epochs=FLAGS.epochs, verbose=2, shuffle=False,
              callbacks=callbacks)
    fit_seconds = time.time() - start
    final = keras_chex.strip(model) if keras_chex.is_wrapped(model) else model
    timing = measure_latency(final, dense) if FLAGS.measure_latency else {}
    if FLAGS.save_dir:
        os.makedirs(FLAGS.save_dir, exist_ok=True)
        final.save(os.path.join(FLAGS.save_dir,
                                f"{name}_seed{FLAGS.seed}.keras"))
    return {
        **timing,
        "variant": name,
        "val_accuracy": datasets.accuracy(final, val),
        "macs": keras_chex.count_macs(final).macs,
        "macs_fraction": keras_chex.count_macs(final).macs / dense_macs,
        "params": keras_chex.count_macs(final).params,
        "fit_seconds": fit_seconds,
        "seconds_per_epoch": fit_seconds / FLAGS.epochs,
        "seed": FLAGS.seed,
        "depth": FLAGS.depth,
        "flops_target": FLAGS.flops,
        "warmup_epochs": FLAGS.warmup_epochs,
        "recalibrate_batches": FLAGS.recalibrate_batches,
        # The method's own stored arguments, so a line says what ran.
        "pruning_config": (model.pruning_config
                           if keras_chex.is_wrapped(model) else None),
        "conv_filters": [layer.filters for layer in final.layers
                         if isinstance(layer, keras.layers.Conv2D)],
    }


def latency_table():
    path = FLAGS.latency_table or os.path.join(
        "runs", f"resnet{FLAGS.depth}_latency.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    keras.utils.set_random_seed(FLAGS.seed)
    return keras_chex.build_latency_table(
        cifar_resnet.cifar_resnet(FLAGS.depth), path, threads=1)


_DENSE_TFLITE = {}


def measure_latency(final, dense, rounds=5):
    """LiteRT 1-thread latency of `final` and of the dense model (ms).

    Every variant of a run has the same dense architecture, and weights do
    not change a float model's latency, so the dense model is exported
    once; it is still timed in turn with each compact."""
    from keras_chex.deploy import latency

    if "path" not in _DENSE_TFLITE:
        _DENSE_TFLITE["dir"] = tempfile.TemporaryDirectory()
        _DENSE_TFLITE["path"] = os.path.join(_DENSE_TFLITE["dir"].name,
                                             "dense.tflite")
        keras_chex.export_tflite(dense, _DENSE_TFLITE["path"], verify=False)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, "final.tflite"), _DENSE_TFLITE["path"]]
        keras_chex.export_tflite(final, paths[0], verify=False)
        best = [float("inf")] * 2
        for _ in range(rounds):
            for i, p in enumerate(paths):
                best[i] = min(best[i], latency.measure_tflite_latency(
                    p, num_threads=1, runs=100, warmup=10).min_ms)
    out = {"latency_ms": best[0], "dense_latency_ms": best[1],
           "latency_fraction": best[0] / best[1]}
    table_path = FLAGS.latency_table or os.path.join(
        "runs", f"resnet{FLAGS.depth}_latency.json")
    if os.path.exists(table_path):
        table = keras_chex.LatencyTable.load(table_path)
        out["predicted_ms"] = table.predict(final)
    return out


def main(argv):
    del argv
    bench_report.set_threads(FLAGS.threads)
    (x, y), (xv, yv) = datasets.load_cifar10(
        FLAGS.data, validation_per_class=FLAGS.val_per_class)
    x, y = datasets.first_per_class(x, y, FLAGS.train_per_class)
    train = datasets.make_dataset(x, y, FLAGS.batch_size, training=True,
                                  seed=FLAGS.seed)
    val = datasets.make_dataset(xv, yv, 500, training=False)
    steps = len(train)
    header = bench_report.run_header(
        command="python tools/benchmark_chex.py " + " ".join(
            f"--{k}={getattr(FLAGS, k)}" for k in (
                "data", "train_per_class", "depth", "epochs", "flops",
                "latency", "interval", "warmup_epochs", "seed", "threads")),
        machine=platform.processor() or platform.machine(),
        train_images=len(x),
        val_images=len(xv),
    )
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
