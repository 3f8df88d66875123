"""Every method under MultiWorkerMirroredStrategy: two workers on loopback.

Two worker processes (TF_CONFIG with ports on 127.0.0.1) train the same
wrapped model with the method's callback; at the end both hold the same
masks and the same weights (BatchNorm moving statistics excepted: Keras
keeps them per replica), and the chief's `.keras` file loads with those
masks.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

WORKER = textwrap.dedent(
    """
    import json
    import os
    import sys

    METHOD, OUT = sys.argv[1], sys.argv[2]
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import keras
    import numpy as np
    from keras import layers

    import keras_chex

    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    ys = rng.integers(0, 10, 64)
    data = tf.data.Dataset.from_tensor_slices((xs, ys)).batch(16)
    with strategy.scope():
        inp = keras.Input((8, 8, 3))
        x = inp
        for i, c in enumerate((16, 32)):
            x = layers.Conv2D(c, 3, padding="same", use_bias=False,
                              name=f"conv{i}")(x)
            x = layers.BatchNormalization(name=f"bn{i}")(x)
            x = layers.ReLU()(x)
        x = layers.GlobalAveragePooling2D()(x)
        base = keras.Model(inp, layers.Dense(10, name="head")(x))
        if METHOD == "chex":
            model = keras_chex.prune_and_regrow(
                base, flops=0.5, interval=1, until=0.8, seed=0)
            callback = keras_chex.ChannelExploration()
        elif METHOD == "smcp":
            model = keras_chex.soft_mask_prune(
                base, flops=0.5, interval_steps=2, round_to=4, seed=0)
            callback = keras_chex.SoftMaskPruning()
        else:
            model = keras_chex.relevance_prune(
                base, flops=0.5, interval=1, until=0.8, seed=0)
            callback = keras_chex.RelevancePruning(data)
        model.compile(
            optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    history = model.fit(data.with_options(options), epochs=4, verbose=0,
                        callbacks=[callback])
    # Only the chief writes where the user looks; every worker must save
    # (the others to a scratch place).
    name = "model.keras" if task == 0 else f"scratch_{task}.keras"
    model.save(os.path.join(OUT, name))
    print("RESULT " + json.dumps({
        "mask": model.masks.numpy().astype(int).tolist(),
        "weights": {v.path: np.asarray(v.numpy()).ravel().tolist()
                    for v in model.weights},
        "loss": [float(v) for v in history.history["loss"]],
    }))
    """
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", ["chex", "smcp", "frs"])
def test_two_workers_end_with_the_same_masks_and_weights(tmp_path, method):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cluster = {"worker": [f"127.0.0.1:{_free_port()}" for _ in range(2)]}
    procs = []
    for index in range(2):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="",
                   TF_CPP_MIN_LOG_LEVEL="3", TF_CONFIG=json.dumps(
                       {"cluster": cluster,
                        "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen(
            [sys.executable, str(script), method, str(tmp_path)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results, outputs = [], []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240))
    finally:
        for proc in procs:
            if proc.poll() is None:  # A worker waiting on a dead peer.
                proc.kill()
    for proc, (out, err) in zip(procs, outputs):
        lines = [line for line in out.splitlines()
                 if line.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, err[-4000:]
        results.append(json.loads(lines[-1][len("RESULT "):]))

    chief, other = results
    assert chief["mask"] == other["mask"]
    assert 0 < sum(chief["mask"]) < len(chief["mask"])  # Pruned, not all.
    assert np.all(np.isfinite(chief["loss"]))
    for path, value in chief["weights"].items():
        if "moving_" in path or "/backup_" in path:
            continue  # Per-replica statistics (and CHEX's copies of them).
        np.testing.assert_array_equal(value, other["weights"][path],
                                      err_msg=path)

    import keras

    import keras_chex  # noqa: F401 (registers the classes to load)

    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert loaded.masks.numpy().astype(int).tolist() == chief["mask"]
