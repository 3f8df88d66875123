"""The CIFAR ResNets of He et al. (2016), as Keras 3 Functional models.

Reference:
    Kaiming He, Xiangyu Zhang, Shaoqing Ren, Jian Sun. "Deep Residual
    Learning for Image Recognition", CVPR 2016, section 4.2.
"""

import numbers

import keras
from keras import layers

# PyTorch's defaults (momentum 0.1 there), used by the usual reference
# implementations; Keras' 0.99 makes the moving statistics lag far behind
# the weights in short CIFAR runs, which hurts validation accuracy.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


def cifar_resnet(
    depth=20,
    num_classes=10,
    *,
    widths=(16, 32, 64),
    input_shape=(32, 32, 3),
    weight_decay=None,
    name=None,
):
    """Builds a CIFAR ResNet (ResNet-20, -32, -44, -56, -110, ...).

    The network is a 3x3 convolution stem followed by three stages of
    `n = (depth - 2) / 6` basic blocks each, global average pooling and a
    dense layer. A basic block is conv3x3-BN-ReLU-conv3x3-BN, added to a
    shortcut and followed by ReLU. The first block of stages 2 and 3 halves
    the resolution with stride 2 and uses a projection shortcut (1x1
    convolution with stride 2, then BN); all other shortcuts are identities.
    (The paper's CIFAR networks pad those shortcuts with zeros instead; the
    projections add 2,752 of ResNet-20's 272,474 trainable parameters, its
    published "0.27M".)

    Convolutions have no bias (the following BN has one) and use He normal
    initialisation. Layers are named after their place in the network, e.g.
    `stem_conv`, `stage2_block1_conv1`, `stage2_block1_bn1`,
    `stage2_block1_shortcut_conv`, `stage2_block1_add`, `stage2_block1_out`
    and `logits`.

    Args:
        depth: Number of weighted layers, `6 * n + 2` for `n >= 1`: 20, 32,
            44, 56 and 110 are the published ones.
        num_classes: Number of output logits.
        widths: Number of channels of the stem and stage 1, stage 2 and
            stage 3. Smaller values build a uniformly narrower network.
        input_shape: Shape of one input image, channels last.
        weight_decay: Optional L2 factor for the convolution and dense
            kernels, used as `keras.regularizers.L2(weight_decay)`: it adds
            `weight_decay * sum(kernel ** 2)` to the loss. `None` or `0`
            adds nothing.
        name: Name of the model. Defaults to `"cifar_resnet<depth>"`.

    Returns:
        A `keras.Model` mapping images to logits (no softmax): train it with
        `keras.losses.SparseCategoricalCrossentropy(from_logits=True)`.

    Raises:
        ValueError: If `depth` is not of the form `6n + 2`, or `widths`,
            `num_classes` or `weight_decay` is invalid.

    Example:

    >>> model = cifar_resnet(20, weight_decay=1e-4)
    >>> model.output_shape
    (None, 10)
    >>> model.compile(
    ...     optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
    ...     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ...     metrics=["accuracy"],
    ... )
    """
    blocks_per_stage = _blocks_per_stage(depth)
    widths = _check_widths(widths)
    _check_num_classes(num_classes)
    regularizer = _kernel_regularizer(weight_decay)

    inputs = keras.Input(shape=input_shape, name="image")
    x = _conv(widths[0], 3, 1, "stem_conv", regularizer)(inputs)
    x = _batch_norm("stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for stage, width in enumerate(widths, start=1):
        for block in range(1, blocks_per_stage + 1):
            strides = 2 if stage > 1 and block == 1 else 1
            x = _basic_block(
                x, width, strides, f"stage{stage}_block{block}", regularizer
            )
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = layers.Dense(
        num_classes, kernel_regularizer=regularizer, name="logits"
    )(x)
    return keras.Model(inputs, outputs, name=name or f"cifar_resnet{depth}")


def _basic_block(x, filters, strides, name, regularizer):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU."""
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv(
            filters, 1, strides, f"{name}_shortcut_conv", regularizer
        )(x)
        shortcut = _batch_norm(f"{name}_shortcut_bn")(shortcut)

    x = _conv(filters, 3, strides, f"{name}_conv1", regularizer)(x)
    x = _batch_norm(f"{name}_bn1")(x)
    x = layers.ReLU(name=f"{name}_relu1")(x)
    x = _conv(filters, 3, 1, f"{name}_conv2", regularizer)(x)
    x = _batch_norm(f"{name}_bn2")(x)
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.ReLU(name=f"{name}_out")(x)


def _conv(filters, kernel_size, strides, name, regularizer):
    return layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer=regularizer,
        name=name,
    )


def _batch_norm(name):
    return layers.BatchNormalization(
        momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, name=name
    )


def _blocks_per_stage(depth):
    if not _is_int(depth) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            "`depth` must be 6n+2 for an integer n >= 1 (e.g. 20, 32, 44, "
            f"56 or 110), got {depth!r}."
        )
    return (int(depth) - 2) // 6


def _check_widths(widths):
    try:
        checked = tuple(int(w) for w in widths if _is_int(w) and w > 0)
        valid = len(checked) == len(widths) == 3
    except TypeError:
        valid = False
    if not valid:
        raise ValueError(
            "`widths` must be three positive integers, the channels of the "
            f"three stages (e.g. (16, 32, 64)), got {widths!r}."
        )
    return checked


def _check_num_classes(num_classes):
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(
            f"`num_classes` must be a positive integer, got {num_classes!r}."
        )


def _kernel_regularizer(weight_decay):
    if weight_decay is None:
        return None
    if (
        isinstance(weight_decay, bool)
        or not isinstance(weight_decay, numbers.Real)
        or not weight_decay >= 0
    ):
        raise ValueError(
            "`weight_decay` must be None or a non-negative number (e.g. "
            f"1e-4), got {weight_decay!r}."
        )
    return keras.regularizers.L2(float(weight_decay)) if weight_decay else None


def _is_int(value):
    # bool is an Integral, but depth=True is surely a mistake.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
