"""The pruning methods keras-chex knows, by name, without importing them.

The `keras-chex prune` command lists its `--method` choices from here and
answers `--help` before TensorFlow loads, so an entry names its entry point
and callback by import path; `load()` imports them when a method is used.
A new method registers one `MethodInfo`.
"""

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class MethodInfo:
    """One pruning method, as the command line and tools see it.

    Attributes:
        name: what `--method` takes, and `pruning_config["method"]`.
        summary: one line for `--help`.
        entry_point: import path of the function that wraps a model,
            `"package.module.function"`; it takes `flops=` and `seed=`.
        callback: import path of its `fit` callback class.
        callback_takes_data: the callback's first argument is the training
            data (FRS scores relevance on it).

    Example:

    ```python
    info = registry.get("chex")
    prune, callback = info.load()
    model = prune(model, flops=0.5, seed=0)
    model.fit(x, y, callbacks=[info.make_callback(callback, x)])
    ```
    """

    name: str
    summary: str
    entry_point: str
    callback: str
    callback_takes_data: bool = False

    def load(self):
        """`(entry point function, callback class)`, imported."""
        return _import(self.entry_point), _import(self.callback)

    def make_callback(self, callback_class, data, **kwargs):
        """The callback, given the training data if it takes them."""
        if self.callback_takes_data:
            return callback_class(data, **kwargs)
        return callback_class(**kwargs)


def _import(path):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


_METHODS = {}


def register(info):
    """Adds (or replaces) the method `info.name`."""
    if not isinstance(info, MethodInfo):
        raise ValueError(f"`info` must be a MethodInfo, got {info!r}.")
    _METHODS[info.name] = info


def names():
    """The registered method names, sorted."""
    return sorted(_METHODS)


def get(name):
    """The `MethodInfo` registered as `name`.

    Raises:
        ValueError: no method of that name, listing the known ones.
    """
    if name not in _METHODS:
        raise ValueError(f"Unknown pruning method {name!r}; known: "
                         f"{', '.join(names())}.")
    return _METHODS[name]


register(MethodInfo(
    "chex", "CHEX: prune and regrow channels (global |gamma| re-allocation)",
    "keras_chex.methods.chex.method.prune_and_regrow",
    "keras_chex.methods.chex.callback.ChannelExploration"))
register(MethodInfo(
    "smcp", "SMCP: soft masks, Taylor importance, knapsack widths",
    "keras_chex.methods.smcp.method.soft_mask_prune",
    "keras_chex.methods.smcp.callback.SoftMaskPruning"))
register(MethodInfo(
    "frs", "FRS: gradual pruning by feature relevance scores",
    "keras_chex.methods.frs.method.relevance_prune",
    "keras_chex.methods.frs.callback.RelevancePruning",
    callback_takes_data=True))
