"""Files saved by keras-chex 0.1.0 (before the core/methods layout) load.

`data/chex_0_1_0.keras` is a CIFAR ResNet-8 mid-CHEX, saved by the 0.1.0
tree with its config under the old "chex" key and its state under the old
attribute; the `.npz` beside it holds what that model computed then.
"""

import os

import keras
import numpy as np

import keras_chex

DATA = os.path.join(os.path.dirname(__file__), "data")


def _load():
    model = keras.saving.load_model(os.path.join(DATA, "chex_0_1_0.keras"))
    expected = np.load(os.path.join(DATA, "chex_0_1_0_expected.npz"))
    return model, expected


def test_a_0_1_0_file_loads_with_its_masks_outputs_and_state():
    model, expected = _load()
    assert keras_chex.is_wrapped(model)
    assert model.pruning_config["method"] == "chex"
    np.testing.assert_array_equal(model.masks.numpy(),
                                  expected["mask"])
    np.testing.assert_allclose(np.asarray(model(expected["x"],
                                                training=False)),
                               expected["y"], rtol=1e-5, atol=1e-6)
    # The exploration state (step statistics, stored weights) came back.
    np.testing.assert_array_equal(model.pruning_state.last_stats.numpy(),
                                  expected["stats"])
    backups = [np.asarray(b.numpy()) for b in model.pruning_state.backups]
    assert any(np.abs(b).sum() > 0 for b in backups)


def test_a_0_1_0_file_saves_in_the_new_format_and_strips(tmp_path):
    model, expected = _load()
    path = str(tmp_path / "again.keras")
    model.save(path)
    again = keras.saving.load_model(path)
    assert "pruning" in again.get_config()
    np.testing.assert_array_equal(again.masks.numpy(),
                                  expected["mask"])
    np.testing.assert_array_equal(again.pruning_state.last_stats.numpy(),
                                  expected["stats"])
    compact = keras_chex.strip(again)
    np.testing.assert_allclose(np.asarray(compact(expected["x"],
                                                  training=False)),
                               expected["y"], rtol=1e-4, atol=1e-5)
