"""Pins the private Keras internals keras_chex._graph relies on."""

import keras
import numpy as np
from keras import layers

from keras_chex.core import _graph


def _model():
    inp = keras.Input((4, 4, 2), name="img")
    a = layers.Conv2D(3, 1, name="a")(inp)
    b = layers.Conv2D(3, 1, name="b")(inp)
    s = layers.Add(name="s")([a, b])
    c = layers.Concatenate(name="cat")([s, a])
    out = layers.Dense(2, name="out")(c + 1.0)
    return keras.Model(inp, out)


def test_nodes_come_in_execution_order_with_tensors():
    model = _model()
    nodes = _graph.nodes(model)
    names = [n.operation.name for n in nodes]
    assert names.index("a") < names.index("s") < names.index("cat")
    assert names.index("b") < names.index("s") < names.index("out")
    cat = nodes[names.index("cat")]
    assert len(cat.inputs) == 2 and len(cat.outputs) == 1
    add_op = [n for n in nodes if n.operation.name.startswith("add")][0]
    assert add_op.constant_arguments() == [1.0]
    assert _graph.producer_of(cat.outputs[0]) is cat.operation
    assert [t.shape for t in _graph.inputs_of(model)] == [(None, 4, 4, 2)]


def test_rebuild_reproduces_the_model_and_calls_node_fn_per_node():
    model = _model()
    calls = []

    def node_fn(node, tensor_map):
        calls.append(node.operation.name)
        return node.call_with(node.operation, tensor_map)

    copy = _graph.rebuild(model, node_fn)
    assert len(calls) == len(_graph.nodes(model))
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 2)).astype("float32")
    np.testing.assert_allclose(copy(x), model(x), atol=1e-6)
    assert copy.inputs[0].name == model.inputs[0].name


def test_sequential_and_nested_models():
    seq = keras.Sequential([keras.Input((3,)), layers.Dense(2)])
    assert _graph.is_graph_model(seq)
    assert len(_graph.nodes(seq)) == 1
    outer_in = keras.Input((3,))
    outer = keras.Model(outer_in, seq(outer_in))
    ops = [n.operation for n in _graph.nodes(outer)]
    assert ops == [seq]
    assert {l.name for l in _graph.all_layers(outer)} == {seq.layers[0].name}


def test_clone_layer_handles_lambdas_from_this_process():
    lam = layers.Lambda(lambda t: t * 2.0)
    clone = _graph.clone_layer(lam)
    assert clone is not lam
    np.testing.assert_allclose(clone(np.ones((1, 2), "float32")), [[2, 2]])
    dense = layers.Dense(4)
    config = dense.get_config()
    config["units"] = 2
    assert _graph.clone_layer(dense, config).units == 2


def test_op_classes_are_the_classes_keras_ops_calls_leave_in_a_graph():
    x = keras.Input((4, 4, 3))
    model = keras.Model(x, keras.ops.add(keras.ops.relu(x), x))
    classes = {type(n.operation) for n in _graph.nodes(model)}
    relu = _graph.op_classes(["Relu", "NoSuchOp"])
    assert set(relu) == {"Relu"}
    assert classes & set(relu["Relu"])
    assert _graph.numpy_op_class("Add") in classes
    assert _graph.numpy_op_class("NoSuchOp") is None


class _Block(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(4)
        self.dropout = layers.Dropout(0.5, seed=1)

    def build(self, input_shape):
        self.gate = self.add_weight(shape=(4,), initializer="random_normal")

    def call(self, x, training=None):
        return self.gate * self.dropout(self.dense(x), training=training)


def test_copy_layer_gives_a_layer_of_its_own_without_its_config():
    inputs = keras.Input((3,))
    block = _Block()
    model = keras.Model(inputs, block(inputs))
    copy = _graph.copy_layer(block)
    assert type(copy) is _Block and copy.built and copy is not block
    # Its own variables (seed state too), with the same values.
    assert len(copy.variables) == len(block.variables) == 4
    for new, old in zip(copy.variables, block.variables):
        assert new is not old
        np.testing.assert_array_equal(new.numpy(), old.numpy())
    assert copy.dense is not block.dense and copy.dense.kernel is not (
        block.dense.kernel)
    assert copy.trainable_weights[0] is copy.weights[0]
    x = np.ones((2, 3), "float32")
    np.testing.assert_array_equal(copy(x), block(x))
    # Changing the copy leaves the original (and its graph) alone.
    copy.gate.assign(copy.gate * 0.0)
    assert np.abs(block.gate.numpy()).sum() > 0
    assert not np.abs(copy(x)).sum()
    assert len(block._inbound_nodes) == 1 and model(x).shape == (2, 4)
