"""SMCP: soft masks, Taylor importance, knapsack allocation under a budget."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import keras_chex
from keras_chex.core import costs
from keras_chex.core import importance as importance_lib
from keras_chex.core import allocation
from keras_chex.methods.smcp import schedule as schedule_lib

from conftest import assert_keras_file_continues
from conftest import assert_resumes_exactly
from conftest import compile_sgd as _compile
from conftest import synthetic_latency_table
from conftest import tiny_data as _data
from conftest import tiny_resnet as _resnet
from conftest import randomize_weights


def _smcp(model=None, **kwargs):
    kwargs.setdefault("flops", 0.5)
    kwargs.setdefault("seed", 0)
    kwargs.setdefault("round_to", 4)
    kwargs.setdefault("interval_steps", 2)
    return keras_chex.soft_mask_prune(model or _resnet(), **kwargs)


def _fit(model, epochs=3, callbacks=(), **kwargs):
    x, y = _data()
    return model.fit(x, y, batch_size=16, epochs=epochs, verbose=0,
                     shuffle=False,
                     callbacks=[keras_chex.SoftMaskPruning(), *callbacks],
                     **kwargs)


# -- schedule -------------------------------------------------------------------
def test_schedule_ramps_to_the_target_and_freezes():
    s = schedule_lib.SoftMaskSchedule(warmup=0.1, ramp=0.6, freeze=0.25,
                                      interval_steps=5)
    steps = s.recompute_steps(200)
    assert steps[0] == 25 and steps[-1] == 150
    assert all(b > a for a, b in zip(steps, steps[1:]))
    kept = [s.kept_fraction(t, 200, 0.4) for t in steps]
    assert all(b <= a + 1e-12 for a, b in zip(kept, kept[1:]))
    assert kept[0] < 1.0 and kept[-1] == pytest.approx(0.4)
    # Exponential ramp: more than half the way after half the ramp.
    assert s.kept_fraction(20 + 60, 200, 0.4) < 0.7
    assert s.kept_fraction(140, 200, 0.4) == pytest.approx(0.4)


def test_schedule_rejects_a_ramp_past_the_freeze():
    with pytest.raises(ValueError, match="freeze"):
        schedule_lib.SoftMaskSchedule(warmup=0.3, ramp=0.6, freeze=0.25)
    with pytest.raises(ValueError, match="interval_steps"):
        schedule_lib.SoftMaskSchedule(interval_steps=0)


# -- importance -----------------------------------------------------------------
def test_taylor_importance_matches_numpy():
    keras.utils.set_random_seed(1)
    x_in = keras.Input((4, 4, 2))
    h = layers.Conv2D(3, 3, padding="same", name="c1")(x_in)
    h = layers.BatchNormalization(name="bn1")(h)
    h = layers.ReLU()(h)
    h = layers.Conv2D(5, 1, use_bias=False, name="c2")(h)
    h = layers.GlobalAveragePooling2D()(h)
    out = layers.Dense(2, name="head")(h)
    wrapped = keras_chex.wrap(keras.Model(x_in, out), mode="straight_through")
    randomize_weights(wrapped, np.random.default_rng(0))
    x = np.random.default_rng(1).normal(size=(6, 4, 4, 2)).astype("float32")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(wrapped(x, training=True) ** 2)
    variables = wrapped.trainable_weights
    grads = tape.gradient(loss, variables)
    plan = importance_lib.ImportancePlan(wrapped.analysis)
    got = np.asarray(plan.taylor(grads, variables))

    by_path = {v.path: (np.asarray(v.numpy()), np.asarray(g))
               for v, g in zip(variables, grads)}
    groups = {g.name: g for g in keras_chex.channel_groups(wrapped)}
    c1 = groups["c1"]
    expected = np.zeros(wrapped.analysis.num_channels)
    for path, axes in (("c1/kernel", (0, 1, 2)), ("c1/bias", ()),
                       ("bn1/gamma", ()), ("bn1/beta", ())):
        w, g = by_path[path]
        expected[c1.start:c1.start + 3] += (-w * g).sum(axis=axes)
    c2 = groups["c2"]
    w, g = by_path["c2/kernel"]
    expected[c2.start:c2.start + 5] += (-w * g).sum(axis=(0, 1, 2))
    np.testing.assert_allclose(got, np.abs(expected), rtol=1e-4, atol=1e-6)
    # The consumer's input slice (c2/kernel axis 2) is not part of it: a
    # random kernel there would change the c1 scores if it were.
    assert got[c1.start:c1.start + 3].sum() > 0


def test_a_step_with_overflowed_gradients_adds_no_importance():
    # Under mixed precision such a step is skipped by the optimizer.
    model = _smcp(pruned_decay=0.0)
    state = model.pruning_state
    variables = model.trainable_weights
    grads = [tf.ones_like(v) for v in variables]
    state.transform_gradients(grads, variables)
    after_one = state.importance.numpy().copy()
    assert after_one.sum() > 0
    grads[0] = tf.fill(variables[0].shape, np.inf)
    state.transform_gradients(grads, variables)
    np.testing.assert_array_equal(state.importance.numpy(), after_one)


def test_straight_through_gradient_reaches_masked_weights_hard_does_not():
    def grads_of(mode):
        keras.utils.set_random_seed(2)
        x_in = keras.Input((4, 4, 2))
        h = layers.Conv2D(4, 1, name="c1")(x_in)
        h = layers.ReLU()(h)
        h = layers.Conv2D(3, 1, name="c2")(h)
        out = layers.GlobalAveragePooling2D()(h)
        wrapped = keras_chex.wrap(keras.Model(x_in, out), mode=mode)
        group = {g.name: g for g in keras_chex.channel_groups(wrapped)}["c1"]
        group.set_mask([True, False, True, True])
        x = np.random.default_rng(0).normal(size=(3, 4, 4, 2)) + 1.0
        with tf.GradientTape() as tape:
            out = wrapped(x.astype("float32"), training=True)
            loss = tf.reduce_sum(out)
        kernel = wrapped.get_layer("c1").kernel
        return np.asarray(out), np.asarray(tape.gradient(loss, kernel))

    out_st, g_st = grads_of("straight_through")
    out_hard, g_hard = grads_of("hard")
    np.testing.assert_allclose(out_st, out_hard, rtol=1e-6)  # Same forward.
    assert np.abs(g_st[..., 1]).sum() > 0
    np.testing.assert_array_equal(g_hard[..., 1], 0.0)


# -- allocation -----------------------------------------------------------------
def test_group_cost_matches_the_cost_model_for_macs_and_params(rng):
    wrapped = keras_chex.wrap(_resnet())
    analysis = wrapped.analysis
    cost = costs.CostModel(analysis)
    for resource in ("macs", "params"):
        group_cost = cost.group_cost(analysis, resource)
        for _ in range(5):
            counts = np.array([rng.integers(1, g.size + 1)
                               for g in analysis.groups])
            mask = np.concatenate([np.arange(g.size) < k for g, k in
                                   zip(analysis.groups, counts)])
            assert group_cost.total(counts) == pytest.approx(
                cost.cost(mask, resource), rel=1e-9)


def test_linearized_costs_are_exact_at_the_expansion_point_and_per_group():
    analysis = keras_chex.wrap(_resnet()).analysis
    group_cost = costs.CostModel(analysis).group_cost(analysis, "macs")
    sizes = np.array([g.size for g in analysis.groups])
    counts = sizes // 2
    widths = [np.arange(1, s + 1) for s in sizes]
    option_costs, offset = group_cost.linearized(counts, widths)
    at_counts = sum(c[k - 1] for c, k in zip(option_costs, counts)) - offset
    assert at_counts == pytest.approx(group_cost.total(counts), rel=1e-9)
    for g in range(len(sizes)):  # One group moved: still exact.
        moved = counts.copy()
        moved[g] = sizes[g]
        approx = sum(c[k - 1] for c, k in zip(option_costs, moved)) - offset
        assert approx == pytest.approx(group_cost.total(moved), rel=1e-9)


def test_allocation_is_the_best_within_budget_on_a_small_problem():
    # Two groups; the cost couples them (a conv between them).
    fixed = np.array([1.0, 0.0, 0.0])
    weights = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    coef = np.array([3.0, 1.0, 2.0])
    group_cost = costs.GroupCost(fixed, weights, [1, 1, 2], [0, 2, 0],
                                 lambda a0, a1, t: coef[t] * a0 * a1)
    rng = np.random.default_rng(0)
    importance = rng.random(12)
    sizes = np.array([6, 6])
    widths = [np.arange(1, 7), np.arange(1, 7)]
    values, _ = allocation.option_values(importance, sizes, widths)
    for budget in (10.0, 25.0, 40.0, 60.0):
        got = allocation.allocate(values, widths, group_cost, budget,
                                  np.array([6, 6]))
        best = max(
            (values[0][i] + values[1][j], (i + 1, j + 1))
            for i, j in itertools.product(range(6), range(6))
            if group_cost.total(np.array([i + 1, j + 1])) <= budget
        )
        assert got.cost <= budget
        assert values[0][got.counts[0] - 1] + values[1][got.counts[1] - 1] == (
            pytest.approx(best[0]))


# -- the method during fit ---------------------------------------------------------
@pytest.mark.parametrize("target", ["flops", "params"])
def test_fit_meets_the_budget(target):
    model = _compile(_smcp(**{"flops": None, target: 0.5}))
    history = _fit(model)
    resource = "macs" if target == "flops" else "params"
    dense = keras_chex.count_macs(_resnet())
    now = keras_chex.count_macs(model)
    kept = getattr(now, resource) / getattr(dense, resource)
    assert kept <= 0.5 + 1e-9
    assert kept > 0.3  # Not pruned far past the budget.
    assert history.history["smcp_cost"][-1] == pytest.approx(kept, rel=1e-6)
    assert sum(history.history["smcp_pruned"]) > 0


def test_fit_meets_a_latency_budget_and_the_table_predicts_the_compact():
    base = _resnet()
    table = synthetic_latency_table(base)
    model = _compile(_smcp(base, flops=None, latency=0.6, cost_table=table))
    history = _fit(model)
    compact = keras_chex.strip(model)
    predicted = table.predict(compact)
    dense = table.predict(base)
    assert predicted <= 0.6 * dense * (1 + 1e-9)
    assert history.history["smcp_cost"][-1] == pytest.approx(
        predicted / dense, rel=1e-6)


def test_a_pruned_channel_comes_back_when_it_ranks_high_again():
    model = _smcp()
    state = model.pruning_state
    n = state.num_channels
    first = {g.name: g for g in model.analysis.groups}["stage1_block1_conv1"]
    importance = np.linspace(1.0, 2.0, n).astype("float32")
    importance[first.start] = 0.0  # Least important: pruned.
    state.importance.assign(importance)
    state.recompute(0.5)
    assert not model.masks.numpy()[first.start]
    importance[first.start] = 100.0  # Now the most important.
    state.importance.assign(importance)
    stats = state.recompute(0.5)
    assert model.masks.numpy()[first.start]
    assert stats[2] >= 1  # Counted as regrown.


def test_pruned_channels_keep_learning_and_decay():
    model = _compile(_smcp(pruned_decay=0.5))
    state = model.pruning_state
    state.importance.assign(np.linspace(1.0, 2.0, state.num_channels)
                            .astype("float32"))
    state.recompute(0.5)
    mask = model.masks.numpy()
    conv = model.get_layer("stage1_block1_conv1")
    group = {g.name: g for g in model.analysis.groups}["stage1_block1_conv1"]
    pruned = np.flatnonzero(~mask[group.start:group.start + group.size])
    assert len(pruned)
    before = np.asarray(conv.kernel.numpy())[..., pruned]
    x, y = _data()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # No callback.
    after = np.asarray(conv.kernel.numpy())[..., pruned]
    assert not np.allclose(before, after)  # Straight-through: they learn.
    # The importance of the pruned channels was accumulated too.
    imp = np.asarray(state.importance.numpy())
    assert np.all(imp[group.start + pruned] > 0)


def test_strip_is_exact_after_smcp():
    model = _compile(_smcp())
    _fit(model)
    compact = keras_chex.strip(model)
    x, _ = _data(8, seed=3)
    np.testing.assert_allclose(np.asarray(compact(x, training=False)),
                               np.asarray(model(x, training=False)),
                               rtol=1e-4, atol=1e-5)
    assert keras_chex.count_macs(compact).macs == (
        keras_chex.count_macs(model).macs)


def test_keras_file_mid_training_continues_identically(tmp_path):
    x, y = _data()
    assert_keras_file_continues(
        _compile(_smcp()), lambda: keras_chex.SoftMaskPruning(),
        x, y, tmp_path, epochs=3)


@pytest.mark.parametrize("backup_first", [True, False])
def test_backup_and_restore_resumes_identically_in_either_order(
        tmp_path, backup_first):
    x, y = _data()
    assert_resumes_exactly(lambda: _compile(_smcp(_resnet(1))),
                           lambda: keras_chex.SoftMaskPruning(),
                           x, y, tmp_path, backup_first)


# -- errors ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(flops=None), "exactly one target"),
    (dict(params=0.5), "exactly one target"),
    (dict(flops=1.5), "`flops`"),
    (dict(flops=None, latency=0.5), "cost_table"),
    (dict(cost_table="x.json"), "latency"),
    (dict(importance="random"), "importance"),
    (dict(round_to=0), "round_to"),
    (dict(pruned_decay=-1.0), "pruned_decay"),
    (dict(warmup=0.5, ramp=0.5), "freeze"),
    (dict(bn_rescale="yes"), "bn_rescale"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _smcp(**kwargs)


def test_an_unreachable_target_warns_and_takes_the_narrowest_widths():
    model = _smcp(round_to=16, min_channels=16)
    # The user's target is named, and the budget of the step that found it.
    target = model.pruning_config["target_value"]
    with pytest.warns(UserWarning, match=rf"flops={target:g} cannot be met"
                      r".*this step's budget of 0\.100"):
        model.pruning_state.recompute(0.1)
    counts = model.pruning_state.current_counts()
    assert np.all(counts == np.minimum(16, model.pruning_state.group_sizes))
    with pytest.warns(UserWarning, match="flops=0.1 cannot be met"):
        keras_chex.prune_and_regrow(_resnet(), flops=0.1, round_to=16,
                                    min_channels=16)


def test_a_latency_table_of_another_model_is_refused():
    other = keras.Sequential([keras.Input((8, 8, 3)),
                              layers.Conv2D(4, 3, name="elsewhere")])
    table = synthetic_latency_table(other)
    with pytest.raises(ValueError,
                       match=r"no entry for layer 'stem_conv' \(Conv2D"):
        _smcp(flops=None, latency=0.5, cost_table=table)


def test_callbacks_refuse_the_other_methods_model():
    model = _compile(keras_chex.prune_and_regrow(_resnet(), flops=0.5))
    x, y = _data()
    with pytest.raises(ValueError, match="soft_mask_prune"):
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[keras_chex.SoftMaskPruning()])
    smcp = _compile(_smcp())
    with pytest.raises(ValueError, match="prune_and_regrow"):
        smcp.fit(x, y, epochs=1, verbose=0,
                 callbacks=[keras_chex.ChannelExploration()])


def test_bn_rescale_keeps_each_batchnorms_summed_gamma():
    for rescale in (False, True):
        model = _smcp(bn_rescale=rescale)
        randomize_weights(model, np.random.default_rng(0))
        state = model.pruning_state
        slices = [s for s in model.analysis.weight_slices
                  if s.name == "gamma"]
        before = [np.abs(np.asarray(s.variable().numpy())) for s in slices]
        state.importance.assign(np.linspace(1.0, 2.0, state.num_channels)
                                .astype("float32"))
        state.recompute(0.5)
        mask = model.masks.numpy()
        lost_somewhere = False
        for s, old in zip(slices, before):
            new = np.abs(np.asarray(s.variable().numpy()))
            kept = np.ones(len(new), bool)
            kept[s.classes >= 0] = mask[s.classes[s.classes >= 0]]
            lost_somewhere |= not kept.all()
            if rescale:
                # What it kept carries the |gamma| it had before.
                assert new[kept].sum() == pytest.approx(old.sum(), rel=1e-5)
            else:
                np.testing.assert_array_equal(new, old)
        assert lost_somewhere
