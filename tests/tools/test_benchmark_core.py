"""Smoke test of tools/benchmark_core.py with tiny settings."""

import re

import keras
import pytest

from keras_chex.cifar import resnet as cifar_resnet
from conftest import load_tool



@pytest.fixture(scope="module")
def bench():
    return load_tool("benchmark_core.py")


def _tiny_cnn():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    y = keras.layers.Conv2D(8, 3, padding="same", name="c2")(x)
    x = keras.layers.Add()([x, y])
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(4)(x), name="tiny")


def _table(text, header):
    """The rows (lists of cells) of the Markdown table starting at `header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    assert re.fullmatch(r"\|(-+\|)+", lines[start + 1])
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_report_tiny(bench):
    text = bench.report(
        repeats=1,
        batch_size=8,
        train_rounds=2,
        train_steps=3,
        warmup_steps=1,
        num_batches=2,
        jit=False,
        data="synthetic",
        argv=["tools/benchmark_core.py", "--repeats=1"],
        core_model_fns={"Tiny": _tiny_cnn},
        train_model_fn=lambda: cifar_resnet.cifar_resnet(8, widths=(4, 4, 4)),
        log=lambda msg: None,
    )
    assert "python tools/benchmark_core.py --repeats=1" in text
    for key in ("CPU:", "Cores:", "TensorFlow:", "Keras:", "Date:"):
        assert key in text

    core = _table(text, "| Model ")
    assert [r[0] for r in core] == ["Tiny"]
    (row,) = core
    layers, groups, masks, folded = (int(c) for c in row[1:5])
    assert layers > 0 and groups > 0 and masks + folded > 0
    for seconds in row[5:9]:
        assert float(seconds) > 0
    assert 0 < float(row[9].rstrip("%")) <= 100

    train = _table(text, "| Run ")
    assert [(r[0], r[1]) for r in train] == [
        (bench.UNWRAPPED, "default"),
        (bench.TRACKING, "default"),
        (bench.WRAPPED, "default"),
        (bench.WRAPPED_MASKED, "default"),
        (bench.UNFOLDED_MASKED, "default"),
    ]
    for r in train:
        assert all(float(c) > 0 for c in r[2:]), r
    assert float(train[0][3]) == float(train[0][5]) == 1.0
    assert "Goals:" in text


def test_training_rows_ratios(bench):
    runs = [
        {"label": bench.UNWRAPPED, "compile": "XLA", "rounds": [1.0, 2.0],
         "cpu": [2.0, 2.0, 4.0], "error": None},
        {"label": bench.WRAPPED, "compile": "XLA", "rounds": [1.1, 2.0],
         "cpu": [2.2, 2.2, 4.0], "error": None},
        {"label": bench.WRAPPED, "compile": "default", "rounds": [],
         "cpu": [], "error": "NotImplementedError: no"},
    ]
    rows = bench.training_rows(runs)
    assert rows[0][2:] == ["1500.0", "1.000", "2000.0", "1.000"]
    assert rows[1][2:] == ["1550.0", "1.050", "2200.0", "1.100"]
    assert "failed" in rows[2][2]
