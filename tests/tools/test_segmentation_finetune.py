"""tools/segmentation_finetune.py at a tiny size (about a minute)."""

import json

import numpy as np
import pytest

from conftest import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("segmentation_finetune.py")


def test_synthetic_shapes_have_every_class_where_drawn(tool):
    images, labels = tool.shapes_dataset(20, seed=0)
    assert images.shape == (20, 64, 64, 3) and labels.shape == (20, 64, 64)
    assert 0 <= images.min() and images.max() <= 1
    assert set(np.unique(labels)) == {0, 1, 2}
    again, _ = tool.shapes_dataset(20, seed=0)
    np.testing.assert_array_equal(images, again)


def test_deeplab_is_pruned_to_the_budget_stripped_and_exported(tool):
    train = tool.shapes_dataset(32, seed=0)
    val = tool.shapes_dataset(8, seed=1)
    result = tool.run(train, val, epochs=1, finetune_epochs=1, flops=0.5,
                      seed=0, batch_size=16)
    assert json.loads(json.dumps(result)) == result
    # The pyramid pooling is opened: its convolutions are in groups too,
    # and the budget holds on the whole model's MACs.
    assert result["groups"] >= 8
    assert 0.3 < result["macs_fraction"] <= 0.5 + 1e-9
    for key in ("dense_miou", "wrapped_miou", "compact_miou",
                "dense_more_miou"):
        assert 0 <= result[key] <= 1
    # SMCP starts with every channel: wrapping alone changes nothing.
    assert result["wrapped_miou"] == result["dense_miou"]
    assert result["compact_tflite_max_diff"] < 1e-3
    assert result["compact_latency_ms"] > 0 and result["dense_latency_ms"] > 0
