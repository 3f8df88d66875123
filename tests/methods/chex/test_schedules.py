"""Tests for keras_chex.methods.chex.schedules."""

import doctest
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_chex.core import schedule
from keras_chex.methods.chex import schedules
from keras_chex.methods.chex.schedules import ExplorationSchedule
from keras_chex.methods.chex.schedules import regrow_fraction

# ---------------------------------------------------------------------------
# regrow_fraction
# ---------------------------------------------------------------------------


def np_regrow_fraction(t, t_max, delta0):
    if t >= t_max:
        return 0.0
    return delta0 * (1.0 + np.cos(np.pi * t / t_max)) / 2.0


@pytest.mark.parametrize("t_max", [1, 4, 7, 90])
def test_regrow_fraction_python_matches_formula(t_max):
    for t in range(t_max + 3):
        got = regrow_fraction(t, t_max, 0.3)
        assert isinstance(got, float)
        want = np_regrow_fraction(t, t_max, 0.3)
        assert got == pytest.approx(want, abs=1e-12)


def test_regrow_fraction_endpoints_and_monotone():
    assert regrow_fraction(0, 10, 0.3) == pytest.approx(0.3)
    assert regrow_fraction(5, 10, 0.3) == pytest.approx(0.15)
    assert regrow_fraction(10, 10, 0.3) == 0.0
    assert regrow_fraction(11, 10, 0.3) == 0.0
    assert regrow_fraction(0, 0, 0.3) == 0.0
    values = [regrow_fraction(t, 10, 0.3) for t in range(11)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_regrow_fraction_accepts_fractional_and_numpy_numbers():
    got = regrow_fraction(np.float64(1.5), np.int64(3), 0.2)
    assert isinstance(got, float)
    assert got == pytest.approx(0.2 * (1 + math.cos(math.pi / 2)) / 2)


def test_regrow_fraction_tensor_matches_formula():
    for t in range(8):
        got = regrow_fraction(tf.constant(t), tf.constant(6), 0.3)
        assert isinstance(got, tf.Tensor)
        assert got.dtype == tf.float32
        np.testing.assert_allclose(
            got.numpy(), np_regrow_fraction(t, 6, 0.3), atol=1e-6
        )


def test_regrow_fraction_tensor_t_max_zero_is_zero_not_nan():
    got = regrow_fraction(tf.constant(0.0), tf.constant(0.0), 0.3)
    assert got.numpy() == 0.0


def test_regrow_fraction_float64_tensor():
    got = regrow_fraction(tf.constant(1.0, tf.float64), 3, 0.3)
    assert got.dtype == tf.float64
    np.testing.assert_allclose(got.numpy(), np_regrow_fraction(1, 3, 0.3))


def test_regrow_fraction_inside_xla():
    @tf.function(jit_compile=True)
    def fn(t, t_max):
        return regrow_fraction(t, t_max, 0.3)

    for t in [0, 2, 5, 9]:
        np.testing.assert_allclose(
            fn(tf.constant(t), tf.constant(5)).numpy(),
            np_regrow_fraction(t, 5, 0.3),
            atol=1e-6,
        )


@pytest.mark.parametrize(
    "args, name",
    [
        ((-1, 5, 0.3), "`t`"),
        ((0, -1, 0.3), "`t_max`"),
        ((0, 5, 1.5), "`delta0`"),
    ],
)
def test_regrow_fraction_validates_python_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        regrow_fraction(*args)


# ---------------------------------------------------------------------------
# ExplorationSchedule
# ---------------------------------------------------------------------------


def reference_steps(interval, until, steps_per_epoch, epochs):
    """Scans every step: a regular exploration is the step nearest to a
    multiple of `interval` epochs (half up); the freeze step is last."""
    freeze = max(1, math.floor(until * epochs * steps_per_epoch + 0.5 + 1e-9))
    stride = interval * steps_per_epoch
    steps = []
    for step in range(1, freeze):
        i = round(step / stride)
        for j in (i - 1, i, i + 1):
            if j >= 1 and -0.5 <= j * stride - step < 0.5 - 1e-9:
                steps.append(step)
                break
    return steps + [freeze]


def test_documented_example():
    schedule = ExplorationSchedule(interval=2, until=0.72)
    steps = schedule.exploration_steps(steps_per_epoch=100, epochs=10)
    assert steps == [200, 400, 600, 720]
    assert schedule.freeze_step(100, 10) == 720
    assert schedule.t_max(100, 10) == 3
    indices = [schedule.exploration_index(s, 100, 10) for s in steps]
    assert indices == [0, 1, 2, 3]
    fractions = [schedule.regrow_fraction(s, 100, 10, 0.3) for s in steps]
    np.testing.assert_allclose(fractions, [0.3, 0.225, 0.075, 0.0], atol=1e-12)


@pytest.mark.parametrize(
    "interval, until, steps_per_epoch, epochs",
    [
        (2, 0.72, 100, 10),
        (2, 0.72, 7, 250),
        (0.5, 1.0, 25, 3),
        (1.5, 0.8, 33, 12),
        (0.3, 0.5, 10, 20),
        (3, 0.6, 50, 10),  # freeze (300) coincides with a regular step
        (5, 0.2, 10, 10),  # freeze (20) before the first regular step
        (0.01, 1.0, 10, 1),  # stride below one step
    ],
)
def test_exploration_steps_match_reference(
    interval, until, steps_per_epoch, epochs
):
    schedule = ExplorationSchedule(interval, until)
    got = schedule.exploration_steps(steps_per_epoch, epochs)
    assert got == reference_steps(interval, until, steps_per_epoch, epochs)
    assert got == sorted(set(got))
    assert got[-1] == schedule.freeze_step(steps_per_epoch, epochs)
    assert schedule.t_max(steps_per_epoch, epochs) == len(got) - 1


def test_freeze_step_rounds_half_up_despite_float_error():
    # 0.29 * 50 * 1 is 14.499999999999998 in floating point.
    assert ExplorationSchedule(interval=1, until=0.29).freeze_step(1, 50) == 15


def test_fractional_interval():
    schedule = ExplorationSchedule(interval=0.5, until=1.0)
    assert schedule.exploration_steps(25, 3) == [13, 25, 38, 50, 63, 75]


def test_freeze_before_first_interval_gives_single_final_step():
    schedule = ExplorationSchedule(interval=5, until=0.2)
    assert schedule.exploration_steps(10, 10) == [20]
    assert schedule.t_max(10, 10) == 0
    assert schedule.regrow_fraction(20, 10, 10, 0.3) == 0.0


def test_is_exploration_step_scans_whole_training():
    schedule = ExplorationSchedule(interval=2, until=0.72)
    flagged = [
        s for s in range(1001) if schedule.is_exploration_step(s, 100, 10)
    ]
    assert flagged == [200, 400, 600, 720]


def test_is_exploration_step_accepts_numpy_and_eager_tensors():
    schedule = ExplorationSchedule(interval=2, until=0.72)
    assert schedule.is_exploration_step(np.int64(400), 100, 10)
    assert schedule.is_exploration_step(tf.constant(400, tf.int64), 100, 10)
    assert not schedule.is_exploration_step(tf.constant(401), 100, 10)


def test_exploration_index_rejects_other_steps():
    schedule = ExplorationSchedule(interval=2, until=0.72)
    with pytest.raises(ValueError, match="not an exploration step"):
        schedule.exploration_index(250, 100, 10)
    with pytest.raises(ValueError, match="`step`"):
        schedule.exploration_index(200.0, 100, 10)


def test_config_round_trip():
    schedule = ExplorationSchedule(interval=0.5, until=0.6)
    config = schedule.get_config()
    assert config == {"interval": 0.5, "until": 0.6}
    restored = ExplorationSchedule.from_config(config)
    assert restored.get_config() == config
    want = schedule.exploration_steps(40, 5)
    assert restored.exploration_steps(40, 5) == want


def test_keras_serialization_round_trip():
    schedule = ExplorationSchedule(interval=1.5, until=0.9)
    serialized = keras.saving.serialize_keras_object(schedule)
    restored = keras.saving.deserialize_keras_object(serialized)
    assert isinstance(restored, ExplorationSchedule)
    assert restored.get_config() == schedule.get_config()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"interval": 0}, "`interval`"),
        ({"interval": -1.0}, "`interval`"),
        ({"until": 0.0}, "`until`"),
        ({"until": 1.2}, "`until`"),
        ({"until": "0.5"}, "`until`"),
    ],
)
def test_constructor_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ExplorationSchedule(**kwargs)


def test_training_length_validation():
    schedule = ExplorationSchedule()
    with pytest.raises(ValueError, match="`steps_per_epoch`"):
        schedule.exploration_steps(0, 10)
    with pytest.raises(ValueError, match="`steps_per_epoch`"):
        schedule.exploration_steps(10.5, 10)
    with pytest.raises(ValueError, match="`epochs`"):
        schedule.exploration_steps(10, 0)


def test_docstring_examples():
    result = doctest.testmod(schedules)
    assert result.attempted > 0
    assert result.failed == 0


def test_docstring_examples_hold():
    for module in (schedule, schedules):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
