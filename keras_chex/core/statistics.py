"""BatchNorm moving statistics: re-estimated exactly after a mask change.

Training normalises with each batch's statistics; inference uses the moving
averages. A mask change moves the distribution of every activation after
it, and Keras' moving average (momentum 0.99) needs hundreds of steps to
follow it.

Every BatchNormalization of a wrapped model is a `TrackingBatchNormalization`
(or its masked subclass). After a mask change its moving mean and variance
restart as the exact average of the batch statistics seen since (the
cumulative average of PyTorch's `momentum=None`), until that average has
seen as many batches as the layer's momentum weighs (`1 / (1 - momentum)`,
100 at 0.99); then the layer's own momentum takes over. The n-th batch after
a change is weighted `max(1 - momentum, 1 / n)`: one scalar per layer, one
multiply per step, inside the compiled train step, no extra pass over data.

Why every BatchNorm, not only those whose channels changed: the ones after
a change see a new input too. Measured on a trained ResNet-20 fine-tuned
with masks changing until 90% of the fit, restarting only the layers whose
own channels changed left 2.5-4.7 points between moving- and
batch-statistics accuracy, restarting all 1.2-1.4 (docs/benchmarks.md,
"BatchNorm statistics").

What it cannot fix: the exact average of the batches since a change is
still an average over weights that moved meanwhile. When the weights move
fast to the end of `fit` (a constant high learning rate, a short
fine-tuning right after heavy pruning), every running average lags them,
plain Keras models' too; restarting the average over the last 2, 5 or 20
batches closed little of that gap when measured, a pass over data with the
final weights closed all of it. That pass is `recalibrate_batchnorm`;
`stale_batchnorms` names the layers that have seen fewer than
`SETTLED_BATCHES` batches since the last change, which `strip` and
`export_tflite` warn about.
"""

import math
import numbers
import warnings
import weakref

import keras
import numpy as np
from keras import ops

from keras_chex.core import _graph
from keras_chex.core import students

# Batches after a mask change from which the re-estimated statistics are
# treated as current (see docs/benchmarks.md, "BatchNorm statistics").
SETTLED_BATCHES = 20

def averaging_window(momentum):
    """Batches the cumulative average runs before the momentum takes over."""
    if momentum <= 0:
        return 1
    return max(1, int(math.ceil(1.0 / (1.0 - momentum))))


