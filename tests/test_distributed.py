"""Every method under `tf.distribute.MirroredStrategy` on two logical CPUs.

Logical devices must be configured before TensorFlow initialises, which the
test process has long done, so the body runs in a fresh interpreter and
prints its findings as JSON.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json
    import os
    import sys

    METHOD = sys.argv[1]
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import keras
    import numpy as np
    from keras import layers

    import keras_chex
    from keras_chex.core import statistics

    if METHOD == "frs":
        # Its masks are written between steps (`Masks.assign`); here they
        # restart the BatchNorms in one compiled call, as a large model's do.
        statistics.COMPILED_RESTART_MIN_BATCHNORMS = 1

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    keras.utils.set_random_seed(0)
    with strategy.scope():
        inp = keras.Input((8, 8, 3))
        x = inp
        for i, c in enumerate((16, 32, 32)):
            x = layers.Conv2D(c, 3, padding="same", use_bias=False,
                              name=f"conv{i}")(x)
            x = layers.BatchNormalization(name=f"bn{i}")(x)
            x = layers.ReLU()(x)
        x = layers.GlobalAveragePooling2D()(x)
        base = keras.Model(inp, layers.Dense(10, name="head")(x))
        if METHOD == "chex":
            model = keras_chex.prune_and_regrow(
                base, flops=0.5, interval=1, until=0.8, seed=0)
            callback, prefix = keras_chex.ChannelExploration(), "chex"
            logged = ("chex_macs", "chex_pruned", "chex_regrown")
        elif METHOD == "smcp":
            model = keras_chex.soft_mask_prune(
                base, flops=0.5, interval_steps=2, seed=0)
            callback, prefix = keras_chex.SoftMaskPruning(), "smcp"
            logged = ("smcp_cost", "smcp_pruned", "smcp_regrown")
        else:
            model = keras_chex.relevance_prune(
                base, flops=0.5, interval=1, until=0.8, seed=0)
            prefix = "frs"
            logged = ("frs_macs", "frs_pruned")
        model.compile(
            optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )

    def per_replica(variable):
        value = getattr(variable, "value", variable)
        return [np.asarray(v.numpy()) for v in
                strategy.experimental_local_results(value)]

    def mask_vars():
        return {layer.name: layer.mask for layer in model.layers
                if isinstance(layer, (keras_chex.ChannelMask,
                                      keras_chex.MaskedBatchNormalization))}

    initial = {n: per_replica(v)[0] for n, v in mask_vars().items()}
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    ys = rng.integers(0, 10, 64)
    ds = tf.data.Dataset.from_tensor_slices((xs, ys)).batch(16)
    if METHOD == "frs":
        callback = keras_chex.RelevancePruning(ds)
    history = model.fit(ds, epochs=4, verbose=0, callbacks=[callback])

    out = {"replicas": strategy.num_replicas_in_sync, "masks": {},
           "initial": {}, "state": {}, "weights_equal": True}
    for name, v in mask_vars().items():
        out["masks"][name] = [r.tolist() for r in per_replica(v)]
        out["initial"][name] = initial[name].tolist()
    for v in model.pruning_state.weights:
        out["state"][v.path] = [r.tolist() for r in per_replica(v)]
    for v in model.weights:
        values = per_replica(v)
        if len(values) != 2 or not np.array_equal(values[0], values[1]):
            out["weights_equal"] = False
            out.setdefault("unequal", []).append(v.path)
    out["history"] = {k[len(prefix) + 1:]: [float(x) for x in
                                            history.history[k]]
                      for k in logged}
    stats = model.pruning_state.last_stats.numpy()
    out["explorations"] = float(stats[2] if METHOD == "frs" else stats[3])
    dense = keras_chex.count_macs(base).macs
    out["macs"] = keras_chex.count_macs(keras_chex.strip(model)).macs / dense
    out["compiled_restart"] = model in statistics._COMPILED_RESTARTS
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.parametrize("method", ["chex", "smcp", "frs"])
def test_mirrored_strategy_keeps_replicas_in_sync(tmp_path, method):
    script = tmp_path / "mirrored.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, str(script), method], capture_output=True, text=True,
        timeout=600, env=env,
    )
    lines = [line for line in proc.stdout.splitlines()
             if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULT "):])

    assert out["replicas"] == 2
    assert out["masks"], "no mask variables found"
    changed = False
    for name, replicas in out["masks"].items():
        assert len(replicas) == 2, name  # Really mirrored, one per device.
        assert replicas[0] == replicas[1], f"{name} differs across replicas"
        changed |= replicas[0] != out["initial"][name]
    assert changed, "masks never changed: no exploration happened"
    for path, replicas in out["state"].items():
        assert len(replicas) == 2 and replicas[0] == replicas[1], path
    # Keras 3 updates BatchNorm moving statistics per replica (aggregation
    # "none"; a plain model without CHEX shows the same), so only those may
    # differ. Every other variable, trainable or the method's, must agree.
    unequal = out.get("unequal", [])
    assert all(p.endswith(("moving_mean", "moving_variance"))
               for p in unequal), unequal
    history = out["history"]
    assert sum(history["pruned"]) > 0
    if method == "chex":
        # Steps 4, 8, 12 and the freeze step round(0.8 * 16) = 13.
        assert out["explorations"] == 4
        assert sum(history["regrown"]) > 0
        assert history["macs"][-1] == out["macs"] <= 0.5
    elif method == "smcp":
        # Every 2 steps from the warm-up end (2) to the freeze step (12).
        assert out["explorations"] == 5
        assert history["cost"][-1] == out["macs"] <= 0.5
    else:
        # Steps 4, 8, 12 and the freeze step 13, as CHEX's.
        assert out["explorations"] == 4
        # The compiled restart ran, and left the replicas equal (above).
        assert out["compiled_restart"] is True
        assert history["macs"][-1] == out["macs"] <= 0.5
