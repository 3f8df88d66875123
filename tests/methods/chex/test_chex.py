"""Tests for CHEX (`keras_chex.prune_and_regrow` + `ChannelExploration`).

The single exploration step is checked against NumPy re-computations of the
paper's recipe (global |gamma| allocation, leverage-score column subset
selection, regrowth counts, restoration of the most recently used weights);
the rest are end-to-end fits on tiny models (8x8 or 16x16 inputs, a handful of
steps) so that the whole file stays fast on two CPU cores.
"""

import math
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import keras_chex
from keras_chex.methods.chex import schedules
from keras_chex.cifar.resnet import cifar_resnet

from conftest import CrashAtEpoch
from conftest import synthetic_latency_table

# ---------------------------------------------------------------------------
# Tiny models and helpers
# ---------------------------------------------------------------------------


def parallel_model(sizes=(8, 12), hw=6):
    """Two conv-BN-ReLU branches reading the (unprunable) input.

    Each group's filter matrix is then just its own kernel, independent of
    every other group's mask, which makes NumPy references simple.
    """
    inp = keras.Input((hw, hw, 3))
    branches = []
    for name, c in zip("ab", sizes):
        x = layers.Conv2D(c, 3, padding="same", use_bias=False,
                          name=f"conv_{name}")(inp)
        x = layers.BatchNormalization(name=f"bn_{name}")(x)
        branches.append(layers.ReLU(name=f"relu_{name}")(x))
    x = layers.Concatenate(name="concat")(branches)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    out = layers.Dense(3, name="head")(x)
    return keras.Model(inp, out, name="parallel")


def chain_model(hw=6):
    """conv1(8)-BN-ReLU-conv2(10)-BN-ReLU-GAP-Dense: two chained groups."""
    inp = keras.Input((hw, hw, 3))
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv1")(inp)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU(name="relu1")(x)
    x = layers.Conv2D(10, 3, padding="same", use_bias=False, name="conv2")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.ReLU(name="relu2")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    out = layers.Dense(3, name="head")(x)
    return keras.Model(inp, out, name="chain")


def plain_cnn(widths=(48, 96, 96, 96), hw=8, classes=10):
    """A plain conv net, wide enough that one channel is < 1% of its MACs."""
    inp = keras.Input((hw, hw, 3))
    x = inp
    for i, c in enumerate(widths):
        x = layers.Conv2D(c, 3, padding="same", use_bias=False,
                          name=f"conv{i}")(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    out = layers.Dense(classes, name="head")(x)
    return keras.Model(inp, out, name="plain_cnn")


def tiny_resnet(hw=16):
    """cifar_resnet(8): one basic block per stage, Add-coupled streams."""
    return cifar_resnet(8, input_shape=(hw, hw, 3))


def data(n, hw, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, hw, hw, 3)).astype("float32")
    y = rng.integers(0, classes, n)
    return x, y


