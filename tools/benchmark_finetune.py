"""Compressing a trained model: each method fine-tunes a trained ResNet.

Two stages, so the expensive one runs once and later sessions reuse it:

  --stage=pretrain   trains the dense ResNet-`depth` for `--pretrain_epochs`
                     (E0) on `--train_per_class` images of each class and
                     saves it as <run_dir>/resnet<depth>_dense.keras
                     (resumable: a backup is kept while it trains);
  --stage=finetune   starts every variant from that checkpoint and trains it
                     `--finetune_epochs` (K, default E0 / 5) more epochs;
  --stage=latency    exports every saved compact of `--depth` and `--flops`
                     and the dense checkpoint to TFLite and times them with
                     LiteRT (1 thread, interleaved rounds): one line each,
                     with the median latency as a fraction of dense.

Fine-tune variants (held-out accuracy on the stripped compact):
  dense       the trained model, K more epochs;
  narrow_K    a uniformly narrow model with the target's MACs, trained from
              scratch for K epochs;
  narrow_E0K  the same, for E0 + K epochs (the same total compute);
  chex, smcp, frs   each method wrapping the trained model, K epochs;
  l1          one-shot L1-norm pruning (every group cut by the same share,
              largest filter L1 norms kept), stripped at once, then K
              epochs of plain fine-tuning (Torch-Pruning's L1 recipe);
  any name + "_kd"  the same, trained as the student of a
              `keras.distillation.Distiller` whose teacher is the trained
              dense model (`LogitsDistillation` with `KLDivergence()` at
              `--temperature`, weighted `--alpha` against the labels).
Each line also holds the held-out accuracy right after wrapping and after
every epoch (so after each pruning step's epoch).

    python tools/benchmark_finetune.py --stage=pretrain \\
        --data=../shared/data/cifar10/train.zip --train_per_class=2000 \\
        --pretrain_epochs=30 --threads=1
    python tools/benchmark_finetune.py --stage=finetune \\
        --data=../shared/data/cifar10/train.zip --train_per_class=2000 \\
        --pretrain_epochs=30 --variants=chex,chex_kd --flops=0.5 --seed=0 \\
        --threads=1 --output=docs/results/finetune22.jsonl
"""

import json
import os
import re
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import baselines  # noqa: E402
import bench_report  # noqa: E402
import keras_chex  # noqa: E402
from keras_chex.deploy import latency  # noqa: E402
from keras_chex.cifar import data as datasets  # noqa: E402
from keras_chex.cifar import resnet as cifar_resnet  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("stage", "finetune", ["pretrain", "finetune", "latency"],
                  "Which stage to run.")
flags.DEFINE_integer("latency_rounds", 5,
                     "--stage=latency: interleaved rounds of 50 timed runs "
                     "each (1 thread).")
flags.DEFINE_string("data", None, "CIFAR-10 train.zip (default: sample).")
flags.DEFINE_integer("train_per_class", 2000,
                     "Training images per class (0: all but the held out).")
flags.DEFINE_integer("val_per_class", 500, "Held-out images per class.")
flags.DEFINE_integer("depth", 20, "ResNet depth.")
flags.DEFINE_integer("pretrain_epochs", 30, "E0: epochs of pre-training.")
flags.DEFINE_integer("finetune_epochs", None,
                     "K: epochs of fine-tuning (default E0 / 5).")
flags.DEFINE_float("finetune_lr", 0.01,
                   "Peak learning rate of the fine-tune (cosine to 0).")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_float("flops", 0.5, "Fraction of dense MACs to keep.")
flags.DEFINE_list("variants", ["dense", "chex", "smcp", "frs"],
                  "Fine-tune variants, in order.")
flags.DEFINE_float("temperature", 4.0, "Distillation temperature.")
flags.DEFINE_float("alpha", 0.5,
                   "Weight of the label loss against the distillation loss.")
flags.DEFINE_integer("seed", 0, "Seed of the fine-tune (data order, masks).")
flags.DEFINE_string("options", None,
                    "JSON object of extra arguments for the method's entry "
                    "point, e.g. '{\"importance\": \"magnitude\"}' for "
                    "SMCP (recorded with each result).")
flags.DEFINE_string("run_dir", "runs/finetune22",
                    "Checkpoints, backups and saved compacts go here.")
flags.DEFINE_string("output", None, "Append one JSON line per variant here.")
flags.DEFINE_integer("threads", 0,
                     "TensorFlow threads (0: TensorFlow's default).")

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def checkpoint_path():
    return os.path.join(FLAGS.run_dir, f"resnet{FLAGS.depth}_dense.keras")


def sgd(peak, steps, warmup=0):
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, steps - warmup, warmup_target=peak, warmup_steps=warmup)
    return keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True)


