r"""Benchmark of the keras-chex core: analysis, wrapping, stripping, training.

Prints Markdown tables (ready for `docs/benchmarks.md`) of:

1. The time to analyse (`keras_chex.channel_groups`), wrap (`keras_chex.wrap`),
   set random 50% masks on every group, and strip (`keras_chex.strip`)
   ImageNet-size `keras.applications` models: median of `--repeats` timed
   runs after one untimed warm-up run.
2. The per-step training time of a CIFAR ResNet (`cifar_resnet`) unwrapped,
   wrapped with all-ones masks and wrapped with 50% masks (with masks
   folded into BatchNorms, the default, and without), trained with
   `model.fit` (SGD with momentum) on pre-made CIFAR-10 batches. Every model
   is warmed up by one untimed epoch (tracing, compilation); then the models
   are run in interleaved rounds (A B C, C B A, A B C, ...) of one
   `--train_steps`-step epoch each, so that the load of a shared machine
   hits all of them alike. A round's value is the median time between the
   ends of consecutive steps (the first step of each epoch, which also
   creates the data iterator, is left out). The table gives the median over
   rounds and its ratio to the unwrapped model as the median of the
   per-round ratios (paired, robust to load drifting between rounds). It
   also gives the CPU time of the process per step (all threads, from
   `time.process_time`), which other processes on a shared machine disturb
   much less than wall time, with its paired ratio.
   With `--jit` the unwrapped and wrapped models are also timed compiled
   with XLA (`jit_compile=True`).

The batches are made once by `keras_chex.cifar.data.make_dataset` (standard
augmentation) and then replayed from memory, so the input pipeline does not
compete with training for the CPU and the ratio measures the models alone.

Usage:

```
python tools/benchmark_core.py    # ~6 min of CPU; 11-12 min wall on 2 busy cores
python tools/benchmark_core.py --repeats=1 --train_rounds=2 --train_steps=4
python tools/benchmark_core.py --data=full             # batches of train.zip
python tools/benchmark_core.py --nojit --core_models=ResNet50
```
"""

import os
import statistics
import sys
import time
import warnings

from absl import app
from absl import flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

