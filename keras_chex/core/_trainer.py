"""A train step with a gradient hook: Keras' TensorFlow step, one line added.

Methods that learn from gradients (SMCP's Taylor importance, its extra
decay on pruned weights) must see every step's gradients inside the
compiled train step, not in an extra pass over the data. Keras has no
public hook between `tape.gradient` and `optimizer.apply_gradients`, so
this module mirrors `keras.src.backend.tensorflow.trainer.TensorFlowTrainer
.train_step` (Keras 3.3 to 3.15) and calls the hook there. It is, with
`_graph.py`, the only module that uses private Keras internals; its test
checks that with an identity hook the step trains exactly like Keras' own.
It also finds an optimizer's state for a variable (by Keras' naming of
slot variables), which permanent pruning must clear.
"""

import warnings

import keras
import tensorflow as tf
from keras.src.losses import loss as loss_module
from keras.src.trainers.data_adapters import data_adapter_utils


def train_step_with_gradient_hook(model, data, hook):
    """One training step of `model` whose gradients pass through `hook`.

    Args:
        model: a compiled Keras model (TensorFlow backend).
        data: one batch, as `train_step` receives it.
        hook: `hook(gradients, variables) -> gradients`, run inside the
            compiled step before the optimizer applies the gradients.

    Returns:
        The metrics dict `train_step` returns.
    """
    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    with tf.GradientTape() as tape:
        if model._call_has_training_arg:
            y_pred = model(x, training=True)
        else:
            y_pred = model(x)
        loss = model._compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
            training=True,
        )
        model._loss_tracker.update_state(
            loss_module.unscale_loss_for_distribution(loss),
            sample_weight=tf.shape(
                next(i for i in keras.tree.flatten(x) if i is not None)
            )[0],
        )
        if model.optimizer is not None:
            loss = model.optimizer.scale_loss(loss)
    if model.trainable_weights:
        variables = model.trainable_weights
        gradients = tape.gradient(loss, variables)
        # The hook sees the true gradients: a LossScaleOptimizer (mixed
        # precision) has scaled the loss, and unscales in `apply`. The
        # scale is a power of two, so dividing and multiplying back is
        # exact.
        factor = tf.cast(model.optimizer.scale_loss(tf.ones([])), tf.float32)
        gradients = [None if g is None else g / tf.cast(factor, g.dtype)
                     for g in gradients]
        gradients = hook(gradients, variables)
        gradients = [None if g is None else g * tf.cast(factor, g.dtype)
                     for g in gradients]
        model.optimizer.apply_gradients(zip(gradients, variables))
    else:
        warnings.warn("The model does not have any trainable weights.")
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def install_gradient_hook(model, pruned):
    """Makes `model`'s train step call `pruned`'s gradient hook.

    A wrapped model applies its method's `transform_gradients` in its own
    `train_step`. When another model trains it (the student of a
    `keras.distillation.Distiller`), that model's step runs instead, so its
    train step is replaced for the `fit` by the same step with the hook;
    `remove_gradient_hook` undoes it. Keras builds the train function
    before the callbacks' `on_train_begin`, so it is rebuilt here.

    Args:
        model: the model `fit` runs on.
        pruned: the wrapped model it trains.
    """
    if model is pruned:
        return
    hook = getattr(pruned.pruning_state, "transform_gradients", None)
    if hook is None:
        return

    def train_step(data):
        return train_step_with_gradient_hook(model, data, hook)

    # An instance attribute shadows the class's method for this model only.
    model.train_step = train_step
    model.make_train_function(force=True)


def remove_gradient_hook(model):
    """Gives `model` back the train step it had before
    `install_gradient_hook`."""
    if "train_step" in vars(model):
        del model.train_step
        model.train_function = None


def optimizer_slots(optimizer, variable, others=()):
    """The optimizer variables holding per-entry state of `variable`.

    Keras' optimizers name the state they keep for a variable (SGD's
    momentum, Adam's moments, ...) after the variable's path, with the
    variable's shape (`Optimizer.add_variable_from_reference`); there is no
    public map from a variable to its slots.

    Args:
        optimizer: a built Keras optimizer, or None.
        variable: a model variable.
        others: the model's other variables: a slot whose name extends
            one of theirs (layer `d_kernel` beside layer `d`) is theirs.

    Returns:
        A list of optimizer variables (empty for None or an unbuilt one).
    """
    if optimizer is None:
        return []

    def prefix(v):
        return v.path.replace("/", "_") + "_"

    own = prefix(variable)
    longer = [prefix(v) for v in others
              if prefix(v).startswith(own) and prefix(v) != own]
    return [v for v in optimizer.variables
            if v.name.startswith(own)
            and not any(v.name.startswith(p) for p in longer)
            and tuple(v.shape) == tuple(variable.shape)]


def maybe_symbolic_build(model, iterator=None, data_batch=None):
    """Keras' `TensorFlowTrainer._maybe_symbolic_build`, fixed for
    `MultiWorkerMirroredStrategy`.

    Keras (3.3 to 3.15 at least, keras-team/keras#20585) averages the first
    distributed batch with `strategy.reduce` only to learn its shapes;
    under MultiWorkerMirroredStrategy that reduce of a nested batch fails
    ("Attempt to convert a value (PerReplica...)"), so `fit` cannot start.
    The shapes are the same on every replica: take this replica's batch.
    """
    if model._distribute_strategy is None:
        return
    if iterator is not None:
        for _, _, it in iterator:
            batch = next(it)
            strategy = model.distribute_strategy
            data_batch = keras.tree.map_structure(
                lambda x: strategy.experimental_local_results(x)[0]
                if isinstance(x, tf.distribute.DistributedValues) else x,
                batch)
            break
    with model.distribute_strategy.scope():
        model._symbolic_build(data_batch=data_batch)


def in_multi_worker_mode(model):
    """Whether `model` trains under a multi-worker collective strategy."""
    strategy = model._distribute_strategy
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode())


def multi_worker_logs(logs):
    """Train-step logs as Keras can reduce them across workers.

    Keras reduces each replica's logs with `strategy.reduce("MEAN", v,
    axis=0)` under MultiWorkerMirroredStrategy, which fails on the scalars
    every train step returns (keras-team/keras#20585). A length-1 vector
    reduces along that axis to the same scalar mean.
    """
    return keras.tree.map_structure(
        lambda v: tf.reshape(v, [1]) if len(v.shape) == 0 else v, logs)
