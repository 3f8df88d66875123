"""The `keras-chex` command: count, strip, export and prune `.keras` models.

    keras-chex count model.keras [--input_shape=224,224,3]
    keras-chex strip pruning.keras compact.keras
    keras-chex export model.keras --tflite out.tflite [--quantization=int8
        --representative=images/] [--input_shape=224,224,3]
    keras-chex prune model.keras --method=chex --flops=0.5 --data=train.zip
        --epochs=30 [--distill] [--output_dir=out]
    keras-chex prune trained.keras --method=once --flops=0.5 --epochs=6
        --distill
    keras-chex table model.keras latency.json [--threads=1]
    keras-chex prune model.keras --latency=0.5 --cost_table=latency.json

A mistake is one line on stderr with what to do, and exit code 2; pass
`--verbose` for the traceback.
"""

import argparse
import contextlib
import os
import sys
import time
import warnings

from keras_chex.methods import registry

USAGE_ERROR = 2
# Batches `prune` re-estimates the BatchNorm statistics on after fitting.
RECALIBRATION_BATCHES = 50
# `prune --method` for `prune_once` followed by plain fine-tuning.
ONCE = "once"
# What `prune --data` feeds: CIFAR-layout images.
IMAGE_SHAPE = (32, 32, 3)


class CliError(Exception):
    """A mistake of the user's, shown as one line."""


def _parse_shape(text):
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected sizes like 224,224,3, got {text!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(
            f"expected positive sizes like 224,224,3, got {text!r}")
    return shape


def _fraction(text):
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"expected a fraction in (0, 1], got {value}")
    return value


def _number(text):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _positive(text):
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def _fraction_or_zero(text):
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(
            f"expected a number in [0, 1], got {value}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-chex",
        description="Channel pruning for Keras 3: count, strip, export and "
                    "prune .keras models.")
    parser.add_argument("--verbose", action="store_true",
                        help="show tracebacks and TensorFlow's log")
    sub = parser.add_subparsers(dest="command", required=True)

    count = sub.add_parser("count", help="MACs and parameters per layer")
    count.add_argument("model", help="a .keras file")
    count.add_argument("--input_shape", type=_parse_shape,
                       help="size to count at, e.g. 224,224,3 (for models "
                            "with free spatial dimensions)")
    count.add_argument("--top", type=int, default=None,
                       help="show only the N layers with the most MACs")

    strip = sub.add_parser("strip", help="pruning model -> compact model")
    strip.add_argument("model", help="a .keras pruning model")
    strip.add_argument("output", help="where the compact .keras goes")
    strip.add_argument("--overwrite", action="store_true")

    export = sub.add_parser("export", help="verified TFLite / SavedModel")
    export.add_argument("model", help="a .keras file (stripped if wrapped)")
    export.add_argument("--tflite", metavar="PATH",
                        help="write a .tflite file here")
    export.add_argument("--saved_model", metavar="DIR",
                        help="write a SavedModel directory here")
    export.add_argument("--quantization",
                        choices=["none", "float16", "dynamic", "int8"],
                        default="none")
    export.add_argument("--representative", metavar="PATH",
                        help="int8 calibration inputs: a .npy array or a "
                             "folder of images (scaled to [0, 1])")
    export.add_argument("--input_shape", type=_parse_shape,
                        help="size to convert and verify at, e.g. "
                             "224,224,3 (for models with free spatial "
                             "dimensions)")
    export.add_argument("--overwrite", action="store_true")

    table = sub.add_parser("table", help="measure a latency table (LiteRT, "
                                         "this machine)")
    table.add_argument("model", help="a .keras model (plain, the one to "
                                     "prune)")
    table.add_argument("output", help="the table's JSON file (reused and "
                                      "extended if it exists)")
    table.add_argument("--threads", type=int, default=1,
                       help="LiteRT threads, as the device will use "
                            "(default 1)")
    table.add_argument("--round_to", type=int, default=8,
                       help="channel step of the widths measured (default "
                            "8)")
    table.add_argument("--input_shape", type=_parse_shape,
                       help="size to measure at, e.g. 224,224,3 (for "
                            "models with free spatial dimensions)")

    prune = sub.add_parser("prune", help="fit with a pruning method, strip, "
                                         "export")
    prune.add_argument("model", help="a .keras classifier (plain)")
    prune.add_argument(
        "--method", choices=registry.names() + [ONCE], default="chex",
        help="; ".join([f"{n}: {registry.get(n).summary}"
                        for n in registry.names()]
                       + [f"{ONCE}: cut once by filter L1 norm, then "
                          "fine-tune the compact model (for a trained "
                          "model: the best route measured)"]))
    prune.add_argument("--flops", type=_fraction, default=None,
                       help="fraction of the MACs to keep (default 0.5)")
    prune.add_argument("--latency", type=_fraction, default=None,
                       help="fraction of the predicted latency to keep "
                            "instead (needs --cost_table)")
    prune.add_argument("--cost_table", metavar="JSON", default=None,
                       help="a latency table measured on the target device "
                            "(`keras-chex table`)")
    prune.add_argument("--data", default=None,
                       help="training images: a zip or folder of one "
                            "sub-folder of 32x32 JPEGs per class (the "
                            "CIFAR-10 layout); default: the bundled sample")
    prune.add_argument("--val_per_class", type=int, default=None,
                       help="images of each class held out for accuracy "
                            "(default: 500 of --data, 100 of the sample)")
    prune.add_argument("--epochs", type=int, default=10)
    prune.add_argument("--batch_size", type=int, default=128)
    prune.add_argument("--learning_rate", type=float, default=0.05)
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument(
        "--distill", action="store_true",
        help="learn from the input model while pruning: it is the teacher "
             "of a keras.distillation.Distiller (for a trained model)")
    prune.add_argument("--temperature", type=_positive, default=None,
                       help="distillation temperature (default 4)")
    prune.add_argument("--alpha", type=_fraction_or_zero, default=None,
                       help="weight of the label loss against the "
                            "distillation loss (default 0.5)")
    prune.add_argument("--output_dir", default="keras_chex_out")
    prune.add_argument("--overwrite", action="store_true")
    return parser


