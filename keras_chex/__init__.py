"""keras-chex: channel pruning during training for Keras 3.

Public API. Everything else in the package is internal.
"""

from keras_chex.callbacks import ChannelExploration
from keras_chex.channel_analysis import ChannelGroup
from keras_chex.channel_analysis import channel_groups
from keras_chex.chex import prune_and_regrow
from keras_chex.counting import count_macs
from keras_chex.export import export_saved_model
from keras_chex.export import export_tflite
from keras_chex.masking import ChannelMask
from keras_chex.masking import MaskedBatchNormalization
from keras_chex.stripping import strip
from keras_chex.wrapping import PrunableModel
from keras_chex.wrapping import is_wrapped
from keras_chex.wrapping import wrap

__version__ = "0.1.0"

__all__ = [
    "ChannelExploration",
    "ChannelGroup",
    "ChannelMask",
    "MaskedBatchNormalization",
    "PrunableModel",
    "channel_groups",
    "count_macs",
    "export_saved_model",
    "export_tflite",
    "is_wrapped",
    "prune_and_regrow",
    "strip",
    "wrap",
]