def compile_(model, lr=0.05):
    model.compile(
        optimizer=keras.optimizers.SGD(lr, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def groups_of(model):
    return {g.name: g for g in keras_chex.channel_groups(model)}


def full_mask(model):
    return np.concatenate([g.mask for g in keras_chex.channel_groups(model)])


def layer_var(model, layer, leaf):
    for v in model.get_layer(layer).weights:
        if v.path.split("/")[-1] == leaf:
            return v
    raise KeyError((layer, leaf))


def round_half_up(x):
    return int(math.floor(x + 0.5 + 1e-9))


def np_global_allocation(scores, group_ids, n_groups, sparsity, minimums):
    """The documented allocation: one global ranking, per-group minimums."""
    n = len(scores)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    target = round_half_up((1 - sparsity) * n)
    kept = np.zeros(n, bool)
    seen = np.zeros(n_groups, int)
    for c in order:  # Each group's best `minimum` channels are protected.
        g = group_ids[c]
        if seen[g] < minimums[g]:
            kept[c] = True
        seen[g] += 1
    budget = max(target - kept.sum(), 0)
    for c in order:
        if budget == 0:
            break
        if not kept[c]:
            kept[c] = True
            budget -= 1
    return np.bincount(group_ids[kept], minlength=n_groups)


def np_leverage_keep(matrix, active, k):
    """Top-k leverage scores of the *active* filters (pruned ones are 0)."""
    m = np.asarray(matrix, np.float64) * active[None, :]
    _, _, vt = np.linalg.svd(m, full_matrices=False)
    lev = np.sum(vt[:k].T ** 2, axis=1)
    lev = np.where(active, lev, -np.inf)
    order = np.argsort(-lev, kind="stable")
    keep = np.zeros(len(active), bool)
    keep[order[:k]] = True
    margin = lev[order[k - 1]] - lev[order[k]]
    return keep, margin


# ---------------------------------------------------------------------------
# 1. Argument validation
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model():
    return chain_model()


@pytest.mark.parametrize("kwargs", [
    {},
    {"flops": 0.5, "params": 0.5},
    {"flops": 0.5, "sparsity": 0.3},
    {"params": 0.5, "sparsity": 0.3},
    {"flops": 0.5, "params": 0.5, "sparsity": 0.3},
])
def test_exactly_one_target(small_model, kwargs):
    with pytest.raises(ValueError, match="exactly one target") as info:
        keras_chex.prune_and_regrow(small_model, **kwargs)
    for name in ("flops", "params", "sparsity"):
        assert f"`{name}`" in str(info.value)


@pytest.mark.parametrize("kwargs, name", [
    ({"flops": 0.0}, "flops"),
    ({"flops": 1.5}, "flops"),
    ({"flops": -0.2}, "flops"),
    ({"flops": float("nan")}, "flops"),
    ({"flops": "0.5"}, "flops"),
    ({"flops": True}, "flops"),
    ({"params": 0.0}, "params"),
    ({"params": 2}, "params"),
    ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity": -0.1}, "sparsity"),
    ({"sparsity": 0.5, "regrow": 1.0}, "regrow"),
    ({"sparsity": 0.5, "regrow": -0.1}, "regrow"),
    ({"sparsity": 0.5, "until": 0.0}, "until"),
    ({"sparsity": 0.5, "until": 1.2}, "until"),
    ({"sparsity": 0.5, "interval": 0}, "interval"),
    ({"sparsity": 0.5, "interval": -1.0}, "interval"),
    ({"sparsity": 0.5, "interval": "2"}, "interval"),
    ({"sparsity": 0.5, "round_to": 0}, "round_to"),
    ({"sparsity": 0.5, "round_to": 4.0}, "round_to"),
    ({"sparsity": 0.5, "round_to": -8}, "round_to"),
    ({"sparsity": 0.5, "min_channels": 0}, "min_channels"),
    ({"sparsity": 0.5, "min_channels": -2}, "min_channels"),
    ({"sparsity": 0.5, "min_channels": 1.0}, "min_channels"),
    ({"sparsity": 0.5, "min_channels": 1.5}, "min_channels"),
    ({"sparsity": 0.5, "min_channels": 0.0}, "min_channels"),
    ({"sparsity": 0.5, "min_channels": True}, "min_channels"),
    ({"sparsity": 0.5, "min_channels": "2"}, "min_channels"),
    ({"sparsity": 0.5, "allocator": "knapsack"}, "allocator"),
    ({"flops": 0.5, "allocator": "greedy"}, "allocator"),
    ({"flops": 0.5, "pruned_importance": "max"}, "pruned_importance"),
    ({"flops": 0.5, "streams": "all"}, "streams"),
    ({"flops": 0.5, "gamma_l1": -1e-4}, "gamma_l1"),
    ({"latency": 0.5}, "latency"),
    ({"flops": 0.5, "cost_table": "table.json"}, "cost_table"),
])
def test_bad_arguments_name_the_argument(small_model, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        keras_chex.prune_and_regrow(small_model, **kwargs)


@pytest.mark.parametrize("kwargs", [
    {"flops": 1.0},
    {"flops": np.float32(0.5)},
    {"params": 0.01},
    {"sparsity": 0.0, "regrow": 0.0},
    {"sparsity": 0.99, "until": 1.0, "interval": 0.25},
    {"sparsity": 0.5, "min_channels": 3, "round_to": 2},
    {"sparsity": 0.5, "min_channels": 0.5},
])
def test_valid_edge_arguments_are_accepted(small_model, kwargs):
    if kwargs.get("params") == 0.01:
        # Valid, but below what the minimum widths keep: a warning says so.
        with pytest.warns(UserWarning, match="params=0.01 cannot be met"):
            model = keras_chex.prune_and_regrow(small_model, seed=0,
                                                **kwargs)
    else:
        model = keras_chex.prune_and_regrow(small_model, seed=0, **kwargs)
    assert keras_chex.is_wrapped(model)
    config = model.pruning_config
    target = next(k for k in ("flops", "params", "sparsity") if k in kwargs)
    assert config["target"] == target
    assert config["target_value"] == pytest.approx(float(kwargs[target]))


def test_user_model_is_untouched(small_model):
    before = [w.copy() for w in small_model.get_weights()]
    model = keras_chex.prune_and_regrow(small_model, sparsity=0.5, seed=0)
    assert not keras_chex.is_wrapped(small_model)
    assert model is not small_model
    for a, b in zip(before, small_model.get_weights()):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# 2. Initial masks: uniform sparsity S - min(regrow, S / 2), by filter L1 norm
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity, regrow, expected", [
    (0.5, 0.3, {"conv_a": 6, "conv_b": 9}),    # capped: 0.5 - 0.25
    (0.6, 0.1, {"conv_a": 4, "conv_b": 6}),    # uncapped: 0.6 - 0.1
    (0.4, 0.3, {"conv_a": 6, "conv_b": 10}),   # capped: 0.4 - 0.2
    (0.5, 0.0, {"conv_a": 4, "conv_b": 6}),
])
def test_initial_masks_uniform_by_l1_norm(sparsity, regrow, expected):
    keras.utils.set_random_seed(3)
    base = parallel_model()
    model = keras_chex.prune_and_regrow(base, sparsity=sparsity,
                                        regrow=regrow, min_channels=1, seed=0)
    start = sparsity - min(regrow, sparsity / 2)
    for name, group in groups_of(model).items():
        k = round_half_up((1 - start) * group.size)
        assert k == expected[name]
        kernel = base.get_layer(name).kernel.numpy()
        l1 = np.abs(kernel.reshape(-1, group.size)).sum(axis=0)
        top = np.zeros(group.size, bool)
        top[np.argsort(-l1, kind="stable")[:k]] = True
        np.testing.assert_array_equal(group.mask, top, err_msg=name)


def test_initial_masks_on_coupled_groups_use_all_producers():
    keras.utils.set_random_seed(4)
    base = tiny_resnet()
    model = keras_chex.prune_and_regrow(base, sparsity=0.6, regrow=0.3,
                                        min_channels=1, seed=0)
    start = 0.6 - 0.3
    coupled = 0
    for group in keras_chex.channel_groups(model):
        l1 = np.zeros(group.size)
        for name in group.producers:
            layer = base.get_layer(name)
            if isinstance(layer, layers.Conv2D):
                l1 += np.abs(layer.kernel.numpy().reshape(-1, group.size)
                             ).sum(axis=0)
        coupled += len([p for p in group.producers
                        if isinstance(base.get_layer(p), layers.Conv2D)]) > 1
        k = round_half_up((1 - start) * group.size)
        top = np.zeros(group.size, bool)
        top[np.argsort(-l1, kind="stable")[:k]] = True
        np.testing.assert_array_equal(group.mask, top, err_msg=group.name)
    assert coupled >= 2  # The residual streams of several stages.


def test_initial_masks_for_a_flops_target_are_uniform_and_above_target():
    keras.utils.set_random_seed(5)
    base = plain_cnn(widths=(16, 32, 32), hw=8)
    dense = keras_chex.count_macs(base).macs
    model = keras_chex.prune_and_regrow(base, flops=0.5, regrow=0.3,
                                        min_channels=1, seed=0)
    fractions = [g.mask.mean() for g in keras_chex.channel_groups(model)]
    # One uniform keep ratio (up to rounding of each group's count).
    assert max(fractions) - min(fractions) <= 1 / 16 + 1e-9
    # Initial sparsity is S - min(regrow, S/2) < S: more MACs than the target.
    assert keras_chex.count_macs(model).macs > 0.5 * dense


# ---------------------------------------------------------------------------
# 3. One exploration step against NumPy
# ---------------------------------------------------------------------------


def _set_parallel_state(model, rng, active):
    """Random kernels, distinct |gamma| with random signs, given masks."""
    for name, group in groups_of(model).items():
        kernel = layer_var(model, name, "kernel")
        kernel.assign(rng.normal(size=kernel.shape).astype("float32"))
        bn = "bn_" + name[-1]
        gamma = layer_var(model, bn, "gamma")
        magnitudes = rng.uniform(0.2, 2.0, gamma.shape)
        signs = rng.choice([-1.0, 1.0], gamma.shape)
        gamma.assign((magnitudes * signs).astype("float32"))
        group.set_mask(active[name])


def _parallel_reference(model, sparsity, delta):
    """(kept, counts, grown) from NumPy for every group of `parallel_model`."""
    groups = list(keras_chex.channel_groups(model))
    scores, ids = [], []
    for i, g in enumerate(groups):
        gamma = layer_var(model, "bn_" + g.name[-1], "gamma").numpy()
        scores.append(np.abs(gamma) * g.mask)
        ids.append(np.full(g.size, i))
    scores, ids = np.concatenate(scores), np.concatenate(ids)
    mins = np.ones(len(groups), int)
    counts = np_global_allocation(scores, ids, len(groups), sparsity, mins)
    d = min(delta, sparsity / 2)
    grown = np_global_allocation(scores, ids, len(groups), sparsity - d, mins)
    # Preconditions that make the reference unambiguous.
    unprotected = np_global_allocation(
        scores, ids, len(groups), sparsity, np.zeros(len(groups), int))
    np.testing.assert_array_equal(counts, unprotected)
    kept, margins = {}, []
    for g, k in zip(groups, counts):
        assert 0 < k < g.mask.sum()
        kernel = layer_var(model, g.name, "kernel").numpy()
        kept[g.name], margin = np_leverage_keep(
            kernel.reshape(-1, g.size), g.mask, int(k))
        margins.append(margin)
    assert min(margins) > 1e-4
    names = [g.name for g in groups]
    return kept, dict(zip(names, counts)), dict(zip(names, grown))


def test_exploration_step_matches_numpy():
    keras.utils.set_random_seed(6)
    rng = np.random.default_rng(60)
    model = keras_chex.prune_and_regrow(
        parallel_model(), sparsity=0.5, regrow=0.3, min_channels=1, seed=11)
    state = model.pruning_state

    # (a) + (b): with delta = 0 the new mask is exactly the pruning result.
    active = {
        "conv_a": np.array([1, 1, 0, 1, 1, 0, 1, 1], bool),
        "conv_b": np.array([1, 0, 1, 1, 1, 1, 0, 1, 1, 0, 1, 1], bool),
    }
    _set_parallel_state(model, rng, active)
    kept, counts, grown = _parallel_reference(model, 0.5, 0.0)
    assert counts["conv_a"] + counts["conv_b"] == 10  # round(0.5 * 20)
    assert counts == grown
    stats = np.asarray(state.explore(0.0, 0))
    for name, group in groups_of(model).items():
        np.testing.assert_array_equal(group.mask, kept[name], err_msg=name)
    assert stats[1] == sum(active[n].sum() - kept[n].sum() for n in kept)
    assert stats[2] == 0

    # (c): with delta > 0, regrowth adds grown - kept channels per group,
    # all from outside the kept set (previously or newly pruned channels).
    active = {
        "conv_a": np.array([0, 1, 1, 1, 1, 1, 0, 1], bool),
        "conv_b": np.array([1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 0, 1], bool),
    }
    _set_parallel_state(model, rng, active)
    kept, counts, grown = _parallel_reference(model, 0.5, 0.2)
    assert sum(grown.values()) == 14  # round((1 - 0.3) * 20)
    assert any(grown[n] > counts[n] for n in grown)
    stats = np.asarray(state.explore(0.2, 1))
    regrown_total = 0
    for name, group in groups_of(model).items():
        new = group.mask
        assert np.all(new[kept[name]]), f"{name}: a CSS-kept channel is off"
        back = new & ~kept[name]
        assert back.sum() == grown[name] - counts[name], name
        assert new.sum() == grown[name], name
        regrown_total += (new & ~active[name]).sum()
    assert stats[2] == regrown_total
    assert stats[3] == 2  # Explorations done.


def test_a_coupled_channel_scores_its_largest_gamma():
    # conv_a and conv_b feed an Add, so they form one 8-channel group with
    # two BatchNorms; conv_c is a group of its own. With bn_a's |gamma| ~1,
    # bn_b's 0.1 and bn_c's ~0.8, the coupled channels rank first by their
    # largest |gamma| (they would rank last by the mean, ~0.55).
    inp = keras.Input((6, 6, 3))
    branches = []
    for name in "ab":
        x = layers.Conv2D(8, 3, padding="same", use_bias=False,
                          name=f"conv_{name}")(inp)
        branches.append(layers.BatchNormalization(name=f"bn_{name}")(x))
    x = layers.ReLU()(layers.Add()(branches))
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv_c")(x)
    x = layers.ReLU()(layers.BatchNormalization(name="bn_c")(x))
    out = layers.Dense(3)(layers.GlobalAveragePooling2D()(x))
    model = keras_chex.prune_and_regrow(
        keras.Model(inp, out), sparsity=0.25, regrow=0.0, min_channels=1,
        seed=0)
    ramp = 0.01 * np.arange(8, dtype="float32")
    for bn, gamma in (("bn_a", 1.0 + ramp), ("bn_b", 0.1 + 0 * ramp),
                      ("bn_c", 0.8 + ramp)):
        layer_var(model, bn, "gamma").assign(gamma)
    groups = list(keras_chex.channel_groups(model))
    assert sorted(g.size for g in groups) == [8, 8]
    for g in groups:
        g.set_mask(np.ones(8, bool))
    model.pruning_state.explore(0.0, 0)
    kept = {("conv_c" if g.name == "conv_c" else "coupled"): int(
        g.mask.sum()) for g in groups}
    assert kept == {"coupled": 8, "conv_c": 4}  # 12 = 0.75 * 16 channels


@pytest.mark.parametrize("pruned_importance, widths", [
    ("zero", {"conv_a": 2, "conv_b": 8}), ("last", {"conv_a": 8,
                                                     "conv_b": 2})])
def test_a_pruned_channel_ranks_by_its_last_used_gamma_on_request(
        pruned_importance, widths):
    # conv_a's channels all had |gamma| 2 when last used, conv_b's at most
    # 1.6. With 2 of conv_a's 8 active, the paper's ranking (pruned = 0)
    # cannot widen conv_a; ranked by their last-used |gamma| its pruned
    # channels win back their places and conv_b pays.
    model = keras_chex.prune_and_regrow(
        parallel_model(), sparsity=0.5, regrow=0.0, min_channels=1, seed=0,
        pruned_importance=pruned_importance)
    state = model.pruning_state
    groups = groups_of(model)
    for group in groups.values():
        group.set_mask(np.ones(group.size, bool))
    layer_var(model, "bn_a", "gamma").assign(np.full(8, 2.0, "float32"))
    layer_var(model, "bn_b", "gamma").assign(
        np.linspace(0.5, 1.6, 12).astype("float32"))
    state._plain["backups"].refresh(model.masks.tensor())
    groups["conv_a"].set_mask(np.array([1, 1, 0, 0, 0, 0, 0, 0], bool))
    state.explore(0.0, 0)
    assert {name: int(g.mask.sum()) for name, g in groups.items()} == widths
    # A channel that comes back comes back with its last-used weights.
    np.testing.assert_allclose(
        np.abs(layer_var(model, "bn_a", "gamma").numpy())[groups[
            "conv_a"].mask], 2.0)


def test_exploration_step_uses_kept_filters_only_for_css():
    """Stale values of pruned filters must not steer the leverage scores."""
    keras.utils.set_random_seed(7)
    rng = np.random.default_rng(70)
    model = keras_chex.prune_and_regrow(
        parallel_model(sizes=(6, 12)), sparsity=0.5, regrow=0.3,
        min_channels=1, seed=1)
    active = {"conv_a": np.array([1, 1, 1, 0, 1, 1], bool),
              "conv_b": np.array([1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1], bool)}
    _set_parallel_state(model, rng, active)
    # Give the soon-to-be-pruned filters huge values and let an exploration
    # store them (every channel on, so every value is "most recently used").
    for name in ("conv_a", "conv_b"):
        kernel = layer_var(model, name, "kernel")
        value = kernel.numpy()
        off = np.flatnonzero(~active[name])
        value[..., off] = 100.0 * rng.normal(size=value[..., off].shape)
        kernel.assign(value)
    for name, group in groups_of(model).items():
        group.set_mask(np.ones(group.size, bool))
    model.pruning_state.explore(0.0, 0)
    # Now prune them and draw new live weights: the huge filters are only
    # remembered (for a later regrowth); were they part of the SVD, they
    # would dominate the top singular vectors and change what CSS keeps.
    _set_parallel_state(model, rng, active)
    kept, _, _ = _parallel_reference(model, 0.5, 0.0)
    model.pruning_state.explore(0.0, 1)
    for name, group in groups_of(model).items():
        np.testing.assert_array_equal(group.mask, kept[name], err_msg=name)


# Which axis of which weight belongs to which group, written out by hand for
# `chain_model` (independent of the package's own analysis).
CHAIN_AXES = {
    ("conv1", "kernel"): {3: "conv1"},
    ("bn1", "gamma"): {0: "conv1"},
    ("bn1", "beta"): {0: "conv1"},
    ("bn1", "moving_mean"): {0: "conv1"},
    ("bn1", "moving_variance"): {0: "conv1"},
    ("conv2", "kernel"): {2: "conv1", 3: "conv2"},
    ("bn2", "gamma"): {0: "conv2"},
    ("bn2", "beta"): {0: "conv2"},
    ("bn2", "moving_mean"): {0: "conv2"},
    ("bn2", "moving_variance"): {0: "conv2"},
    ("head", "kernel"): {0: "conv2"},
}


def _entry_active(shape, axes, masks):
    active = np.ones(shape, bool)
    for axis, group in axes.items():
        view = [1] * len(shape)
        view[axis] = -1
        active &= masks[group].reshape(view)
    return active


def test_regrown_channels_get_their_last_used_weights_back():
    keras.utils.set_random_seed(8)
    rng = np.random.default_rng(80)
    model = keras_chex.prune_and_regrow(
        chain_model(), sparsity=0.5, regrow=0.3, min_channels=1, seed=5)
    variables = {key: layer_var(model, *key) for key in CHAIN_AXES}
    # The reference "most recently used" store starts as the weights at
    # wrapping time (channels pruned by the initial masks were last used
    # then).
    stored = {key: v.numpy().copy() for key, v in variables.items()}
    # Channel-level record: the channel's own weights just before pruning.
    snapshot = {}
    checked_channels = 0
    for t, delta in enumerate([0.3, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05]):
        masks = {n: g.mask for n, g in groups_of(model).items()}
        # "Training": active entries move, pruned slices get garbage (what
        # weight decay or a stateful optimizer could do to them).
        for key, v in variables.items():
            value = v.numpy()
            act = _entry_active(value.shape, CHAIN_AXES[key], masks)
            noise = rng.normal(0, 0.1, value.shape)
            garbage = 1e3 + rng.normal(0, 1, value.shape)
            if "variance" in key[1]:
                noise, garbage = np.abs(noise), np.abs(garbage)
            v.assign(np.where(act, value + noise, garbage).astype("float32"))
        before = {key: v.numpy().copy() for key, v in variables.items()}
        model.pruning_state.explore(delta, t)
        new_masks = {n: g.mask for n, g in groups_of(model).items()}
        for key, v in variables.items():
            after = v.numpy()
            old_act = _entry_active(after.shape, CHAIN_AXES[key], masks)
            new_act = _entry_active(after.shape, CHAIN_AXES[key], new_masks)
            stored[key] = np.where(old_act, before[key], stored[key])
            regrown = new_act & ~old_act
            np.testing.assert_array_equal(after[regrown], stored[key][regrown],
                                          err_msg=f"{key} step {t}")
            np.testing.assert_array_equal(
                after[~regrown], before[key][~regrown],
                err_msg=f"{key} step {t}")
        # The same thing said per channel: filter, BatchNorm, next layer.
        for group, own in (("conv1", [("conv1", "kernel", 3),
                                      ("bn1", "gamma", 0), ("bn1", "beta", 0),
                                      ("bn1", "moving_mean", 0),
                                      ("bn1", "moving_variance", 0)]),
                           ("conv2", [("bn2", "gamma", 0), ("bn2", "beta", 0),
                                      ("bn2", "moving_mean", 0),
                                      ("bn2", "moving_variance", 0),
                                      ("head", "kernel", 0)])):
            old, new = masks[group], new_masks[group]
            for c in np.flatnonzero(new & ~old):
                if (group, c) not in snapshot:
                    continue  # Pruned by the initial masks.
                for layer, leaf, axis in own:
                    np.testing.assert_array_equal(
                        np.take(variables[(layer, leaf)].numpy(), c, axis),
                        snapshot[(group, c)][(layer, leaf)])
                checked_channels += 1
            for c in np.flatnonzero(old & ~new):
                snapshot[(group, c)] = {
                    (layer, leaf): np.take(before[(layer, leaf)], c, axis)
                    for layer, leaf, axis in own
                }
        # Next layer's input slice of a regrown conv1 channel, towards the
        # conv2 channels that were on both then and now.
        old1, new1 = masks["conv1"], new_masks["conv1"]
        for c in np.flatnonzero(new1 & ~old1):
            if ("conv1", c) not in snapshot:
                continue
            then = snapshot[("conv1", c)]["conv2_mask"]
            both = then & masks["conv2"] & new_masks["conv2"]
            np.testing.assert_array_equal(
                variables[("conv2", "kernel")].numpy()[:, :, c, both],
                snapshot[("conv1", c)]["conv2_in"][:, :, both])
        for c in np.flatnonzero(old1 & ~new1):
            snapshot[("conv1", c)]["conv2_in"] = before[("conv2", "kernel")][
                :, :, c, :]
            snapshot[("conv1", c)]["conv2_mask"] = masks["conv2"].copy()
    assert checked_channels >= 3, "no channel was pruned and then regrown"


# ---------------------------------------------------------------------------
# 4 + 5. Targets and end-to-end fits
# ---------------------------------------------------------------------------


class MaskRecorder(keras.callbacks.Callback):
    """Model-wide mask after every optimizer step (after the exploration)."""

    def __init__(self):
        super().__init__()
        self.masks = {}

    def on_train_begin(self, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        self.masks.setdefault(step, full_mask(self.model))

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        self.masks[step] = full_mask(self.model)


def group_marginals(model, resource):
    """Cost of switching on one more channel, per group with pruned ones.

    All channels of a group cost the same, so this is the most that any
    single channel the allocation could still have added would cost.
    """
    base = getattr(keras_chex.count_macs(model), resource)
    mask = full_mask(model)
    out = {}
    for g in keras_chex.channel_groups(model):
        off = np.flatnonzero(~g.mask)
        if len(off):
            trial = mask.copy()
            trial[g.start + off[0]] = True
            more = keras_chex.count_macs(model, class_mask=trial)
            out[g.name] = getattr(more, resource) - base
    return out


def assert_compact_matches(model, x, rtol=1e-4):
    compact = keras_chex.strip(model)
    assert not keras_chex.is_wrapped(compact)
    expected = np.asarray(model(x, training=False))
    actual = np.asarray(compact(x, training=False))
    assert expected.shape == actual.shape
    scale = max(np.abs(expected).max(), 1e-6)
    rel = np.abs(expected - actual).max() / scale
    assert rel <= rtol, f"max rel diff {rel:.3g}"
    return compact


def assert_masks_change_only_at(recorder, steps, last_step):
    changed = [s for s in range(1, last_step + 1)
               if not np.array_equal(recorder.masks[s], recorder.masks[s - 1])]
    assert set(changed) <= set(steps), (changed, steps)
    return changed


def test_flops_target_fit_on_numpy_arrays():
    keras.utils.set_random_seed(10)
    base = plain_cnn()
    dense = keras_chex.count_macs(base).macs
    model = compile_(keras_chex.prune_and_regrow(
        base, flops=0.5, interval=1, until=0.72, seed=0))
    x, y = data(64, 8)
    recorder = MaskRecorder()
    history = model.fit(x, y, batch_size=16, epochs=5, verbose=0,
                        callbacks=[keras_chex.ChannelExploration(), recorder])
    compact = assert_compact_matches(model, x[:8])
    macs = keras_chex.count_macs(compact).macs
    gaps = group_marginals(model, "macs")
    print(f"\nflops=0.5: kept {macs / dense:.4f} of dense MACs; one more "
          f"channel costs at most {max(gaps.values()) / dense:.4f}")
    assert macs <= 0.5 * dense
    assert macs >= 0.49 * dense
    # The allocation stops at the last channel that fits the budget.
    assert 0.5 * dense - macs < max(gaps.values())
    # Logs.
    logs = history.history
    for key in ("chex_macs", "chex_pruned", "chex_regrown"):
        assert len(logs[key]) == 5, key
    assert logs["chex_macs"][-1] == pytest.approx(macs / dense, rel=1e-6)
    assert logs["chex_macs"][0] > 0.5  # Regrowth above target before freeze.
    assert sum(logs["chex_pruned"]) > 0 and sum(logs["chex_regrown"]) > 0
    assert logs["chex_pruned"][-1] == 0 and logs["chex_regrown"][-1] == 0
    # Masks change at exploration steps only, and are frozen after `until`.
    schedule = schedules.ExplorationSchedule(interval=1, until=0.72)
    steps = schedule.exploration_steps(4, 5)
    freeze = schedule.freeze_step(4, 5)
    assert steps == [4, 8, 12, 14] and freeze == 14
    changed = assert_masks_change_only_at(recorder, steps, 20)
    assert freeze in changed and len(changed) >= 3
    for s in range(freeze, 21):
        np.testing.assert_array_equal(recorder.masks[s],
                                      recorder.masks[freeze])
    # Strip again after further training: still exact, still the same MACs.
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    compact = assert_compact_matches(model, x[:8])
    assert keras_chex.count_macs(compact).macs == macs


def test_params_target_fit_on_a_dataset_of_known_cardinality():
    keras.utils.set_random_seed(11)
    base = plain_cnn()
    dense = keras_chex.count_macs(base).params
    model = compile_(keras_chex.prune_and_regrow(
        base, params=0.6, interval=1, seed=0))
    x, y = data(64, 8)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    assert int(ds.cardinality()) == 4
    history = model.fit(ds, epochs=4, verbose=0, shuffle=False,
                        callbacks=[keras_chex.ChannelExploration()])
    compact = assert_compact_matches(model, x[:8])
    params = keras_chex.count_macs(compact).params
    gaps = group_marginals(model, "params")
    print(f"\nparams=0.6: kept {params / dense:.4f} of dense params; one "
          f"more channel costs at most {max(gaps.values()) / dense:.4f}")
    assert params <= 0.6 * dense
    assert params >= 0.59 * dense
    assert 0.6 * dense - params < max(gaps.values())
    # For a params target the logged fraction is of parameters.
    assert history.history["chex_macs"][-1] == pytest.approx(
        params / dense, rel=1e-6)


def test_sparsity_target_fit_with_steps_per_epoch_on_a_repeated_dataset():
    keras.utils.set_random_seed(12)
    base = plain_cnn(widths=(16, 32, 32))
    model = compile_(keras_chex.prune_and_regrow(
        base, sparsity=0.37, interval=1, seed=0))
    total = sum(g.size for g in keras_chex.channel_groups(model))
    x, y = data(32, 8)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    recorder = MaskRecorder()
    history = model.fit(ds, steps_per_epoch=3, epochs=4, verbose=0,
                        shuffle=False,
                        callbacks=[keras_chex.ChannelExploration(), recorder])
    kept = full_mask(model).sum()
    assert abs(kept - (1 - 0.37) * total) <= 0.5, (kept, total)
    steps = schedules.ExplorationSchedule(1, 0.72).exploration_steps(3, 4)
    assert_masks_change_only_at(recorder, steps, 12)
    assert sum(history.history["chex_regrown"]) > 0
    assert_compact_matches(model, x[:4])


def test_steps_per_execution_runs_every_planned_exploration():
    # Planned steps 5, 10, 15 (interval 1 over 5-step epochs) are not
    # multiples of steps_per_execution=3: the callback only sees steps 3, 6,
    # 9, ... and must still run each exploration once, in order.
    keras.utils.set_random_seed(13)
    model = keras_chex.prune_and_regrow(plain_cnn(), flops=0.5, interval=1,
                                        until=0.72, seed=0)
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=3,
    )
    x, y = data(40, 8)
    planned = schedules.ExplorationSchedule(1, 0.72).exploration_steps(5, 5)
    assert any(step % 3 for step in planned)
    history = model.fit(x, y, batch_size=8, epochs=5, verbose=0,
                        callbacks=[keras_chex.ChannelExploration()])
    assert int(model.pruning_state.last_stats[3]) == len(planned)
    # The last (regrowth-free) exploration ran: the target is met.
    assert history.history["chex_macs"][-1] <= 0.5
    assert sum(history.history["chex_regrown"]) > 0


def _assert_rounded(model, round_to, where):
    for g in keras_chex.channel_groups(model):
        k = int(g.mask.sum())
        # The one rounding rule: a multiple, or the whole group.
        assert k % round_to == 0 or k == g.size or g.size < round_to, (
            where, g.name, g.size, k)


def test_round_to_keeps_multiples_during_and_after_fit():
    keras.utils.set_random_seed(13)
    base = plain_cnn(widths=(16, 32, 32, 32))
    model = compile_(keras_chex.prune_and_regrow(
        base, sparsity=0.45, round_to=4, interval=1, seed=0))
    _assert_rounded(model, 4, "initial masks")
    x, y = data(32, 8)
    recorder = MaskRecorder()
    history = model.fit(x, y, batch_size=8, epochs=4, verbose=0,
                        callbacks=[keras_chex.ChannelExploration(), recorder])
    assert sum(history.history["chex_regrown"]) > 0
    sizes = [g.size for g in keras_chex.channel_groups(model)]
    for step, mask in recorder.masks.items():
        counts = np.add.reduceat(mask, np.cumsum([0] + sizes[:-1]))
        assert np.all(counts % 4 == 0), (step, counts)
    _assert_rounded(model, 4, "final")
    assert_compact_matches(model, x[:4])


def test_round_to_never_leaves_a_big_group_below_the_multiple():
    """An allocation of 3 channels to a 8-channel group with round_to=4."""
    keras.utils.set_random_seed(14)
    rng = np.random.default_rng(140)
    model = keras_chex.prune_and_regrow(
        parallel_model(), sparsity=0.5, round_to=4, min_channels=1, seed=0)
    groups = groups_of(model)
    for name, group in groups.items():
        group.set_mask(np.ones(group.size, bool))
    # Global top 10 of 20 by |gamma|: 3 channels of conv_a, 7 of conv_b.
    gamma_a = np.full(8, 0.01)
    gamma_a[[1, 4, 6]] = 5.0
    layer_var(model, "bn_a", "gamma").assign(gamma_a.astype("float32"))
    gamma_b = rng.uniform(1.0, 2.0, 12)
    gamma_b[rng.permutation(12)[:5]] = 0.02
    layer_var(model, "bn_b", "gamma").assign(gamma_b.astype("float32"))
    model.pruning_state.explore(0.0, 0)
    counts = {n: int(g.mask.sum()) for n, g in groups.items()}
    assert counts["conv_b"] == 4  # 7 rounded down.
    assert counts["conv_a"] in (1, 4), counts  # Not 3: the minimum or 4.
    _assert_rounded(model, 4, "after exploration")


def test_flops_target_on_a_residual_network():
    keras.utils.set_random_seed(15)
    base = tiny_resnet()
    dense = keras_chex.count_macs(base).macs
    model = compile_(keras_chex.prune_and_regrow(
        base, flops=0.5, interval=1, seed=0))
    x, y = data(32, 16)
    model.fit(x, y, batch_size=8, epochs=3, verbose=0,
              callbacks=[keras_chex.ChannelExploration()])
    compact = assert_compact_matches(model, x[:4])
    macs = keras_chex.count_macs(compact).macs
    gaps = group_marginals(model, "macs")
    print(f"\nresnet flops=0.5: kept {macs / dense:.4f}; one more channel "
          f"costs at most {max(gaps.values()) / dense:.4f}")
    assert macs <= 0.5 * dense
    assert 0.5 * dense - macs < max(gaps.values())
    # The Add-coupled residual streams are pruned too, and the compact model
    # really is narrower there.
    streams = [g for g in keras_chex.channel_groups(model)
               if sum(isinstance(base.get_layer(p), layers.Conv2D)
                      for p in g.producers) > 1]
    assert streams and any(not g.mask.all() for g in streams)
    stem = compact.get_layer("stem_conv").kernel.shape[-1]
    assert stem == groups_of(model)["stem_conv"].mask.sum() < 16


def test_streams_keep_prunes_only_the_inner_widths():
    keras.utils.set_random_seed(15)
    base = tiny_resnet()
    dense = keras_chex.count_macs(base).macs
    model = compile_(keras_chex.prune_and_regrow(
        base, flops=0.5, interval=1, seed=0, streams="keep"))
    x, y = data(32, 16)
    model.fit(x, y, batch_size=8, epochs=3, verbose=0,
              callbacks=[keras_chex.ChannelExploration()])
    compact = assert_compact_matches(model, x[:4])
    assert keras_chex.count_macs(compact).macs <= 0.5 * dense
    groups = keras_chex.channel_groups(model)
    streams = [g for g in groups if len(g.producers) > 1]
    inner = [g for g in groups if len(g.producers) == 1]
    assert len(streams) == 3 and inner
    assert all(g.mask.all() for g in streams)
    assert sum(g.mask.sum() for g in inner) < sum(g.size for g in inner)


def test_gamma_l1_adds_its_pressure_to_the_batchnorm_scales():
    # Plain SGD from the same start on the same batch: the only difference
    # between the two runs is -lr * rate * sign(gamma) on scoring gammas.
    x, y = data(8, 6)
    gammas = {}
    for rate in (0.0, 0.5):
        keras.utils.set_random_seed(3)
        model = keras_chex.prune_and_regrow(
            parallel_model(), sparsity=0.25, regrow=0.0, seed=0,
            gamma_l1=rate)
        assert (model.pruning_state.transform_gradients is None) == (
            rate == 0)
        model.compile(optimizer=keras.optimizers.SGD(0.1),
                      loss=keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True))
        start = layer_var(model, "bn_a", "gamma").numpy()
        model.fit(x, y % 3, batch_size=8, epochs=1, verbose=0,
                  callbacks=[keras_chex.ChannelExploration()])
        gammas[rate] = layer_var(model, "bn_a", "gamma").numpy()
    active = groups_of(model)["conv_a"].mask
    np.testing.assert_allclose(
        (gammas[0.5] - gammas[0.0])[active],
        (-0.1 * 0.5 * np.sign(start))[active], atol=1e-5)


