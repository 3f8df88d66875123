"""How keras-chex handles real model families: one Markdown row per model.

Every model is built from its constructor with random weights (no download):
`keras.applications` at the smallest input size each accepts, and
keras-hub backbones and tasks from tiny configs (the applications with 10
classes and no softmax, so the outputs compared are logits). For each
model:

- `groups`: the channel groups of the wrapped model;
- `prunable convs`: how many of the model's Conv/Dense layers (found
  anywhere, inside layers made of layers too; layers a block creates but
  never calls, so never builds, are not counted) write channels of a
  group (a depthwise convolution writes its input's);
- `unsupported`: the layers the analysis leaves alone (count, first
  classes);
- `strip diff`: random masks on every group (BatchNorm statistics random
  too), then max |compact(x) - wrapped(x)| on a random batch of 2 (and,
  in brackets, relative to max |wrapped(x)|);
- `MACs agree`: `count_macs` of the wrapped and the compact model, and the
  dense MACs; `uncounted`: layers whose MACs keras-chex cannot see;
- `entry points`: `prune_and_regrow`, `soft_mask_prune` and
  `relevance_prune` at `flops=0.5` (a ValueError is reported as
  "refused");
- `TFLite`: `export_tflite` of the compact model (verified with LiteRT).

A failure in one stage is reported in its column and never stops the run:

    python tools/check_real_models.py --output=/tmp/real_models.jsonl
    python tools/check_real_models.py --models=ResNetBackbone-basic,ViTBackbone
    python tools/check_real_models.py --noapplications --notflite

`--output` appends one JSON line per model with every field.
"""

import collections
import json
import linecache
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_report  # noqa: E402

import keras_chex  # noqa: E402
from keras_chex.core import _graph  # noqa: E402
from keras_chex.core import analysis as analysis_lib  # noqa: E402
from keras_chex.core import composites  # noqa: E402
from keras_chex.testing.random_graphs import random_masks  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    """The command's flags, defined when run as a script only: tests import
    this module next to other tools that define `--seed`, `--models`, ...
    in the same process, and absl refuses a flag defined twice."""
    flags.DEFINE_list("models", [], "Names of the models to run (default: "
                      "all of the selected families). See MODELS.")
    flags.DEFINE_string("output", None, "A .jsonl file to append one line "
                        "per model to.")
    flags.DEFINE_boolean("applications", True, "Run the keras.applications "
                         "models.")
    flags.DEFINE_boolean("hub", True, "Run the keras-hub models.")
    flags.DEFINE_boolean("tflite", True, "Export the compact models to "
                         "TFLite.")
    flags.DEFINE_boolean("entry_points", True, "Try the three entry points.")
    flags.DEFINE_integer("seed", 0, "Seed of the weights, masks and inputs.")
    flags.DEFINE_integer("threads", 1, "TensorFlow threads (0: default).")


# The layers whose output channels are what channel pruning removes.
CONV_TYPES = (
    keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
    keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D,
    keras.layers.Conv2DTranspose, keras.layers.Dense,
)

# ---------------------------------------------------------------------------
# The models. Each builder returns a built keras.Model with random weights.


def _application(name, size):
    def build():
        # Logits out (no softmax), so the strip check compares values that
        # are not squashed into [0, 1].
        return getattr(keras.applications, name)(
            weights=None, input_shape=(size, size, 3), classes=10,
            classifier_activation=None)
    return build


# The smallest input size each constructor accepts (Xception 71,
# InceptionV3 75; the others 32).
APPLICATIONS = collections.OrderedDict(
    (name, _application(name, size)) for name, size in [
        ("MobileNetV2", 32), ("MobileNetV3Small", 32),
        ("EfficientNetB0", 32), ("EfficientNetV2B0", 32),
        ("ResNet50", 32), ("ResNet50V2", 32), ("DenseNet121", 32),
        ("NASNetMobile", 32), ("Xception", 71), ("InceptionV3", 75),
        ("ConvNeXtTiny", 32),
    ])


