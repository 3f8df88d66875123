"""Pruning a model while it is distilled by `keras.distillation.Distiller`.

The pruning callbacks find the wrapped student inside the Distiller that
`fit` runs on; SMCP's gradient hook runs in the Distiller's step.
"""

import keras
import numpy as np
import pytest

import keras_chex
from conftest import CrashAtEpoch, compile_sgd, tiny_data, tiny_resnet

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
METHODS = ["chex", "smcp", "frs"]


_TEACHER_WEIGHTS = []


def _teacher():
    """A fresh trained teacher; the training runs once per process."""
    teacher = compile_sgd(tiny_resnet())
    if not _TEACHER_WEIGHTS:
        x, y = tiny_data(96)
        teacher.fit(x, y, batch_size=16, epochs=2, verbose=0)
        _TEACHER_WEIGHTS.extend(teacher.get_weights())
    teacher.set_weights(_TEACHER_WEIGHTS)
    # The same random state after the first call as after any other, so
    # that runs compared for equality start alike.
    keras.utils.set_random_seed(1)
    return teacher


def _student(method, teacher):
    if method == "chex":
        return keras_chex.prune_and_regrow(teacher, flops=0.5, interval=0.5,
                                           seed=0)
    if method == "smcp":
        return keras_chex.soft_mask_prune(teacher, flops=0.5, seed=0,
                                          round_to=4, interval_steps=2)
    return keras_chex.relevance_prune(teacher, flops=0.5, interval=0.5,
                                      seed=0)


def _callback(method, data):
    return {"chex": keras_chex.ChannelExploration,
            "smcp": keras_chex.SoftMaskPruning,
            "frs": lambda: keras_chex.RelevancePruning(data)}[method]()


def _distiller(teacher, student, **distillation):
    distillation.setdefault("loss", keras.losses.KLDivergence())
    distiller = keras.distillation.Distiller(
        teacher=teacher, student=student,
        distillation_losses=keras.distillation.LogitsDistillation(
            temperature=2.0, **distillation),
        student_loss_weight=0.5)
    distiller.compile(optimizer=keras.optimizers.SGD(0.02, momentum=0.9),
                      loss=LOSS)
    return distiller


@pytest.mark.parametrize("method", METHODS)
def test_a_distilled_student_is_pruned_to_its_target_and_strips_exactly(
        method):
    teacher = _teacher()
    student = _student(method, teacher)
    distiller = _distiller(teacher, student)
    x, y = tiny_data(96)
    teacher_weights = [w.copy() for w in teacher.get_weights()]
    distiller.fit(x, y, batch_size=16, epochs=4, verbose=0,
                  callbacks=[_callback(method, (x, y))])
    assert not student.masks.numpy().all()  # The callback pruned.
    kept = (keras_chex.count_macs(student).macs
            / keras_chex.count_macs(teacher).macs)
    assert kept <= 0.5 + 1e-9
    # The teacher only lent its outputs.
    for a, b in zip(teacher.get_weights(), teacher_weights):
        np.testing.assert_array_equal(a, b)
    compact = keras_chex.strip(student)
    np.testing.assert_allclose(np.asarray(compact(x[:8], training=False)),
                               np.asarray(student(x[:8], training=False)),
                               rtol=1e-4, atol=1e-5)
    # The Distiller has its own train step back after the fit.
    assert "train_step" not in vars(distiller)


def test_smcp_accumulates_taylor_importance_under_a_distiller():
    teacher = _teacher()
    student = _student("smcp", teacher)
    distiller = _distiller(teacher, student)
    x, y = tiny_data(96)
    distiller.fit(x, y, batch_size=16, epochs=1, verbose=0,
                  callbacks=[keras_chex.SoftMaskPruning()])
    importance = np.asarray(student.pruning_state.importance.numpy())
    assert np.all(np.isfinite(importance))
    assert np.count_nonzero(importance) > 0.9 * importance.size


