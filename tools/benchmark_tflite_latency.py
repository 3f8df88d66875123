r"""Benchmark: LiteRT (TFLite) latency of compact (stripped) vs dense models.

For each `keras.applications` model (`weights=None`, 224x224x3,
`classifier_activation=None`) this builds

- the dense model, and
- one compact model per `--round_to` value: `keras_chex.prune_and_regrow(
  model, flops=f, regrow=0.0, round_to=r, seed=...)` (uniform per-group
  channel sparsity chosen by filter L1 norm, meeting `f` of the dense MACs,
  kept counts rounded to multiples of `r`), then `keras_chex.strip()`;

exports each to a verified float32 `.tflite` file with
`keras_chex.export_tflite()` and measures its latency with
`keras_chex.deploy.latency.measure_tflite_latency()` (LiteRT interpreter, XNNPACK,
batch 1, `invoke()` only) with 1 thread and with all usable cores.

The machine may be shared and noisy, so the files are measured in interleaved
rounds (A B C D, D C B A, A B C D, ...), every thread count in every round; a
round's value is the median of `--runs` timed runs after `--warmup` untimed
ones. The tables give the median over rounds, the minimum over all runs, and
the speed-up over the dense model as the median of the per-round ratios
(paired, robust to load drifting between rounds).

The goal checked is speed-up >= 90% of the MACs ratio (dense MACs / compact
MACs), e.g. >= 3.6x for ResNet50 at 25% of its MACs.

With `--profile` it also times every convolution / dense layer on its own (a
one-layer model per distinct layer, exported and measured like the whole
models), for the dense and every compact model, to show which layers do not
speed up in proportion to their MACs. The Python LiteRT interpreter has no
per-op profiler and `benchmark_model --enable_op_profiling` is not shipped in
any installed package, hence layer sub-models. "rest" is the whole model minus
the sum of its layers: ops between the convolutions (adds, pooling, padding,
the mean) plus what running the layers in one graph costs or saves.

Usage:

```
python tools/benchmark_tflite_latency.py --profile   # ~12 min on 2 busy cores
python tools/benchmark_tflite_latency.py             # without the profile
python tools/benchmark_tflite_latency.py --models=MobileNetV2 --rounds=3 \
    --runs=10 --round_to=1 --threads=1
python tools/benchmark_tflite_latency.py --targets=ResNet50:0.5 \
    --models=ResNet50
```
"""

import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

from absl import app
from absl import flags
from absl import logging

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

DEFAULT_TARGETS = {"ResNet50": 0.25, "MobileNetV2": 0.5}
DEFAULT_FRACTION = 0.5
GOAL = 0.9

_MODELS = flags.DEFINE_list(
    "models",
    ["ResNet50", "MobileNetV2"],
    "keras.applications models to benchmark (weights=None, 224x224x3).",
)
_TARGETS = flags.DEFINE_list(
    "targets",
    [f"{k}:{v}" for k, v in DEFAULT_TARGETS.items()],
    "Fraction of the dense MACs to keep, as Model:fraction; models not "
    f"listed use {DEFAULT_FRACTION}.",
)
_ROUND_TO = flags.DEFINE_list(
    "round_to",
    ["1", "8", "16"],
    "`round_to` values: one compact model per value, same target.",
)
_THREADS = flags.DEFINE_list(
    "threads",
    ["1", "all"],
    "Interpreter thread counts; 'all' = the usable cores of this process.",
)
_ROUNDS = flags.DEFINE_integer("rounds", 9, "Interleaved timed rounds.")
_RUNS = flags.DEFINE_integer("runs", 20, "Timed runs per file per round.")
_WARMUP = flags.DEFINE_integer(
    "warmup", 3, "Untimed runs per file per round (fresh interpreter)."
)
_SAVED_MODEL = flags.DEFINE_bool(
    "saved_model", True, "Also time export_saved_model() of every model."
)
_PROFILE = flags.DEFINE_bool(
    "profile",
    False,
    "Time every conv / dense layer as a one-layer TFLite model.",
)
_PROFILE_THREADS = flags.DEFINE_list(
    "profile_threads", ["1"], "Thread counts for --profile."
)
_PROFILE_ROUNDS = flags.DEFINE_integer(
    "profile_rounds", 5, "Interleaved rounds per layer for --profile."
)
_PROFILE_RUNS = flags.DEFINE_integer(
    "profile_runs", 20, "Timed runs per layer file per round for --profile."
)
_PROFILE_TOP = flags.DEFINE_integer(
    "profile_top", 8, "Layers listed per compact model in the profile."
)
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir",
    None,
    "Where to write the .tflite files (kept). Default: a temporary directory, "
    "deleted at the end.",
)
_SEED = flags.DEFINE_integer("model_seed", 0, "Seed for weights and masks.")