def _fit_explorations(model, epochs=4):
    x, y = data(32, 16)
    history = model.fit(x, y, batch_size=8, epochs=epochs, verbose=0,
                        shuffle=False,
                        callbacks=[keras_chex.ChannelExploration()])
    return history, assert_compact_matches(model, x[:4])


def test_knapsack_allocator_meets_a_flops_target_and_regrows():
    keras.utils.set_random_seed(15)
    base = tiny_resnet()
    dense = keras_chex.count_macs(base).macs
    model = compile_(keras_chex.prune_and_regrow(
        base, flops=0.5, allocator="knapsack", round_to=4, interval=1,
        regrow=0.4, seed=0))
    assert model.pruning_config["allocator"] == "knapsack"
    history, compact = _fit_explorations(model)
    assert keras_chex.count_macs(compact).macs <= 0.5 * dense
    assert sum(history.history["chex_regrown"]) > 0
    _assert_rounded(model, 4, "after fit")


def test_knapsack_widths_carry_the_most_gamma_a_budget_allows():
    """At the last (regrowth-free) step the knapsack keeps, per group, the
    widths of maximal summed |gamma| under the MACs: no other allowed
    choice that fits carries more."""
    keras.utils.set_random_seed(3)
    model = compile_(keras_chex.prune_and_regrow(
        tiny_resnet(), flops=0.5, allocator="knapsack", round_to=4,
        regrow=0.0, interval=1, seed=0))
    _fit_explorations(model, epochs=2)
    state = model.pruning_state
    scores = np.asarray(state._plain["fns"][0]())
    counts = state.masks.counts()
    cost = state.group_cost()
    budget = 0.5 * cost.total(state.group_sizes)
    assert cost.total(counts) <= budget * (1 + 1e-9)

    def value(c):
        total, lo = 0.0, 0
        for size, k in zip(state.group_sizes, c):
            total += np.sort(scores[lo:lo + size])[::-1][:k].sum()
            lo += size
        return total

    rng = np.random.default_rng(0)
    widths = state.widths()
    for _ in range(300):
        other = np.array([rng.choice(w) for w in widths])
        if cost.total(other) <= budget:
            assert value(other) <= value(counts) + 1e-5


