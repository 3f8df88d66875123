"""Which model a `fit` trains: the model itself or a Distiller's student."""

import keras


def trained_model_of(model):
    """The model whose weights a `fit` of `model` trains for itself.

    The `student` of a `keras.distillation.Distiller` (its teacher is
    frozen and only lends its outputs), otherwise `model`. Pruning
    callbacks prune that model, so a wrapped model pruned while distilled
    is found inside the `Distiller` that `fit` runs on.
    """
    distillation = getattr(keras, "distillation", None)
    if distillation is not None and isinstance(model,
                                               distillation.Distiller):
        return model.student
    return model


def mend_logits_distillation(model):
    """Makes a Distiller's `LogitsDistillation` compare softened outputs.

    `LogitsDistillation(loss="kl_divergence")`, its default, resolves the
    name to the plain `keras.losses.kl_divergence` function, and the
    distillation loss only applies the softmax at the temperature (and the
    T² scale) when the loss is a `keras.losses.KLDivergence` *instance*
    (Keras 3.12 to at least 3.15.1). The function then sees raw logits,
    clipped to [1e-7, 1]: the term is meaningless (0 for clearly different
    outputs, negative for others) and a distilled model's accuracy
    collapses within an epoch. Such a loss is replaced by the instance,
    which computes what the Keras documentation describes. Any loss the
    user chose otherwise is left alone, as is everything once Keras
    resolves the name to an instance itself.

    Args:
        model: the model `fit` runs on.

    Returns:
        The number of distillation losses mended (0 when `model` is not a
        Distiller or nothing needed it).
    """
    distillation = getattr(keras, "distillation", None)
    if distillation is None or not isinstance(model, distillation.Distiller):
        return 0
    mended = 0
    for term in model.distillation_losses:
        if not isinstance(term, distillation.LogitsDistillation):
            continue
        before = keras.tree.flatten(term.loss)
        term.loss = keras.tree.map_structure(_instance_for_name, term.loss)
        mended += sum(a is not b
                      for a, b in zip(before, keras.tree.flatten(term.loss)))
    return mended


def _instance_for_name(loss):
    if loss is keras.losses.kl_divergence:
        return keras.losses.KLDivergence()
    return loss


def dropped_regularization(model):
    """How many regularization losses of a Distiller's student its training
    leaves out.

    Keras' `Distiller.compute_loss` returns the weighted student and
    distillation losses only: the student's own `losses` (a
    `kernel_regularizer`'s weight decay, an activity regularizer) are not
    added, as `Model.compute_loss` would. A Distiller subclass with its own
    `compute_loss` is assumed to know what it does.

    Args:
        model: the model `fit` runs on.

    Returns:
        The number of the student's losses left out (0 for other models).
    """
    distillation = getattr(keras, "distillation", None)
    if distillation is None or not isinstance(model, distillation.Distiller):
        return 0
    if type(model).compute_loss is not distillation.Distiller.compute_loss:
        return 0
    return len(model.student.losses)