# ---------------------------------------------------------------------------
# Machine and formatting.


# The benchmarks run as scripts (and are loaded by path in tests): make their
# shared helper importable either way.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_report import command_line  # noqa: E402
from bench_report import load_average  # noqa: E402
from bench_report import usable_cores  # noqa: E402
from bench_report import machine_info  # noqa: E402
from bench_report import markdown_table  # noqa: E402


def parse_targets(values):
    """Parses `Model:fraction` items into a dict."""
    targets = {}
    for item in values:
        name, sep, value = item.partition(":")
        try:
            fraction = float(value)
        except ValueError:
            fraction = None
        if not sep or fraction is None or not 0 < fraction <= 1:
            raise app.UsageError(
                f"--targets item {item!r} is not Model:fraction with a "
                "fraction in (0, 1]."
            )
        targets[name] = fraction
    return targets


def parse_threads(values):
    """Parses thread counts ('all' = usable cores), deduplicated, in order."""
    threads = []
    for value in values:
        n = usable_cores() if value == "all" else int(value)
        if n < 1:
            raise app.UsageError(f"Thread count must be >= 1, got {value!r}.")
        if n not in threads:
            threads.append(n)
    return threads


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Models and files.


@dataclasses.dataclass
class Variant:
    """One model (dense or compact) of a benchmark and its files."""

    label: str
    round_to: int | None
    model: object
    macs: int
    params: int
    strip_s: float | None = None
    path: str | None = None
    export_s: float | None = None
    size_bytes: int | None = None
    max_rel_diff: float | None = None
    saved_model_s: float | None = None
    ops: str | None = None


def application(name, seed):
    """Builds `keras.applications.<name>` with random (seeded) weights."""
    import keras  # pylint: disable=g-import-not-at-top

    keras.utils.set_random_seed(seed)
    return getattr(keras.applications, name)(
        weights=None,
        input_shape=(224, 224, 3),
        classifier_activation=None,
    )


def make_variants(name, fraction, round_tos, seed):
    """Returns `[dense, compact(round_to=r) for r in round_tos]` Variants."""
    import keras_chex  # pylint: disable=g-import-not-at-top

    dense = application(name, seed)
    counts = keras_chex.count_macs(dense)
    variants = [Variant("dense", None, dense, counts.macs, counts.params)]
    for r in round_tos:
        _log(f"  {name}: prune_and_regrow(flops={fraction}, round_to={r}) "
             "+ strip ...")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = keras_chex.prune_and_regrow(
                dense, flops=fraction, regrow=0.0, round_to=r, seed=seed
            )
        wrapped_macs = keras_chex.count_macs(wrapped).macs
        start = time.perf_counter()
        compact = keras_chex.strip(wrapped)
        strip_s = time.perf_counter() - start
        counts = keras_chex.count_macs(compact)
        if counts.macs != wrapped_macs:
            raise AssertionError(
                f"{name} round_to={r}: count_macs of the stripped model "
                f"({counts.macs}) differs from the wrapped model "
                f"({wrapped_macs})."
            )
        del wrapped
        variants.append(
            Variant(f"compact r={r}", r, compact, counts.macs, counts.params,
                    strip_s=strip_s)
        )
    return variants