# -- commands ----------------------------------------------------------------
def _load(path):
    import keras

    import keras_chex  # noqa: F401 (registers the classes to load)

    if not os.path.exists(path):
        raise CliError(f"{path}: no such file")
    try:
        return keras.saving.load_model(path)
    except Exception as e:  # Keras raises many kinds for a bad file.
        raise CliError(f"{path}: cannot load it as a Keras model "
                       f"({type(e).__name__}: {str(e).splitlines()[0]})")


def _check_target(path, overwrite):
    if os.path.exists(path) and not overwrite:
        raise CliError(f"{path} exists; pass --overwrite to replace it")


def _count_line(label, count):
    return f"{label:<9} {count.macs:>15,} MACs  {count.params:>12,} params"


def _count(model, input_shape):
    import keras_chex

    try:
        return keras_chex.count_macs(model, input_shape=input_shape)
    except ValueError as e:
        message = str(e)
        if "unknown spatial size" in message:
            message = ("the model's spatial size is free: pass "
                       "--input_shape, e.g. --input_shape=224,224,3")
        raise CliError(message)


def cmd_count(args):
    import keras_chex

    model = _load(args.model)
    count = _count(model, args.input_shape)
    if keras_chex.is_wrapped(model):
        import numpy as np

        dense = keras_chex.count_macs(
            model, class_mask=np.ones(model.analysis.num_channels, bool),
            input_shape=args.input_shape)
        print(count.table(top=args.top, reference=dense))
    else:
        print(count.table(top=args.top))
    return 0


def cmd_strip(args):
    import keras_chex

    model = _load(args.model)
    if not keras_chex.is_wrapped(model):
        raise CliError(f"{args.model} is a plain Keras model: nothing to "
                       "strip (it has no keras-chex masks)")
    _check_target(args.output, args.overwrite)
    before = keras_chex.count_macs(model)
    compact = keras_chex.strip(model)
    after = keras_chex.count_macs(
        compact, input_shape=model.pruning_config.get("input_shape"))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    compact.save(args.output)
    print(_count_line("pruning", before) + "  (masked)")
    print(_count_line("compact", after))
    print(f"wrote {args.output}")
    return 0


