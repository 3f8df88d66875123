"""Input shapes the user gives for models of free spatial size: checked,
and the model's graph rebuilt at them (sharing its layers)."""

import numpy as np

from keras_chex.core import _graph


def input_batch_shapes(model, input_shape):
    """`input_shape` as one full batch shape per model input, checked.

    Args:
        model: the model the shapes are for.
        input_shape: one shape without the batch axis, or a list of them
            (one per model input).

    Returns:
        A list of batch shapes (batch axis None), one per model input.

    Raises:
        ValueError: the shapes do not fit the model's inputs.
    """
    inputs = _graph.inputs_of(model)
    shapes = input_shape
    usage = ("`input_shape` must be one shape without the batch axis, "
             "e.g. (224, 224, 3), or a list of such shapes, one per model "
             f"input; got {input_shape!r}.")
    if not isinstance(input_shape, (list, tuple)) or not input_shape:
        raise ValueError(usage)
    if all(isinstance(d, (int, np.integer)) or d is None
           for d in input_shape):
        shapes = [input_shape]
    if not all(isinstance(s, (list, tuple)) for s in shapes):
        raise ValueError(usage)
    shapes = [tuple(s) for s in shapes]
    if len(shapes) != len(inputs):
        raise ValueError(
            f"`input_shape` gives {len(shapes)} shape(s) for the "
            f"{len(inputs)} input(s) of model '{model.name}'; give one shape "
            "per input, without the batch axis.")
    result = []
    for shape, tensor in zip(shapes, inputs):
        known = tuple(tensor.shape[1:])
        fits = len(shape) == len(known) and all(
            isinstance(d, (int, np.integer)) and d > 0
            and (k is None or k == d) for d, k in zip(shape, known))
        if not fits:
            raise ValueError(
                f"`input_shape` {shape} does not fit input "
                f"'{_graph.producer_of(tensor).name}' of shape "
                f"{(None,) + known} (batch axis first): give positive sizes "
                "for every axis, equal to the fixed ones.")
        result.append((None,) + tuple(int(d) for d in shape))
    return result


def at_input_shape(model, input_shape):
    """`model`'s graph on inputs of `input_shape` (checked as in
    `input_batch_shapes`), sharing its layers and weights."""
    return _graph.with_input_shapes(model,
                                    input_batch_shapes(model, input_shape))


def free_input_axes(model):
    """(input name, shape) of every model input with a free axis besides
    the batch axis."""
    return [(_graph.producer_of(t).name, tuple(t.shape))
            for t in _graph.inputs_of(model)
            if any(d is None for d in t.shape[1:])]


def at_fixed_size(model, input_shape, why, fix):
    """`model` at `input_shape` when given, else `model` if its size is
    fixed.

    Args:
        model: the model.
        input_shape: the user's shape (without the batch axis), or None.
        why: what needs a fixed size, completing "... of free size S, " in
            the error.
        fix: the call that gives the size, for the error.

    Raises:
        ValueError: no `input_shape` for a model of free size, naming its
            input, `why` and `fix`; or an `input_shape` that does not fit.
    """
    if input_shape is not None:
        return at_input_shape(model, input_shape)
    free = free_input_axes(model)
    if free:
        name, shape = free[0]
        raise ValueError(
            f"Model '{model.name}' has input '{name}' of free size {shape}, "
            f"{why}. Pass the size the device will feed, without the batch "
            f"axis: {fix}.")
    return model