def test_uniform_allocator_keeps_one_fraction_of_every_group():
    """Every exploration keeps the widths of a uniformly narrow network at
    the target (the same fraction of each group), regrows on top of them
    while delta > 0, and ends at the target."""
    keras.utils.set_random_seed(15)
    base = tiny_resnet()
    dense = keras_chex.count_macs(base).macs
    model = compile_(keras_chex.prune_and_regrow(
        base, flops=0.5, allocator="uniform", interval=1, regrow=0.4,
        seed=0))
    assert model.pruning_config["allocator"] == "uniform"
    history, compact = _fit_explorations(model)
    assert sum(history.history["chex_regrown"]) > 0
    macs = keras_chex.count_macs(compact).macs
    assert 0.4 * dense < macs <= 0.5 * dense
    state = model.pruning_state
    fractions = state.masks.counts() / state.group_sizes
    # One fraction, up to rounding each group to whole channels.
    assert np.ptp(fractions) <= 1.0 / state.group_sizes.min() + 1e-9
    assert not np.all(fractions == 1)
    with pytest.raises(ValueError, match="allocator"):
        keras_chex.prune_and_regrow(base, flops=0.5, allocator="even")


def test_latency_target_meets_the_table_budget():
    keras.utils.set_random_seed(15)
    base = tiny_resnet()
    table = synthetic_latency_table(base)
    model = compile_(keras_chex.prune_and_regrow(
        base, latency=0.6, cost_table=table, interval=1, seed=0))
    assert model.pruning_config["allocator"] == "knapsack"
    history, compact = _fit_explorations(model)
    kept = table.predict(compact) / table.predict(base)
    assert 0.3 < kept <= 0.6 * (1 + 1e-9)
    assert history.history["chex_macs"][-1] == pytest.approx(kept, rel=1e-5)
    with pytest.raises(ValueError, match="`allocator='threshold'` cannot"):
        keras_chex.prune_and_regrow(base, latency=0.5, cost_table=table,
                                    allocator="threshold")