_CORE_MODELS = flags.DEFINE_list(
    "core_models",
    ["ResNet50", "EfficientNetB0"],
    "keras.applications models to analyse, wrap and strip (weights=None). "
    "Empty to skip this part.",
)
_REPEATS = flags.DEFINE_integer(
    "repeats", 5, "Timed repeats of analyse/wrap/strip (after one warm-up)."
)
_KEEP = flags.DEFINE_float(
    "keep", 0.5, "Fraction of channels kept by the random masks."
)
_TRAIN = flags.DEFINE_bool("train", True, "Run the training benchmark.")
_DEPTH = flags.DEFINE_integer("depth", 20, "Depth of the CIFAR ResNet.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Training batch size.")
_TRAIN_ROUNDS = flags.DEFINE_integer(
    "train_rounds", 7, "Interleaved timed rounds (one epoch per model each)."
)
_TRAIN_STEPS = flags.DEFINE_integer(
    "train_steps", 12, "steps_per_epoch of each timed epoch."
)
_WARMUP_STEPS = flags.DEFINE_integer(
    "warmup_steps", 3, "steps_per_epoch of the untimed warm-up epoch."
)
_NUM_BATCHES = flags.DEFINE_integer(
    "num_batches", 8, "Distinct batches made once and replayed."
)
_JIT = flags.DEFINE_bool(
    "jit", True, "Also time unwrapped and wrapped with jit_compile=True."
)
_DATA = flags.DEFINE_enum(
    "data",
    "sample",
    ["sample", "full", "synthetic"],
    "Training images: the CIFAR-10 sample bundled with keras_chex, the full "
    "CIFAR-10 at --cifar_path, or uniform random pixels.",
)
_CIFAR_PATH = flags.DEFINE_string(
    "cifar_path",
    "/work/shared/data/cifar10/train.zip",
    "CIFAR-10 zip archive or folder, used with --data=full.",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed for masks and data.")

CORE_COLUMNS = (
    "Model",
    "Layers",
    "Groups",
    "ChannelMasks",
    "Folded BNs",
    "Analyse (s)",
    "Wrap (s)",
    "Set 50% masks (s)",
    "Strip (s)",
    "MACs kept",
)
TRAIN_COLUMNS = (
    "Run",
    "Compile",
    "Median step (ms)",
    "Ratio",
    "CPU time / step (ms)",
    "CPU ratio",
)
UNWRAPPED = "unwrapped"
WRAPPED = "wrapped, masks all ones"
WRAPPED_MASKED = "wrapped, 50% masks"
UNFOLDED_MASKED = "wrapped, 50% masks, fold_batchnorm=False"
TRACKING = "unwrapped, TrackingBatchNormalization"


# ---------------------------------------------------------------------------
# Machine and formatting.


# The benchmarks run as scripts (and are loaded by path in tests): make their
# shared helper importable either way.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_report import command_line  # noqa: E402
from bench_report import machine_info  # noqa: E402
from bench_report import markdown_table  # noqa: E402


def format_seconds(seconds):
    """Two decimals, or two significant digits below 0.1 s (never "0.00")."""
    return f"{seconds:.2f}" if seconds >= 0.1 else f"{seconds:.2g}"


def random_masks(groups, rng, keep):
    """Sets a random mask keeping about `keep` of every group (>= 1 kept)."""
    for group in groups:
        mask = rng.random(group.size) < keep
        if not mask.any():
            mask[rng.integers(group.size)] = True
        group.set_mask(mask)


def time_core(model_fn, repeats, keep=0.5, seed=0, name=None):
    """Times analyse / wrap / set masks / strip on the model of `model_fn`.

    Args:
        model_fn: builds the plain Keras model (called once).
        repeats: number of timed repeats after one untimed warm-up.
        keep: fraction of channels the random masks keep.
        seed: seed of the random masks.
        name: name for the table (default: the model's name).

    Returns:
        A dict with the model's `name`, `layers`, `groups`, `masks` (number
        of ChannelMask layers), `macs_kept` (MACs after / before stripping),
        and for each of `analyse`, `wrap`, `mask`, `strip` the list of timed
        seconds (warm-up excluded).
    """
    import numpy as np  # pylint: disable=g-import-not-at-top
    import keras_chex  # pylint: disable=g-import-not-at-top
    from keras_chex.core import _graph  # pylint: disable=g-import-not-at-top

    model = model_fn()
    rng = np.random.default_rng(seed)
    times = {"analyse": [], "wrap": [], "mask": [], "strip": []}
    result = {}
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        groups = keras_chex.channel_groups(model)
        t1 = time.perf_counter()
        wrapped = keras_chex.wrap(model)
        t2 = time.perf_counter()
        random_masks(keras_chex.channel_groups(wrapped), rng, keep)
        t3 = time.perf_counter()
        compact = keras_chex.strip(wrapped)
        t4 = time.perf_counter()
        if i == 0:  # Warm-up: not timed; describe the model.
            result = {
                "name": name or model.name,
                "layers": len(_graph.all_layers(model)),
                "groups": len(groups),
                "masks": sum(
                    isinstance(layer, keras_chex.ChannelMask)
                    for layer in _graph.all_layers(wrapped)
                ),
                "folded": sum(
                    isinstance(layer, keras_chex.MaskedBatchNormalization)
                    for layer in _graph.all_layers(wrapped)
                ),
                "macs_kept": keras_chex.count_macs(compact).macs
                / keras_chex.count_macs(model).macs,
            }
            continue
        for key, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[key].append(seconds)
        del wrapped, compact
    result.update(times)
    return result


def core_rows(results):
    """Table rows (see `CORE_COLUMNS`) from `time_core` results."""
    rows = []
    for r in results:
        rows.append(
            [
                r["name"],
                r["layers"],
                r["groups"],
                r["masks"],
                r["folded"],
            ]
            + [
                format_seconds(statistics.median(r[k]))
                for k in ("analyse", "wrap", "mask", "strip")
            ]
            + [f"{r['macs_kept']:.1%}"]
        )
    return rows


def application(name):
    """A `keras.applications` model builder with `weights=None`."""
    import keras  # pylint: disable=g-import-not-at-top

    fn = getattr(keras.applications, name)
    return lambda: fn(weights=None)


# ---------------------------------------------------------------------------
# Part 2: training overhead.


def make_batches(batch_size, num_batches, data="sample", path=None, seed=0):
    """A repeating `tf.data.Dataset` of `num_batches` fixed training batches.

    The batches come from `keras_chex.cifar.data.make_dataset` (shuffled,
    augmented, scaled) and are materialised once, so that replaying them
    costs next to no CPU and every model sees the same batches.

    Args:
        batch_size: examples per batch.
        num_batches: number of distinct batches.
        data: "sample" (bundled CIFAR-10 sample), "full" (CIFAR-10 at
            `path`) or "synthetic" (uniform random pixels and labels).
        path: CIFAR-10 source for `data="full"`.
        seed: seed of the shuffle, augmentation and synthetic data.
    """
    import numpy as np  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from keras_chex.cifar import data as datasets  # pylint: disable=g-import-not-at-top

    if data == "synthetic":
        rng = np.random.default_rng(seed)
        n = batch_size * num_batches
        x = rng.integers(0, 256, (n,) + datasets.IMAGE_SHAPE, dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.int64)
    else:
        (x, y), _ = datasets.load_cifar10(path if data == "full" else None)
    # Whole batches only: a smaller last batch would retrace (and recompile
    # under XLA) the train step.
    num_batches = min(num_batches, len(x) // batch_size)
    if num_batches < 1:
        raise ValueError(f"Fewer than {batch_size} images in the data.")
    dataset = datasets.make_dataset(
        x, y, batch_size, training=True, seed=seed
    ).take(num_batches)
    xs, ys = zip(*[(bx.numpy(), by.numpy()) for bx, by in dataset])
    return tf.data.Dataset.from_tensor_slices(
        (np.stack(xs), np.stack(ys))
    ).repeat()


def _step_timer():
    import keras  # pylint: disable=g-import-not-at-top

    class StepTimer(keras.callbacks.Callback):
        """Records wall and process CPU time at the end of every step."""

        def on_epoch_begin(self, epoch, logs=None):
            self.ends = []
            self.cpu_ends = []

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())
            self.cpu_ends.append(time.process_time())

        def step_times(self):
            # The first step also creates the iterator: measured from its end.
            return [b - a for a, b in zip(self.ends, self.ends[1:])]

        def cpu_per_step(self):
            return (self.cpu_ends[-1] - self.cpu_ends[0]) / (
                len(self.cpu_ends) - 1
            )

    return StepTimer()


def training_configs(jit=True):
    """(label, compile label, wrapped?, masked?, fold?, jit_compile) of
    each run. The unfolded run shows what folding masks into BatchNorms
    saves; the tracking run, what the BatchNorms that restart their
    statistics after a mask change cost without any mask."""
    configs = [
        (UNWRAPPED, "default", False, False, True, False),
        (TRACKING, "default", False, False, True, False),
        (WRAPPED, "default", True, False, True, False),
        (WRAPPED_MASKED, "default", True, True, True, False),
        (UNFOLDED_MASKED, "default", True, True, False, False),
    ]
    if jit:
        configs += [
            (UNWRAPPED, "XLA", False, False, True, True),
            (WRAPPED, "XLA", True, False, True, True),
        ]
    return configs


def _with_tracking_batchnorms(plain):
    """A copy of `plain` whose BatchNorms are `TrackingBatchNormalization`."""
    import keras  # pylint: disable=g-import-not-at-top
    from keras_chex.core import statistics  # pylint: disable=g-import-not-at-top

    def clone(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            return statistics.TrackingBatchNormalization.replacing(layer)
        return layer.__class__.from_config(layer.get_config())

    model = keras.models.clone_model(plain, clone_function=clone)
    for old, new in zip(plain.layers, model.layers):
        if isinstance(new, statistics.TrackingBatchNormalization):
            new.load_batchnorm_weights(old)
        else:
            new.set_weights(old.get_weights())
    return model


def time_training(
    model_fn,
    dataset,
    *,
    rounds,
    steps,
    warmup_steps=3,
    jit=True,
    keep=0.5,
    seed=0,
    log=print,
):
    """Interleaved per-step training times of unwrapped and wrapped models.

    Args:
        model_fn: builds the plain model (called once; the wrapped models
            are wrapped copies of it, so all start from the same weights).
        dataset: repeating dataset of `(images, labels)` batches.
        rounds: number of timed rounds; each runs one epoch of every model.
        steps: `steps_per_epoch` of a timed epoch (>= 2).
        warmup_steps: `steps_per_epoch` of the untimed first epoch.
        jit: also time `jit_compile=True` runs.
        keep: fraction of channels kept by the masked run's masks.
        seed: seed of the masks.
        log: function called with progress messages.

    Returns:
        A list of dicts, one per run of `training_configs(jit)`, with
        `label`, `compile`, `rounds` (per-round median step seconds), `cpu`
        (per-round process CPU seconds per step) and `error` (a message if
        the run could not be compiled, else None).
    """
    import keras  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    import keras_chex  # pylint: disable=g-import-not-at-top

    if steps < 2:
        raise ValueError("steps must be >= 2 (the first step is not timed).")
    plain = model_fn()
    runs = []
    for label, compile_label, wrapped, masked, fold, jit_compile in (
        training_configs(jit)
    ):
        if wrapped:
            model = keras_chex.wrap(plain, fold_batchnorm=fold)
            if masked:
                rng = np.random.default_rng(seed)
                random_masks(keras_chex.channel_groups(model), rng, keep)
        elif label == TRACKING:
            model = _with_tracking_batchnorms(plain)
        else:
            model = keras.models.clone_model(plain)
            model.set_weights(plain.get_weights())
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=jit_compile,
        )
        run = {
            "label": label,
            "compile": compile_label,
            "model": model,
            "timer": _step_timer(),
            "rounds": [],
            "cpu": [],
            "error": None,
        }
        t0 = time.perf_counter()
        try:
            model.fit(
                dataset,
                epochs=1,
                steps_per_epoch=warmup_steps,
                shuffle=False,
                verbose=0,
            )
        except Exception as e:  # pylint: disable=broad-except
            run["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            log(f"  {label} ({compile_label}) failed: {run['error']}")
        else:
            log(
                f"  warm-up {label} ({compile_label}): "
                f"{time.perf_counter() - t0:.1f} s"
            )
        runs.append(run)

    active = [r for r in runs if r["error"] is None]
    for i in range(rounds):
        # A B C, C B A, ...: no run always goes first or last.
        order = active if i % 2 == 0 else active[::-1]
        for run in order:
            run["model"].fit(
                dataset,
                epochs=1,
                steps_per_epoch=steps,
                shuffle=False,
                verbose=0,
                callbacks=[run["timer"]],
            )
            run["rounds"].append(statistics.median(run["timer"].step_times()))
            run["cpu"].append(run["timer"].cpu_per_step())
        log(
            f"  round {i + 1}/{rounds}: "
            + ", ".join(
                f"{r['label']} ({r['compile']}) {r['rounds'][-1] * 1e3:.0f} ms"
                for r in active
            )
        )
    for run in runs:
        del run["model"], run["timer"]
    return runs


def training_rows(runs):
    """Table rows (see `TRAIN_COLUMNS`) from `time_training` results."""
    base = {
        r["compile"]: r
        for r in runs
        if r["label"] == UNWRAPPED and r["error"] is None
    }
    rows = []
    for r in runs:
        if r["error"] is not None:
            rows.append([r["label"], r["compile"], f"failed ({r['error']})",
                         "", "", ""])
            continue
        ref = base.get(r["compile"])

        def paired(key):
            if not ref:
                return "n/a"
            ratios = [a / b for a, b in zip(r[key], ref[key])]
            return f"{statistics.median(ratios):.3f}"

        rows.append(
            [
                r["label"],
                r["compile"],
                f"{statistics.median(r['rounds']) * 1e3:.1f}",
                paired("rounds"),
                f"{statistics.median(r['cpu']) * 1e3:.1f}",
                paired("cpu"),
            ]
        )
    return rows


# ---------------------------------------------------------------------------


def report(
    core_models=("ResNet50", "EfficientNetB0"),
    repeats=5,
    keep=0.5,
    train=True,
    depth=20,
    batch_size=128,
    train_rounds=7,
    train_steps=12,
    warmup_steps=3,
    num_batches=8,
    jit=True,
    data="sample",
    cifar_path=None,
    seed=0,
    argv=None,
    core_model_fns=None,
    train_model_fn=None,
    log=print,
):
    """Runs the benchmark and returns it as Markdown text.

    `core_model_fns` (name -> builder) and `train_model_fn` replace the
    `keras.applications` models and the CIFAR ResNet (for tests).
    """
    info = machine_info()
    lines = ["Command:", "", "```", command_line(argv), "```", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    goals = []

    if core_model_fns is None:
        core_model_fns = {name: application(name) for name in core_models}
    if core_model_fns:
        results = []
        for name, fn in core_model_fns.items():
            log(f"Analyse / wrap / strip {name} ...")
            with warnings.catch_warnings():
                # Unsupported layers are reported once per analysis; the
                # benchmark only needs the timings.
                warnings.simplefilter("ignore")
                results.append(
                    time_core(fn, repeats, keep=keep, seed=seed, name=name)
                )
        worst = max(
            statistics.median(r[k])
            for r in results
            for k in ("analyse", "wrap", "mask", "strip")
        )
        goals.append(
            f"- Analyse, wrap, set masks, strip each < 5 s: "
            f"{'met' if worst < 5 else 'MISSED'} (slowest median "
            f"{worst:.2f} s)."
        )
        lines += [
            "",
            f"Analysis, wrapping and stripping (median of {repeats} runs "
            f"after one warm-up; masks keep {keep:.0%} of each group at "
            "random):",
            "",
            markdown_table(CORE_COLUMNS, core_rows(results)),
        ]

    if train:
        if train_model_fn is None:
            from keras_chex.cifar import resnet as cifar_resnet  # pylint: disable=g-import-not-at-top

            train_model_fn = lambda: cifar_resnet.cifar_resnet(depth)
            model_name = f"ResNet-{depth}"
        else:
            model_name = "test model"
        log(f"Training {model_name} ({data} data) ...")
        dataset = make_batches(
            batch_size, num_batches, data=data, path=cifar_path, seed=seed
        )
        runs = time_training(
            train_model_fn,
            dataset,
            rounds=train_rounds,
            steps=train_steps,
            warmup_steps=warmup_steps,
            jit=jit,
            keep=keep,
            seed=seed,
            log=log,
        )
        rows = training_rows(runs)
        for row in rows:
            if row[0] != UNWRAPPED and row[3] not in ("", "n/a"):
                ratio = float(row[3])
                goals.append(
                    f"- Training time ratio {row[0]} ({row[1]}) <= 1.05: "
                    f"{'met' if ratio <= 1.05 else 'MISSED'} (wall {ratio:.3f}, "
                    f"CPU time {row[5]})."
                )
        lines += [
            "",
            f"Training step time, {model_name}, batch {batch_size}, SGD "
            f"momentum 0.9, `model.fit` ({data} CIFAR-10 data, "
            f"{num_batches} batches replayed from memory); {train_rounds} "
            f"interleaved rounds of {train_steps} steps per run after a "
            f"{warmup_steps}-step warm-up epoch. Median step = median over "
            "rounds of each round's median wall time per step; CPU time = "
            "median over rounds of the process CPU time per step (all "
            "threads); ratios are to the unwrapped model with the same "
            "compilation, median of the per-round ratios:",
            "",
            markdown_table(TRAIN_COLUMNS, rows),
        ]
    if goals:
        lines += ["", "Goals:", ""] + goals
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    text = report(
        core_models=[m for m in _CORE_MODELS.value if m],
        repeats=_REPEATS.value,
        keep=_KEEP.value,
        train=_TRAIN.value,
        depth=_DEPTH.value,
        batch_size=_BATCH_SIZE.value,
        train_rounds=_TRAIN_ROUNDS.value,
        train_steps=_TRAIN_STEPS.value,
        warmup_steps=_WARMUP_STEPS.value,
        num_batches=_NUM_BATCHES.value,
        jit=_JIT.value,
        data=_DATA.value,
        cifar_path=_CIFAR_PATH.value,
        seed=_SEED.value,
        log=log,
    )
    print(text)


if __name__ == "__main__":
    app.run(main)