def export_variants(name, variants, directory, saved_model):
    """Exports every variant to float32 TFLite (and optionally SavedModel)."""
    from keras_chex.deploy import export  # pylint: disable=g-import-not-at-top
    from keras_chex.deploy.saved_model import export_saved_model  # noqa: E501 pylint: disable=g-import-not-at-top

    for v in variants:
        slug = v.label.replace(" ", "_").replace("=", "")
        v.path = os.path.join(directory, f"{name}_{slug}.tflite")
        _log(f"  {name}: export {v.label} ...")
        start = time.perf_counter()
        report = export.export_tflite(v.model, v.path, overwrite=True)
        v.export_s = time.perf_counter() - start
        v.size_bytes = report.size_bytes
        v.max_rel_diff = report.max_rel_diff
        v.ops = describe_ops(v.path)
        if saved_model:
            saved_dir = os.path.join(directory, f"{name}_{slug}_saved_model")
            start = time.perf_counter()
            export_saved_model(v.model, saved_dir, overwrite=True)
            v.saved_model_s = time.perf_counter() - start
            shutil.rmtree(saved_dir, ignore_errors=True)


def describe_ops(path):
    """E.g. 'CONV_2D 53, ADD 16, ...; XNNPACK partitions: 1'.

    With the default delegates LiteRT hands every op XNNPACK supports to
    XNNPACK; each contiguous run of supported ops becomes one DELEGATE node,
    so one partition and no unsupported op type means all ops run in XNNPACK.
    Uses the interpreter's private op listing; returns 'n/a' if it is gone.
    """
    from ai_edge_litert import interpreter as litert  # pylint: disable=g-import-not-at-top

    try:
        interpreter = litert.Interpreter(model_path=path, num_threads=1)
        interpreter.allocate_tensors()
        names = [op["op_name"] for op in interpreter._get_ops_details()]  # pylint: disable=protected-access
    except (AttributeError, KeyError, RuntimeError):
        return "n/a"
    counts = {}
    for name in names:
        if name != "DELEGATE":
            counts[name] = counts.get(name, 0) + 1
    text = ", ".join(
        f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])
    )
    return f"{text}; XNNPACK partitions: {names.count('DELEGATE')}"


# ---------------------------------------------------------------------------
# Latency.


def measure_interleaved(paths, threads, rounds, runs, warmup, measure=None):
    """Times files in interleaved rounds.

    Args:
        paths: dict label -> `.tflite` path, in measuring order.
        threads: list of thread counts; every round measures all of them.
        rounds: number of rounds; odd rounds go through `paths` backwards.
        runs: timed runs per file per round.
        warmup: untimed runs per file per round.
        measure: the measuring function (default
            `keras_chex.deploy.latency.measure_tflite_latency`).

    Returns:
        dict (label, threads) -> list of `LatencyReport`, one per round.
    """
    if measure is None:
        from keras_chex.deploy import latency  # pylint: disable=g-import-not-at-top

        measure = latency.measure_tflite_latency
    labels = list(paths)
    results = {(label, t): [] for label in labels for t in threads}
    for r in range(rounds):
        order = labels if r % 2 == 0 else labels[::-1]
        for t in threads:
            for label in order:
                results[(label, t)].append(
                    measure(paths[label], num_threads=t, runs=runs,
                            warmup=warmup)
                )
    return results


@dataclasses.dataclass(frozen=True)
class Timing:
    """Summary of one file at one thread count."""

    median_ms: float  # Median over rounds of the round medians.
    min_ms: float  # Fastest single run.
    speedup: float  # Median over rounds of reference / this (paired).
    speedup_min: float  # reference min / this min.


def summarize(results, label, reference, t):
    """Summarizes `label` at `t` threads against `reference` (paired)."""
    mine = results[(label, t)]
    ref = results[(reference, t)]
    return Timing(
        median_ms=statistics.median(r.median_ms for r in mine),
        min_ms=min(r.min_ms for r in mine),
        speedup=statistics.median(
            a.median_ms / b.median_ms for a, b in zip(ref, mine)
        ),
        speedup_min=min(r.min_ms for r in ref) / min(r.min_ms for r in mine),
    )


LATENCY_COLUMNS = (
    "Model",
    "Threads",
    "Variant",
    "MACs (M)",
    "MACs kept",
    "MACs ratio",
    "Median (ms)",
    "Min (ms)",
    "Speed-up",
    "Speed-up / MACs ratio",
    "Speed-up (min)",
    f"Goal >= {GOAL:.0%}",
)