def test_unknown_steps_per_epoch_is_a_clear_error():
    model = compile_(keras_chex.prune_and_regrow(
        plain_cnn(widths=(8, 8)), sparsity=0.5, seed=0))
    x, y = data(16, 8)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4).filter(
        lambda a, b: True)
    assert int(ds.cardinality()) == int(tf.data.UNKNOWN_CARDINALITY)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        model.fit(ds, epochs=2, verbose=0, shuffle=False,
                  callbacks=[keras_chex.ChannelExploration()])


def test_callback_refuses_a_model_without_chex():
    model = compile_(keras_chex.wrap(plain_cnn(widths=(8, 8))))
    x, y = data(8, 8)
    with pytest.raises(ValueError, match="prune_and_regrow"):
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[keras_chex.ChannelExploration()])


# ---------------------------------------------------------------------------
# 6. Determinism
# ---------------------------------------------------------------------------


def _seeded_run(seed):
    keras.utils.set_random_seed(20)
    model = compile_(keras_chex.prune_and_regrow(
        plain_cnn(widths=(16, 32, 32)), sparsity=0.5, interval=1,
        seed=seed))
    x, y = data(32, 8)
    recorder = MaskRecorder()
    history = model.fit(x, y, batch_size=8, epochs=4, verbose=0,
                        callbacks=[keras_chex.ChannelExploration(), recorder])
    assert sum(history.history["chex_regrown"]) > 0
    return recorder.masks


