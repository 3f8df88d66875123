"""keras-chex: channel pruning during training for Keras 3.

Public API. Everything else in the package is internal.

The core (`keras_chex.core`) finds channel groups, wraps models with masks,
counts costs and strips; each method (`keras_chex.methods.*`) is an entry
point, a state and a `fit` callback on top of it; `keras_chex.deploy`
exports and measures the compact model.
"""

import os as _os
import sys as _sys

from keras_chex import _native_stderr as _native_stderr_module

# TensorFlow's C++ start-up lines (oneDNN, CPU features, the CUDA probe on a
# machine without a GPU) are written to stderr before its log level
# applies. Imported through keras-chex, TensorFlow starts without them;
# any other line is kept. The `keras-chex` command hides every start-up
# line (not with `--verbose`).
_command = (_os.path.basename(_sys.argv[0] if _sys.argv else "") ==
            "keras-chex")
if _command:
    # `--help` and mistyped arguments answer before TensorFlow loads (6 s
    # here): the parser exits on them.
    from keras_chex import cli as _cli

    _cli.build_parser().parse_args()
    del _cli
_command = _command and "--verbose" not in _sys.argv
if _command:
    _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_native_stderr_module.start_tensorflow_quietly(drop_all=_command)
del _command, _native_stderr_module

from keras_chex.core.analysis import ChannelGroup  # noqa: E402
from keras_chex.core.analysis import channel_groups  # noqa: E402
from keras_chex.core.counting import count_macs  # noqa: E402
from keras_chex.core.layer_registry import register_layer_rule  # noqa: E402
from keras_chex.core.masking import ChannelMask  # noqa: E402
from keras_chex.core.masking import MaskedBatchNormalization  # noqa: E402
from keras_chex.core.statistics import RecalibrateBatchNorm  # noqa: E402
from keras_chex.core.statistics import TrackingBatchNormalization  # noqa: E402,E501
from keras_chex.core.statistics import recalibrate_batchnorm  # noqa: E402
from keras_chex.core.stripping import strip  # noqa: E402
from keras_chex.core.wrapping import PrunableModel  # noqa: E402
from keras_chex.core.wrapping import is_wrapped  # noqa: E402
from keras_chex.core.wrapping import wrap  # noqa: E402
from keras_chex.deploy.saved_model import export_saved_model  # noqa: E402
from keras_chex.deploy.export import export_tflite  # noqa: E402
from keras_chex.core.latency_table import LatencyTable  # noqa: E402
from keras_chex.deploy.table_builder import build_latency_table  # noqa: E402
from keras_chex.methods.chex.callback import ChannelExploration  # noqa: E402
from keras_chex.methods.chex.method import prune_and_regrow  # noqa: E402
from keras_chex.methods.chex.oneshot import prune_once  # noqa: E402
from keras_chex.methods.frs.callback import RelevancePruning  # noqa: E402
from keras_chex.methods.frs.method import relevance_prune  # noqa: E402
from keras_chex.methods.frs.scores import relevance_scores  # noqa: E402
from keras_chex.methods.smcp.callback import SoftMaskPruning  # noqa: E402
from keras_chex.methods.smcp.method import soft_mask_prune  # noqa: E402
from keras_chex.plots import plot_widths  # noqa: E402

__version__ = "0.2.0"

__all__ = [
    "ChannelExploration",
    "ChannelGroup",
    "ChannelMask",
    "LatencyTable",
    "MaskedBatchNormalization",
    "PrunableModel",
    "RecalibrateBatchNorm",
    "RelevancePruning",
    "SoftMaskPruning",
    "TrackingBatchNormalization",
    "build_latency_table",
    "channel_groups",
    "count_macs",
    "export_saved_model",
    "export_tflite",
    "is_wrapped",
    "plot_widths",
    "prune_and_regrow",
    "prune_once",
    "recalibrate_batchnorm",
    "register_layer_rule",
    "relevance_prune",
    "relevance_scores",
    "soft_mask_prune",
    "strip",
    "wrap",
]