@keras.saving.register_keras_serializable(package="keras_chex")
class TrackingBatchNormalization(keras.layers.BatchNormalization):
    """A BatchNormalization whose moving statistics restart after a change.

    After `restart_statistics()` the moving mean and variance are the exact
    average of the batch statistics of the training batches seen since,
    until the average has seen `1 / (1 - momentum)` batches; from then on
    the layer's own momentum applies. Without a restart it trains exactly
    like `keras.layers.BatchNormalization`. `keras_chex.wrap` puts it in
    place of every BatchNormalization; `keras_chex.strip` turns it back.

    Args:
        **kwargs: the arguments of `keras.layers.BatchNormalization`.

    Example:

    ```python
    layer = TrackingBatchNormalization()
    layer.build((None, 4))
    layer.restart_statistics()
    layer(np.full((8, 4), 3.0), training=True)
    layer.moving_mean  # [3., 3., 3., 3.]: the first batch's mean, exactly
    ```
    """

    def build(self, input_shape):
        super().build(input_shape)
        # Batches averaged since the last restart, saturating at the
        # averaging window; a fresh layer counts as settled.
        self.batches_seen = self.add_weight(
            name="batches_seen", shape=(), trainable=False, dtype="float32",
            initializer=keras.initializers.Constant(float(self.window)),
            autocast=False)

    @property
    def window(self):
        return averaging_window(self.momentum)

    def restart_statistics(self, when=True):
        """The next training batch's statistics replace the moving ones;
        the average then accumulates exactly.

        Args:
            when: a boolean (tensor, inside a compiled step): restart only
                if it is true.
        """
        if when is True:  # Called eagerly after each mask change: one op.
            self.batches_seen.assign(0.0)
            return
        self.batches_seen.assign(
            ops.where(when, 0.0, ops.convert_to_tensor(self.batches_seen)))

    def settle_statistics(self):
        """Marks the moving statistics as current (the momentum applies)."""
        self.batches_seen.assign(float(self.window))

    def _new_batch_weight(self):
        seen = ops.convert_to_tensor(self.batches_seen)
        weight = ops.maximum(1.0 - self.momentum, 1.0 / (seen + 1.0))
        self.batches_seen.assign(ops.minimum(seen + 1.0, float(self.window)))
        return weight

    def _update_moving_statistics(self, mean, variance):
        weight = ops.cast(self._new_batch_weight(), mean.dtype)
        moving_mean = ops.cast(self.moving_mean, mean.dtype)
        moving_variance = ops.cast(self.moving_variance, mean.dtype)
        self.moving_mean.assign(moving_mean + (mean - moving_mean) * weight)
        self.moving_variance.assign(
            moving_variance + (variance - moving_variance) * weight)

    def _normalize(self, inputs, scale, offset, training):
        """Keras' BatchNorm maths over the last axis, with our update."""
        dtype = keras.backend.result_type(inputs.dtype, "float32")
        inputs = ops.cast(inputs, dtype)
        if scale is not None:
            scale = ops.cast(scale, dtype)
        if offset is not None:
            offset = ops.cast(offset, dtype)
        if training and self.trainable:
            axes = list(range(len(inputs.shape) - 1))
            mean, variance = ops.moments(inputs, axes=axes,
                                         synchronized=self.synchronized)
            self._update_moving_statistics(mean, variance)
        else:
            mean = ops.cast(self.moving_mean, dtype)
            variance = ops.cast(self.moving_variance, dtype)
        outputs = ops.batch_normalization(
            inputs, mean, variance, axis=-1, offset=offset, scale=scale,
            epsilon=self.epsilon)
        return ops.cast(outputs, self.compute_dtype)

    def _keras_path(self, inputs, mask):
        # Renorm, a Keras mask or a channel axis other than the last: Keras'
        # own maths (and its plain momentum).
        return (mask is not None or self.renorm
                or self.axis not in (-1, len(inputs.shape) - 1))

    def call(self, inputs, training=None, mask=None):
        if self._keras_path(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        return self._normalize(
            inputs, self.gamma if self.scale else None,
            self.beta if self.center else None, training)

    def load_own_variables(self, store):
        # Files saved before the counter existed hold one variable fewer:
        # their statistics count as settled.
        if len(store) == len(self.variables) - 1:
            # Keras stores trainable then non-trainable variables: for a
            # BatchNorm that is their creation order.
            values = [store[str(i)] for i in range(len(store))]
            for variable, value in zip(
                    [v for v in self.weights if v is not self.batches_seen],
                    values):
                variable.assign(value)
            self.settle_statistics()
            return
        super().load_own_variables(store)

    @classmethod
    def replacing(cls, layer, **kwargs):
        """A new layer with `layer`'s config (a BatchNormalization)."""
        return cls(**kwargs, **layer.get_config())

    def load_batchnorm_weights(self, layer):
        """Copies the weights of BatchNormalization `layer`."""
        for target, value in zip(self.weights, layer.get_weights()):
            target.assign(value)

    def batchnorm_config(self):
        """The config of the plain BatchNormalization it stands for."""
        return keras.layers.BatchNormalization.get_config(self)


def tracking_batchnorms(model):
    """Every `TrackingBatchNormalization` of `model`, nested ones too."""
    return [layer for layer in _graph.every_layer(model)
            if isinstance(layer, TrackingBatchNormalization)]


# Restarting eagerly costs an op per BatchNorm (~0.3 ms each on a 2-core
# CPU); a compiled restart costs one trace (~4 ms per BatchNorm, once),
# then ~20 us each. Masks set group by group on a model with hundreds of
# BatchNorms restart them all once per group.
COMPILED_RESTART_MIN_BATCHNORMS = 32
_COMPILED_RESTARTS = weakref.WeakKeyDictionary()


def restart_statistics(model):
    """Restarts the moving statistics of every tracking BatchNorm of `model`.

    Called after every mask change; a no-op on a model without them.
    """
    layers = tracking_batchnorms(model)
    if len(layers) < COMPILED_RESTART_MIN_BATCHNORMS:
        for layer in layers:
            layer.restart_statistics()
        return
    key = [id(layer) for layer in layers]
    cached = _COMPILED_RESTARTS.get(model)
    if cached is None or cached[0] != key:
        import tensorflow as tf

        @tf.function(autograph=False)
        def restart():
            for layer in layers:
                layer.restart_statistics()

        cached = _COMPILED_RESTARTS[model] = (key, restart)
    cached[1]()


def stale_batchnorms(model):
    """Names of the tracking BatchNorms that have averaged fewer than
    `SETTLED_BATCHES` training batches since the last mask change."""
    stale = []
    for layer in tracking_batchnorms(model):
        if not layer.trainable:
            continue
        seen = float(ops.convert_to_numpy(layer.batches_seen))
        if seen < min(SETTLED_BATCHES, layer.window):
            stale.append(layer.name)
    return stale


def warn_if_stale(model, action, stacklevel=3):
    """Warns that `model`'s statistics predate its masks, if they do."""
    stale = stale_batchnorms(model)
    if not stale:
        return
    warnings.warn(
        f"{action}: the BatchNorm moving statistics of {len(stale)} layer(s) "
        f"(e.g. '{stale[0]}') have seen fewer than {SETTLED_BATCHES} "
        "training batches since the masks last changed, so the model may "
        "predict far worse than it trained. Re-estimate them first: "
        "`keras_chex.recalibrate_batchnorm(model, data)` with a few dozen "
        "batches of training inputs (or train a few more steps).",
        stacklevel=stacklevel)


def recalibrate_batchnorm(model, data, *, batches=None, batch_size=32):
    """Re-estimates every BatchNorm's moving statistics exactly from data.

    Each trainable BatchNormalization's moving mean and variance become the
    average, over the batches given, of the batch means and variances it
    computes in training mode: what the layer normalises with during
    training, averaged exactly instead of by a moving average. Use it after
    changing masks outside `fit` (`ChannelGroup.set_mask`), or before
    stripping a model saved right after a pruning step. Weights are not
    changed; frozen BatchNorms (`trainable=False`) keep their statistics, as
    Keras does in training.

    Args:
        model: a Keras model: wrapped, plain or stripped.
        data: training inputs: a `tf.data.Dataset` or another iterable of
            batches (`x`, or tuples `(x, y[, sample_weight])`), or an array
            of inputs cut into batches of `batch_size`.
        batches: how many batches to average (None: all of `data`; needed
            for an endless dataset).
        batch_size: batch size when `data` is an array.

    Returns:
        The names of the BatchNorm layers re-estimated.

    Raises:
        ValueError: for a `batches` that is not an int >= 1, an endless
            dataset without `batches`, or data with no batch.

    Example:

    ```python
    group.set_mask(keep)
    keras_chex.recalibrate_batchnorm(model, x_train[:2048])
    ```
    """
    _check_batches(batches)
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a Keras model, got "
                        f"{type(model).__name__}.")
    norms = [layer for layer in _graph.every_layer(model)
             if isinstance(layer, keras.layers.BatchNormalization)
             and layer.trainable and not layer.renorm]
    iterator = _input_batches(data, batches, batch_size)
    momenta = [layer.momentum for layer in norms]
    # Put back if the data fails part-way, rather than leaving the last
    # batch's statistics.
    before = _moving_statistics(norms)
    sums = [(np.zeros(m.shape), np.zeros(v.shape)) for m, v in before]
    seen = 0
    done = False
    try:
        for layer in norms:
            if isinstance(layer, TrackingBatchNormalization):
                layer.restart_statistics()
            # At momentum 0 a training-mode call leaves the batch's own
            # statistics in the moving ones; their average is taken here.
            layer.momentum = 0.0
        step = _training_call(model)
        for x in iterator:
            step(x)
            for (mean, variance), (m, v) in zip(sums,
                                                _moving_statistics(norms)):
                mean += m
                variance += v
            seen += 1
        for layer, (mean, variance) in zip(norms, sums if seen else ()):
            layer.moving_mean.assign(
                (mean / seen).astype(layer.moving_mean.dtype))
            layer.moving_variance.assign(
                (variance / seen).astype(layer.moving_variance.dtype))
        done = True
    finally:
        for layer, momentum, (mean, variance) in zip(norms, momenta, before):
            layer.momentum = momentum
            if not done:
                layer.moving_mean.assign(mean)
                layer.moving_variance.assign(variance)
            if isinstance(layer, TrackingBatchNormalization):
                layer.settle_statistics()
    if not seen:
        raise ValueError("`data` gave no batch to recalibrate on.")
    return [layer.name for layer in norms]


