"""The train step with a gradient hook trains exactly like Keras' own."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_chex.core import _trainer


class _Hooked(keras.Model):
    """A Functional model whose train step runs through `_trainer`."""

    def __init__(self, *args, hook=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.hook = hook

    def train_step(self, data):
        return _trainer.train_step_with_gradient_hook(self, data, self.hook)


def _build(cls, **kwargs):
    keras.utils.set_random_seed(0)
    x = keras.Input((6,))
    h = keras.layers.Dense(5, activation="relu", name="first")(x)
    h = keras.layers.BatchNormalization()(h)
    y = keras.layers.Dense(3, name="last")(h)
    model = cls(x, y, name="net", **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True),
                  metrics=["accuracy"])
    return model


def _data():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(64, 6)).astype("float32"),
            rng.integers(0, 3, 64))


def test_identity_hook_matches_keras_train_step():
    x, y = _data()
    plain = _build(keras.Model)
    hooked = _build(_Hooked, hook=lambda grads, variables: grads)
    h1 = plain.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    h2 = hooked.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    for a, b in zip(plain.get_weights(), hooked.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert h1.history["loss"] == h2.history["loss"]
    assert h1.history["accuracy"] == h2.history["accuracy"]


def test_the_hook_sees_every_step_and_its_result_is_applied():
    x, y = _data()
    calls = tf.Variable(0)

    def freeze_first_kernel(grads, variables):
        calls.assign_add(1)
        return [tf.zeros_like(g) if v.path == "first/kernel" else g
                for g, v in zip(grads, variables)]

    model = _build(_Hooked, hook=freeze_first_kernel)
    first = next(v for v in model.trainable_weights
                 if v.path == "first/kernel")
    before = np.asarray(first.numpy())
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert int(calls.numpy()) == 4
    np.testing.assert_array_equal(first.numpy(), before)
    last = next(v for v in model.trainable_weights
                if v.path == "last/kernel")
    untrained = _build(keras.Model).get_layer("last").kernel
    assert not np.allclose(last.numpy(), untrained.numpy())


@pytest.mark.parametrize("optimizer, slots", [
    (lambda: keras.optimizers.SGD(0.1, momentum=0.9), 1),
    (lambda: keras.optimizers.Adam(), 2),
    (lambda: keras.optimizers.RMSprop(momentum=0.5), 2),
])
def test_optimizer_slots_are_found_per_variable(optimizer, slots):
    # Slot names come from variable paths: layer "d_kernel"'s slots start
    # like those of layer "d"'s kernel, with the same shape.
    model = keras.Sequential([keras.Input((3,)),
                              keras.layers.Dense(3, name="d"),
                              keras.layers.Dense(3, name="d_kernel")])
    model.compile(optimizer(), "mse")
    model.fit(np.ones((4, 3)), np.ones((4, 3)), verbose=0)
    for variable in model.trainable_variables:
        found = _trainer.optimizer_slots(model.optimizer, variable,
                                         model.trainable_variables)
        assert len(found) == slots, variable.path
        assert all(tuple(v.shape) == tuple(variable.shape) for v in found)
    assert _trainer.optimizer_slots(None, model.weights[0]) == []


def test_the_hook_sees_unscaled_gradients_under_a_loss_scale():
    x, y = _data()
    seen = tf.Variable(tf.zeros([6, 5]))

    def record(grads, variables):
        for g, v in zip(grads, variables):
            if v.path == "first/kernel":
                seen.assign(g)
        return grads

    model = _build(_Hooked, hook=record)
    model.compile(
        optimizer=keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.0), initial_scale=1024.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:16], y[:16], batch_size=16, epochs=1, verbose=0)
    reference = _build(keras.Model)
    with tf.GradientTape() as tape:
        loss = reference.compute_loss(
            x=x[:16], y=y[:16], y_pred=reference(x[:16], training=True))
    kernel = reference.get_layer("first").kernel
    np.testing.assert_allclose(seen.numpy(),
                               tape.gradient(loss, kernel).numpy(),
                               rtol=1e-5, atol=1e-7)
