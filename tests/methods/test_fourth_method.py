"""A fourth method written on the core's contract alone: one-shot L1.

Entry point, state, callback and registry entry in one short file, with no
code from the other methods: what a new method costs.
"""

import keras
import numpy as np

import keras_chex
from keras_chex.cifar.resnet import cifar_resnet
from keras_chex.core import callback, importance, method, wrapping
from keras_chex.methods import registry

NAME = "l1_oneshot_test"


def l1_prune(model, *, flops=None, seed=None):
    """Prunes the lowest-L1 filters of every group once, after one step."""
    method.check_fraction("flops", flops)
    config = {"method": NAME, "target": "flops", "target_value": float(flops),
              "seed": method.resolve_seed(seed)}
    return wrapping.wrap(model, mode="hard", pruning=config)


class L1State(method.PruningState):
    def __init__(self, model, **kwargs):
        super().__init__(model, name="l1_state", **kwargs)

    def prune(self):
        """Uniform sparsity by bisection, the lowest-L1 filters removed."""
        scores = importance.ImportancePlan(self.analysis, True).magnitude()
        old = self.masks.numpy()
        budget = self.config["target_value"] * self.cost.dense_macs

        def mask_at(keep):
            counts = np.maximum(self.min_counts,
                                np.floor(keep * self.group_sizes))
            parts, start = [], 0
            for size, k in zip(self.group_sizes, counts):
                order = np.argsort(-scores[start:start + size], kind="stable")
                part = np.zeros(size, bool)
                part[order[:int(k)]] = True
                parts.append(part)
                start += size
            return np.concatenate(parts)

        lo, hi = 0.0, 1.0
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.cost.macs(mask_at(mid)) <= budget else (
                lo, mid)
        self.masks.assign(mask_at(lo))
        new = self.masks.numpy()
        return [self.kept_fraction(), float(np.sum(old & ~new)), 0.0]


method.register_method(NAME, L1State)


class OneShotL1(callback.PruningCallback):
    method = NAME
    entry_point = "l1_prune(model, ...)"
    cost_log, pruned_log = "l1_macs", "l1_pruned"

    def plan(self, steps_per_epoch, epochs):
        return [(1, None)]

    def run_step(self, step, payload):
        stats = self.state.prune()
        return stats, f"L1: kept {stats[0]:.3f} of the MACs"


def test_a_fourth_method_is_one_short_file(monkeypatch, tmp_path):
    monkeypatch.setitem(registry._METHODS, NAME, registry.MethodInfo(
        NAME, "one-shot L1 (a test)", f"{__name__}.l1_prune",
        f"{__name__}.OneShotL1"))
    prune, callback_class = registry.get(NAME).load()
    assert (prune, callback_class) == (l1_prune, OneShotL1)
    keras.utils.set_random_seed(0)
    base = cifar_resnet(8, widths=(8, 16, 32), input_shape=(8, 8, 3),
                        num_classes=4)
    model = prune(base, flops=0.5, seed=0)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 4, 64)
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0,
                        callbacks=[callback_class()])
    kept = history.history["l1_macs"]
    assert kept[0] <= 0.5 and kept[0] > 0.3 and kept[1] == kept[0]
    assert history.history["l1_pruned"][0] > 0
    # The core does the rest: strip exactly, save and load mid-way.
    compact = keras_chex.strip(model)
    np.testing.assert_allclose(compact(x[:4]), model(x[:4]), atol=1e-5)
    assert keras_chex.count_macs(compact).macs <= 0.5 * (
        keras_chex.count_macs(base).macs)
    model.save(tmp_path / "l1.keras")
    loaded = keras.saving.load_model(tmp_path / "l1.keras")
    assert isinstance(loaded.pruning_state, L1State)
    np.testing.assert_array_equal(loaded.masks.numpy(),
                                  model.masks.numpy())


def test_this_file_stays_short():
    with open(__file__) as f:
        assert len(f.readlines()) < 120
