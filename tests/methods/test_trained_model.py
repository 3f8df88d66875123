"""Compressing a trained model: every method, plain or distilled, keeps
what the model learned on a task it has mastered."""

import keras
import numpy as np
import pytest

import keras_chex
from conftest import compile_sgd, tiny_resnet

METHODS = {
    "chex": (keras_chex.prune_and_regrow, dict(interval=1),
             lambda data: keras_chex.ChannelExploration()),
    "smcp": (keras_chex.soft_mask_prune, dict(round_to=4),
             lambda data: keras_chex.SoftMaskPruning()),
    "frs": (keras_chex.relevance_prune, dict(interval=1),
            lambda data: keras_chex.RelevancePruning(data)),
}


def separable(n, seed):
    """Four classes, each a fixed random image under unit noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    templates = np.random.default_rng(99).normal(size=(4, 8, 8, 3))
    x = rng.normal(size=(n, 8, 8, 3)) + templates[y]
    return x.astype("float32"), y


def accuracy(model, x, y):
    logits = np.asarray(model.predict(x, batch_size=64, verbose=0))
    return float(np.mean(np.argmax(logits, -1) == y))


def _distiller(model, student):
    """`student` learning from a copy of `model`: the Distiller freezes its
    teacher for good, and the other tests prune the same trained model."""
    teacher = keras.models.clone_model(model)
    teacher.set_weights(model.get_weights())
    return keras.distillation.Distiller(
        teacher=teacher, student=student,
        distillation_losses=keras.distillation.LogitsDistillation(
            temperature=2.0, loss=keras.losses.KLDivergence()),
        student_loss_weight=0.5)


@pytest.fixture(scope="module")
def trained():
    x, y = separable(512, 0)
    model = tiny_resnet()
    compile_sgd(model)
    model.fit(x, y, batch_size=32, epochs=4, verbose=0)
    held_out = separable(256, 1)
    return model, accuracy(model, *held_out)


@pytest.mark.parametrize("distill", [False, True], ids=["plain", "distilled"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_trained_model_keeps_its_accuracy_at_half_the_macs(
        trained, method, distill):
    model, dense_accuracy = trained
    assert dense_accuracy >= 0.95  # The task is mastered.
    x, y = separable(512, 0)
    held_out = separable(256, 1)
    entry, options, callback = METHODS[method]
    student = entry(model, flops=0.5, seed=0, **options)
    if method != "chex":
        # Nothing is removed before the first step: the wrapped model is
        # the trained one.
        assert accuracy(student, *held_out) == dense_accuracy
    trainer = _distiller(model, student) if distill else student
    compile_sgd(trainer, lr=0.01)
    trainer.fit(x, y, batch_size=32, epochs=4, verbose=0,
                callbacks=[callback((x, y)),
                           keras_chex.RecalibrateBatchNorm(x, batches=8)])
    compact = keras_chex.strip(student)
    kept = (keras_chex.count_macs(compact).macs
            / keras_chex.count_macs(model).macs)
    assert kept <= 0.5 + 1e-9
    assert accuracy(compact, *held_out) >= dense_accuracy - 0.03


@pytest.mark.parametrize("distill", [False, True], ids=["plain", "distilled"])
def test_a_model_cut_once_recovers_with_fine_tuning(trained, distill):
    model, dense_accuracy = trained
    x, y = separable(512, 0)
    held_out = separable(256, 1)
    compact = keras_chex.prune_once(model, flops=0.5)
    trainer = _distiller(model, compact) if distill else compact
    compile_sgd(trainer, lr=0.01)
    trainer.fit(x, y, batch_size=32, epochs=4, verbose=0)
    assert (keras_chex.count_macs(compact).macs
            <= 0.5 * keras_chex.count_macs(model).macs + 1e-9)
    assert accuracy(compact, *held_out) >= dense_accuracy - 0.03