def pretrain(train, val):
    keras.utils.set_random_seed(0)
    model = cifar_resnet.cifar_resnet(FLAGS.depth, weight_decay=5e-4)
    steps = len(train) * FLAGS.pretrain_epochs
    model.compile(optimizer=sgd(0.1, steps, warmup=len(train)), loss=LOSS,
                  metrics=["accuracy"])
    backup = os.path.join(FLAGS.run_dir, f"pretrain_backup_{FLAGS.depth}")
    start = time.time()
    model.fit(train, epochs=FLAGS.pretrain_epochs, verbose=2, shuffle=False,
              callbacks=[keras.callbacks.BackupAndRestore(backup)])
    seconds = time.time() - start
    model.save(checkpoint_path())
    return {
        "variant": "pretrain",
        "val_accuracy": datasets.accuracy(model, val),
        "macs": keras_chex.count_macs(model).macs,
        "fit_seconds": seconds,
        "seconds_per_epoch": seconds / FLAGS.pretrain_epochs,
        "checkpoint": checkpoint_path(),
    }


def main(argv):
    del argv
    bench_report.set_threads(FLAGS.threads)
    os.makedirs(FLAGS.run_dir, exist_ok=True)
    (x, y), (xv, yv) = datasets.load_cifar10(
        FLAGS.data, validation_per_class=FLAGS.val_per_class)
    x, y = datasets.first_per_class(x, y, FLAGS.train_per_class)
    # The pre-training's data order is fixed; the fine-tune's follows --seed.
    seed = 0 if FLAGS.stage == "pretrain" else FLAGS.seed
    train = datasets.make_dataset(x, y, FLAGS.batch_size, training=True,
                                  seed=seed)
    val = datasets.make_dataset(xv, yv, 500, training=False)
    header = bench_report.run_header(
        command=bench_report.command_line(), train_images=len(x),
        val_images=len(xv), date=time.strftime("%Y-%m-%d"))
    lines = [header]
    print(json.dumps(header), flush=True)
    if FLAGS.stage == "pretrain":
        results = [pretrain(train, val)]
    elif FLAGS.stage == "latency":
        results = latency_lines()
    else:
        results = (finetune(name, train, val) for name in FLAGS.variants)
    for result in results:
        for key, value in (("seed", seed), ("depth", FLAGS.depth),
                           ("train_images", len(x))):
            result.setdefault(key, value)
        print(json.dumps(result), flush=True)
        lines.append(result)
        if FLAGS.output:
            with open(FLAGS.output, "a") as f:
                for line in lines:
                    f.write(json.dumps(line) + "\n")
            lines = []


class HeldOutAccuracy(keras.callbacks.Callback):
    """Held-out accuracy of `model` after every epoch (the pruned model
    with its current masks, the student inside a Distiller)."""

    def __init__(self, model, val):
        super().__init__()
        self.target, self.val, self.values = model, val, []

    def on_epoch_end(self, epoch, logs=None):
        self.values.append(datasets.accuracy(self.target, self.val))


def _options_tag(options):
    """`[key=value]...` for file names, as `chex_results.py` lists them."""
    return "".join(f"[{k}={v}]" for k, v in sorted(options.items()))


MODEL_FILE = re.compile(r"r(\d+)_(.+)_f([\d.]+)_seed(\d+)\.keras$")


def latency_lines():
    """Measured LiteRT latency of every saved compact of this depth and
    `--flops` (and the dense checkpoint), as result lines."""
    files = sorted(
        f for f in os.listdir(os.path.join(FLAGS.run_dir, "models"))
        if (m := MODEL_FILE.match(f)) and int(m.group(1)) == FLAGS.depth
        and float(m.group(3)) == FLAGS.flops)
    paths = {"checkpoint": checkpoint_path()}
    paths.update({f: os.path.join(FLAGS.run_dir, "models", f)
                  for f in files})
    tflite_dir = os.path.join(FLAGS.run_dir, "tflite")
    os.makedirs(tflite_dir, exist_ok=True)
    tflite = {}
    for key, path in paths.items():
        tflite[key] = os.path.join(tflite_dir, os.path.basename(path)
                                   .replace(".keras", ".tflite"))
        keras_chex.export_tflite(keras.saving.load_model(path), tflite[key],
                                 overwrite=True)
    rounds = {key: [] for key in tflite}
    order = list(tflite)
    for r in range(FLAGS.latency_rounds):
        for key in (order if r % 2 == 0 else order[::-1]):
            rounds[key].append(latency.measure_tflite_latency(
                tflite[key], num_threads=1, runs=50).median_ms)
    dense = rounds["checkpoint"]
    lines = []
    for f in files:
        m = MODEL_FILE.match(f)
        ratios = [a / b for a, b in zip(rounds[f], dense)]
        lines.append({
            "stage": "latency", "file": f, "variant": m.group(2),
            "seed": int(m.group(4)), "flops_target": FLAGS.flops,
            "median_ms": statistics.median(rounds[f]),
            "dense_ms": statistics.median(dense),
            "latency_fraction": statistics.median(ratios)})
    return lines


