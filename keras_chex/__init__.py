"""keras-chex: channel pruning during training for Keras 3.

Public API. Everything else in the package is internal.

The core (`keras_chex.core`) finds channel groups, wraps models with masks,
counts costs and strips; each method (`keras_chex.methods.*`) is an entry
point, a state and a `fit` callback on top of it; `keras_chex.deploy`
exports and measures the compact model.
"""

from keras_chex.core.analysis import ChannelGroup
from keras_chex.core.analysis import channel_groups
from keras_chex.core.counting import count_macs
from keras_chex.core.masking import ChannelMask
from keras_chex.core.masking import MaskedBatchNormalization
from keras_chex.core.stripping import strip
from keras_chex.core.wrapping import PrunableModel
from keras_chex.core.wrapping import is_wrapped
from keras_chex.core.wrapping import wrap
from keras_chex.deploy.export import export_saved_model
from keras_chex.deploy.export import export_tflite
from keras_chex.deploy.latency_table import LatencyTable
from keras_chex.deploy.latency_table import build_latency_table
from keras_chex.methods.chex.callback import ChannelExploration
from keras_chex.methods.chex.method import prune_and_regrow
from keras_chex.methods.frs.callback import RelevancePruning
from keras_chex.methods.frs.method import relevance_prune
from keras_chex.methods.frs.scores import relevance_scores
from keras_chex.methods.smcp.callback import SoftMaskPruning
from keras_chex.methods.smcp.method import soft_mask_prune

__version__ = "0.2.0"

__all__ = [
    "ChannelExploration",
    "ChannelGroup",
    "ChannelMask",
    "LatencyTable",
    "MaskedBatchNormalization",
    "PrunableModel",
    "RelevancePruning",
    "SoftMaskPruning",
    "build_latency_table",
    "channel_groups",
    "count_macs",
    "export_saved_model",
    "export_tflite",
    "is_wrapped",
    "prune_and_regrow",
    "relevance_prune",
    "relevance_scores",
    "soft_mask_prune",
    "strip",
    "wrap",
]
