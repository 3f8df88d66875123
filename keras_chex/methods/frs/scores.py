"""Feature relevance scores (FRS) of channels, as in Aketi et al. (2020).

A channel's relevance for one image is the LRP relevance (see `lrp.py`) at
the outputs of the layers that write it, summed over positions. (The paper
averages over height and width; within a group, which is normalised as a
whole, the two differ by a constant, and a sum lets the producers of one
coupled group, such as a residual stream, add up.) Over a dataset:

1. per class, the mean relevance of each channel over that class's images;
2. each class weighted by `sigmoid(1 / (acc_c / max_acc))`, where `acc_c` is
   the model's accuracy on that class in the same data (classes it gets
   wrong more often weigh more);
3. averaged over classes, absolute value, L2-normalised within each group.

All batches go through one compiled function. Channels whose relevance is
incomplete (upstream of a layer LRP has no rule for) get NaN: not scored.
"""

import warnings
import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_chex.core import _graph
from keras_chex.core import _trainer
from keras_chex.core import analysis as analysis_lib
from keras_chex.core import wrapping
from keras_chex.methods.frs import lrp


class RelevanceScorer:
    """Computes the feature relevance scores of a model's channels.

    Args:
        model: a Functional or Sequential classifier, plain or wrapped, with
            one output of shape `(batch, classes)`.
        analysis: its `ModelAnalysis` (default: the model's own).
        warn: warn about layers that leave channels unscored.

    Attributes:
        graph: the `lrp.RelevanceGraph`.
        scored: bool array over the analysis' channels, False where the
            relevance is incomplete.
    """

    def __init__(self, model, analysis=None, warn=True):
        if analysis is None:
            analysis = (model.analysis if wrapping.is_wrapped(model)
                        else analysis_lib.ModelAnalysis(model, warn=False))
        self.model = model
        self.analysis = analysis
        outputs = _graph.outputs_of(model)
        if len(outputs) != 1 or len(outputs[0].shape) != 2 or not (
                (outputs[0].shape[-1] or 0) >= 2):
            shapes = [tuple(t.shape) for t in outputs]
            raise ValueError(
                f"Relevance scores need a classifier with one output of shape "
                f"(batch, classes); model '{model.name}' has outputs "
                f"{shapes}. Score a Functional model that ends at the class "
                "logits (or probabilities).")
        self.num_classes = int(outputs[0].shape[-1])
        self.graph = lrp.RelevanceGraph(model)
        self.num_channels = analysis.num_channels
        self._sites = self._score_sites()
        self.scored = self._scored()
        if warn:
            self._warn_unscored()
        self._accumulate = None

    def _score_sites(self):
        """(step id, segment ids) of every output written by a producer."""
        producers = {id(s.layer) for s in self.analysis.weight_slices
                     if s.filters}
        sites = {}
        for step in self.graph.steps:
            node = step.node
            if node is None or id(node.operation) not in producers:
                continue
            tensor = node.outputs[0]
            classes = np.asarray(self.analysis.classes_of(tensor))
            if not np.any(classes >= 0):
                continue
            # Fixed positions go to a last, discarded segment.
            segments = np.where(classes >= 0, classes, self.num_channels)
            sites[id(step)] = (step, segments.astype(np.int32))
        return sites

    def _scored(self):
        scored = np.zeros(self.num_channels, dtype=bool)
        for step, segments in self._sites.values():
            scored[segments[segments < self.num_channels]] = True
        for step, segments in self._sites.values():
            if step.outputs[0] in self.graph.incomplete:
                scored[segments[segments < self.num_channels]] = False
        # A group is scored as a whole or not at all (a channel no producer
        # output reaches is not scored either).
        for g in self.analysis.groups:
            part = slice(g.start, g.start + g.size)
            if not scored[part].all():
                scored[part] = False
        return scored

    def unscored_groups(self):
        """Names of the groups that get no score."""
        return [g.name for g in self.analysis.groups
                if not self.scored[g.start]]

    def _warn_unscored(self):
        unscored = self.unscored_groups()
        if not unscored:
            return
        layers = [n for n in self.graph.unsupported]
        warnings.warn(
            "keras-chex cannot propagate relevance through "
            + (", ".join(f"'{n}'" for n in layers) if layers
               else "some layers")
            + " (no LRP rule for them), so the channel groups upstream of "
            f"them are not scored and will not be pruned: {unscored}.",
            stacklevel=3)

    # -- the compiled pass -----------------------------------------------------
    def _inputs(self, x):
        inputs = _graph.inputs_of(self.model)
        if isinstance(x, dict):
            return [x[_graph.producer_of(t).name] for t in inputs]
        return keras.tree.flatten(x)

    def _labels(self, y):
        y = tf.convert_to_tensor(y)
        if y.shape.rank == 2 and y.shape[-1] == self.num_classes:
            return tf.argmax(y, axis=-1, output_type=tf.int32)
        return tf.cast(tf.reshape(y, [-1]), tf.int32)

    def _batch(self, x, y):
        graph = self.graph
        values = graph.forward(self._inputs(x))
        logits = tf.cast(values[graph.output_keys[0]], tf.float32)
        labels = self._labels(y)
        onehot = tf.one_hot(labels, self.num_classes)
        per_channel = []
        n = self.num_channels + 1

        def on_step(step, relevance):
            site = self._sites.get(id(step))
            if site is None:
                return
            r = relevance[0]
            r = tf.reduce_sum(r, axis=list(range(1, len(r.shape) - 1)))
            per_channel.append(tf.math.unsorted_segment_sum(
                tf.transpose(r), site[1], n))

        graph.backward(values, {graph.output_keys[0]: onehot}, on_step)
        if per_channel:
            relevance = tf.add_n(per_channel)  # (channels + 1, batch)
        else:
            relevance = tf.zeros([n, tf.shape(onehot)[0]])
        right = tf.cast(
            tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels),
            tf.float32)
        return (tf.matmul(relevance, onehot), tf.reduce_sum(onehot, 0),
                tf.reduce_sum(onehot * right[:, None], 0))

    def accumulate(self, dataset):
        """Per-class relevance sums, image counts and correct counts.

        Args:
            dataset: a finite `tf.data.Dataset` of `(x, y)` or
                `(x, y, sample_weight)` batches.

        Returns:
            (sums [channels, classes], counts [classes], correct
            [classes]) as NumPy arrays.
        """
        if self._accumulate is None:
            n, k = self.num_channels + 1, self.num_classes

            @tf.function
            def run(data):
                sums = tf.zeros([n, k])
                counts = tf.zeros([k])
                correct = tf.zeros([k])
                for batch in data:
                    x, y, _ = keras.utils.unpack_x_y_sample_weight(batch)
                    s, c, r = self._batch(x, y)
                    sums += s
                    counts += c
                    correct += r
                return sums, counts, correct

            self._accumulate = run
        sums, counts, correct = self._accumulate(dataset)
        if _trainer.in_multi_worker_mode(self.model):
            # Each worker scores with its own BatchNorm moving statistics
            # (Keras keeps them per replica); all must prune alike.
            strategy = self.model.distribute_strategy
            sums, counts, correct = (strategy.reduce("MEAN", v, axis=None)
                                     for v in (sums, counts, correct))
        return (np.asarray(sums)[:self.num_channels], np.asarray(counts),
                np.asarray(correct))

    def scores(self, dataset):
        """The normalised scores of every channel (NaN: not scored)."""
        return aggregate(*self.accumulate(dataset), self.analysis.groups,
                         self.scored)


