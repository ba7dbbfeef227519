"""derm.trainer.kgraph, the one module that reads Keras graphs, on a real Keras Inception-v3 (small input, random
weights): the private attributes it needs are there (and a missing one is named), and its two views of the graph
(public config, live objects) agree with each other and with Keras' own execution."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from derm.trainer import kgraph  # noqa: E402


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return keras.applications.InceptionV3(include_top=False, weights=None, input_shape=(75, 75, 3), pooling="avg")


def test_the_private_attributes_it_reads_exist_in_this_keras(model):
    kgraph.check_keras_internals(model)  # fails naming each missing attribute and the Keras version


def test_a_missing_private_attribute_is_named_with_the_keras_version(model, monkeypatch):
    from keras.src.ops.node import Node

    monkeypatch.delattr(Node, "parent_nodes")
    with pytest.raises(kgraph.KerasInternalsError, match=r"Keras 3\.\d+.* lacks Node\.parent_nodes"):
        kgraph.check_keras_internals(model)


def test_config_and_live_parents_agree_for_every_layer(model):
    by_config, outputs = kgraph.parents_by_name(model)
    assert outputs == [model.layers[-1].name]
    for layer in model.layers:
        assert [p.name for p in kgraph.parent_layers(layer)] == by_config[layer.name], layer.name
    users = kgraph.consumers(model)
    assert sorted(u.name for u in users["mixed9"]) == sorted(n for n, ps in by_config.items() if "mixed9" in ps)
    assert kgraph.output_layer_names(model) == set(outputs)


def test_orders_are_topological_and_cover_every_layer(model):
    parents, _ = kgraph.parents_by_name(model)
    for order in (kgraph.creation_order(model), [n.operation.name for n in kgraph.graph_nodes(model)]):
        seen: set[str] = {model.layers[0].name}
        for name in order:
            assert all(p in seen for p in parents[name]), name
            seen.add(name)
        assert seen == {layer.name for layer in model.layers}
    # creation order keeps a block's branches together (model.layers interleaves them by depth)
    order = kgraph.creation_order(model)
    assert order[0] == model.layers[0].name and order[-1] == model.layers[-1].name


def test_run_graph_and_replay_compute_what_keras_computes(model):
    x = np.random.default_rng(0).uniform(-1, 1, (2, 75, 75, 3)).astype(np.float32)
    want = keras.ops.convert_to_numpy(model(x, training=False))
    seen: list[str] = []
    (got,) = kgraph.run_graph(model, x, before=lambda layer, _: seen.append(layer.name))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(got), want, atol=1e-5)
    assert len(seen) == len(model.layers) - 1  # every layer but the input, once

    inputs = keras.Input((75, 75, 3))
    rebuilt = keras.Model(inputs, kgraph.replay(model, inputs, lambda la: la.__class__.from_config(la.get_config())))
    for layer in model.layers[1:]:  # the input layer gets a fresh name
        rebuilt.get_layer(layer.name).set_weights(layer.get_weights())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(rebuilt(x, training=False)), want, atol=1e-5)
    assert [la.name for la in rebuilt.layers][1:] == [la.name for la in model.layers][1:]