BUILD_COLUMNS = (
    "Model",
    "Variant",
    "Params (M)",
    "TFLite size (MB)",
    "Strip (s)",
    "TFLite export (s)",
    "Max rel diff vs Keras",
    "SavedModel export (s)",
)


def latency_rows(name, variants, results, threads):
    """Rows of the latency table and goal lines for one model."""
    rows, goals = [], []
    dense = variants[0]
    for t in threads:
        for v in variants:
            timing = summarize(results, v.label, dense.label, t)
            ratio = dense.macs / v.macs
            efficiency = timing.speedup / ratio
            is_dense = v is dense
            met = efficiency >= GOAL
            rows.append((
                name,
                t,
                v.label,
                f"{v.macs / 1e6:,.0f}",
                f"{v.macs / dense.macs:.1%}",
                f"{ratio:.2f}x",
                f"{timing.median_ms:.2f}",
                f"{timing.min_ms:.2f}",
                f"{timing.speedup:.2f}x",
                "" if is_dense else f"{efficiency:.0%}",
                f"{timing.speedup_min:.2f}x",
                "" if is_dense else ("met" if met else "MISSED"),
            ))
            if not is_dense:
                goals.append(
                    f"- {name} {v.label}, {t} thread(s): speed-up "
                    f"{timing.speedup:.2f}x vs MACs ratio {ratio:.2f}x = "
                    f"{efficiency:.0%} (goal >= {GOAL:.0%}, i.e. >= "
                    f"{GOAL * ratio:.2f}x): {'met' if met else 'MISSED'}."
                )
    return rows, goals


def build_rows(name, variants):
    rows = []
    for v in variants:
        rows.append((
            name,
            v.label,
            f"{v.params / 1e6:.2f}",
            f"{v.size_bytes / 1e6:.1f}",
            "" if v.strip_s is None else f"{v.strip_s:.2f}",
            f"{v.export_s:.1f}",
            f"{v.max_rel_diff:.1e}",
            "" if v.saved_model_s is None else f"{v.saved_model_s:.1f}",
        ))
    return rows


# ---------------------------------------------------------------------------
# Per-layer profile.

PROFILED = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Dense")


def profiled_layers(model):
    """Returns {name: layer} of the conv / dense layers, in graph order."""
    import keras  # pylint: disable=g-import-not-at-top

    classes = tuple(getattr(keras.layers, c) for c in PROFILED)
    return {
        layer.name: layer
        for layer in model.layers
        if isinstance(layer, classes)
    }


def layer_key(layer):
    """Hashable description: layers with equal keys make equal files."""
    config = dict(layer.get_config())
    config.pop("name", None)
    return (
        type(layer).__name__,
        tuple(layer.input.shape[1:]),
        json.dumps(config, sort_keys=True, default=str),
    )


def layer_submodel(layer):
    """A one-layer model computing `layer` on an input of its input shape."""
    import keras  # pylint: disable=g-import-not-at-top

    inputs = keras.Input(tuple(layer.input.shape[1:]))
    clone = type(layer).from_config(layer.get_config())
    outputs = clone(inputs)
    clone.set_weights(layer.get_weights())
    return keras.Model(inputs, outputs)


def layer_category(layer):
    """E.g. 'Conv 1x1', 'Conv 3x3 s2', 'Depthwise 3x3', 'Dense'."""
    kind = type(layer).__name__
    if kind == "Dense":
        return "Dense"
    config = layer.get_config()
    k = config["kernel_size"]
    s = config["strides"]
    kind = {"Conv2D": "Conv", "DepthwiseConv2D": "Depthwise"}.get(kind, kind)
    text = f"{kind} {k[0]}x{k[1]}"
    if max(s) > 1:
        text += f" s{s[0]}"
    return text


def layer_shape(layer):
    """E.g. '56x56 64->256' (input spatial size, in -> out channels)."""
    shape = layer.input.shape
    spatial = "x".join(str(d) for d in shape[1:-1])
    text = f"{shape[-1]}->{layer.output.shape[-1]}"
    return f"{spatial} {text}" if spatial else text