def test_frs_clears_the_distillers_optimizer_state_of_removed_channels():
    teacher = _teacher()
    student = _student("frs", teacher)
    distiller = _distiller(teacher, student)
    x, y = tiny_data(96)
    distiller.fit(x, y, batch_size=16, epochs=2, verbose=0,
                  callbacks=[keras_chex.RelevancePruning((x, y))])
    assert student.pruning_state.optimizer() is distiller.optimizer
    conv = student.get_layer("stage1_block1_conv1")
    group = {g.name: g for g in student.analysis.groups}[conv.name]
    removed = ~student.masks.numpy()[group.start:group.start + group.size]
    assert removed.any()
    from keras_chex.core import _trainer

    slots = _trainer.optimizer_slots(distiller.optimizer, conv.kernel)
    assert slots  # SGD with momentum keeps one per kernel.
    # Removed at the last step; no update since (masked gradients are 0).
    for slot in slots:
        np.testing.assert_array_equal(
            np.asarray(slot.numpy())[..., removed], 0.0)


@pytest.mark.parametrize("method", ["chex", "smcp"])
def test_a_distilled_pruning_fit_resumes_exactly_with_backup_and_restore(
        tmp_path, method):
    x, y = tiny_data(96)

    def run(directory, crash=None):
        keras.utils.set_random_seed(5)
        teacher = _teacher()
        student = _student(method, teacher)
        distiller = _distiller(teacher, student)
        distiller(x[:1])  # Keras' BackupAndRestore needs a built model.
        callbacks = [keras.callbacks.BackupAndRestore(str(directory)),
                     _callback(method, (x, y))] + ([crash] if crash else [])
        distiller.fit(x, y, batch_size=16, epochs=4, verbose=0,
                      shuffle=False, callbacks=callbacks)
        return student

    reference = run(tmp_path / "reference")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "backup", CrashAtEpoch(2))
    resumed = run(tmp_path / "backup")
    np.testing.assert_array_equal(resumed.masks.numpy(),
                                  reference.masks.numpy())
    for a, b in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_distiller_with_a_wrapped_student_saves_and_loads(tmp_path):
    teacher = _teacher()
    student = _student("smcp", teacher)
    distiller = _distiller(teacher, student)
    x, y = tiny_data(96)
    distiller.fit(x, y, batch_size=16, epochs=2, verbose=0,
                  callbacks=[keras_chex.SoftMaskPruning()])
    path = str(tmp_path / "distiller.keras")
    distiller.save(path)
    loaded = keras.saving.load_model(path)
    assert keras_chex.is_wrapped(loaded.student)
    np.testing.assert_array_equal(loaded.student.masks.numpy(),
                                  student.masks.numpy())
    for a, b in zip(loaded.student.pruning_state.weights,
                    student.pruning_state.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_student_wrapped_from_a_frozen_teacher_is_refused_clearly():
    teacher = _teacher()
    _distiller(teacher, _student("chex", teacher))  # Freezes the teacher.
    frozen = _student("chex", teacher)  # Copies the frozen flags.
    distiller = _distiller(teacher, frozen)
    x, y = tiny_data(32)
    with pytest.raises(ValueError, match="no trainable weights.*trainable"):
        distiller.fit(x, y, batch_size=16, epochs=1, verbose=0,
                      callbacks=[keras_chex.ChannelExploration()])


def test_the_wrong_methods_callback_names_the_student():
    teacher = _teacher()
    distiller = _distiller(teacher, _student("chex", teacher))
    x, y = tiny_data(32)
    with pytest.raises(ValueError, match="as the student of 'distiller'"):
        distiller.fit(x, y, batch_size=16, epochs=1, verbose=0,
                      callbacks=[keras_chex.SoftMaskPruning()])


def test_recalibrating_a_distiller_leaves_the_teacher_alone():
    teacher = _teacher()
    student = _student("chex", teacher)
    distiller = _distiller(teacher, student)
    before = [w.copy() for w in teacher.get_weights()]
    x, y = tiny_data(96)
    distiller.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[
        keras_chex.ChannelExploration(),
        keras_chex.RecalibrateBatchNorm(x, batches=3, batch_size=16)])
    for a, b in zip(teacher.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_a_refused_fit_leaves_the_distillers_train_step_alone():
    import tensorflow as tf

    teacher = _teacher()
    distiller = _distiller(teacher, _student("smcp", teacher))
    x, y = tiny_data(32)
    # A dataset of unknown length: the callback cannot plan, and refuses.
    data = tf.data.Dataset.from_tensor_slices((x, y)).filter(
        lambda a, b: True).batch(16)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        distiller.fit(data, epochs=1, verbose=0,
                      callbacks=[keras_chex.SoftMaskPruning()])
    assert "train_step" not in vars(distiller)


def test_a_student_whose_regularization_the_distiller_drops_is_named():
    teacher = _teacher()
    student = keras_chex.prune_and_regrow(
        _regularized(teacher), flops=0.5, interval=0.5, seed=0)
    distiller = _distiller(teacher, student)
    x, y = tiny_data(32)
    with pytest.warns(UserWarning, match=r"without its \d+ regularization"
                      r".*weight_decay="):
        distiller.fit(x, y, batch_size=16, epochs=1, verbose=0,
                      callbacks=[keras_chex.ChannelExploration()])
    # Keras' behaviour the warning describes: the Distiller's loss is the
    # weighted student and distillation losses, without the student's own.
    logs = distiller.evaluate(x, y, batch_size=32, verbose=0,
                              return_dict=True)
    assert student.losses
    np.testing.assert_allclose(
        logs["total_loss"],
        0.5 * logs["student_loss"] + 0.5 * logs["distillation_loss"],
        rtol=1e-4)


def test_an_unregularized_student_gets_no_such_warning(recwarn):
    teacher = _teacher()
    distiller = _distiller(teacher, _student("chex", teacher))
    x, y = tiny_data(32)
    distiller.fit(x, y, batch_size=16, epochs=1, verbose=0,
                  callbacks=[keras_chex.ChannelExploration()])
    assert not [w for w in recwarn if "regularization" in str(w.message)]


def _regularized(model):
    """A copy of `model` whose convolutions decay their kernels."""
    config = model.get_config()
    for layer in config["layers"]:
        if layer["class_name"] == "Conv2D":
            layer["config"]["kernel_regularizer"] = {
                "module": "keras.regularizers", "class_name": "L2",
                "config": {"l2": 5e-4}, "registered_name": None}
    copy = keras.Model.from_config(config)
    copy.set_weights(model.get_weights())
    return copy


def _softened_kl(teacher_logits, student_logits, temperature):
    def softmax(z):
        e = np.exp(z / temperature - np.max(z / temperature, -1,
                                            keepdims=True))
        return e / e.sum(-1, keepdims=True)
    p, q = softmax(teacher_logits), softmax(student_logits)
    return float(np.mean(np.sum(p * np.log(p / q), -1))) * temperature ** 2


def test_the_default_logits_distillation_loss_is_mended_with_a_warning():
    teacher = _teacher()
    distiller = keras.distillation.Distiller(
        teacher=teacher, student=_student("chex", teacher),
        distillation_losses=keras.distillation.LogitsDistillation(
            temperature=2.0),
        student_loss_weight=0.5)
    distiller.compile(optimizer=keras.optimizers.SGD(0.02), loss=LOSS)
    x, y = tiny_data(32)
    with pytest.warns(UserWarning, match="KLDivergence"):
        distiller.fit(x, y, batch_size=16, epochs=1, verbose=0,
                      callbacks=[keras_chex.ChannelExploration()])
    term = distiller.distillation_losses[0]
    t = np.array([[2.0, 0.0, -1.0]], "float32")
    s = np.array([[5.0, 0.0, -1.0]], "float32")
    # Keras' default gives 0 here: it compares the raw logits.
    np.testing.assert_allclose(float(term.compute_loss(t, s)),
                               _softened_kl(t, s, 2.0), rtol=1e-4)


@pytest.mark.parametrize("loss", ["categorical_crossentropy", "kl"])
def test_a_distillation_loss_the_user_chose_is_left_alone(loss, recwarn):
    chosen = (keras.losses.KLDivergence() if loss == "kl" else
              keras.losses.get(loss))
    teacher = _teacher()
    distiller = _distiller(teacher, _student("chex", teacher), loss=chosen)
    x, y = tiny_data(32)
    distiller.fit(x, y, batch_size=16, epochs=1, verbose=0,
                  callbacks=[keras_chex.ChannelExploration()])
    assert distiller.distillation_losses[0].loss is chosen
    assert not [w for w in recwarn if "LogitsDistillation" in str(w.message)]
