"""Baselines shared by the CIFAR benchmarks."""

import numpy as np

import keras_chex
from keras_chex.cifar import resnet as cifar_resnet


def narrow_widths(target_macs, depth):
    """Stage widths of the uniformly narrow ResNet-`depth` whose MACs are
    closest to `target_macs` without going over it."""
    best = None
    for f in np.linspace(0.3, 1.0, 141):
        widths = tuple(max(1, int(round(w * f))) for w in (16, 32, 64))
        macs = keras_chex.count_macs(cifar_resnet.cifar_resnet(
            depth, widths=widths)).macs
        if macs <= target_macs and (best is None or macs > best[1]):
            best = (widths, macs)
    return best[0]
