"""The bad-input catalogue: each a clear error or warning, nothing lost.

Errors name the argument or layer at fault and say what to do; nothing the
user passed is modified. (Per-method argument checks live with each
method's tests; exports to existing paths in test_export.py; subclassed
and channels_first models in test_constructs.py.)
"""

import json
import warnings
import zipfile

import keras
import numpy as np
import pytest
from keras import layers

import keras_chex

ENTRY_POINTS = {
    "chex": lambda m, **kw: keras_chex.prune_and_regrow(m, flops=0.5, **kw),
    "smcp": lambda m, **kw: keras_chex.soft_mask_prune(
        m, flops=0.5, round_to=2, **kw),
    "frs": lambda m, **kw: keras_chex.relevance_prune(m, flops=0.5, **kw),
}


def _net():
    inp = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, padding="same", name="conv_a")(inp)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.Conv2D(8, 3, padding="same", name="conv_b")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, layers.Dense(4, name="head")(x))


def _data(n=32):
    rng = np.random.default_rng(0)
    return (rng.normal(size=(n, 8, 8, 3)).astype("float32"),
            rng.integers(0, 4, n))


@pytest.mark.parametrize("method", sorted(ENTRY_POINTS))
def test_an_unbuilt_sequential_model_is_refused_with_the_fix(method):
    model = keras.Sequential([layers.Conv2D(4, 3), layers.Flatten(),
                              layers.Dense(2)])
    with pytest.raises(ValueError, match="keras.Input\\(shape=...\\)"):
        ENTRY_POINTS[method](model)


@pytest.mark.parametrize("method", sorted(ENTRY_POINTS))
def test_a_model_with_nothing_prunable_warns(method):
    inp = keras.Input((4,))
    model = keras.Model(inp, layers.Dense(3)(inp))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ENTRY_POINTS[method](model)
    messages = [str(w.message) for w in caught
                if issubclass(w.category, UserWarning)]
    # One warning that says what is wrong, not a second about the target.
    assert len(messages) == 1, messages
    assert "no channels keras-chex can prune" in messages[0]


@pytest.mark.parametrize("method", sorted(ENTRY_POINTS))
def test_a_target_of_the_wrong_type_is_named(method):
    with pytest.raises(ValueError, match="`flops` must be a number"):
        {"chex": keras_chex.prune_and_regrow,
         "smcp": keras_chex.soft_mask_prune,
         "frs": keras_chex.relevance_prune}[method](_net(), flops="0.5")


@pytest.mark.parametrize("entry, kwargs, name", [
    ("prune_and_regrow", {"flops": "half"}, "flops"),
    ("prune_and_regrow", {"flops": [0.5]}, "flops"),
    ("prune_and_regrow", {"flops": 0.5, "regrow": "a"}, "regrow"),
    ("prune_and_regrow", {"flops": 0.5, "interval": "2"}, "interval"),
    ("prune_and_regrow", {"flops": 0.5, "until": None}, "until"),
    ("prune_and_regrow", {"flops": 0.5, "exclude": 3}, "exclude"),
    ("prune_and_regrow", {"flops": 0.5, "seed": "1"}, "seed"),
    ("prune_and_regrow", {"flops": 0.5, "round_to": 8.0}, "round_to"),
    ("soft_mask_prune", {"flops": 0.5, "warmup": "0.1"}, "warmup"),
    ("soft_mask_prune", {"flops": 0.5, "interval_steps": 2.5},
     "interval_steps"),
    ("soft_mask_prune", {"flops": 0.5, "pruned_decay": "0"},
     "pruned_decay"),
    ("relevance_prune", {"flops": "half"}, "flops"),
    ("relevance_prune", {"channels": 4.0}, "channels"),
    ("relevance_prune", {"flops": 0.5, "score_batches": "3"},
     "score_batches"),
    ("relevance_prune", {"flops": 0.5, "interval": None}, "interval"),
    ("wrap", {"mode": 1}, "mode"),
    ("wrap", {"exclude": 5}, "exclude"),
    ("wrap", {"fold_batchnorm": "no"}, "fold_batchnorm"),
])
def test_every_argument_of_the_wrong_type_is_named(entry, kwargs, name):
    # Not a raw conversion error from deep inside: the argument, by name.
    with pytest.raises((ValueError, TypeError), match=f"`{name}`"):
        getattr(keras_chex, entry)(_net(), **kwargs)


