"""Seeing into a run: width plots and TensorBoard summaries."""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_chex
from conftest import tiny_resnet as _resnet


def _data(n=32):
    rng = np.random.default_rng(0)
    return (rng.normal(size=(n, 8, 8, 3)).astype("float32"),
            rng.integers(0, 4, n))


def _fit(method, log_dir=None, epochs=4, extra_callbacks=()):
    x, y = _data()
    if method == "chex":
        model = keras_chex.prune_and_regrow(_resnet(), flops=0.5, interval=1,
                                            seed=0)
        callback = keras_chex.ChannelExploration(log_dir=log_dir)
    elif method == "smcp":
        model = keras_chex.soft_mask_prune(_resnet(), flops=0.5, round_to=2,
                                           interval_steps=2, seed=0)
        callback = keras_chex.SoftMaskPruning(log_dir=log_dir)
    else:
        model = keras_chex.relevance_prune(_resnet(), flops=0.5, interval=1,
                                           seed=0)
        callback = keras_chex.RelevancePruning((x, y), log_dir=log_dir)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, shuffle=False,
              callbacks=[callback, *extra_callbacks])
    return model, callback


def _events(log_dir):
    tags = {}
    for path in glob.glob(os.path.join(log_dir, "pruning", "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags


@pytest.mark.parametrize("method", ["chex", "smcp", "frs"])
def test_event_files_hold_widths_cost_and_epoch_logs(tmp_path, method):
    model, callback = _fit(method, log_dir=tmp_path)
    tags = _events(str(tmp_path))
    groups = [g.name for g in keras_chex.channel_groups(model)]
    for name in groups:
        assert f"kept/{name}" in tags, name
    assert "kept_fractions" in tags and "cost_kept" in tags
    prefix = {"chex": "chex", "smcp": "smcp", "frs": "frs"}[method]
    epoch_tags = [t for t in tags if t.startswith(f"epoch/{prefix}_")]
    assert epoch_tags and all(sorted(tags[t]) == [0, 1, 2, 3]
                              for t in epoch_tags)
    # One width record per pruning step, plus the start.
    steps = [s for s, _ in callback.widths]
    assert sorted(tags[f"kept/{groups[0]}"]) == steps
    assert len(steps) >= 3 and steps == sorted(steps)


def test_a_tensorboard_callback_in_the_fit_lends_its_log_dir(tmp_path):
    board = keras.callbacks.TensorBoard(log_dir=str(tmp_path / "tb"))
    model, callback = _fit("chex", extra_callbacks=[board])
    assert callback.log_dir is None
    tags = _events(str(tmp_path / "tb"))
    assert "cost_kept" in tags and "epoch/chex_macs" in tags
    for g in keras_chex.channel_groups(model):
        assert f"kept/{g.name}" in tags, g.name
    # Keras' own run is beside ours, untouched.
    assert glob.glob(str(tmp_path / "tb" / "train" / "events.*"))
    # A later fit without TensorBoard writes nothing more there.
    before = {p: os.path.getsize(p) for p in glob.glob(
        str(tmp_path / "tb" / "pruning" / "events.*"))}
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    after = {p: os.path.getsize(p) for p in glob.glob(
        str(tmp_path / "tb" / "pruning" / "events.*"))}
    assert after == before


def test_widths_are_recorded_without_a_log_dir():
    model, callback = _fit("chex")
    assert callback.log_dir is None
    counts = [c for _, c in callback.widths]
    assert any(not np.array_equal(a, b) for a, b in zip(counts, counts[1:]))
    assert np.all(counts[-1] <= callback.group_sizes())
    last = counts[-1]
    final = np.array([g.mask.sum() for g in keras_chex.channel_groups(model)])
    np.testing.assert_array_equal(last, final)


def test_plot_widths_of_a_run_and_of_a_model(tmp_path):
    pytest.importorskip("matplotlib")
    model, callback = _fit("chex")
    groups = keras_chex.channel_groups(model)
    path = tmp_path / "widths.png"
    fig = keras_chex.plot_widths(callback, path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    heat, bars = fig.axes[0], fig.axes[1]
    assert heat.images[0].get_array().shape == (len(groups),
                                                len(callback.widths))
    assert len(bars.patches) == 2 * len(groups)  # total and kept bars
    kept = [p.get_width() for p in bars.patches[len(groups):]]
    assert kept == [g.mask.sum() for g in groups]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        keras_chex.plot_widths(callback, path)
    fig = keras_chex.plot_widths(model, path, overwrite=True)
    assert len([a for a in fig.axes if a.patches]) == 1
    with pytest.raises(ValueError, match="pruning callback after fit"):
        keras_chex.plot_widths(_resnet(), tmp_path / "x.png")
    with pytest.raises(ValueError, match="no widths yet"):
        keras_chex.plot_widths(keras_chex.ChannelExploration(),
                               tmp_path / "y.png")