def finetune(name, train, val):
    keras.utils.set_random_seed(FLAGS.seed)
    epochs = FLAGS.finetune_epochs or FLAGS.pretrain_epochs // 5
    base, distill = (name[:-3], True) if name.endswith("_kd") else (
        name, False)
    if base.startswith("narrow"):
        # From scratch: needs only the dense model's MACs, not the
        # checkpoint, so it can run while the pre-training does.
        trained = None
        dense_macs = keras_chex.count_macs(
            cifar_resnet.cifar_resnet(FLAGS.depth)).macs
    else:
        trained = keras.saving.load_model(checkpoint_path())
        dense_macs = keras_chex.count_macs(trained).macs
    peak, warmup = FLAGS.finetune_lr, 0
    callbacks = []
    options = json.loads(FLAGS.options) if FLAGS.options else {}
    if options and base not in ("chex", "smcp", "frs"):
        raise app.UsageError(f"--options are for chex, smcp and frs, not "
                             f"{name!r}")
    if base == "dense":
        model = trained
    elif base.startswith("narrow"):
        if base == "narrow_E0K":
            epochs += FLAGS.pretrain_epochs
        model = cifar_resnet.cifar_resnet(
            FLAGS.depth,
            widths=baselines.narrow_widths(FLAGS.flops * dense_macs,
                                           FLAGS.depth),
            weight_decay=5e-4)
        peak, warmup = 0.1, len(train)  # From scratch, as pre-trained.
    elif base == "chex":
        model = keras_chex.prune_and_regrow(trained, flops=FLAGS.flops,
                                            seed=FLAGS.seed, **options)
        callbacks = [keras_chex.ChannelExploration(verbose=1)]
    elif base == "l1":
        # The one-shot recipe: `prune_once` (every group cut by the same
        # share, largest filter L1 norms kept), then K epochs of plain
        # fine-tuning, which re-estimates the BatchNorm statistics.
        model = keras_chex.prune_once(trained, flops=FLAGS.flops)
    elif base == "smcp":
        model = keras_chex.soft_mask_prune(trained, flops=FLAGS.flops,
                                           seed=FLAGS.seed, **options)
        callbacks = [keras_chex.SoftMaskPruning(verbose=1)]
    elif base == "frs":
        model = keras_chex.relevance_prune(trained, flops=FLAGS.flops,
                                           seed=FLAGS.seed, **options)
        callbacks = [keras_chex.RelevancePruning(train, verbose=1)]
    else:
        raise app.UsageError(f"unknown variant {name!r}")
    wrapped_accuracy = datasets.accuracy(model, val)
    trainer = model
    if distill:
        teacher = keras.saving.load_model(checkpoint_path())
        trainer = keras.distillation.Distiller(
            teacher=teacher, student=model,
            distillation_losses=keras.distillation.LogitsDistillation(
                temperature=FLAGS.temperature,
                loss=keras.losses.KLDivergence()),
            student_loss_weight=FLAGS.alpha)
    trainer.compile(optimizer=sgd(peak, len(train) * epochs, warmup),
                    loss=LOSS, metrics=["accuracy"])
    tracker = HeldOutAccuracy(model, val)
    if keras_chex.is_wrapped(model):
        callbacks.append(keras_chex.RecalibrateBatchNorm(train, batches=50))
    start = time.time()
    trainer.fit(train, epochs=epochs, verbose=2, shuffle=False,
                callbacks=callbacks + [tracker])
    seconds = time.time() - start
    final = keras_chex.strip(model) if keras_chex.is_wrapped(model) else model
    os.makedirs(os.path.join(FLAGS.run_dir, "models"), exist_ok=True)
    final.save(os.path.join(
        FLAGS.run_dir, "models",
        f"r{FLAGS.depth}_{name}{_options_tag(options)}_f{FLAGS.flops:g}"
        f"_seed{FLAGS.seed}.keras"))
    return {
        "variant": name,
        "flops_target": FLAGS.flops,
        "epochs": epochs,
        "distill": distill,
        "options": options,
        "temperature": FLAGS.temperature if distill else None,
        "alpha": FLAGS.alpha if distill else None,
        "distillation_loss": "KLDivergence()" if distill else None,
        "accuracy_after_wrapping": wrapped_accuracy,
        "accuracy_per_epoch": tracker.values,
        "val_accuracy": datasets.accuracy(final, val),
        "macs_fraction": keras_chex.count_macs(final).macs / dense_macs,
        "fit_seconds": seconds,
        "conv_filters": [layer.filters for layer in final.layers
                         if isinstance(layer, keras.layers.Conv2D)],
    }


if __name__ == "__main__":
    app.run(main)
