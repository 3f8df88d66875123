"""The method registry the command line lists its choices from."""

import pytest

import keras_chex
from keras_chex import cli
from keras_chex.methods import registry


def test_every_registered_method_loads_its_public_entry_point_and_callback():
    public = {"chex": (keras_chex.prune_and_regrow,
                       keras_chex.ChannelExploration),
              "smcp": (keras_chex.soft_mask_prune,
                       keras_chex.SoftMaskPruning),
              "frs": (keras_chex.relevance_prune,
                      keras_chex.RelevancePruning)}
    assert registry.names() == sorted(public)
    for name, expected in public.items():
        assert registry.get(name).load() == expected
        # Its callback names the method the entry point writes in configs.
        assert expected[1].method == name


def test_a_registered_method_is_a_command_line_choice(monkeypatch):
    monkeypatch.setitem(registry._METHODS, "random", registry.MethodInfo(
        "random", "one-shot random channels (a test)",
        "keras_chex.methods.chex.method.prune_and_regrow",
        "keras_chex.methods.chex.callback.ChannelExploration"))
    args = cli.build_parser().parse_args(
        ["prune", "m.keras", "--method=random"])
    assert args.method == "random"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["prune", "m.keras", "--method=nope"])
    with pytest.raises(ValueError, match="known: chex, frs, random, smcp"):
        registry.get("nope")