def test_same_seed_same_masks_different_seed_different_masks():
    first, second, other = _seeded_run(7), _seeded_run(7), _seeded_run(8)
    assert first.keys() == second.keys() == other.keys()
    for step in first:
        np.testing.assert_array_equal(first[step], second[step],
                                      err_msg=f"step {step}")
    assert any(not np.array_equal(first[s], other[s]) for s in first)


# ---------------------------------------------------------------------------
# 7. No lost state: BackupAndRestore and .keras files
# ---------------------------------------------------------------------------


def _fresh_run_model():
    keras.utils.set_random_seed(30)
    return compile_(keras_chex.prune_and_regrow(
        plain_cnn(widths=(16, 32, 32)), sparsity=0.5, interval=1, seed=3))


def _state(model):
    """Every variable of the model (incl. masks and CHEX backups) by path."""
    return {v.path: np.asarray(v.numpy()) for v in model.weights}


@pytest.mark.parametrize("backup_first", [True, False])
def test_backup_and_restore_resumes_exactly(tmp_path, backup_first):
    x, y = data(32, 8)

    def callbacks(*extra):
        pair = [keras.callbacks.BackupAndRestore(backup),
                keras_chex.ChannelExploration()]
        return (pair if backup_first else pair[::-1]) + list(extra)

    fit = dict(batch_size=8, epochs=6, verbose=0, shuffle=False)

    reference = _fresh_run_model()
    ref_history = reference.fit(
        x, y, callbacks=[keras_chex.ChannelExploration()], **fit)
    assert sum(ref_history.history["chex_regrown"]) > 0

    backup = str(tmp_path / "backup")
    crashed = _fresh_run_model()
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit(x, y, callbacks=callbacks(
            CrashAtEpoch(3),  # After the explorations at steps 4, 8 and 12.
        ), **fit)
    assert crashed.pruning_state.last_stats.numpy()[3] == 3
    resumed = _fresh_run_model()
    assert resumed.pruning_state.last_stats.numpy()[3] == 0
    history = resumed.fit(x, y, callbacks=callbacks(), **fit)
    assert len(history.history["loss"]) == 3  # Epochs 3, 4 and 5 only.
    np.testing.assert_array_equal(full_mask(resumed), full_mask(reference))
    assert resumed.pruning_state.last_stats.numpy()[3] == (
        reference.pruning_state.last_stats.numpy()[3])
    expected, actual = _state(reference), _state(resumed)
    assert expected.keys() == actual.keys()
    assert any("backup" in k for k in expected)
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], rtol=1e-5,
                                   atol=1e-6, err_msg=key)