def _representative(path, model):
    import numpy as np

    if path is None:
        return None
    if path.endswith(".npy"):
        return np.load(path)
    if not os.path.isdir(path):
        raise CliError(f"--representative {path}: expected a .npy file or "
                       "a folder of images")
    import keras

    size = tuple(model.inputs[0].shape[1:3])
    if None in size:
        raise CliError("the model's input size is free: give "
                       "--representative as a .npy array instead")
    files = sorted(f for f in os.listdir(path)
                   if f.lower().endswith((".jpg", ".jpeg", ".png")))[:200]
    if not files:
        raise CliError(f"--representative {path}: no .jpg or .png images")
    images = [keras.utils.img_to_array(keras.utils.load_img(
        os.path.join(path, f), target_size=size)) / 255.0 for f in files]
    return np.stack(images).astype("float32")


def cmd_export(args):
    import keras_chex

    if not args.tflite and not args.saved_model:
        raise CliError("nothing to write: pass --tflite PATH and/or "
                       "--saved_model DIR")
    model = _load(args.model)
    quantization = None if args.quantization == "none" else args.quantization
    if quantization == "int8" and not args.representative:
        raise CliError("--quantization=int8 needs --representative (a .npy "
                       "array or a folder of calibration images)")
    count = _count(model, args.input_shape)
    if keras_chex.is_wrapped(model):
        print(_count_line("pruning", count) + "  (masked; exported stripped)")
    else:
        print(_count_line("model", count))
    if args.tflite:
        _check_target(args.tflite, args.overwrite)
        start = time.time()
        try:
            report = keras_chex.export_tflite(
                model, args.tflite, quantization=quantization,
                representative_data=_representative(args.representative,
                                                    model),
                overwrite=args.overwrite, verbose=True,
                input_shape=args.input_shape)
        except (ValueError, TypeError) as e:
            raise CliError(str(e).splitlines()[0])
        print(f"wrote {args.tflite}: {report.size_bytes / 1024:.1f} KB, max "
              f"relative difference to Keras {report.max_rel_diff:.2e} "
              f"({time.time() - start:.1f} s)")
    if args.saved_model:
        _check_target(args.saved_model, args.overwrite)
        keras_chex.export_saved_model(model, args.saved_model,
                                      overwrite=args.overwrite)
        print(f"wrote {args.saved_model}/")
    return 0