def test_exclude_may_name_a_single_layer_as_a_string():
    wrapped = keras_chex.prune_and_regrow(_net(), flops=0.5,
                                          exclude="conv_a")
    names = {n for g in keras_chex.channel_groups(wrapped)
             for n in g.producers}
    assert "conv_a" not in names and "conv_b" in names
    with pytest.raises(ValueError, match="conv_c"):
        keras_chex.prune_and_regrow(_net(), flops=0.5, exclude="conv_c")


@pytest.mark.parametrize("method", sorted(ENTRY_POINTS))
def test_the_users_model_is_never_modified(method):
    model = _net()
    before = [w.copy() for w in model.get_weights()]
    wrapped = ENTRY_POINTS[method](model)
    for g in keras_chex.channel_groups(wrapped):
        mask = g.mask
        mask[0] = False
        g.set_mask(mask)
    keras_chex.strip(wrapped)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not keras_chex.is_wrapped(model)


@pytest.mark.parametrize("method", sorted(ENTRY_POINTS))
def test_a_model_with_nothing_prunable_fits_as_a_plain_fit(method):
    x, y = _data(16)
    model = _net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = ENTRY_POINTS[method](model, exclude=["conv_a", "conv_b"])
        wrapped.compile(optimizer="sgd", loss=keras.losses.
                        SparseCategoricalCrossentropy(from_logits=True))
        callback = getattr(keras_chex, CALLBACKS[method])
        callback = callback((x, y)) if method == "frs" else callback()
        wrapped.fit(x, y, epochs=2, batch_size=4, verbose=0,
                    callbacks=[callback])
    messages = [str(w.message) for w in caught
                if issubclass(w.category, UserWarning)]
    assert len(messages) == 1, messages
    assert "no channels keras-chex can prune" in messages[0]
    compact = keras_chex.strip(wrapped)
    assert keras_chex.count_macs(compact).macs == keras_chex.count_macs(
        model).macs
    np.testing.assert_allclose(compact(x), wrapped(x), rtol=1e-4, atol=1e-5)


CALLBACKS = {"chex": "ChannelExploration", "smcp": "SoftMaskPruning",
             "frs": "RelevancePruning"}


@pytest.mark.parametrize("method, epochs, consequence", [
    ("chex", 1, "never regrows"), ("frs", 2, "at once, not gradually")])
def test_a_fit_too_short_for_the_schedule_says_so_once(method, epochs,
                                                       consequence):
    x, y = _data(16)

    def fit(**kwargs):
        wrapped = ENTRY_POINTS[method](_net(), **kwargs)
        wrapped.compile(optimizer="sgd", loss=keras.losses.
                        SparseCategoricalCrossentropy(from_logits=True))
        callback = getattr(keras_chex, CALLBACKS[method])
        callback = callback((x, y)) if method == "frs" else callback()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            wrapped.fit(x, y, epochs=epochs, batch_size=4, verbose=0,
                        callbacks=[callback])
        return [str(w.message) for w in caught
                if "one pruning step only" in str(w.message)]

    # The default `interval=2` (epochs) leaves one step in this fit.
    (message,) = fit()
    assert consequence in message
    assert "`interval=2`" in message and "smaller `interval`" in message
    suggested = float(message.split("(e.g. interval=")[1].split(" ")[0])
    assert fit(interval=suggested) == []