@keras.saving.register_keras_serializable(package="keras_chex")
class RecalibrateBatchNorm(keras.callbacks.Callback):
    """Re-estimates the BatchNorm statistics from data when `fit` ends.

    Runs `recalibrate_batchnorm(model, data, batches=batches)` in
    `on_train_end`, so the model `fit` returns predicts with the statistics
    of its final weights. Useful for any model whose weights still move at
    the end of `fit` (a constant or high learning rate, a short fine-tuning
    after pruning), plain Keras models too. List it after callbacks that
    restore weights when training ends (`EarlyStopping(
    restore_best_weights=True)`), so it sees the weights that stay.

    Args:
        data: training inputs, as for `recalibrate_batchnorm`: a
            `tf.data.Dataset` or an iterable of batches (`x` or `(x, y[,
            sample_weight])`), or an array of inputs.
        batches: how many batches to average (None: all of `data`).
        batch_size: batch size when `data` is an array.
        verbose: 1 prints one line when done.

    Example:

    ```python
    model.fit(train_ds, epochs=30, callbacks=[
        keras_chex.ChannelExploration(),
        keras_chex.RecalibrateBatchNorm(train_ds, batches=50)])
    ```
    """

    def __init__(self, data, batches=50, batch_size=32, verbose=0):
        super().__init__()
        _check_batches(batches)
        self.data = data
        self.batches = batches
        self.batch_size = batch_size
        self.verbose = verbose

    def on_train_end(self, logs=None):
        # A Distiller's teacher keeps its own statistics.
        names = recalibrate_batchnorm(students.trained_model_of(self.model),
                                      self.data,
                                      batches=self.batches,
                                      batch_size=self.batch_size)
        if self.verbose:
            print(f"RecalibrateBatchNorm: re-estimated the statistics of "
                  f"{len(names)} BatchNorm layer(s).")

    def get_config(self):
        # The data is not part of the config: pass it again when rebuilding.
        return {"batches": self.batches, "batch_size": self.batch_size,
                "verbose": self.verbose}