def cmd_prune(args):
    import keras

    import keras_chex
    from keras_chex.cifar import data as datasets

    model = _load(args.model)
    if keras_chex.is_wrapped(model):
        raise CliError(f"{args.model} is already a pruning model; give the "
                       "plain model to prune")
    shape = tuple(model.inputs[0].shape[1:])
    if len(model.inputs) != 1 or len(shape) != 3 or any(
            d not in (None, want) for d, want in zip(shape, IMAGE_SHAPE)):
        raise CliError(
            f"--data gives 32x32x3 images, but the model's input is "
            f"{shape}")
    target = _target(args)
    fraction, resource = ((target["flops"], "MACs") if "flops" in target
                          else (target["latency"], "predicted latency"))
    if args.distill:
        _check_distill(model, args)
    else:
        for name in ("temperature", "alpha"):
            if getattr(args, name) is not None:
                raise CliError(f"--{name} sets up distillation: add "
                               "--distill, or drop it")
    outputs = (("compact.keras", "compact.tflite") if args.method == ONCE
               else ("pruning.keras", "compact.keras", "compact.tflite"))
    for name in outputs:
        _check_target(os.path.join(args.output_dir, name), args.overwrite)
    if args.val_per_class is not None and args.val_per_class < 1:
        raise CliError("--val_per_class must be >= 1: the held-out images "
                       "measure the accuracy")
    try:
        (x, y), (xv, yv) = datasets.load_cifar10(
            args.data, validation_per_class=args.val_per_class)
    except datasets.ValidationSplitError as e:
        raise CliError(f"--data: {e.describe('--val_per_class')}")
    except (OSError, ValueError) as e:
        raise CliError(f"--data: {str(e).splitlines()[0]}")
    train = datasets.make_dataset(x, y, args.batch_size, training=True,
                                  seed=args.seed)
    val = datasets.make_dataset(xv, yv, 256, training=False)
    print(f"data: {len(x)} training, {len(xv)} held-out images "
          f"({args.data or 'bundled sample'})")
    print(f"{args.method.upper()}: keep {fraction:.0%} of the {resource} of "
          f"{args.model}; {args.epochs} epoch(s), batch {args.batch_size}, "
          f"learning rate {args.learning_rate}")
    dense = keras_chex.count_macs(model, input_shape=IMAGE_SHAPE)
    try:
        # A model of free size is priced (and exported) at the data's size.
        if args.method == ONCE:
            wrapped = keras_chex.prune_once(model, input_shape=IMAGE_SHAPE,
                                            **target)
            callbacks = []
            kept = keras_chex.count_macs(
                wrapped, input_shape=IMAGE_SHAPE).macs / dense.macs
            print(f"cut once: {kept:.3f} of the MACs kept; held-out "
                  f"accuracy {datasets.accuracy(wrapped, val):.4f} before "
                  "fine-tuning")
        else:
            method = registry.get(args.method)
            prune, callback_class = method.load()
            wrapped = prune(model, seed=args.seed, input_shape=IMAGE_SHAPE,
                            **target)
            callbacks = [method.make_callback(callback_class, train,
                                              verbose=1)]
    except ValueError as e:
        raise CliError(str(e).splitlines()[0])
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=_ends_in_logits(model))
    trainer = _distiller(model, wrapped, args) if args.distill else wrapped
    trainer.compile(optimizer=keras.optimizers.SGD(
        args.learning_rate, momentum=0.9), loss=loss, metrics=["accuracy"])
    # A progress bar only where someone watches it: in a redirected log it
    # is kilobytes of control codes.
    trainer.fit(train, epochs=args.epochs, validation_data=val,
                shuffle=False, callbacks=callbacks,
                verbose=1 if sys.stdout.isatty() else 2)
    # The moving averages lag weights that moved to the last step (and any
    # late mask change); the final weights' statistics are a cheap pass
    # away (docs/benchmarks.md, "BatchNorm statistics").
    moving = datasets.accuracy(wrapped, val)
    batches = min(RECALIBRATION_BATCHES, len(train))
    keras_chex.recalibrate_batchnorm(wrapped, train, batches=batches)
    print(f"BatchNorm statistics re-estimated on {batches} training "
          f"batches: held-out accuracy {moving:.4f} -> "
          f"{datasets.accuracy(wrapped, val):.4f}")
    os.makedirs(args.output_dir, exist_ok=True)
    if keras_chex.is_wrapped(wrapped):
        compact = keras_chex.strip(wrapped)
        wrapped.save(os.path.join(args.output_dir, "pruning.keras"))
    else:
        compact = wrapped
    compact.save(os.path.join(args.output_dir, "compact.keras"))
    report = keras_chex.export_tflite(
        compact, os.path.join(args.output_dir, "compact.tflite"),
        overwrite=args.overwrite, verbose=True, input_shape=IMAGE_SHAPE)
    after = keras_chex.count_macs(compact, input_shape=IMAGE_SHAPE)
    print(after.table(top=10, reference=dense))
    if "cost_table" in target:
        table = target["cost_table"]
        from keras_chex.core import input_shapes

        ms, dense_ms = (table.predict(input_shapes.at_input_shape(
            m, IMAGE_SHAPE)) for m in (compact, model))
        print(f"predicted latency (the table's device): {ms:.3f} ms of "
              f"{dense_ms:.3f} ms dense, kept {ms / dense_ms:.3f}")
    print(f"MACs kept {after.macs / dense.macs:.3f}; held-out accuracy of "
          f"the compact model {datasets.accuracy(compact, val):.4f}; "
          f"compact.tflite {report.size_bytes / 1024:.1f} KB; files in "
          f"{args.output_dir}")
    return 0


