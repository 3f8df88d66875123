"""A fourth method written on the core's contract alone: one-shot L1.

Entry point, state, callback and registry entry in one short file, with no
code from the other methods: what a new method costs.
"""

import dataclasses
from typing import ClassVar

import keras
import numpy as np

import keras_chex
from keras_chex.cifar.resnet import cifar_resnet
from keras_chex.core import callback, config, importance, method, wrapping
from keras_chex.methods import registry

NAME = "l1_oneshot_test"


@dataclasses.dataclass(frozen=True, kw_only=True)
class L1Config(config.MethodConfig):
    method: ClassVar[str] = NAME
    targets: ClassVar[tuple] = ("flops", "params")


def l1_prune(model, *, flops=None, params=None, seed=None):
    """Prunes the lowest-L1 filters once, after one step, widths chosen by
    the shared allocator."""
    config = L1Config.from_arguments({"flops": flops, "params": params},
                                     seed=seed)
    return wrapping.wrap(model, mode="hard", pruning=config.to_dict())


class L1State(method.PruningState):
    config_class = L1Config

    def __init__(self, model, **kwargs):
        super().__init__(model, name="l1_state", **kwargs)

    def prune(self):
        scores = importance.ImportancePlan(self.analysis, True).magnitude()
        old = self.masks.numpy()
        _, new, _ = self.allocate(scores, self.config.target_value)
        self.masks.assign(new)
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
    assert loaded.pruning_state.config == model.pruning_state.config
    np.testing.assert_array_equal(loaded.masks.numpy(),
                                  model.masks.numpy())


def test_this_file_stays_short():
    with open(__file__) as f:
        assert len(f.readlines()) < 120