def _check_batches(batches):
    if batches is not None and (isinstance(batches, bool) or not isinstance(
            batches, numbers.Integral) or batches < 1):
        raise ValueError(f"`batches` must be an int >= 1 or None, got "
                         f"{batches!r}.")


def _moving_statistics(norms):
    """Each BatchNorm's moving (mean, variance), as NumPy arrays."""
    return [(ops.convert_to_numpy(layer.moving_mean),
             ops.convert_to_numpy(layer.moving_variance)) for layer in norms]


def _training_call(model):
    """`model(x, training=True)`, compiled as the model's own `fit` runs it:
    faster than eager calls, and the only way some kernels run at all
    (TensorFlow's CPU convolutions take channels-first inputs only in XLA
    or with oneDNN)."""
    import tensorflow as tf

    if not model.built:  # Its first call creates the variables.
        return lambda x: model(x, training=True)
    return tf.function(lambda x: model(x, training=True),
                       jit_compile=bool(getattr(model, "jit_compile", False)),
                       reduce_retracing=True)


def _input_batches(data, batches, batch_size):
    """Yields the input part of up to `batches` batches of `data`."""
    import numpy as np
    import tensorflow as tf

    if isinstance(data, (np.ndarray, tf.Tensor)) or (
            hasattr(data, "shape") and hasattr(data, "dtype")):
        if (isinstance(batch_size, bool)
                or not isinstance(batch_size, numbers.Integral)
                or batch_size < 1):
            raise ValueError(f"`batch_size` must be an int >= 1, got "
                             f"{batch_size!r}.")
        n = int(data.shape[0])
        starts = range(0, n, int(batch_size))
        if batches is not None:
            starts = starts[:batches]
        for start in starts:
            yield data[start:start + batch_size]
        return
    if isinstance(data, tf.data.Dataset):
        if (batches is None and data.cardinality().numpy()
                == tf.data.INFINITE_CARDINALITY):
            raise ValueError(
                "`data` is an endless dataset: give `batches=` (how many "
                "batches to average), e.g. batches=50.")
    try:
        iterator = iter(data)
    except TypeError:
        raise ValueError(
            "`data` must be a tf.data.Dataset, an iterable of batches or an "
            f"array of inputs, got {type(data).__name__}.") from None
    for i, batch in enumerate(iterator):
        if batches is not None and i >= batches:
            return
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        yield batch
