"""A wrapped model's masks as one vector (keras_chex/core/masks.py)."""

import numpy as np
import pytest

import keras_chex
from keras_chex.cifar.resnet import cifar_resnet
from keras_chex.core import statistics


def _wrapped():
    return keras_chex.wrap(cifar_resnet(8, widths=(8, 16, 16),
                                        input_shape=(8, 8, 3),
                                        num_classes=3))


def _seen(model):
    return [float(b.batches_seen.numpy())
            for b in statistics.tracking_batchnorms(model)]


def test_numpy_and_tensor_views_agree_and_writes_round_trip():
    model = _wrapped()
    masks = model.masks
    assert masks is model.masks  # One per model.
    rng = np.random.default_rng(0)
    mask = rng.random(model.analysis.num_channels) < 0.6
    for _, segment in masks.producer_segments():
        mask[segment[0]] = True
    for g in model.analysis.groups:
        mask[g.start] = True
    masks.assign(mask)
    np.testing.assert_array_equal(masks.numpy(), mask)
    np.testing.assert_array_equal(masks.tensor().numpy(), mask)
    # Written from the compiled-step side, read back from either.
    other = np.ones_like(mask)
    other[np.flatnonzero(mask)[::3]] = False
    masks.assign_tensor(other.astype("float32"))
    np.testing.assert_array_equal(masks.numpy(), other)
    np.testing.assert_array_equal(masks.tensor().numpy(), other)


def test_a_change_restarts_statistics_and_no_change_does_not():
    model = _wrapped()
    masks = model.masks
    settled = _seen(model)
    assert settled and all(s > 0 for s in settled)
    masks.assign(masks.numpy())  # The same mask: nothing changes.
    masks.assign_tensor(masks.tensor())
    assert _seen(model) == settled
    mask = masks.numpy()
    mask[model.analysis.groups[0].start] = False
    masks.assign_tensor(mask.astype("float32"))
    assert _seen(model) == [0.0] * len(settled)


def test_a_plain_model_has_no_masks_to_write():
    from keras_chex.core import analysis, masks

    plain = analysis.ModelAnalysis(cifar_resnet(8, input_shape=(8, 8, 3)),
                                   warn=False)
    with pytest.raises(ValueError, match="carries no channel masks"):
        masks.Masks(plain).assign(np.ones(plain.num_channels, bool))
    with pytest.raises(ValueError, match="carries no channel masks"):
        masks.Masks(plain).assign_channels(0, np.ones(4, bool))


def test_a_group_write_touches_only_the_layers_holding_its_channels(
        monkeypatch):
    model = _wrapped()
    masks = model.masks
    written = []
    for site in model.analysis.mask_sites:
        original = site.layer.set_channel_mask

        def spy(keep, layer=site.layer, original=original):
            written.append(layer.name)
            original(keep)

        monkeypatch.setattr(site.layer, "set_channel_mask", spy)
    group = max(keras_chex.channel_groups(model), key=lambda g: g.size)
    holders = {site.layer.name for site in model.analysis.mask_sites
               if np.any((site.classes >= group.start)
                         & (site.classes < group.start + group.size))}
    assert 0 < len(holders) < len(model.analysis.mask_sites)
    before = masks.numpy()
    keep = np.ones(group.size, bool)
    keep[1::2] = False
    group.set_mask(keep)
    assert written and set(written) <= holders
    np.testing.assert_array_equal(group.mask, keep)
    expected = before.copy()
    expected[group.start:group.start + group.size] = keep
    np.testing.assert_array_equal(masks.numpy(), expected)
    assert _seen(model) == [0.0] * len(_seen(model))
    # The same mask again writes nothing.
    written.clear()
    group.set_mask(keep)
    assert written == []


def test_the_compiled_restart_of_many_batchnorms_restarts_them_all(
        monkeypatch):
    # Models from COMPILED_RESTART_MIN_BATCHNORMS BatchNorms on restart in
    # one compiled call; here every model does.
    monkeypatch.setattr(statistics, "COMPILED_RESTART_MIN_BATCHNORMS", 1)
    for _ in range(2):  # A second model gets its own compiled restart.
        model = _wrapped()
        settled = _seen(model)
        assert all(s > 0 for s in settled)
        group = model.analysis.groups[0]
        keep = group.mask
        keep[0] = False
        group.set_mask(keep)
        assert _seen(model) == [0.0] * len(settled)
        assert model in statistics._COMPILED_RESTARTS
        for layer in statistics.tracking_batchnorms(model):
            layer.settle_statistics()
        keep[0] = True
        group.set_mask(keep)
        assert _seen(model) == [0.0] * len(settled)


@pytest.mark.parametrize("compiled_restart", [False, True])
def test_a_dropped_wrapped_model_is_freed(monkeypatch, compiled_restart):
    import gc
    import weakref

    if compiled_restart:
        monkeypatch.setattr(statistics, "COMPILED_RESTART_MIN_BATCHNORMS", 1)
    model = _wrapped()
    group = model.analysis.groups[0]
    keep = group.mask
    keep[0] = False
    group.set_mask(keep)  # The masks and the restart are set up.
    assert (model in statistics._COMPILED_RESTARTS) is compiled_restart
    ref = weakref.ref(model)
    del model, group
    gc.collect()
    assert ref() is None