def _target(args):
    """The entry point's target arguments from --flops / --latency."""
    if args.latency is None:
        if args.cost_table is not None:
            raise CliError("--cost_table prices a --latency target: add "
                           "--latency=FRACTION, or drop it")
        return {"flops": 0.5 if args.flops is None else args.flops}
    if args.flops is not None:
        raise CliError("give one target: --flops or --latency, not both")
    if args.cost_table is None:
        raise CliError("--latency needs --cost_table: measure one on the "
                       "target device with `keras-chex table model.keras "
                       "latency.json`")
    if not os.path.exists(args.cost_table):
        raise CliError(f"--cost_table {args.cost_table}: no such file "
                       "(`keras-chex table model.keras FILE` measures one)")
    from keras_chex.core import latency_table

    try:
        table = latency_table.LatencyTable.load(args.cost_table)
    except (OSError, ValueError, KeyError) as e:
        raise CliError(f"--cost_table {args.cost_table}: not a latency "
                       f"table ({str(e).splitlines()[0]})")
    return {"latency": args.latency, "cost_table": table}


def _check_distill(model, args):
    import keras

    if getattr(keras, "distillation", None) is None:
        raise CliError(f"--distill needs Keras >= 3.12 (this is "
                       f"{keras.__version__}): upgrade keras")
    if not _ends_in_logits(model):
        raise CliError(
            f"--distill compares the model's logits, but {args.model} ends "
            "in a softmax: save the model without its final softmax (and "
            "apply it after inference)")


def _distiller(teacher, student, args):
    """`student` as the student of `teacher` in Keras' own Distiller."""
    import keras

    temperature = 4.0 if args.temperature is None else args.temperature
    alpha = 0.5 if args.alpha is None else args.alpha
    print(f"distilling from {args.model}: temperature {temperature:g}, "
          f"label weight {alpha:g}")
    return keras.distillation.Distiller(
        teacher=teacher, student=student,
        distillation_losses=keras.distillation.LogitsDistillation(
            temperature=temperature, loss=keras.losses.KLDivergence()),
        student_loss_weight=alpha)


def _ends_in_logits(model):
    import keras

    last = model.layers[-1]
    activation = getattr(last, "activation", None)
    return not (isinstance(last, keras.layers.Softmax) or getattr(
        activation, "__name__", "") == "softmax")


def cmd_table(args):
    import keras_chex

    model = _load(args.model)
    for name in ("threads", "round_to"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name} must be >= 1")
    start = time.time()
    try:
        table = keras_chex.build_latency_table(
            model, args.output, threads=args.threads,
            round_to=args.round_to, verbose=1, input_shape=args.input_shape)
    except ValueError as e:
        raise CliError(str(e).splitlines()[0])
    measured = model
    if args.input_shape is not None:
        from keras_chex.core import input_shapes

        measured = input_shapes.at_input_shape(model, args.input_shape)
    print(f"wrote {args.output}: {len(table.entries)} layer computation(s); "
          f"{model.name} predicted {table.predict(measured):.3f} ms at "
          f"{args.threads} thread(s) ({time.time() - start:.1f} s)")
    return 0


COMMANDS = {"count": cmd_count, "strip": cmd_strip, "export": cmd_export,
            "prune": cmd_prune, "table": cmd_table}


@contextlib.contextmanager
def _one_line_warnings(command):
    """Shows warnings as `keras-chex <command>: warning: ...` on stderr.

    A command-line user has no use for the library's file and line."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"keras-chex {command}: warning: {message}",
              file=file or sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        if not args.verbose:
            from keras_chex.deploy import export

            with export.quiet_tensorflow_info(), _one_line_warnings(
                    args.command):
                return COMMANDS[args.command](args)
        return COMMANDS[args.command](args)
    except CliError as e:
        if args.verbose:
            raise
        print(f"keras-chex {args.command}: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except Exception as e:  # Anything else: one line, not a traceback.
        if args.verbose:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"keras-chex {args.command}: error: {type(e).__name__}: "
              f"{first} (run with --verbose for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
