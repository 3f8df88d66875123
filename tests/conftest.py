"""Shared test helpers: random weights everywhere, exact-strip checks."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_chex  # noqa: E402
from keras_chex.core import _graph  # noqa: E402
from keras_chex.core import latency_table  # noqa: E402
from keras_chex.testing.random_graphs import random_masks  # noqa: E402,F401
from keras_chex.testing.random_graphs import randomize_weights  # noqa: E402,F401

# The repository root, for tests that run its scripts and examples.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory):
    """A CIFAR-layout zip of the bundled sample's first 24 and last 6
    images of each class: for command-line runs that need real images but
    not many (pass `--val_per_class=6`)."""
    from keras_chex.cifar import data as datasets

    path = tmp_path_factory.mktemp("data") / "tiny_cifar.zip"
    datasets.write_sample(datasets.SAMPLE_PATH, path, 24, 6)
    return path


@pytest.fixture
def tiny_cifar_flags(tiny_cifar):
    """Training-script flags for `tiny_cifar`: 240 training images, 60 held
    out, batches of 16."""
    return (f"--data={tiny_cifar}", "--val_per_class=6", "--batch_size=16")


def load_tool(filename, name=None):
    """The script `tools/<filename>` imported as a module (tools are
    scripts, not a package)."""
    import importlib.util

    path = os.path.join(REPO_ROOT, "tools", filename)
    spec = importlib.util.spec_from_file_location(
        name or filename[:-len(".py")], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_strips_exactly(model, inputs, rng, keep=0.5, rtol=1e-4):
    """Wrap, mask at random, strip, and compare outputs and MACs.

    Returns:
        (wrapped, compact) for further checks.
    """
    wrapped = keras_chex.wrap(model)
    random_masks(wrapped, rng, keep)
    compact = keras_chex.strip(wrapped)
    expected = keras.tree.flatten(wrapped(inputs, training=False))
    actual = keras.tree.flatten(compact(inputs, training=False))
    for e, a in zip(expected, actual):
        e, a = np.asarray(e), np.asarray(a)
        assert e.shape == a.shape
        assert np.all(np.isfinite(e))
        scale = max(np.abs(e).max(), 1e-6)
        assert np.abs(e - a).max() / scale <= rtol, (
            f"max rel diff {np.abs(e - a).max() / scale:.3g}"
        )
    assert keras_chex.count_macs(compact).macs == (
        keras_chex.count_macs(wrapped).macs
    )
    assert keras_chex.count_macs(compact).params == (
        keras_chex.count_macs(wrapped).params
    )
    for layer in _graph.all_layers(compact):
        assert layer.__class__.__module__.startswith("keras."), layer
    return wrapped, compact


class CrashAtEpoch(keras.callbacks.Callback):
    """Raises "simulated crash" when epoch `epoch` begins (0-based), after
    the epochs before it ended and were backed up."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("simulated crash")


def tiny_resnet(seed=0):
    """A ResNet-8 on 8x8 images with 4 classes: every method's test model."""
    from keras_chex.cifar.resnet import cifar_resnet

    keras.utils.set_random_seed(seed)
    return cifar_resnet(8, num_classes=4, widths=(8, 16, 16),
                        input_shape=(8, 8, 3))


def tiny_data(n=64, seed=0):
    """Images for `tiny_resnet` with learnable labels (so gradients are not
    noise alone)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 3)).astype("float32")
    y = (x[:, :4, :4, 0].mean(axis=(1, 2)) > 0).astype("int64") + 2 * (
        x[:, 4:, 4:, 1].mean(axis=(1, 2)) > 0).astype("int64")
    return x, y


def compile_sgd(model, lr=0.05):
    """Compiles with SGD + momentum and a from-logits cross-entropy."""
    model.compile(
        optimizer=keras.optimizers.SGD(lr, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def assert_keras_file_continues(model, make_callback, x, y, directory,
                                epochs):
    """A `.keras` file saved after one epoch loads with the same config,
    masks and method state, and both copies then train to the same end.

    Args:
        model: a compiled wrapped model (untrained).
        make_callback: `fn() -> the method's pruning callback`.
        x, y: the training arrays.
        directory: a `pathlib.Path` to save into.
        epochs: the total epochs of the continued fit.
    """
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False,
              callbacks=[make_callback()])
    path = str(directory / "mid.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.pruning_config == model.pruning_config
    np.testing.assert_array_equal(loaded.masks.numpy(),
                                  model.masks.numpy())
    for a, b in zip(loaded.pruning_state.weights, model.pruning_state.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for m in (model, loaded):
        m.fit(x, y, batch_size=16, epochs=epochs, initial_epoch=1, verbose=0,
              shuffle=False, callbacks=[make_callback()])
    np.testing.assert_array_equal(loaded.masks.numpy(),
                                  model.masks.numpy())
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def assert_resumes_exactly(make_model, make_callback, x, y, directory,
                           backup_first, epochs=4, crash_at=2):
    """A fit crashed at epoch `crash_at` and resumed by `BackupAndRestore`
    ends like an uninterrupted one: same masks, method state and weights.

    Args:
        make_model: `fn() -> compiled wrapped model` (same seed every call).
        make_callback: `fn() -> the method's pruning callback`.
        x, y: the training arrays.
        directory: a fresh `pathlib.Path` for the backups.
        backup_first: list `BackupAndRestore` before the pruning callback.
    """

    def callbacks(path, crash=None):
        backup = keras.callbacks.BackupAndRestore(str(path))
        pruning = make_callback()
        order = [backup, pruning] if backup_first else [pruning, backup]
        return order + ([crash] if crash else [])

    def run(model, cbs):
        model.fit(x, y, batch_size=16, epochs=epochs, verbose=0,
                  shuffle=False, callbacks=cbs)

    keras.utils.set_random_seed(5)
    reference = make_model()
    run(reference, callbacks(directory / "reference"))
    keras.utils.set_random_seed(5)
    crashed = make_model()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crashed, callbacks(directory / "backup", CrashAtEpoch(crash_at)))
    keras.utils.set_random_seed(5)
    resumed = make_model()
    run(resumed, callbacks(directory / "backup"))
    np.testing.assert_array_equal(resumed.masks.numpy(),
                                  reference.masks.numpy())
    np.testing.assert_array_equal(
        resumed.pruning_state.last_stats.numpy(),
        reference.pruning_state.last_stats.numpy())
    for a, b in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def synthetic_latency_table(model, round_to=4):
    """A latency table from a formula, with a step at 8 channels (like
    XNNPACK's blocking), so no LiteRT timing is needed."""
    entries = {}
    for name, node in latency_table._timed_nodes(model):
        key = latency_table._entry_key(node)
        cin, cout = latency_table._channels(node)
        cins = sorted({1, *range(round_to, cin, round_to), cin})
        couts = sorted({1, *range(round_to, cout, round_to), cout})
        spatial = float(np.prod(node.inputs[0].shape[1:-1]))
        entries[key] = {
            "cin": cins, "cout": couts,
            "ms": [[1e-4 * spatial * a * 8 * np.ceil(b / 8) for b in couts]
                   for a in cins]}
    calibration = {latency_table.architecture_key(model):
                   {"scale": 1.0, "other_ms": 0.05}}
    return latency_table.LatencyTable(entries, calibration, 1, {}, round_to)