def _resnet(block_type="basic_block", pre_activation=False, stacks=2,
            size=32):
    import keras_hub

    # The first stack must have 64 filters; a basic block's first stack has
    # no projection shortcut, so the stem must give 64 channels too.
    basic = block_type.startswith("basic")
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[64 if basic else 16],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 16, 16][:stacks],
        stackwise_num_blocks=[1, 2, 1][:stacks],
        stackwise_num_strides=[1, 2, 2][:stacks],
        block_type=block_type,
        use_pre_activation=pre_activation,
        image_shape=(size, size, 3))


def _resnet_classifier():
    import keras_hub

    return keras_hub.models.ResNetImageClassifier(
        backbone=_resnet(), num_classes=10)


def _mobilenet():
    import keras_hub

    return keras_hub.models.MobileNetBackbone(
        stackwise_expansion=[[16, 24], [32]],
        stackwise_num_blocks=[2, 1],
        stackwise_num_filters=[[8, 8], [16]],
        stackwise_kernel_size=[[3, 3], [5]],
        stackwise_num_strides=[[2, 1], [2]],
        stackwise_se_ratio=[[None, None], [0.25]],
        stackwise_activation=[["relu", "relu"], ["hard_swish"]],
        stackwise_padding=[[1, 1], [2]],
        output_num_filters=64,
        depthwise_filters=8,
        depthwise_stride=2,
        depthwise_residual=False,
        last_layer_filter=32,
        squeeze_and_excite=0.5,
        image_shape=(32, 32, 3))


def _efficientnet(block_type):
    import keras_hub

    return keras_hub.models.EfficientNetBackbone(
        stackwise_width_coefficients=[1.0] * 3,
        stackwise_depth_coefficients=[1.0] * 3,
        stackwise_kernel_sizes=[3, 3, 3],
        stackwise_num_repeats=[1, 2, 1],
        stackwise_input_filters=[8, 8, 16],
        stackwise_output_filters=[8, 16, 16],
        stackwise_expansion_ratios=[1, 4, 4],
        stackwise_squeeze_and_excite_ratios=[0.0, 0.25, 0.25],
        stackwise_strides=[1, 2, 2],
        stackwise_block_types=[block_type] * 3,
        stackwise_force_input_filters=[0] * 3,
        stackwise_nores_option=[False] * 3,
        num_features=64,
        input_shape=(32, 32, 3))


def _densenet():
    import keras_hub

    return keras_hub.models.DenseNetBackbone(
        stackwise_num_repeats=[2, 2], growth_rate=8, image_shape=(32, 32, 3))


def _vgg():
    import keras_hub

    return keras_hub.models.VGGBackbone(
        stackwise_num_repeats=[1, 2], stackwise_num_filters=[8, 16],
        image_shape=(32, 32, 3))


def _full_size(family):
    """The published depths and widths of a family, at 64x64 inputs: the
    tiny configs above have so few layers that the convolutions writing a
    backbone's outputs (never pruned: they are its user's) weigh a lot."""
    import keras_hub

    if family == "resnet50":
        return keras_hub.models.ResNetBackbone(
            input_conv_filters=[64], input_conv_kernel_sizes=[7],
            stackwise_num_filters=[64, 128, 256, 512],
            stackwise_num_blocks=[3, 4, 6, 3],
            stackwise_num_strides=[1, 2, 2, 2],
            block_type="bottleneck_block", image_shape=(64, 64, 3))
    if family == "densenet121":
        return keras_hub.models.DenseNetBackbone(
            stackwise_num_repeats=[6, 12, 24, 16], image_shape=(64, 64, 3))
    return keras_hub.models.VGGBackbone(
        stackwise_num_repeats=[2, 2, 3, 3, 3],
        stackwise_num_filters=[64, 128, 256, 512, 512],
        image_shape=(64, 64, 3))