def class_weights(counts, correct):
    """`sigmoid(1 / (acc_c / max_acc))` per class present in the data.

    A class the model never gets right weighs 1 (the limit); if it gets no
    class right, every class weighs the same.
    """
    counts = np.asarray(counts, np.float64)
    present = counts > 0
    accuracy = np.zeros_like(counts)
    accuracy[present] = np.asarray(correct, np.float64)[present] / counts[
        present]
    best = accuracy[present].max() if present.any() else 0.0
    weights = np.zeros_like(counts)
    if best <= 0:
        weights[present] = 1.0
        return weights
    with np.errstate(divide="ignore"):
        ratio = np.where(accuracy > 0, best / np.maximum(accuracy, 1e-300),
                         np.inf)
    weights[present] = 1.0 / (1.0 + np.exp(-ratio[present]))
    return weights


def aggregate(sums, counts, correct, groups, scored=None):
    """Normalised feature relevance scores from per-class sums.

    Args:
        sums: [channels, classes] summed relevance.
        counts: [classes] images per class.
        correct: [classes] images the model classified right.
        groups: the `ChannelGroup`s (for the per-group L2 normalisation).
        scored: optional bool [channels]; False gives NaN.

    Returns:
        A float64 array [channels].
    """
    sums = np.asarray(sums, np.float64)
    counts = np.asarray(counts, np.float64)
    present = counts > 0
    if not present.any():
        raise ValueError("The scoring data held no images: nothing to score.")
    mean = sums[:, present] / counts[present]
    weights = class_weights(counts, correct)[present]
    score = normalise_per_group(np.abs(mean @ weights / present.sum()),
                                groups)
    if scored is not None:
        score = np.where(scored, score, np.nan)
    return score


