"""One-shot pruning of a trained model: CHEX's first cut, taken once.

CHEX starts every run from a uniform cut by filter L1 norm (Li et al.,
2017), the magnitude criterion Torch-Pruning's one-shot recipe also uses.
For a model that is already trained, that cut followed by plain
fine-tuning measured better than pruning during the fine-tune
(docs/benchmarks.md, "Compressing a trained model"), so it is offered on
its own: the compact model comes back at once, ready to fine-tune.
"""

import warnings

from keras_chex.core import checks
from keras_chex.core import stripping
from keras_chex.methods.chex import method as chex_method


def prune_once(model, *, flops=None, params=None, latency=None,
               cost_table=None, min_channels=0.05, round_to=1, exclude=(),
               input_shape=None):
    """Removes the lowest-L1 filters of every channel group, once.

    Every channel group keeps the same share of its channels, those whose
    filters have the largest L1 norm; the share is bisected until the
    compact model meets the target. Fine-tune the result (its BatchNorm
    statistics are the dense model's, and its accuracy right after the cut
    can be near chance), with `fit` alone or as the student of a
    `keras.distillation.Distiller` whose teacher is the original model.

    Also the way to prune a freshly built model before training it: on a
    deep network with a short schedule that beat both a narrow network and
    CHEX's exploration (docs/benchmarks.md, issue 24).

    Args:
        model: a Functional or Sequential Keras model, trained or freshly
            built (untouched).
        flops: fraction of the MACs to keep.
        params: fraction of the parameters to keep.
        latency: fraction of the latency to keep, as predicted by
            `cost_table`. Give exactly one of `flops`, `params`, `latency`.
        cost_table: with `latency`: a `LatencyTable` or its JSON path.
        min_channels: fewest channels a group keeps: an int, or a float in
            (0, 1) for a fraction of the group's size (at least 1).
        round_to: keep channel counts at multiples of this, except where a
            group is smaller.
        exclude: names of layers never pruned (a nested model's or a
            composite layer's name excludes all inside it; "outer/inner"
            names one layer inside a nested model).
        input_shape: the input size the cost is counted at (without the
            batch axis), for a model of free spatial size.

    Returns:
        A plain `keras.Model` with the channels physically removed.

    Example:

    ```python
    trained = keras.saving.load_model("trained.keras")
    compact = keras_chex.prune_once(trained, flops=0.5)
    compact.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                    loss="sparse_categorical_crossentropy")
    compact.fit(train_ds, epochs=6)
    ```
    """
    checks.one_target(
        {"flops": flops, "params": params, "latency": latency},
        {"flops": "fraction of MACs to keep",
         "params": "fraction of parameters to keep",
         "latency": "fraction of the predicted latency to keep"})
    wrapped = chex_method.prune_and_regrow(
        model, flops=flops, params=params, latency=latency,
        cost_table=cost_table, regrow=0.0, min_channels=min_channels,
        round_to=round_to, exclude=exclude, input_shape=input_shape, seed=0)
    with warnings.catch_warnings():
        # The statistics are stale by design here: the docstring says to
        # fine-tune, which re-estimates them.
        warnings.filterwarnings("ignore", message="Stripping model")
        return stripping.strip(wrapped)