@pytest.mark.parametrize("method", sorted(ENTRY_POINTS))
def test_fitting_without_the_methods_callback_warns(method):
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype("float32")
    y = np.zeros(16, "int64")
    model = ENTRY_POINTS[method](_net())
    model.compile(optimizer="sgd", loss=keras.losses.
                  SparseCategoricalCrossentropy(from_logits=True))
    with pytest.warns(UserWarning,
                      match=f"without `keras_chex.{CALLBACKS[method]}`"):
        model.fit(x, y, epochs=1, verbose=0)
    callback = getattr(keras_chex, CALLBACKS[method])
    callback = callback((x, y)) if method == "frs" else callback()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    assert not [w for w in caught if "without `keras_chex" in str(w.message)]
    # A plain `wrap` has no method: its masks are the user's to set.
    plain = keras_chex.wrap(_net())
    plain.compile(optimizer="sgd", loss="mse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain.fit(x, np.zeros((16, 4), "float32"), epochs=1, verbose=0)
    assert not [w for w in caught if "without `keras_chex" in str(w.message)]


def test_a_file_from_a_newer_keras_chex_is_refused(tmp_path):
    path = tmp_path / "model.keras"
    keras_chex.prune_and_regrow(_net(), flops=0.5).save(path)
    newer = tmp_path / "newer.keras"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(newer, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                config["config"]["pruning"]["config_version"] = 99
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    with pytest.raises(ValueError, match="newer keras-chex"):
        keras.saving.load_model(newer)
    # The file itself is intact and still loads where it can.
    assert keras.saving.load_model(path).pruning_config["config_version"] == 2


@pytest.mark.parametrize("method", sorted(ENTRY_POINTS))
def test_callbacks_refuse_a_plain_model(method):
    x, y = _data()
    model = _net()
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    callback = {"chex": keras_chex.ChannelExploration(),
                "smcp": keras_chex.SoftMaskPruning(),
                "frs": keras_chex.RelevancePruning((x, y))}[method]
    with pytest.raises(ValueError, match="needs a model from"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])


@pytest.mark.parametrize("method", sorted(ENTRY_POINTS))
def test_mixed_float16_works_for_every_method(method):
    x, y = _data()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        options = {"chex": dict(interval=1), "smcp": dict(interval_steps=1),
                   "frs": dict(interval=1)}[method]
        model = ENTRY_POINTS[method](_net(), seed=0, **options)
        callback = {"chex": keras_chex.ChannelExploration(),
                    "smcp": keras_chex.SoftMaskPruning(),
                    "frs": keras_chex.RelevancePruning((x, y))}[method]
        model.compile(
            optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(x, y, batch_size=8, epochs=3, verbose=0,
                            callbacks=[callback])
        assert np.all(np.isfinite(history.history["loss"]))
        assert model.get_layer("conv_a").compute_dtype == "float16"
        compact = keras_chex.strip(model)
        assert compact.get_layer("conv_a").compute_dtype == "float16"
        np.testing.assert_allclose(
            np.asarray(compact(x[:4]), "float32"),
            np.asarray(model(x[:4]), "float32"), rtol=1e-3, atol=1e-3)
        kept = (keras_chex.count_macs(compact).macs
                / keras_chex.count_macs(_net()).macs)
        assert kept <= 0.5
        state = model.pruning_state
        for v in state.weights:
            assert np.all(np.isfinite(v.numpy())), v.path
    finally:
        keras.mixed_precision.set_global_policy("float32")


class _Poison(keras.callbacks.Callback):
    """Puts NaN into a layer's kernel after a given step (a diverged step)."""

    def __init__(self, step, layer="conv_b"):
        super().__init__()
        self.step, self.layer = step, layer

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.step:
            kernel = self.model.get_layer(self.layer).kernel
            value = kernel.numpy()
            value[..., 0] = np.nan
            kernel.assign(value)


@pytest.mark.parametrize("method", sorted(ENTRY_POINTS))
def test_a_diverged_step_skips_pruning_with_a_clear_warning(method):
    x, y = _data()
    options = {"chex": dict(interval=1), "smcp": dict(interval_steps=2),
               "frs": dict(interval=1)}[method]
    model = ENTRY_POINTS[method](_net(), seed=0, **options)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = {"chex": keras_chex.ChannelExploration(),
                "smcp": keras_chex.SoftMaskPruning(),
                "frs": keras_chex.RelevancePruning((x, y))}[method]
    masks = []
    recorder = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: masks.append(
            model.masks.numpy()))
    # Listed first, so the poison is in place when the pruning step runs.
    poison = _Poison(step=3)
    with pytest.warns(UserWarning, match="skipped the pruning step.*"
                      "'conv_b'.*NaN or inf"):
        model.fit(x, y, batch_size=8, epochs=3, verbose=0,
                  callbacks=[poison, callback, recorder])
    # From the poisoned step on, no pruning step changed the masks, and
    # they are valid: every group keeps a channel.
    for mask in masks[3:]:
        np.testing.assert_array_equal(mask, masks[2])
    for g in keras_chex.channel_groups(model):
        assert g.mask.any()


def test_all_zero_filters_are_pruned_like_any_other():
    x, y = _data()
    model = keras_chex.relevance_prune(_net(), channels=4, interval=1,
                                       seed=0)
    kernel = model.get_layer("conv_a").kernel
    kernel.assign(np.zeros(kernel.shape, "float32"))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[keras_chex.RelevancePruning((x, y))])
    for g in keras_chex.channel_groups(model):
        assert g.mask.any()
    chex = keras_chex.prune_and_regrow(_net(), flops=0.5, interval=1, seed=0)
    kernel = chex.get_layer("conv_a").kernel
    kernel.assign(np.zeros(kernel.shape, "float32"))
    chex.compile("sgd", keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    history = chex.fit(x, y, batch_size=8, epochs=2, verbose=0,
                       callbacks=[keras_chex.ChannelExploration()])
    assert history.history["chex_macs"][-1] <= 0.5


def _concat_joined_to_a_stream():
    # Found by the random-graph benchmark (seed 249): 'side' writes 3 of
    # the 11 channels of one group; pruning all 3 left a 0-filter layer.
    inp = keras.Input((8, 8, 3))
    main = layers.Conv2D(8, 3, padding="same", name="main")(inp)
    side = layers.Conv2D(3, 1, name="side")(inp)
    joined = layers.Concatenate()([main, side])
    other = layers.BatchNormalization()(
        layers.Conv2D(11, 1, name="other")(inp))
    x = layers.ReLU()(layers.Add()([joined, other]))
    x = layers.Conv2D(6, 3, padding="same", name="after")(x)
    x = layers.GlobalAveragePooling2D()(layers.ReLU()(x))
    return keras.Model(inp, layers.Dense(4, name="head")(x))


def test_a_mask_may_not_empty_a_layer_inside_a_group():
    wrapped = keras_chex.wrap(_concat_joined_to_a_stream())
    group = next(g for g in keras_chex.channel_groups(wrapped)
                 if "side" in g.producers)
    assert group.size == 11
    mask = np.ones(11, bool)
    mask[8:] = False  # The three channels 'side' writes.
    with pytest.raises(ValueError, match="\\['side'\\].*keep at least one"):
        group.set_mask(mask)
    mask[9] = True
    group.set_mask(mask)
    compact = keras_chex.strip(wrapped)
    assert compact.get_layer("side").filters == 1


@pytest.mark.parametrize("method", sorted(ENTRY_POINTS))
def test_no_method_empties_a_layer_inside_a_group(method):
    x, y = _data()
    make = {"chex": lambda m: keras_chex.prune_and_regrow(
                m, flops=0.15, interval=1, seed=0),
            "smcp": lambda m: keras_chex.soft_mask_prune(
                m, flops=0.15, interval_steps=1, round_to=1, seed=0),
            "frs": lambda m: keras_chex.relevance_prune(
                m, flops=0.15, interval=1, seed=0)}[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Such a target may be unreachable.
        model = make(_concat_joined_to_a_stream())
        model.compile(
            optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        callback = {"chex": keras_chex.ChannelExploration(),
                    "smcp": keras_chex.SoftMaskPruning(),
                    "frs": keras_chex.RelevancePruning((x, y))}[method]
        model.fit(x, y, batch_size=8, epochs=3, verbose=0,
                  callbacks=[callback])
    group = next(g for g in keras_chex.channel_groups(model)
                 if "side" in g.producers)
    assert group.mask.sum() < 11  # The group was pruned ...
    compact = keras_chex.strip(model)
    assert compact.get_layer("side").filters >= 1  # ... 'side' kept one.
    np.testing.assert_allclose(np.asarray(compact(x[:4])),
                               np.asarray(model(x[:4])), rtol=1e-4,
                               atol=1e-5)
