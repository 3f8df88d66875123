"""The width arithmetic every method shares (keras_chex/core/method.py)."""

import numpy as np
import tensorflow as tf

from keras_chex.core import method


def _expected(count, size, minimum, round_to):
    options = method.width_options(size, minimum, round_to)
    below = options[options <= max(count, minimum)]
    return int(below[-1]) if len(below) else int(options[0])


def test_rounding_and_width_options_are_one_rule():
    cases = [(c, size, m, r) for size in range(1, 41) for r in range(2, 10)
             for m in range(1, size + 1, 3) for c in range(0, size + 1)]
    counts, sizes, minimums, round_to = (np.array(v) for v in zip(*cases))
    for r in np.unique(round_to):
        sel = round_to == r
        got = method.round_counts(counts[sel], sizes[sel], int(r),
                                  minimums[sel])
        want = [_expected(*case) for case in np.array(cases)[sel]]
        np.testing.assert_array_equal(got, want)
        # The compiled step rounds the same way.
        got_tf = method.round_counts(
            tf.constant(counts[sel], tf.int32), sizes[sel], int(r),
            minimums[sel].astype(np.int32), ops=tf)
        np.testing.assert_array_equal(got_tf.numpy(), want)


def test_a_group_can_always_be_kept_whole():
    # 20 channels at round_to=8 used to round to 16.
    assert method.round_counts(np.array([20]), [20], 8, [1])[0] == 20
    assert list(method.width_options(20, 1, 8)) == [8, 16, 20]
    # A minimum between two multiples rounds up to the next one.
    assert method.round_counts(np.array([3]), [32], 8, [5])[0] == 8
    assert method.round_counts(np.array([12]), [32], 8, [5])[0] == 8
