"""Pictures of what pruning did: the width of every channel group.

Needs matplotlib (`pip install keras-chex[plots]`). Figures are drawn with
matplotlib's object API on an Agg canvas, so the user's pyplot backend and
open figures are left alone.
"""

import os

import numpy as np


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "keras_chex.plot_widths needs matplotlib: "
            "pip install 'keras-chex[plots]' (or pip install matplotlib)."
        ) from None
    return Figure, FigureCanvasAgg


def plot_widths(source, path, *, overwrite=False, title=None):
    """Draws the kept channels of every group to a PNG file.

    Args:
        source: a pruning callback after `fit` (`ChannelExploration`,
            `SoftMaskPruning`, `RelevancePruning`): two panels, a heat map
            of each group's kept fraction at every pruning step (prunes and
            regrowths show as colour changes along a row) and the final
            kept / total channels per group; or a wrapped model: the second
            panel only.
        path: the PNG file to write.
        overwrite: replace an existing file at `path`.
        title: optional figure title.

    Returns:
        The matplotlib `Figure`.

    Raises:
        ValueError: `source` is neither; the callback has not run.
        FileExistsError: `path` exists and `overwrite` is False.
        ImportError: matplotlib is not installed.

    Example:

    ```python
    callback = keras_chex.ChannelExploration()
    model.fit(train, epochs=30, callbacks=[callback])
    keras_chex.plot_widths(callback, "widths.png")
    ```
    """
    from keras_chex.core import callback as callback_lib
    from keras_chex.core import wrapping

    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"{path} exists; pass overwrite=True to replace it.")
    if isinstance(source, callback_lib.PruningCallback):
        if not source.widths or source.model is None:
            raise ValueError(
                f"{type(source).__name__} has recorded no widths yet: plot "
                "it after the `fit` it took part in.")
        names, sizes = source.group_names(), source.group_sizes()
        steps = [s for s, _ in source.widths]
        history = np.stack([c for _, c in source.widths], axis=1)
        final = history[:, -1]
    elif wrapping.is_wrapped(source):
        analysis = source.analysis
        names = [g.name for g in analysis.groups]
        sizes = np.array([g.size for g in analysis.groups])
        final = source.masks.counts()
        history = None
    else:
        raise ValueError(
            "plot_widths draws a pruning callback after fit, or a model from "
            "keras_chex.prune_and_regrow / soft_mask_prune / relevance_prune; "
            f"got {type(source).__name__}.")
    if not names:
        raise ValueError("The model has no channel groups to draw.")

    Figure, FigureCanvasAgg = _matplotlib()
    height = max(3.0, 0.22 * len(names) + 1.5)
    panels = 2 if history is not None else 1
    fig = Figure(figsize=(6 * panels + 1, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    rows = np.arange(len(names))
    if history is not None:
        ax = axes[0]
        image = ax.imshow(history / np.maximum(sizes, 1)[:, None],
                          aspect="auto", cmap="viridis", vmin=0, vmax=1,
                          interpolation="nearest")
        ax.set_yticks(rows, names, fontsize=7)
        ticks = np.unique(np.linspace(0, len(steps) - 1,
                                      min(len(steps), 8)).astype(int))
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=7)
        ax.set_xlabel("optimizer step (after each pruning step)")
        ax.set_title("kept fraction per group")
        fig.colorbar(image, ax=ax, label="kept / total")
    ax = axes[-1]
    ax.barh(rows, sizes, color="#dddddd", label="total")
    ax.barh(rows, final, color="#3b75af", label="kept")
    ax.set_yticks(rows, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("channels")
    ax.set_title("channels kept per group")
    ax.legend(loc="lower right", fontsize=7)
    if title:
        fig.suptitle(title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    return fig