def profile_model(name, variants, threads, rounds, runs, warmup, directory,
                  measure=None):
    """Times every conv / dense layer of every variant on its own.

    Layers whose sub-models are identical in every variant (e.g. repeated
    blocks) are exported and timed once and counted as many times as they
    occur.

    Returns:
        A dict with, per variant label and thread count, the per-layer-group
        times and metadata (see `profile_tables`).
    """
    from keras_chex.deploy import export  # pylint: disable=g-import-not-at-top
    import keras_chex  # pylint: disable=g-import-not-at-top

    layers = {v.label: profiled_layers(v.model) for v in variants}
    macs = {
        v.label: {c.name: c.macs for c in keras_chex.count_macs(v.model).layers}
        for v in variants
    }
    dense = variants[0]
    groups = {}
    for layer_name in layers[dense.label]:
        if not all(layer_name in layers[v.label] for v in variants):
            continue
        signature = tuple(
            layer_key(layers[v.label][layer_name]) for v in variants
        )
        groups.setdefault(signature, []).append(layer_name)

    files = {}  # layer key -> path, shared by variants and groups.

    def file_for(layer):
        key = layer_key(layer)
        if key not in files:
            path = os.path.join(directory, f"{name}_layer_{len(files)}.tflite")
            export.export_tflite(
                layer_submodel(layer), path, verify=False, overwrite=True
            )
            files[key] = path
        return files[key]

    entries = []
    for i, (signature, names) in enumerate(groups.items()):
        first = names[0]
        _log(f"  {name}: profile {i + 1}/{len(groups)}: {first}"
             + (f" (+{len(names) - 1} equal)" if len(names) > 1 else ""))
        paths = {v.label: file_for(layers[v.label][first]) for v in variants}
        results = measure_interleaved(
            paths, threads, rounds, runs, warmup, measure=measure
        )
        entry = {
            "names": names,
            "category": layer_category(layers[dense.label][first]),
            "shape": {
                v.label: layer_shape(layers[v.label][first]) for v in variants
            },
            "macs": {
                v.label: sum(macs[v.label].get(n, 0) for n in names)
                for v in variants
            },
            "ms": {},
        }
        for v in variants:
            for t in threads:
                # The fastest run: on a loaded machine the median of a
                # 0.1 ms layer mostly measures preemption.
                per_layer = min(r.min_ms for r in results[(v.label, t)])
                entry["ms"][(v.label, t)] = per_layer * len(names)
        entries.append(entry)
    return entries


PROFILE_COLUMNS = (
    "Model",
    "Threads",
    "Layers",
    "#",
    "Dense MACs share",
    "Dense (ms)",
    "Variant",
    "Compact (ms)",
    "MACs ratio",
    "Speed-up",
    "Speed-up / MACs ratio",
)

WORST_COLUMNS = (
    "Model",
    "Variant",
    "Layer(s)",
    "Dense shape",
    "Compact shape",
    "Dense (ms)",
    "Compact (ms)",
    "MACs ratio",
    "Speed-up",
    "Excess (ms)",
)


def _ratio_text(a, b, fmt="{:.2f}x"):
    return fmt.format(a / b) if b else "n/a"