class _SaveAt(keras.callbacks.Callback):
    def __init__(self, epoch, path):
        super().__init__()
        self.epoch, self.path, self.saved = epoch, path, None

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self.model.save(self.path)
            self.saved = _state(self.model)


def test_keras_file_saved_mid_training_loads_and_continues(tmp_path):
    x, y = data(32, 8)
    fit = dict(batch_size=8, epochs=6, verbose=0, shuffle=False)
    path = str(tmp_path / "mid.keras")
    model = _fresh_run_model()
    saver = _SaveAt(2, path)
    model.fit(x, y, callbacks=[keras_chex.ChannelExploration(), saver], **fit)

    # No custom_objects: registration by `import keras_chex` is enough.
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, keras_chex.PrunableModel)
    assert loaded.pruning_config == model.pruning_config
    state = _state(loaded)
    assert state.keys() == saver.saved.keys()
    for key, value in saver.saved.items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)
    backups = [np.asarray(b.numpy()) for b in loaded.pruning_state.backups]
    assert len(backups) == len(model.pruning_state.backups) > 0
    assert any(np.any(b) for b in backups)
    assert int(loaded.optimizer.iterations.numpy()) == 12

    # Continuing the loaded model ends where the uninterrupted run ended.
    loaded.fit(x, y, initial_epoch=3,
               callbacks=[keras_chex.ChannelExploration()], **fit)
    assert loaded.pruning_state.last_stats.numpy()[3] == (
        model.pruning_state.last_stats.numpy()[3])
    np.testing.assert_array_equal(full_mask(loaded), full_mask(model))
    expected, actual = _state(model), _state(loaded)
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], rtol=1e-5,
                                   atol=1e-6, err_msg=key)
    assert_compact_matches(loaded, x[:4])


