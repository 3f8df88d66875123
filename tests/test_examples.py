"""The README's main job, run end to end on a tiny budget."""

import os
import re
import subprocess
import sys

from conftest import REPO_ROOT

EXAMPLE = os.path.join(REPO_ROOT, "examples", "cifar10_resnet_chex.py")


def run_example(*flags, timeout=600):
    """Runs the main job's script on the CPU with `flags`."""
    return subprocess.run(
        [sys.executable, EXAMPLE, *flags],
        capture_output=True, text=True, timeout=timeout,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
    )


def test_cifar10_example_trains_strips_exports_and_reports(
        tmp_path, tiny_cifar_flags):
    out = tmp_path / "run"
    result = run_example(
        "--depth=8", "--epochs=1", "--target=0.5", *tiny_cifar_flags,
        f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    kept = float(re.search(r"MACs kept: ([0-9.]+)", text).group(1))
    # Never over the target. One first-stage channel of this tiny ResNet-8
    # is worth 2-3% of its MACs, so the target is met to within a channel.
    assert 0.47 <= kept <= 0.5
    compact, wrapped = map(float, re.search(
        r"accuracy: ([0-9.]+) \(compact\) = ([0-9.]+)", text).groups())
    # The compact model is the pruning model with channels removed.
    assert abs(compact - wrapped) < 1e-3
    # Evaluated with the statistics of its final weights.
    before, after = map(float, re.search(
        r"BatchNorm statistics re-estimated on \d+ training batches: "
        r"held-out accuracy ([0-9.]+) -> ([0-9.]+)", text).groups())
    assert after == wrapped
    assert f"widths per group: {out / 'widths.png'}" in text
    # TensorFlow's C++ start-up notes are not part of the summary.
    for note in ("InitializeLog", "cudart_stub", "cuInit", "cpu_feature"):
        assert note not in result.stderr, result.stderr[-3000:]
    for name in ("pruning_model.keras", "compact.keras", "dense.tflite",
                 "compact.tflite", "widths.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "compact.tflite").stat().st_size < (
        out / "dense.tflite").stat().st_size


def test_cifar10_example_rejects_a_bad_target(tmp_path):
    result = run_example(
        "--target=1.5", f"--output_dir={tmp_path}", timeout=120)
    assert result.returncode != 0
    assert "target" in result.stderr
    assert "Traceback" not in result.stderr


def test_cifar10_example_with_smcp_meets_the_macs_target(
        tmp_path, tiny_cifar_flags):
    out = tmp_path / "run"
    result = run_example(
        "--depth=8", "--epochs=1", "--target=0.5", "--method=smcp",
        *tiny_cifar_flags,
        f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    assert "SMCP" in text
    kept = float(re.search(r"MACs kept: ([0-9.]+)", text).group(1))
    assert 0.3 <= kept <= 0.5
    # What the user sees: no TensorFlow INFO pages, no Keras shuffle
    # warning about the dataset.
    assert "Assets written" not in result.stdout + result.stderr
    assert "shuffle=True" not in result.stderr
    assert (out / "compact.tflite").stat().st_size > 0


def test_cifar10_example_with_relevance_pruning(tmp_path, tiny_cifar_flags):
    out = tmp_path / "run"
    result = run_example("--depth=8", "--epochs=2", "--target=0.5",
                         "--method=frs", *tiny_cifar_flags,
                         f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    assert "FRS pruning step" in text and "FRS, target 50% of MACs" in text
    kept = float(re.search(r"MACs kept: ([0-9.]+)", text).group(1))
    assert 0.45 <= kept <= 0.5
    compact, wrapped = map(float, re.search(
        r"accuracy: ([0-9.]+) \(compact\) = ([0-9.]+)", text).groups())
    assert abs(compact - wrapped) < 1e-3
    assert (out / "compact.tflite").stat().st_size > 0


def test_cifar10_example_refuses_latency_without_smcp(tmp_path):
    result = run_example(
        "--latency=0.5", f"--output_dir={tmp_path}", timeout=120)
    assert result.returncode != 0
    assert "--method=smcp" in result.stderr
    assert "Traceback" not in result.stderr
