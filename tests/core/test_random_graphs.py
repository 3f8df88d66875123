"""Property test: random graphs of every construct strip exactly.

Hypothesis builds random Functional models (see
`keras_chex.testing.random_graphs`); each must strip to outputs equal to the
masked model's, count the same MACs, survive a `.keras` round trip, export
to a matching TFLite file and get relevance scores. The examples are seeded
(`derandomize`), so CI runs the same few every time;
`tools/check_random_graphs.py` runs a thousand.
"""

import keras
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_chex.testing import random_graphs


@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(st.data())
def test_random_graphs_strip_count_save_and_export_exactly(data):
    keras.utils.set_random_seed(0)
    model = random_graphs.build_model(random_graphs.HypothesisChooser(data))
    random_graphs.check_model(model, seed=0)


def test_the_generator_reaches_every_construct():
    seen = {}
    for seed in range(200):
        chooser = random_graphs.RandomChooser(seed)
        keras.utils.set_random_seed(seed)
        model = random_graphs.build_model(chooser)
        for layer in model.layers:
            kind = type(layer).__name__
            seen[kind] = seen.get(kind, 0) + 1
    for kind in ("Conv2D", "DepthwiseConv2D", "SeparableConv2D",
                 "Conv2DTranspose", "BatchNormalization", "Add", "Multiply",
                 "Subtract", "Average", "Maximum", "Concatenate", "Flatten",
                 "Dense", "Functional", "Scale", "LayerNormalization",
                 "PReLU", "MaxPooling2D", "AveragePooling2D"):
        assert seen.get(kind), f"no {kind} in 200 random graphs"
