"""`prune_once`: CHEX's uniform filter-L1 cut, taken once, as a compact
model to fine-tune."""

import numpy as np
import pytest

import keras_chex
from conftest import synthetic_latency_table, tiny_resnet


def test_the_cut_keeps_each_groups_largest_l1_filters_at_the_target():
    dense = tiny_resnet()
    before = [w.copy() for w in dense.get_weights()]
    compact = keras_chex.prune_once(dense, flops=0.5)
    assert not keras_chex.is_wrapped(compact)
    kept = (keras_chex.count_macs(compact).macs
            / keras_chex.count_macs(dense).macs)
    assert 0.4 < kept <= 0.5 + 1e-9
    # A block's inner convolution writes a group of its own: the channels
    # kept are those whose filters have the largest L1 norm, which the
    # BatchNorm after it shows one per channel.
    norms = np.abs(dense.get_layer("stage1_block1_conv1").get_weights()[0]
                   ).sum(axis=(0, 1, 2))
    gamma = dense.get_layer("stage1_block1_bn1").get_weights()[0]
    kept_gamma = compact.get_layer("stage1_block1_bn1").get_weights()[0]
    k = len(kept_gamma)
    assert 0 < k < len(gamma)
    top = np.sort(np.argsort(-norms, kind="stable")[:k])
    np.testing.assert_array_equal(kept_gamma, gamma[top])
    # The user's model is untouched.
    for a, b in zip(dense.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_every_target_kind_is_met():
    dense = tiny_resnet()
    macs = keras_chex.count_macs(dense)
    compact = keras_chex.prune_once(dense, params=0.5)
    assert keras_chex.count_macs(compact).params <= 0.5 * macs.params
    table = synthetic_latency_table(dense)
    compact = keras_chex.prune_once(dense, latency=0.6, cost_table=table,
                                    round_to=4)
    assert table.predict(compact) <= 0.6 * table.predict(dense) * 1.05


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "exactly one target"),
    (dict(flops=0.5, params=0.5), "exactly one target"),
    (dict(flops=1.5), "flops"),
    (dict(latency=0.5), "cost_table"),
])
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_chex.prune_once(tiny_resnet(), **kwargs)


def test_a_wrapped_model_is_refused():
    wrapped = keras_chex.wrap(tiny_resnet())
    with pytest.raises(ValueError, match="already wrapped"):
        keras_chex.prune_once(wrapped, flops=0.5)