def _cspnet():
    import keras_hub

    return keras_hub.models.CSPNetBackbone(
        stem_filters=8, stem_kernel_size=3, stem_strides=1,
        stackwise_depth=[1, 2], stackwise_strides=2,
        stackwise_num_filters=[16, 32], block_type="dark_block",
        stage_type="csp", down_growth=True, bottle_ratio=(0.5, 1.0),
        block_ratio=(1.0, 0.5), expand_ratio=(2.0, 1.0),
        stem_padding="same", image_shape=(32, 32, 3))


def _hgnetv2(out_features=None, size=32):
    import keras_hub

    return keras_hub.models.HGNetV2Backbone(
        depths=[1, 1], embedding_size=8, hidden_sizes=[16, 32],
        stem_channels=[3, 8, 8], hidden_act="relu",
        use_learnable_affine_block=True,
        stackwise_stage_filters=[[8, 8, 16, 1, 2, 3], [16, 8, 32, 1, 2, 3]],
        apply_downsample=[False, True],
        use_lightweight_conv_block=[False, True],
        out_features=out_features, image_shape=(size, size, 3))


def _vit():
    import keras_hub

    return keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2,
        hidden_dim=16, mlp_dim=32)


def _deit():
    import keras_hub

    return keras_hub.models.DeiTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2,
        hidden_dim=16, intermediate_dim=32)


def _mit():
    import keras_hub

    return keras_hub.models.MiTBackbone(
        layerwise_depths=[1, 1], num_layers=2, layerwise_num_heads=[1, 2],
        layerwise_sr_ratios=[4, 2], max_drop_path_rate=0.0,
        layerwise_patch_sizes=[7, 3], layerwise_strides=[4, 2],
        hidden_dims=[8, 16], image_shape=(32, 32, 3))


def _retinanet_backbone():
    import keras_hub

    return keras_hub.models.RetinaNetBackbone(
        image_encoder=_resnet(stacks=3, size=64), min_level=3, max_level=4,
        use_p5=False, image_shape=(64, 64, 3))


def _retinanet():
    import keras_hub

    return keras_hub.models.RetinaNetObjectDetector(
        backbone=_retinanet_backbone(), num_classes=4,
        pre_logits_num_conv_layers=1)


def _deeplab_backbone():
    import keras_hub

    return keras_hub.models.DeepLabV3Backbone(
        image_encoder=_resnet(stacks=3, size=64),
        low_level_feature_key="P2", spatial_pyramid_pooling_key="P4",
        dilation_rates=[2, 4], upsampling_size=4, projection_filters=8,
        image_shape=(64, 64, 3))


def _deeplab():
    import keras_hub

    return keras_hub.models.DeepLabV3ImageSegmenter(
        backbone=_deeplab_backbone(), num_classes=3)


def _dfine():
    import keras_hub

    return keras_hub.models.DFineBackbone(
        backbone=_hgnetv2(out_features=["stage1", "stage2"], size=64),
        decoder_in_channels=[16, 16], encoder_hidden_dim=16, num_labels=4,
        num_denoising=0, learn_initial_query=False, num_queries=10,
        anchor_image_size=(64, 64), feat_strides=[4, 8],
        num_feature_levels=2, hidden_dim=16, encoder_in_channels=[16, 32],
        encode_proj_layers=[1], num_attention_heads=2, encoder_ffn_dim=32,
        num_encoder_layers=1, hidden_expansion=0.5, depth_multiplier=0.5,
        eval_idx=-1, num_decoder_layers=1, decoder_attention_heads=2,
        decoder_ffn_dim=32, decoder_n_points=[2, 2], lqe_hidden_dim=8,
        num_lqe_layers=2, out_features=["stage1", "stage2"],
        image_shape=(64, 64, 3), seed=0)


