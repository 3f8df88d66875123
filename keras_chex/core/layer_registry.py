"""Which `LayerRule` each layer class gets, and how users add their own.

Exact classes only: a subclass of a Keras layer may compute something else
entirely, so it is analysed only once `register_layer_rule` says how.
"""

from keras import layers

from keras_chex.core import _graph
from keras_chex.core.layer_rules import (
    ANY_DIRTY, ALL_DIRTY, PRODUCER, ActivationRule, AttentionRule,
    BatchNormRule, EinsumDenseRule,
    ConcatenateOpRule, ConcatenateRule, ConvRule, ConvTransposeRule,
    DenseRule, DepthwiseRule, FlattenRule, LayerRule, MergeRule, NormalizationRule, OpRule, PadRule,
    PermuteRule, PoolingRule, PReLURule, ReduceRule, ReshapeRule,
    ResizingRule, SeparableRule, SoftmaxRule, SplitRule, Unsupported,
    weight_leaf_name)


def _build_registry():
    reg = {}

    def add(classes, rule):
        for cls in classes:
            if cls is not None:
                reg[cls] = rule

    L = layers
    add([L.Conv1D, L.Conv2D, L.Conv3D], ConvRule())
    add(
        [L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose],
        ConvTransposeRule(),
    )
    add([L.DepthwiseConv1D, L.DepthwiseConv2D], DepthwiseRule())
    add([L.SeparableConv1D, L.SeparableConv2D], SeparableRule())
    add([L.Dense], DenseRule())
    add([L.BatchNormalization], BatchNormRule())
    add([L.Normalization], NormalizationRule())
    add([L.PReLU], PReLURule())
    add([L.Activation], ActivationRule())
    add([L.ReLU, L.LeakyReLU, L.ELU], ActivationRule())
    add([L.Softmax], SoftmaxRule())
    add([L.Rescaling], ActivationRule())
    pooling = [
        L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D,
        L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D,
        L.GlobalAveragePooling1D, L.GlobalAveragePooling2D,
        L.GlobalAveragePooling3D, L.GlobalMaxPooling1D,
        L.GlobalMaxPooling2D, L.GlobalMaxPooling3D,
        L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D,
        L.Cropping1D, L.Cropping2D, L.Cropping3D,
        L.UpSampling1D, L.UpSampling2D, L.UpSampling3D,
        L.SpatialDropout1D, L.SpatialDropout2D, L.SpatialDropout3D,
    ]
    add(pooling, PoolingRule())
    add([L.Resizing], ResizingRule())
    passthrough = [
        L.Dropout, L.GaussianNoise, L.GaussianDropout, L.AlphaDropout,
        L.ActivityRegularization, getattr(L, "Identity", None),
        L.RepeatVector,
    ]
    add(passthrough, LayerRule())
    add([L.Flatten], FlattenRule())
    add([L.Reshape], ReshapeRule())
    add([L.Permute], PermuteRule())
    add([L.Add, L.Subtract, L.Average, L.Maximum, L.Minimum],
        MergeRule(ANY_DIRTY))
    add([L.Multiply], MergeRule(ALL_DIRTY))
    add([L.Concatenate], ConcatenateRule())
    add([L.EinsumDense], EinsumDenseRule())
    add([L.MultiHeadAttention], AttentionRule())

    unary = [
        "Relu", "Relu6", "Sigmoid", "HardSigmoid", "Silu", "Swish",
        "HardSilu", "HardSwish", "Gelu", "Elu", "Selu", "Softplus",
        "Softsign", "LeakyRelu", "Mish", "Celu", "Glu", "Tanh", "Exp",
        "Negative", "Abs", "Absolute", "Square", "Sqrt", "Clip",
        "TrueDivide", "Divide", "Power", "Cast", "ReLU",
    ]
    for classes in _graph.op_classes(unary).values():
        for cls in classes:
            reg.setdefault(cls, OpRule())
    for name, kind in (
        ("Add", ANY_DIRTY), ("Subtract", ANY_DIRTY), ("Maximum", ANY_DIRTY),
        ("Minimum", ANY_DIRTY), ("Multiply", ALL_DIRTY),
    ):
        cls = _graph.numpy_op_class(name)
        if cls is not None:
            reg[cls] = OpRule(merge_kind=kind)
    for name, rule in (("Pad", PadRule()), ("Split", SplitRule()),
                       ("Concatenate", ConcatenateOpRule()),
                       ("Mean", ReduceRule()), ("Max", ReduceRule())):
        cls = _graph.numpy_op_class(name)
        if cls is not None:
            reg[cls] = rule
    return reg


