"""CHEX's initial masks: every group cut by the same fraction, by filter L1
norm, at the sparsity that meets the target (NumPy, once)."""

import numpy as np

from keras_chex.core import method


def uniform_counts(state, sparsity):
    """Channels each group keeps when all lose `sparsity` of theirs."""
    sizes = state.group_sizes
    counts = np.maximum(np.floor((1 - sparsity) * sizes + 0.5),
                        state.min_counts)
    counts = method.round_counts(counts, sizes, state.config.round_to,
                                 state.min_counts)
    return np.minimum(counts, sizes).astype(int)


def uniform_mask(state, l1, sparsity):
    """The bool mask keeping each group's largest-L1 filters at `sparsity`.

    Args:
        state: the `ChexState`.
        l1: per group, the L1 norm of each channel's filter.
        sparsity: the uniform fraction removed.
    """
    parts = []
    for norms, k in zip(l1, uniform_counts(state, sparsity)):
        keep = np.zeros(len(norms), bool)
        keep[np.argsort(-norms, kind="stable")[:k]] = True
        parts.append(keep)
    return np.concatenate(parts) if parts else np.zeros(0, bool)


def uniform_sparsity(state, l1, fraction):
    """The smallest uniform sparsity whose mask costs at most `fraction` of
    dense (MACs, parameters or predicted latency, as the target counts);
    warns when even the narrowest widths cost more."""
    dense = state.cost_of(np.ones(state.num_channels, bool))
    budget = fraction * dense
    lo, hi = 0.0, 1.0 - 1e-9
    for _ in range(40):
        mid = (lo + hi) / 2
        if state.cost_of(uniform_mask(state, l1, mid)) <= budget:
            hi = mid
        else:
            lo = mid
    narrowest = state.cost_of(uniform_mask(state, l1, hi))
    # Without channels the wrapper has already said so.
    if state.num_channels and narrowest > budget * (1 + 1e-9):
        state.warn_unreachable(narrowest / dense, step_budget=fraction)
    return hi