# ---------------------------------------------------------------------------
# 8. Exploration cost
# ---------------------------------------------------------------------------


def test_exploration_is_cheap_next_to_training():
    """One exploration on ResNet-20 costs less than two training steps.

    Both are timed after warm-up, interleaved, and compared by their medians,
    so machine noise hits both alike. Two steps of batch 32 is a strict
    bound: CHEX explores every couple of epochs, i.e. every ~3000 such steps
    on CIFAR-10, so this caps the overhead well below 0.1%.
    """
    keras.utils.set_random_seed(40)
    model = compile_(keras_chex.prune_and_regrow(
        cifar_resnet(20), flops=0.5, seed=0))
    x, y = data(32, 32)
    model.train_on_batch(x, y)
    model.pruning_state.explore(0.3, 0)  # Warm-up: traces the step.
    explore, step = [], []
    for t in range(5):
        start = time.perf_counter()
        stats = model.pruning_state.explore(0.2, t + 1)
        np.asarray(stats)
        explore.append(time.perf_counter() - start)
        start = time.perf_counter()
        model.train_on_batch(x, y)
        step.append(time.perf_counter() - start)
    explore_time, step_time = np.median(explore), np.median(step)
    print(f"\nResNet-20 exploration {explore_time * 1e3:.1f} ms, training "
          f"step (batch 32, 32x32) {step_time * 1e3:.1f} ms, ratio "
          f"{explore_time / step_time:.2f}")
    assert explore_time < 2 * step_time


def test_an_unreachable_target_is_warned_once_through_wrap_and_fit():
    # The initial cut and every exploration find the same floor; the user
    # hears about it once.
    import warnings

    keras.utils.set_random_seed(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = compile_(keras_chex.prune_and_regrow(
            tiny_resnet(), flops=0.01, round_to=4, min_channels=4,
            allocator="knapsack", interval=1, seed=0))
        history, _ = _fit_explorations(model, epochs=2)
    unreachable = [w for w in caught if "cannot be met" in str(w.message)]
    assert len(unreachable) == 1, [str(w.message) for w in unreachable]
    assert "flops=0.01" in str(unreachable[0].message)
    assert len(history.history["chex_macs"]) == 2