HUB = collections.OrderedDict([
    ("ResNetBackbone-basic", _resnet),
    ("ResNetBackbone-bottleneck",
     lambda: _resnet(block_type="bottleneck_block")),
    ("ResNetBackbone-v2", lambda: _resnet(pre_activation=True)),
    ("ResNetBackbone-vd", lambda: _resnet(block_type="bottleneck_block_vd")),
    ("ResNetImageClassifier", _resnet_classifier),
    ("ResNetBackbone-50", lambda: _full_size("resnet50")),
    ("DenseNetBackbone-121", lambda: _full_size("densenet121")),
    ("VGGBackbone-16", lambda: _full_size("vgg16")),
    ("MobileNetBackbone", _mobilenet),
    ("EfficientNetBackbone-fused", lambda: _efficientnet("fused")),
    ("EfficientNetBackbone-mbconv", lambda: _efficientnet("unfused")),
    ("EfficientNetBackbone-v1", lambda: _efficientnet("v1")),
    ("DenseNetBackbone", _densenet),
    ("VGGBackbone", _vgg),
    ("CSPNetBackbone", _cspnet),
    ("HGNetV2Backbone", _hgnetv2),
    ("ViTBackbone", _vit),
    ("DeiTBackbone", _deit),
    ("MiTBackbone", _mit),
    ("RetinaNetBackbone", _retinanet_backbone),
    ("RetinaNetObjectDetector", _retinanet),
    ("DeepLabV3Backbone", _deeplab_backbone),
    ("DeepLabV3ImageSegmenter", _deeplab),
    ("DFineBackbone", _dfine),
])

MODELS = collections.OrderedDict(list(APPLICATIONS.items())
                                 + list(HUB.items()))

ENTRY_POINTS = collections.OrderedDict([
    ("prune_and_regrow", lambda m: keras_chex.prune_and_regrow(
        m, flops=0.5, seed=0)),
    ("soft_mask_prune", lambda m: keras_chex.soft_mask_prune(
        m, flops=0.5, seed=0)),
    ("relevance_prune", lambda m: keras_chex.relevance_prune(
        m, flops=0.5, seed=0)),
])

# ---------------------------------------------------------------------------
# The checks.