def normalise_per_group(values, groups):
    """`values` with each group's part scaled to unit L2 norm (all-zero
    parts stay zero)."""
    values = np.array(values, np.float64)
    for g in groups:
        part = slice(g.start, g.start + g.size)
        norm = np.linalg.norm(values[part])
        if norm > 0:
            values[part] /= norm
    return values


def as_dataset(data, batches=None, batch_size=32):
    """`data` as a finite dataset of batches, `batches` of them at most.

    Args:
        data: a `tf.data.Dataset` of batches, or an `(x, y)` tuple of arrays.
        batches: how many batches to use (None: all).
        batch_size: batch size for arrays.

    Raises:
        ValueError: bad `data` or `batches`, or an endless dataset with no
            `batches`.
    """
    if batches is not None and (isinstance(batches, bool) or not isinstance(
            batches, (int, np.integer)) or batches < 1):
        raise ValueError(f"`batches` must be an int >= 1 or None, got "
                         f"{batches!r}.")
    if isinstance(data, tuple) and len(data) in (2, 3):
        data = tf.data.Dataset.from_tensor_slices(data).batch(batch_size)
    if not isinstance(data, tf.data.Dataset):
        raise ValueError(
            "`data` must be a tf.data.Dataset of (x, y) batches or an (x, y) "
            f"tuple of arrays, got {type(data).__name__}.")
    if batches is not None:
        data = data.take(int(batches))
    elif data.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            "`data` repeats forever; pass `batches=` (how many batches to "
            "score on).")
    return data


# One scorer per model, so that scoring the same model again (say, after
# every epoch) reuses its compiled pass instead of tracing a new one.
_SCORERS = weakref.WeakKeyDictionary()


def _scorer_of(model):
    scorer = _SCORERS.get(model)
    if scorer is None:
        scorer = RelevanceScorer(model)
        _SCORERS[model] = scorer
    return scorer


def relevance_scores(model, data, batches=None):
    """The feature relevance score of every channel of every group.

    Relevance is propagated by LRP from the true class's logit (alpha-beta
    rule, alpha=2, beta=1, for convolutions and Dense), aggregated per class
    with class-accuracy weights, and L2-normalised within each group, as in
    Aketi et al. (2020). Groups upstream of a layer LRP has no rule for are
    not scored (NaN), with a warning naming the layer.

    Args:
        model: a Functional or Sequential classifier (plain, or wrapped by
            `keras_chex.relevance_prune` or another entry point) with one
            output of shape `(batch, classes)`.
        data: a `tf.data.Dataset` of `(x, y)` batches (labels as class
            indices or one-hot), or an `(x, y)` tuple of arrays.
        batches: how many batches of `data` to use (None: all of it).

    Returns:
        A dict: group name (see `keras_chex.channel_groups`) -> float array
        of the group's channel scores (NaN where not scored).

    Example:

    ```python
    scores = keras_chex.relevance_scores(model, (x_train, y_train), batches=8)
    for name, values in scores.items():
        print(name, values.round(3))
    ```
    """
    scorer = _scorer_of(model)
    values = scorer.scores(as_dataset(data, batches))
    return {g.name: values[g.start:g.start + g.size]
            for g in scorer.analysis.groups}