class ChannelwiseRule(LayerRule):
    """A user's layer that maps every channel to itself, with per-channel
    weights indexed on their last axis (see `register_layer_rule`)."""

    # It may turn a zero channel into a non-zero one (a bias): masks sit
    # after it, which is always correct.
    kind = PRODUCER

    def __init__(self, weights=()):
        self.weights = tuple(weights)

    def propagate(self, ctx, node):
        layer = node.operation
        if len(node.inputs) != 1 or len(node.outputs) != 1:
            raise Unsupported("registered as channel-wise, but it is called "
                              "on several tensors")
        ids = ctx.ids(node.inputs[0])
        if node.outputs[0].shape[-1] != len(ids):
            raise Unsupported(
                "registered as channel-wise, but its output has "
                f"{node.outputs[0].shape[-1]} channels for {len(ids)} in")
        have = {weight_leaf_name(v): v for v in layer.weights}
        for name in self.weights:
            if name not in have or have[name].shape[-1] != len(ids):
                raise Unsupported(
                    f"registered with channel-wise weight '{name}', but it "
                    f"has no weight '{name}' with {len(ids)} entries on its "
                    f"last axis (its weights: {sorted(have)})")
            ctx.weight_slice(layer, name, -1, ids)
        ctx.set_ids(node.outputs[0], ids)


_REGISTRY = None


def _registry():
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _build_registry()
    return _REGISTRY


# Subclasses of `MultiHeadAttention` that compute what it does (a key/value
# cache for generation changes nothing in one call's MACs).
KNOWN_ATTENTION = {
    "keras_hub.src.layers.modeling.cached_multi_head_attention."
    "CachedMultiHeadAttention",
}

# Layers of other libraries keras-chex knows, by qualified class name so
# that nothing is imported for them: name -> channel-wise weights.
KNOWN_CHANNELWISE = {
    # `scale * x + bias` with scalar weights.
    "keras_hub.src.models.hgnetv2.hgnetv2_layers."
    "HGNetV2LearnableAffineBlock": (),
}


def rule_for(operation):
    """Returns the `LayerRule` for an operation, or None if unsupported.

    Exact classes only: a subclass may compute something else entirely
    (`register_layer_rule` says when it does not).
    """
    registry = _registry()
    cls = type(operation)
    rule = registry.get(cls)
    if rule is None:
        name = f"{cls.__module__}.{cls.__qualname__}"
        known = KNOWN_CHANNELWISE.get(name)
        if known is not None:
            rule = registry[cls] = ChannelwiseRule(known)
        elif name in KNOWN_ATTENTION:
            rule = registry[cls] = AttentionRule()
    return rule


def register_layer_rule(layer_class, *, like=None, channelwise_weights=None):
    """Lets keras-chex prune through a layer class of your own.

    Layers keras-chex has no rule for are left whole, with a warning
    naming them, and so are the channels they touch. Register your class
    once per process, before `wrap` (or `prune_and_regrow`, ...) and
    before loading a wrapped `.keras` file that contains it, with one of:

    - `like=`: your class treats channels exactly as a Keras layer class
      keras-chex supports (a `keras.layers.Conv2D` subclass with weight
      standardisation, say). Its config must name widths as that class's
      does (`filters` for convolutions, `units` for `Dense`), since the
      compact model re-creates it with fewer.
    - `channelwise_weights=`: your layer maps every channel to itself, one
      input to one output of the same shape (a learned per-channel scale,
      a custom activation), and these are the names of its weights that
      hold one value per channel on their last axis (`()` for none).

    Args:
        layer_class: a `keras.layers.Layer` subclass.
        like: a Keras layer class keras-chex supports.
        channelwise_weights: a list of weight names.

    Raises:
        ValueError: for anything but one of the two forms above, or a class
            keras-chex already has a rule for.

    Example:

    ```python
    @keras.saving.register_keras_serializable()
    class Scale(keras.layers.Layer):
        def build(self, shape):
            self.scale = self.add_weight(shape=shape[-1:], name="scale")
        def call(self, x):
            return x * self.scale

    keras_chex.register_layer_rule(Scale, channelwise_weights=["scale"])
    ```
    """
    import keras  # pylint: disable=g-import-not-at-top

    if not (isinstance(layer_class, type)
            and issubclass(layer_class, keras.layers.Layer)):
        raise ValueError(
            "`layer_class` must be a keras.layers.Layer subclass (the class, "
            f"not an instance), got {layer_class!r}.")
    registry = _registry()
    if (like is None) == (channelwise_weights is None):
        raise ValueError(
            "Give exactly one of `like` (a Keras layer class your layer "
            "treats channels like) and `channelwise_weights` (the names of "
            "its per-channel weights, [] for none).")
    if like is not None:
        rule = registry.get(like) if isinstance(like, type) else None
        if rule is None or isinstance(rule, (OpRule, ChannelwiseRule)):
            raise ValueError(
                f"`like` must be a Keras layer class keras-chex supports, such "
                f"as keras.layers.Conv2D or keras.layers.Dense; got {like!r}.")
    else:
        if isinstance(channelwise_weights, str) or not all(
                isinstance(n, str) for n in channelwise_weights):
            raise ValueError(
                "`channelwise_weights` must be a list of weight names, got "
                f"{channelwise_weights!r}.")
        rule = ChannelwiseRule(channelwise_weights)
    if layer_class in _build_registry():
        raise ValueError(
            f"keras-chex already has a rule for {layer_class.__name__}; "
            "register your own subclass instead.")
    registry[layer_class] = rule