def first_line(error, limit=None):
    """`Type: first line of the message`, at most `limit` characters."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip()
    if limit and len(text) > limit:
        text = text[:limit - 3] + "..."
    return text


def _operation_classes(model):
    """Name -> class name of every layer and op in `model`, nested models
    and layers made of layers included."""
    classes = {}

    def visit(graph):
        for node in _graph.nodes(graph):
            op = node.operation
            classes.setdefault(op.name, type(op).__name__)
            if _graph.is_graph_model(op):
                visit(op)

    try:
        visit(model)
    except Exception:  # A model the graph walk cannot read: names only.
        pass
    for layer in _graph.every_layer(model):
        classes.setdefault(layer.name, type(layer).__name__)
    return classes


def _randomize_batchnorm(model, rng):
    """Random BatchNorm statistics and affine weights (a wrong slice or a
    missing mask then shows in the outputs)."""
    for layer in _graph.every_layer(model):
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        for v in layer.weights:
            leaf = v.path.split("/")[-1]
            shape = tuple(v.shape)
            if "variance" in leaf or leaf == "gamma":
                value = rng.uniform(0.5, 1.5, shape)
            elif leaf in ("beta", "moving_mean"):
                value = rng.normal(0.0, 0.3, shape)
            else:
                continue
            v.assign(value.astype(v.dtype))


def _random_inputs(model, rng, batch=2):
    values = [rng.uniform(-1, 1, (batch,) + tuple(t.shape[1:])).astype(
        "float32") for t in model.inputs]
    return values[0] if len(values) == 1 else values


def _max_diff(expected, actual):
    """(max abs difference, that over max |expected|) over all outputs."""
    worst_abs, worst_rel = 0.0, 0.0
    expected, actual = keras.tree.flatten(expected), keras.tree.flatten(actual)
    if len(expected) != len(actual):
        raise ValueError(f"{len(expected)} outputs against {len(actual)}")
    for e, a in zip(expected, actual):
        e = keras.ops.convert_to_numpy(e).astype(np.float64)
        a = keras.ops.convert_to_numpy(a).astype(np.float64)
        if e.shape != a.shape:
            raise ValueError(f"output shapes differ: {e.shape} against "
                             f"{a.shape}")
        diff = float(np.abs(e - a).max()) if e.size else 0.0
        scale = float(np.abs(e).max()) if e.size else 0.0
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / max(scale, 1e-6))
    return worst_abs, worst_rel


def _count(model):
    """`count_macs(model)`, its warnings (uncounted layers) kept quiet."""
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        return keras_chex.count_macs(model)


def _refusal(error):
    """Whether `error` is keras-chex refusing its arguments: a ValueError
    raised by a `raise` statement in keras-chex's own code (not an error
    of Keras or of a layer that keras-chex called)."""
    if not isinstance(error, ValueError):
        return False
    tb, last = error.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    if last is None:
        return False
    filename = last.tb_frame.f_code.co_filename
    line = linecache.getline(filename, last.tb_lineno).strip()
    return (os.sep + "keras_chex" + os.sep in filename
            and line.startswith("raise"))


def _entry_point_outcome(fn, model):
    """("ok" | "refused: <60 characters>" | "failed: <error>", the error's
    first line or None)."""
    try:
        fn(model)
        return "ok", None
    except Exception as e:  # A refusal or a crash: both are findings.
        if _refusal(e):
            lines = str(e).strip().splitlines()
            return "refused: " + (lines[0][:60] if lines else ""), (
                first_line(e))
        return "failed: " + first_line(e), first_line(e)


def check_model(name, build=None, *, seed=0, tflite=True, entry_points=True,
                randomize_bn=True, output_dir=None):
    """Runs every check on one model; never raises.

    Args:
        name: the model's name (a key of `MODELS` unless `build` is given).
        build: `fn() -> keras.Model`; defaults to `MODELS[name]`.
        seed: seed of the weights, the BatchNorm statistics, the masks and
            the input batch.
        tflite: export the compact model to TFLite and verify it.
        entry_points: try the three entry points.
        randomize_bn: random BatchNorm statistics before wrapping.
        output_dir: where the .tflite files go (default: a temporary
            directory, removed afterwards).

    Returns:
        A dict: one field per column (plain values, JSON-ready), plus the
        error of every stage that failed (`<stage>_error`).
    """
    build = build or MODELS[name]
    row = {"model": name}
    stage_seconds = {}
    start = time.time()
    rng = np.random.default_rng(seed)

    def stage(key):
        stage_seconds[key] = time.time()

    def done(key):
        stage_seconds[key] = round(time.time() - stage_seconds[key], 2)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = wrapped = compact = None
        stage("build")
        try:
            keras.utils.set_random_seed(seed)
            model = build()
            row["class"] = type(model).__name__
            row["input_shapes"] = [list(t.shape[1:]) for t in model.inputs]
            row["outputs"] = len(keras.tree.flatten(model.outputs))
            row["params"] = int(model.count_params())
            if randomize_bn:
                _randomize_batchnorm(model, rng)
        except Exception as e:
            row["build_error"] = first_line(e)
        done("build")
        if model is None:
            row["seconds"] = round(time.time() - start, 1)
            row["stage_seconds"] = stage_seconds
            return row

        try:  # The graph the analysis reads: composite layers opened.
            opened = composites.open_composites(model)
        except Exception:
            opened = model
        classes = _operation_classes(opened)
        convs = [layer for layer in _graph.every_layer(model)
                 if isinstance(layer, CONV_TYPES) and layer.built]
        row["convs"] = len(convs)

        stage("analyze")
        try:
            unsupported = analysis_lib.analyze(model, warn=False).unsupported
            row["unsupported"] = len(unsupported)
            row["unsupported_layers"] = [
                [n, classes.get(n, "?"), str(r)] for n, r in unsupported]
        except Exception as e:
            row["analyze_error"] = first_line(e)
        done("analyze")

        stage("wrap")
        try:
            wrapped = keras_chex.wrap(model)
            groups = keras_chex.channel_groups(wrapped)
            row["groups"] = len(groups)
            row["group_channels"] = int(sum(g.size for g in groups))
            producers = {n for g in groups for n in g.producers}
            # A depthwise convolution's output channels are its input's:
            # pruned when its weights are indexed by a group's.
            indexed = {n for g in groups for n in g.layers}
            # Name -> layer objects of the layers the analysis sees, so a
            # layer inside a composite one with the same name as a graph
            # layer is not counted.
            seen = {id(layer) for layer in _graph.all_layers(opened)
                    if layer.name in producers or (
                        isinstance(layer, keras.layers.DepthwiseConv2D)
                        and layer.name in indexed)}
            row["prunable_convs"] = sum(id(c) in seen for c in convs)
        except Exception as e:
            row["wrap_error"] = first_line(e)
            # Whose bug: can Keras itself copy the model from its layers'
            # configs (what wrapping does)?
            try:
                keras.models.clone_model(model)
                row["keras_clone"] = "ok"
            except Exception as clone_error:
                row["keras_clone"] = first_line(clone_error)
        done("wrap")

        if wrapped is not None:
            stage("strip")
            try:
                random_masks(wrapped, rng, keep=0.5)
                row["kept_channels"] = int(wrapped.masks.numpy().sum())
                compact = keras_chex.strip(wrapped)
                x = _random_inputs(model, rng)
                masked = wrapped(x, training=False)
                row["strip_diff"], row["strip_rel_diff"] = _max_diff(
                    masked, compact(x, training=False))
                # How much the masks changed the outputs (a strip check on
                # outputs the masks do not reach proves little).
                row["output_scale"] = max(
                    float(np.abs(keras.ops.convert_to_numpy(t)).max())
                    for t in keras.tree.flatten(masked))
                row["mask_effect"] = _max_diff(
                    model(x, training=False), masked)[0]
            except Exception as e:
                row["strip_error"] = first_line(e)
            done("strip")

        stage("count")
        try:
            dense = _count(model)
            row["dense_mmacs"] = dense.macs / 1e6
            row["uncounted"] = len(dense.uncounted)
            row["uncounted_layers"] = list(dense.uncounted)
            if wrapped is not None and compact is not None:
                row["wrapped_mmacs"] = _count(wrapped).macs / 1e6
                row["compact_mmacs"] = _count(compact).macs / 1e6
                row["macs_agree"] = bool(
                    row["wrapped_mmacs"] == row["compact_mmacs"])
        except Exception as e:
            row["count_error"] = first_line(e)
        done("count")

        if tflite and compact is not None:
            stage("tflite")
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    path = os.path.join(output_dir or tmp, f"{name}.tflite")
                    report = keras_chex.export_tflite(
                        compact, path, verbose=False, overwrite=True)
                row["tflite"] = "ok"
                row["tflite_rel_diff"] = float(report.max_rel_diff)
                row["tflite_bytes"] = int(report.size_bytes)
            except Exception as e:
                row["tflite"] = first_line(e)
            done("tflite")

        if entry_points:
            stage("entry_points")
            row["entry_points"], row["entry_point_errors"] = {}, {}
            for key, fn in ENTRY_POINTS.items():
                outcome, error = _entry_point_outcome(fn, model)
                row["entry_points"][key] = outcome
                if error:
                    row["entry_point_errors"][key] = error
            done("entry_points")

    row["warnings"] = sorted({str(w.message).strip().splitlines()[0][:200]
                              for w in caught if str(w.message).strip()})
    row["seconds"] = round(time.time() - start, 1)
    row["stage_seconds"] = stage_seconds
    keras.backend.clear_session()
    return row


# ---------------------------------------------------------------------------
# The report.

COLUMNS = ["model", "groups", "prunable convs", "unsupported",
           "strip diff (rel)", "MACs agree (dense M)", "uncounted",
           "entry points", "TFLite", "s"]


def _cell(text, limit=90):
    text = str(text).replace("|", "/").replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def table_row(row):
    """The Markdown cells of one `check_model` result."""
    if "build_error" in row:
        failed = "build failed: " + row["build_error"]
        return [row["model"], _cell(failed), "-", "-", "-", "-", "-", "-",
                "-", f"{row['seconds']:.0f}"]
    if "groups" in row:
        groups = row["groups"]
    else:
        clone = row.get("keras_clone", "ok")
        groups = _cell(row.get("wrap_error", "-"), 80) + (
            " (keras.models.clone_model fails too)" if clone != "ok" else
            " (keras.models.clone_model works)")
    prunable = (f"{row['prunable_convs']} of {row['convs']}"
                if "prunable_convs" in row else f"? of {row['convs']}")
    if "unsupported" in row:
        names = []
        for _, cls, _ in row["unsupported_layers"]:
            if cls not in names:
                names.append(cls)
        unsupported = str(row["unsupported"]) + (
            f" ({', '.join(names[:3])})" if names else "")
    else:
        unsupported = row.get("analyze_error", "-")
    if "strip_diff" in row:
        strip = f"{row['strip_diff']:.1e} ({row['strip_rel_diff']:.1e})"
    else:
        strip = row.get("strip_error", "-")
    if "macs_agree" in row:
        macs = ("yes" if row["macs_agree"] else
                f"no: {row['wrapped_mmacs']:.2f} vs "
                f"{row['compact_mmacs']:.2f}") + f" ({row['dense_mmacs']:.1f})"
    elif "dense_mmacs" in row:
        macs = f"- ({row['dense_mmacs']:.1f})"
    else:
        macs = row.get("count_error", "-")
    uncounted = row.get("uncounted", "-")
    outcomes = row.get("entry_points")
    if outcomes is None:
        entry = "-"
    else:
        ok = sum(v == "ok" for v in outcomes.values())
        # Entry points that failed alike are listed together.
        alike = collections.OrderedDict()
        for key, outcome in outcomes.items():
            if outcome != "ok":
                alike.setdefault(outcome, []).append(key)
        bad = ["all " + outcome if len(keys) == len(outcomes) else
               f"{', '.join(keys)} {outcome}"
               for outcome, keys in alike.items()]
        entry = f"{ok}/{len(outcomes)}" + (
            "; " + "; ".join(bad) if bad else "")
    return [row["model"], _cell(groups, 130), prunable, _cell(unsupported),
            _cell(strip), _cell(macs), uncounted, _cell(entry, 160),
            _cell(row.get("tflite", "-")), f"{row['seconds']:.0f}"]


def selected_models(names, applications=True, hub=True):
    if names:
        unknown = [n for n in names if n not in MODELS]
        if unknown:
            raise app.UsageError(f"unknown models {unknown}; known: "
                                 f"{', '.join(MODELS)}")
        return list(names)
    return ([n for n in APPLICATIONS if applications]
            + [n for n in HUB if hub])


def main(argv):
    del argv
    bench_report.set_threads(FLAGS.threads)
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    logging.set_verbosity(logging.WARNING)
    names = selected_models(FLAGS.models, FLAGS.applications, FLAGS.hub)
    start = time.time()
    rows = []
    for name in names:
        row = check_model(name, seed=FLAGS.seed, tflite=FLAGS.tflite,
                          entry_points=FLAGS.entry_points)
        rows.append(row)
        print(f"{name}: {row['seconds']:.0f} s", flush=True)
        if FLAGS.output:
            with open(FLAGS.output, "a") as f:
                f.write(json.dumps(row) + "\n")
    seconds = time.time() - start
    print()
    print("Command: `" + bench_report.command_line() + "`")
    for k, v in bench_report.machine_info().items():
        print(f"- {k}: {v}")
    print(f"- keras-hub: {bench_report.package_version('keras-hub')}")
    print(f"- keras-chex: {keras_chex.__version__}")
    print()
    print(bench_report.markdown_table(COLUMNS, [table_row(r) for r in rows]))
    print()
    print(f"{len(rows)} models in {seconds:.0f} s.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
