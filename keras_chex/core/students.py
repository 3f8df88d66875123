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