def profile_tables(name, variants, entries, whole, threads, top):
    """Category table rows and worst-layer rows of one model's profile.

    Args:
        name: model name.
        variants: the Variants (dense first).
        entries: output of `profile_model`.
        whole: dict (label, threads) -> median ms of the whole model.
        threads: thread counts profiled.
        top: worst layers listed per compact variant.

    Returns:
        (category_rows, worst_rows).
    """
    dense = variants[0]
    compact = variants[1:]
    total_macs = sum(e["macs"][dense.label] for e in entries) or 1
    categories = []
    for e in entries:
        if e["category"] not in categories:
            categories.append(e["category"])
    rows = []
    for t in threads:
        for category in categories + ["Σ layers", "rest", "whole model"]:
            chosen = [
                e for e in entries
                if category == "Σ layers" or e["category"] == category
            ]
            count = sum(len(e["names"]) for e in chosen)

            def total(label, key, chosen=chosen, category=category):
                if category == "whole model":
                    return whole[(label, t)] if key == "ms" else {
                        v.label: v.macs for v in variants
                    }[label]
                if category == "rest":
                    if key == "ms":
                        return whole[(label, t)] - sum(
                            e["ms"][(label, t)] for e in entries
                        )
                    return None
                if key == "ms":
                    return sum(e["ms"][(label, t)] for e in chosen)
                return sum(e["macs"][label] for e in chosen)

            dense_ms = total(dense.label, "ms")
            dense_macs = total(dense.label, "macs")
            for i, v in enumerate(compact):
                ms = total(v.label, "ms")
                v_macs = total(v.label, "macs")
                if category == "rest":
                    share, macs_ratio, efficiency = "", "", ""
                else:
                    share = f"{dense_macs / total_macs:.1%}"
                    if category == "whole model":
                        share = ""
                    macs_ratio = _ratio_text(dense_macs, v_macs)
                    efficiency = (
                        f"{(dense_ms / ms) / (dense_macs / v_macs):.0%}"
                        if v_macs and ms > 0 else "n/a"
                    )
                rows.append((
                    name if i == 0 else "",
                    t if i == 0 else "",
                    category if i == 0 else "",
                    "" if category in ("rest", "whole model") or i else count,
                    share if i == 0 else "",
                    f"{dense_ms:.2f}" if i == 0 else "",
                    v.label,
                    f"{ms:.2f}",
                    macs_ratio,
                    _ratio_text(dense_ms, ms) if ms > 0 else "n/a",
                    efficiency,
                ))
    worst = []
    t = threads[0]
    for v in compact:
        scored = []
        for e in entries:
            d_ms, c_ms = e["ms"][(dense.label, t)], e["ms"][(v.label, t)]
            d_macs, c_macs = e["macs"][dense.label], e["macs"][v.label]
            ideal = d_ms * c_macs / d_macs if d_macs else 0.0
            scored.append((c_ms - ideal, e, d_ms, c_ms, d_macs, c_macs))
        scored.sort(key=lambda s: -s[0])
        for excess, e, d_ms, c_ms, d_macs, c_macs in scored[:top]:
            names = e["names"]
            label = names[0] + (
                f" (+{len(names) - 1})" if len(names) > 1 else ""
            )
            worst.append((
                name,
                v.label,
                f"{label}: {e['category']}",
                e["shape"][dense.label],
                e["shape"][v.label],
                f"{d_ms:.3f}",
                f"{c_ms:.3f}",
                _ratio_text(d_macs, c_macs),
                _ratio_text(d_ms, c_ms),
                f"{excess:+.3f}",
            ))
    return rows, worst


# ---------------------------------------------------------------------------
# Main.


