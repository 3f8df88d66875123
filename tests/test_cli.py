"""The `keras-chex` command installed with the package, on tiny models."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import layers

import keras_chex
from keras_chex import cli
from keras_chex.cifar.resnet import cifar_resnet

COMMAND = os.path.join(os.path.dirname(sys.executable), "keras-chex")


def run(*args, timeout=600):
    return subprocess.run([COMMAND, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    keras.utils.set_random_seed(0)
    plain = cifar_resnet(8)
    plain.save(root / "plain.keras")
    pruning = keras_chex.prune_and_regrow(plain, flops=0.5, seed=0)
    pruning.save(root / "stale.keras")
    calibration = np.random.default_rng(0).uniform(
        size=(8, 32, 32, 3)).astype("float32")
    keras_chex.recalibrate_batchnorm(pruning, calibration, batch_size=4)
    pruning.save(root / "pruning.keras")
    inp = keras.Input((None, None, 3))
    x = layers.GlobalAveragePooling2D()(layers.Conv2D(4, 3)(inp))
    keras.Model(inp, layers.Dense(2)(x)).save(root / "free.keras")
    np.save(root / "calibration.npy", calibration)
    keras.Sequential([keras.Input((32, 32, 3)), layers.Conv2D(4, 3),
                      layers.GlobalAveragePooling2D(),
                      layers.Dense(3, activation="softmax")]).save(
        root / "softmax.keras")
    return root


def test_the_command_is_installed_and_has_help():
    result = run("--help")
    assert result.returncode == 0
    for command in ("count", "strip", "export", "prune"):
        assert command in result.stdout


@pytest.mark.parametrize("args", [("--help",), ("prune", "--help"),
                                  ("prune", "m.keras", "--flops=2")])
def test_help_and_argument_errors_answer_without_loading_tensorflow(args):
    # The installed command run in a process that reports, on exit,
    # whether TensorFlow was imported.
    probe = (
        "import atexit, runpy, sys\n"
        "atexit.register(lambda: print('tensorflow loaded:', "
        "'tensorflow' in sys.modules))\n"
        f"sys.argv = {[COMMAND, *args]!r}\n"
        f"runpy.run_path({COMMAND!r}, run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", probe],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode in (0, 2)
    assert "usage: keras-chex" in result.stdout + result.stderr
    assert "tensorflow loaded: False" in result.stdout, result.stdout


def test_count_prints_a_per_layer_table(files):
    result = run("count", files / "plain.keras", "--top", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["layer", "MACs", "params"]
    assert len(lines) == 5 and lines[-1].startswith("total")
    total = int(lines[-1].split()[1].replace(",", ""))
    assert total == keras_chex.count_macs(cifar_resnet(8)).macs
    # A pruning model: channels and MACs before and after.
    result = run("count", files / "pruning.keras")
    assert result.returncode == 0, result.stderr
    assert "MACs before" in result.stdout and "->" in result.stdout
    assert "% kept" in result.stdout.splitlines()[-1]
    # What a user sees: no TensorFlow start-up lines.
    assert "I0000" not in result.stderr and "oneDNN" not in result.stderr


def test_count_needs_an_input_shape_for_free_spatial_dims(files):
    result = run("count", files / "free.keras")
    assert result.returncode == 2
    assert "--input_shape" in result.stderr
    assert "Traceback" not in result.stderr
    result = run("count", files / "free.keras", "--input_shape=16,16,3")
    assert result.returncode == 0, result.stderr
    total = int(result.stdout.splitlines()[-1].split()[1].replace(",", ""))
    assert total == 14 * 14 * 27 * 4 + 4 * 2


def test_export_converts_a_free_size_model_at_the_input_shape(files,
                                                             tmp_path):
    out = tmp_path / "free.tflite"
    result = run("export", files / "free.keras", "--tflite", out)
    assert result.returncode == 2
    assert "--input_shape" in result.stderr
    assert not out.exists()
    result = run("export", files / "free.keras", "--tflite", out,
                 "--input_shape=16,16,3")
    assert result.returncode == 0, result.stderr
    assert out.exists()
    from ai_edge_litert.interpreter import Interpreter

    shape = Interpreter(str(out)).get_input_details()[0]["shape"]
    assert list(shape[1:]) == [16, 16, 3]


def test_strip_writes_the_compact_model_and_never_overwrites(files, tmp_path):
    out = tmp_path / "compact.keras"
    result = run("strip", files / "pruning.keras", out)
    assert result.returncode == 0, result.stderr
    compact = keras.saving.load_model(out)
    assert not keras_chex.is_wrapped(compact)
    pruning = keras.saving.load_model(files / "pruning.keras")
    assert keras_chex.count_macs(compact).macs == (
        keras_chex.count_macs(pruning).macs)
    before = out.stat().st_mtime_ns
    result = run("strip", files / "pruning.keras", out)
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert out.stat().st_mtime_ns == before
    result = run("strip", files / "plain.keras", tmp_path / "x.keras")
    assert result.returncode == 2 and "nothing to strip" in result.stderr


def test_export_tflite_float_and_int8(files, tmp_path):
    result = run("export", files / "pruning.keras", "--tflite",
                 tmp_path / "m.tflite")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m.tflite").stat().st_size > 0
    assert "max relative difference" in result.stdout
    # One line per stage, and nothing from LiteRT or TensorFlow on stderr.
    for line in ("[1/3] stripping the pruning model ... ",
                 "[2/3] converting to TFLite (none (float32)) ... ",
                 "[3/3] verifying the file against Keras on 1 input(s) ... "):
        assert line in result.stdout, result.stdout
    assert "XNNPACK" not in result.stderr + result.stdout
    assert result.stderr.strip() == "", result.stderr
    # A model saved right after a mask change: the one real warning, as one
    # line naming the fix, and the export still goes through.
    result = run("export", files / "stale.keras", "--tflite",
                 tmp_path / "s.tflite")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("keras-chex export: warning: Stripping")
    assert "recalibrate_batchnorm" in lines[0]
    result = run("export", files / "plain.keras", "--tflite",
                 tmp_path / "q.tflite", "--quantization=int8")
    assert result.returncode == 2 and "--representative" in result.stderr
    result = run("export", files / "plain.keras", "--tflite",
                 tmp_path / "q.tflite", "--quantization=int8",
                 "--representative", files / "calibration.npy")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "q.tflite").stat().st_size < (
        tmp_path / "m.tflite").stat().st_size * 2


def test_prune_fits_strips_and_exports(files, tmp_path, tiny_cifar_flags):
    out = tmp_path / "run"
    result = run("prune", files / "plain.keras", "--method=frs",
                 "--flops=0.5", "--epochs=1", *tiny_cifar_flags,
                 f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    kept = float(result.stdout.split("MACs kept ")[1].split(";")[0])
    assert 0.45 <= kept <= 0.5
    # What the user reads: a header, the method's steps, the re-estimated
    # statistics and the compact model's held-out accuracy; one line per
    # epoch in a redirected log, no progress-bar control codes.
    assert result.stdout.startswith("data: ")
    assert "FRS: keep 50% of the MACs" in result.stdout
    assert "FRS pruning step 1/" in result.stdout
    assert "BatchNorm statistics re-estimated on " in result.stdout
    accuracy = float(result.stdout.split(
        "held-out accuracy of the compact model ")[1].split(";")[0])
    assert 0.0 <= accuracy <= 1.0
    assert "\x08" not in result.stdout and "\r" not in result.stdout
    assert "recalibrate_batchnorm" not in result.stderr
    for name in ("pruning.keras", "compact.keras", "compact.tflite"):
        assert (out / name).stat().st_size > 0, name


def test_prune_takes_a_model_of_free_size_at_the_datas_size(
        tmp_path, tiny_cifar_flags):
    keras.utils.set_random_seed(0)
    free = tmp_path / "free_resnet.keras"
    cifar_resnet(8, widths=(8, 8, 8), input_shape=(None, None, 3)).save(free)
    out = tmp_path / "run"
    result = run("prune", free, "--method=frs", "--epochs=1",
                 *tiny_cifar_flags,
                 f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    kept = float(result.stdout.split("MACs kept ")[1].split(";")[0])
    assert kept <= 0.5 + 1e-9
    compact = keras.saving.load_model(out / "compact.keras")
    assert tuple(compact.inputs[0].shape) == (None, None, None, 3)
    assert (out / "compact.tflite").exists()


def test_prune_once_cuts_then_fine_tunes_with_distillation(
        files, tmp_path, tiny_cifar_flags):
    out = tmp_path / "run"
    result = run("prune", files / "plain.keras", "--method=once",
                 "--flops=0.5", "--epochs=1", *tiny_cifar_flags,
                 "--distill",
                 f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ONCE: keep 50% of the MACs" in result.stdout
    assert "cut once: " in result.stdout and "before fine-tuning" in (
        result.stdout)
    kept = float(result.stdout.split("MACs kept ")[1].split(";")[0])
    assert 0.4 < kept <= 0.5 + 1e-9
    # Nothing to strip: the compact model is what was fine-tuned.
    assert not (out / "pruning.keras").exists()
    for name in ("compact.keras", "compact.tflite"):
        assert (out / name).stat().st_size > 0, name


def test_prune_distills_from_the_input_model(
        files, tmp_path, tiny_cifar_flags):
    out = tmp_path / "run"
    result = run("prune", files / "plain.keras", "--method=smcp",
                 "--flops=0.5", "--epochs=1", *tiny_cifar_flags,
                 "--distill",
                 "--temperature=2", f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distilling from " in result.stdout
    assert "temperature 2, label weight 0.5" in result.stdout
    # The Distiller's own losses are in the epoch line.
    assert "distillation_loss" in result.stdout
    kept = float(result.stdout.split("MACs kept ")[1].split(";")[0])
    assert kept <= 0.5 + 1e-9
    assert "LogitsDistillation" not in result.stderr
    for name in ("pruning.keras", "compact.keras", "compact.tflite"):
        assert (out / name).stat().st_size > 0, name


def test_table_measures_and_prune_spends_a_latency_budget(
        files, tmp_path, tiny_cifar_flags):
    table_path = tmp_path / "latency.json"
    small = tmp_path / "small.keras"
    keras.utils.set_random_seed(0)
    cifar_resnet(8, widths=(8, 8, 8)).save(small)
    result = run("table", small, table_path, "--round_to=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert table_path.exists()
    assert "predicted" in result.stdout and " ms at 1 thread" in result.stdout
    out = tmp_path / "run"
    result = run("prune", small, "--method=chex", "--latency=0.6",
                 f"--cost_table={table_path}", "--epochs=1",
                 *tiny_cifar_flags,
                 f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "keep 60% of the predicted latency" in result.stdout
    # The method spends the budget by the table...
    spent = float(result.stdout.split(" of dense cost")[0].split("kept ")[-1])
    if "cannot be met" in result.stderr:
        # ... or, where this machine's table prices even the narrowest
        # widths above it (a fixed cost per invoke dominates this 0.06 ms
        # model on some CPUs), takes those widths and says so, once.
        floor = float(result.stderr.split("narrowest widths allowed keep ")
                      [1].split()[0])
        assert floor > 0.6 and spent == pytest.approx(floor, abs=1e-3)
        assert result.stderr.count("cannot be met") == 1
    else:
        assert 0.4 < spent <= 0.6 + 1e-6
    # ... and the compact is priced as the wrapped model was in training.
    kept = float(result.stdout.split("predicted latency (the table's "
                                     "device): ")[1].split("kept ")[1]
                 .split()[0])
    assert kept == pytest.approx(spent, abs=2e-3)
    assert (out / "compact.tflite").exists()


@pytest.mark.parametrize("args, message", [
    (("count", "missing.keras"), "no such file"),
    (("prune", "{plain}", "--flops=1.5"), "fraction in (0, 1]"),
    (("prune", "{pruning}"), "already a pruning model"),
    (("export", "{plain}"), "nothing to write"),
    (("count", "{plain}", "--input_shape=abc"), "224,224,3"),
    (("prune", "{plain}", "--distill", "--temperature=0"), "number > 0"),
    (("prune", "{plain}", "--distill", "--alpha=2"), "in [0, 1]"),
    (("prune", "{softmax}", "--distill"), "ends in a softmax"),
    (("prune", "{plain}", "--alpha=0.3"), "add --distill"),
    (("prune", "{plain}", "--latency=0.5"), "needs --cost_table"),
    (("prune", "{plain}", "--latency=0.5", "--flops=0.5"), "one target"),
    (("prune", "{plain}", "--cost_table=t.json"), "add --latency"),
    (("prune", "{plain}", "--latency=0.5", "--cost_table=missing.json"),
     "no such file"),
    (("table", "{plain}", "t.json", "--threads=0"), "--threads must be"),
])
def test_mistakes_are_one_line_with_exit_code_2(files, args, message,
                                               capsys):
    args = [a.format(plain=files / "plain.keras",
                     pruning=files / "pruning.keras",
                     softmax=files / "softmax.keras") for a in args]
    # In this process (the command's own `main`): a new process per case
    # costs seconds of imports; the installed command is run by the tests
    # above and below.
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse's own errors.
        code = e.code
    stderr = capsys.readouterr().err
    # The error is the last line (argparse prints the usage above it).
    last = stderr.strip().splitlines()[-1]
    assert code == 2
    assert last.startswith("keras-chex ") and ": error: " in last, stderr
    assert message in last and "Traceback" not in stderr


@pytest.mark.parametrize("held_out, message", [
    (None, "--val_per_class=500 leaves no training images"),
    (0, "--val_per_class must be >= 1")])
def test_a_small_data_set_is_told_to_hold_out_fewer_images(
        files, tiny_cifar, tmp_path, capsys, held_out, message):
    args = ["prune", str(files / "plain.keras"), f"--data={tiny_cifar}",
            f"--output_dir={tmp_path}"]
    if held_out is not None:
        args.append(f"--val_per_class={held_out}")
    assert cli.main(args) == 2
    stderr = capsys.readouterr().err
    assert message in stderr, stderr
    assert "Pass a value below 30" in stderr or held_out == 0
    assert not os.listdir(tmp_path)


def test_verbose_shows_the_traceback(files):
    result = run("--verbose", "count", "missing.keras")
    assert result.returncode != 0 and "Traceback" in result.stderr
