"""The typed, versioned method configs: checked once, stored, read back."""

import dataclasses
import json

import keras
import numpy as np
import pytest

import keras_chex
from keras_chex.core import config as config_lib
from keras_chex.methods.chex.config import ChexConfig
from keras_chex.methods.frs.config import FrsConfig
from keras_chex.methods.smcp.config import SmcpConfig

CONFIGS = [ChexConfig, SmcpConfig, FrsConfig]


@pytest.mark.parametrize("cls", CONFIGS)
def test_a_config_survives_its_stored_form(cls):
    config = cls.from_arguments({"flops": 0.4, "params": None}, seed=3)
    stored = json.loads(json.dumps(config.to_dict()))
    assert stored["method"] == cls.method
    assert stored["method_version"] == cls.version
    assert cls.from_dict(stored) == config


@pytest.mark.parametrize("cls", CONFIGS)
def test_fields_are_normalised_once(cls):
    config = cls.from_arguments({"flops": np.float32(0.5)}, seed=np.int64(2),
                                round_to=np.int64(4))
    assert type(config.target_value) is float
    assert type(config.seed) is int and config.seed == 2
    assert type(config.round_to) is int


@pytest.mark.parametrize("cls", CONFIGS)
def test_a_seed_left_out_is_drawn_and_kept(cls):
    config = cls.from_arguments({"flops": 0.5})
    assert isinstance(config.seed, int)
    assert cls.from_dict(config.to_dict()).seed == config.seed


@pytest.mark.parametrize("cls", CONFIGS)
def test_a_newer_config_is_refused_by_name(cls):
    stored = dict(cls.from_arguments({"flops": 0.5}, seed=0).to_dict(),
                  method_version=cls.version + 1)
    with pytest.raises(ValueError, match="newer keras-chex"):
        cls.from_dict(stored)


@pytest.mark.parametrize("cls", CONFIGS)
def test_an_unknown_field_of_a_typed_config_is_refused(cls):
    stored = dict(cls.from_arguments({"flops": 0.5}, seed=0).to_dict(),
                  shiny_new_option=1)
    with pytest.raises(ValueError, match="shiny_new_option"):
        cls.from_dict(stored)
    # Before typed configs a retired key was simply not read.
    del stored["method_version"]
    assert cls.from_dict(stored).target_value == 0.5


@pytest.mark.parametrize("cls", CONFIGS)
def test_a_stored_config_is_checked_again(cls):
    stored = dict(cls.from_arguments({"flops": 0.5}, seed=0).to_dict(),
                  round_to=0)
    with pytest.raises(ValueError, match="`round_to`"):
        cls.from_dict(stored)


def test_a_config_is_frozen_and_replace_checks_again():
    config = ChexConfig.from_arguments({"flops": 0.5}, seed=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.regrow = 0.1
    assert config.replace(regrow=0.1).regrow == 0.1
    with pytest.raises(ValueError, match="`regrow`"):
        config.replace(regrow=2.0)


def test_a_target_the_method_does_not_take_is_named():
    with pytest.raises(ValueError, match="exactly one target"):
        SmcpConfig.from_arguments({"flops": None, "params": None})
    with pytest.raises(ValueError, match="smcp takes a target of"):
        SmcpConfig(target="sparsity", target_value=0.5)


def test_chex_resolves_its_allocator_from_the_target():
    assert ChexConfig.from_arguments({"flops": 0.5}).allocator == "threshold"
    assert ChexConfig(target="latency", target_value=0.5).allocator == (
        "knapsack")
    # A file from before the choice existed gets the published allocator.
    old = {"method": "chex", "target": "flops", "target_value": 0.5,
           "regrow": 0.3, "interval": 0.5, "until": 0.8,
           "min_channels": 0.05, "round_to": 1, "seed": 3, "exclude": [],
           "mask_mode": "hard"}
    assert ChexConfig.from_dict(old).allocator == "threshold"


def test_frs_reads_a_channel_count_stored_as_a_float_by_older_files():
    old = {"method": "frs", "target": "channels", "target_value": 4.0,
           "interval": 2.0, "until": 0.75, "score_batches": 10, "seed": 0}
    config = FrsConfig.from_dict(old)
    assert config.target_value == 4 and type(config.target_value) is int
    with pytest.raises(ValueError, match="`channels`"):
        FrsConfig.from_arguments({"channels": 4.0})


def test_smcp_stores_its_schedule_normalised():
    config = SmcpConfig.from_arguments({"flops": 0.5}, warmup=0, ramp=1,
                                       freeze=0)
    assert (config.warmup, config.ramp, config.freeze) == (0.0, 1.0, 0.0)
    assert config.schedule().ramp == 1.0
    with pytest.raises(ValueError, match="`warmup` \\+ `ramp`"):
        config.replace(freeze=0.5)


def test_the_wrapped_model_stores_the_config_and_its_state_reads_it(tmp_path):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, name="c1")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Conv2D(4, 1, name="c2")(x)
    outputs = keras.layers.GlobalAveragePooling2D()(x)
    model = keras_chex.soft_mask_prune(keras.Model(inputs, outputs),
                                       flops=0.5, seed=1, round_to=2)
    state = model.pruning_state
    assert isinstance(state.config, SmcpConfig)
    assert state.config == SmcpConfig.from_dict(model.pruning_config)
    # The wrapping keeps its own keys beside the method's.
    assert model.pruning_config["mask_mode"] == "straight_through"
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.pruning_state.config == state.config


def test_the_base_config_documents_its_example():
    # The docstring's example, run: a method's config in a few lines.
    from typing import ClassVar

    from keras_chex.core import checks

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class OneShotConfig(config_lib.MethodConfig):
        method: ClassVar[str] = "one_shot"
        targets: ClassVar[tuple] = ("flops",)
        criterion: str = "l1"

        def check(self):
            checks.check_choice("criterion", self.criterion, ("l1",))

    config = OneShotConfig.from_arguments({"flops": 0.5}, seed=0)
    assert OneShotConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="`criterion`"):
        OneShotConfig.from_arguments({"flops": 0.5}, criterion="l2")