def report(
    models=("ResNet50", "MobileNetV2"),
    targets=None,
    round_tos=(1, 8, 16),
    threads=(1,),
    rounds=9,
    runs=20,
    warmup=3,
    saved_model=True,
    profile=False,
    profile_threads=(1,),
    profile_rounds=5,
    profile_runs=20,
    profile_top=8,
    directory=None,
    seed=0,
    argv=None,
):
    """Runs the benchmark and returns it as Markdown text."""
    targets = dict(DEFAULT_TARGETS if targets is None else targets)
    info = machine_info()
    lines = ["Command:", "", "```", command_line(argv), "```", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    latency_table, build_table, goals = [], [], []
    profile_rows, worst_rows, ops_lines = [], [], []
    for name in models:
        fraction = targets.get(name, DEFAULT_FRACTION)
        _log(f"{name} at {fraction:.0%} of the MACs ...")
        variants = make_variants(name, fraction, round_tos, seed)
        export_variants(name, variants, directory, saved_model)
        all_threads = list(dict.fromkeys(list(threads) + (
            list(profile_threads) if profile else []
        )))
        _log(f"  {name}: timing {len(variants)} files x {all_threads} "
             f"threads x {rounds} rounds ...")
        paths = {v.label: v.path for v in variants}
        results = measure_interleaved(paths, all_threads, rounds, runs, warmup)
        rows, model_goals = latency_rows(name, variants, results, threads)
        latency_table += rows
        goals += model_goals
        build_table += build_rows(name, variants)
        ops_lines += [f"- {name} {v.label}: {v.ops}" for v in variants]
        if profile:
            entries = profile_model(
                name, variants, list(profile_threads), profile_rounds,
                profile_runs, warmup, directory,
            )
            whole = {
                (v.label, t): min(r.min_ms for r in results[(v.label, t)])
                for v in variants for t in profile_threads
            }
            p_rows, w_rows = profile_tables(
                name, variants, entries, whole, list(profile_threads),
                profile_top,
            )
            profile_rows += p_rows
            worst_rows += w_rows
        for v in variants:
            v.model = None

    target_text = ", ".join(
        f"{m} {targets.get(m, DEFAULT_FRACTION):.0%}" for m in models
    )
    lines += [
        f"- Load average at end: {load_average()}",
        "",
        f"Latency, float32 TFLite, batch 1, LiteRT + XNNPACK; targets: "
        f"{target_text} of the dense MACs; {rounds} interleaved rounds of "
        f"{runs} runs (+{warmup} warm-up) per file. Median = median over "
        "rounds of the round medians; Speed-up = median over rounds of dense "
        "/ compact (paired); Speed-up (min) = ratio of the fastest runs; "
        "MACs ratio = dense MACs / compact MACs.",
        "",
        markdown_table(LATENCY_COLUMNS, latency_table),
        "",
        "Build and export (one run each; strip = `keras_chex.strip()` of the "
        "wrapped model; TFLite export includes conversion and verification "
        "against Keras):",
        "",
        markdown_table(BUILD_COLUMNS, build_table),
    ]
    if profile:
        lines += [
            "",
            "Per-layer profile: every Conv2D / DepthwiseConv2D / Dense layer "
            "exported alone (float32 TFLite, same input shape and weights, "
            f"no fused BatchNorm/activation) and timed in {profile_rounds} "
            f"interleaved rounds of {profile_runs} runs. Times are the "
            "fastest run (the least noisy statistic on a loaded machine), "
            "summed over the layers of a category; 'whole model' is the "
            "fastest run of the whole file (Min column above), 'rest' = whole "
            "model minus the sum of its layers (adds, pooling, padding, mean, "
            "and graph-level effects).",
            "",
            markdown_table(PROFILE_COLUMNS, profile_rows),
            "",
            f"Layers furthest from scaling with their MACs ({profile_threads[0]}"
            " thread(s)); Excess = compact time - dense time x MACs kept, i.e. "
            "the time lost against perfect scaling (summed over equal layers):",
            "",
            markdown_table(WORST_COLUMNS, worst_rows),
        ]
    lines += ["", "TFLite ops (XNNPACK delegate, 1 thread):", ""]
    lines += ops_lines
    lines += ["", f"Goal: speed-up >= {GOAL:.0%} of the MACs ratio:", ""]
    lines += goals
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        # TensorFlow logs every SavedModel write at INFO level.
        logging.set_verbosity(logging.ERROR)
    models = [m for m in _MODELS.value if m]
    if not models:
        raise app.UsageError("--models is empty.")
    try:
        round_tos = [int(r) for r in _ROUND_TO.value]
    except ValueError as e:
        raise app.UsageError(f"--round_to: {e}") from None
    if not round_tos or min(round_tos) < 1:
        raise app.UsageError("--round_to needs ints >= 1.")
    threads = parse_threads(_THREADS.value)
    profile_threads = parse_threads(_PROFILE_THREADS.value)
    targets = dict(DEFAULT_TARGETS)
    targets.update(parse_targets(_TARGETS.value))

    directory = _OUTPUT_DIR.value
    temporary = directory is None
    if temporary:
        directory = tempfile.mkdtemp(prefix="tflite_latency_")
    os.makedirs(directory, exist_ok=True)
    try:
        text = report(
            models=models,
            targets=targets,
            round_tos=round_tos,
            threads=threads,
            rounds=_ROUNDS.value,
            runs=_RUNS.value,
            warmup=_WARMUP.value,
            saved_model=_SAVED_MODEL.value,
            profile=_PROFILE.value,
            profile_threads=profile_threads,
            profile_rounds=_PROFILE_ROUNDS.value,
            profile_runs=_PROFILE_RUNS.value,
            profile_top=_PROFILE_TOP.value,
            directory=directory,
            seed=_SEED.value,
        )
    finally:
        if temporary:
            shutil.rmtree(directory, ignore_errors=True)
    print(text)


if __name__ == "__main__":
    app.run(main)
