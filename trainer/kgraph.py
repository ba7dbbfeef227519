"""Keras functional graphs, in one place: who feeds whom, in which order, and running or replaying a model layer by
layer. The trainer (building the 2015 Inception-v3), the exporter (equalization, GPTQ, the QAT rebuild) and the
research scripts all read graphs through this module.

Two ways in:

- **From the public config** (``model.get_config()``): :func:`parents_by_name`, :func:`creation_order`,
  :func:`wire_inputs`, :func:`replay`. Stable across Keras versions; used to build and rebuild models.
- **From Keras' live objects**, which need private attributes: :func:`parent_layers`, :func:`output_layer_names`,
  :func:`graph_nodes`, :func:`run_graph`. They are touched here alone; :data:`PRIVATE_ATTRIBUTES` lists them and
  :func:`check_keras_internals` names any that a Keras upgrade removed (``tests/test_kgraph.py`` runs it on a real
  model, so an upgrade fails there first, clearly, instead of deep inside an export).

tf-keras (Keras 2, the QAT environment) has other internals; :mod:`derm.exporter.qat` keeps its few helpers for it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

#: (object, attribute) pairs read by this module; a Keras release without one breaks :func:`check_keras_internals`.
PRIVATE_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("Layer", "_inbound_nodes"),  # parent_layers
    ("Node", "parent_nodes"),
    ("Node", "operation"),
    ("KerasTensor", "_keras_history"),  # output_layer_names
    ("Functional", "_nodes_by_depth"),  # graph_nodes
    ("Node", "is_input"),
    ("Node", "input_tensors"),  # run_graph
    ("Node", "outputs"),
    ("Node", "arguments"),
    ("Layer", "_call_has_training_arg"),
)


class KerasInternalsError(RuntimeError):
    """This Keras version lacks an internal attribute the graph helpers read."""


def check_keras_internals(model: Any) -> None:
    """Raise :class:`KerasInternalsError` naming every private attribute of :data:`PRIVATE_ATTRIBUTES` that
    ``model`` (a functional model with at least one layer after its input) does not have."""
    import keras

    layer = next(la for la in model.layers if not isinstance(la, keras.layers.InputLayer))
    node = layer._inbound_nodes[0] if getattr(layer, "_inbound_nodes", None) else None
    objects = {"Layer": layer, "Node": node, "KerasTensor": model.outputs[0], "Functional": model}
    missing = [
        f"{kind}.{attr}"
        for kind, attr in PRIVATE_ATTRIBUTES
        if objects[kind] is None or not hasattr(objects[kind], attr)
    ]
    if node is not None and not hasattr(getattr(node, "arguments", None), "fill_in"):
        missing.append("Node.arguments.fill_in")
    if missing:
        raise KerasInternalsError(
            f"Keras {keras.__version__} lacks {', '.join(missing)}, which derm.trainer.kgraph reads; pin the Keras "
            f"version in constraints.txt or port kgraph to it."
        )


def layer_kind(layer: Any) -> str:
    return type(layer).__name__


def is_relu(layer: Any) -> bool:
    """A plain ReLU: a ``ReLU`` layer without cap, slope or threshold, or an ``Activation("relu")``."""
    import keras

    if isinstance(layer, keras.layers.ReLU):
        return layer.max_value is None and not layer.negative_slope and not layer.threshold
    if isinstance(layer, keras.layers.Activation):
        return getattr(layer.activation, "__name__", "") == "relu"
    return False


# ------------------------------------------------------------------------------------------- from the config


def _history_names(obj: Any) -> list[str]:
    """Layer names referenced by ``keras_history`` entries anywhere in a serialized inbound node."""
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            return [obj["config"]["keras_history"][0]]
        return [n for v in obj.values() for n in _history_names(v)]
    if isinstance(obj, (list, tuple)):
        return [n for v in obj for n in _history_names(v)]
    return []


def parents_by_name(model: Any) -> tuple[dict[str, list[str]], list[str]]:
    """(layer name -> names of the layers feeding it, output layer names), from the model's public config."""
    config = model.get_config()
    parents = {
        layer["name"]: [n for node in layer.get("inbound_nodes", []) for n in _history_names(node)]
        for layer in config["layers"]
    }
    outputs = config["output_layers"]
    if outputs and isinstance(outputs[0], str):  # a single output: [name, node, tensor]
        outputs = [outputs]
    return parents, [o[0] for o in outputs]


def creation_order(model: Any) -> list[str]:
    """Layer names in the order the Keras application code creates them: post-order from the outputs, inputs first.

    (``model.layers`` is sorted by depth instead, which interleaves the branches of a block.)
    """
    parents, outputs = parents_by_name(model)
    order: list[str] = []
    done: set[str] = set()
    for out in outputs:
        stack: list[tuple[str, Iterator[str]]] = [(out, iter(parents[out]))]
        while stack:
            name, it = stack[-1]
            nxt = next((p for p in it if p not in done), None)
            if nxt is None:
                stack.pop()
                if name not in done:
                    done.add(name)
                    order.append(name)
            elif all(nxt != s[0] for s in stack):
                stack.append((nxt, iter(parents[nxt])))
    return order


def wire_inputs(obj: Any, tensors: dict[str, Any]) -> Any:
    """A serialized call argument (Keras 3 config), each ``__keras_tensor__`` replaced by ``tensors[layer name]``."""
    if isinstance(obj, dict) and obj.get("class_name") == "__keras_tensor__":
        return tensors[obj["config"]["keras_history"][0]]
    if isinstance(obj, (list, tuple)):
        return type(obj)(wire_inputs(v, tensors) for v in obj)
    if isinstance(obj, dict):
        return {k: wire_inputs(v, tensors) for k, v in obj.items()}
    return obj


def replay(base: Any, inputs: Any, clone: Callable[[Any], Any]) -> Any:
    """Call ``clone(layer)`` for every layer of single-input ``base``, in creation order, wired as in ``base``; the
    output tensor of the last layer.

    Like ``keras.models.clone_model``, but the result stays connected to ``inputs`` even when that is an
    intermediate tensor, so the caller can make one flat model from its own source inputs.
    """
    import keras

    config = {layer["name"]: layer for layer in base.get_config()["layers"]}
    by_name = {layer.name: layer for layer in base.layers}
    tensors: dict[str, Any] = {}
    order = creation_order(base)
    for name in order:
        layer = by_name[name]
        if isinstance(layer, keras.layers.InputLayer):
            tensors[name] = inputs
            continue
        (node,) = config[name]["inbound_nodes"]
        tensors[name] = clone(layer)(*wire_inputs(node["args"], tensors), **wire_inputs(node["kwargs"], tensors))
    return tensors[order[-1]]


# ----------------------------------------------------------------------------------- from the live objects


def parent_layers(layer: Any) -> list[Any]:
    """The layers feeding ``layer``'s one call; [] for a layer called several times (shared) or never."""
    nodes = getattr(layer, "_inbound_nodes", [])
    if len(nodes) != 1:
        return []
    return [n.operation for n in nodes[0].parent_nodes]


def output_layer_names(model: Any) -> set[str]:
    return {t._keras_history[0].name for t in model.outputs}


def consumers(model: Any) -> dict[str, list[Any]]:
    """Layer name -> the layers it feeds (through :func:`parent_layers`)."""
    users: dict[str, list[Any]] = {}
    for layer in model.layers:
        for p in parent_layers(layer):
            users.setdefault(p.name, []).append(layer)
    return users


def graph_nodes(model: Any) -> list[Any]:
    """The functional ``model``'s call nodes (its inputs left out), each after every node that feeds it."""
    return [
        node
        for depth in sorted(model._nodes_by_depth, reverse=True)
        for node in model._nodes_by_depth[depth]
        if node.operation is not None and not node.is_input
    ]


def run_graph(
    model: Any,
    x: Any,
    before: Callable[[Any, Any], None] | None = None,
    after: Callable[[Any, Any], Any] | None = None,
) -> list[Any]:
    """Execute the functional ``model`` on ``x`` node by node in graph order and return its outputs, freeing each
    intermediate tensor once its last consumer has run. ``before(layer, input)`` is called ahead of every layer;
    ``after(node, outputs)`` may replace a node's outputs (what it returns is what the consumers see).

    (Keras' own ``Functional._run_through_graph`` keeps every intermediate tensor: tens of GB for Inception-v3 on a
    64-image batch.)
    """
    import keras

    nodes = graph_nodes(model)
    uses: Counter[int] = Counter(id(t) for node in nodes for t in node.input_tensors)
    for t in model.outputs:
        uses[id(t)] += 1
    (inp,) = model.inputs
    values: dict[int, Any] = {id(inp): x}
    for node in nodes:
        if any(id(t) not in values for t in node.input_tensors):
            continue
        args, kwargs = node.arguments.fill_in(values)
        layer = node.operation
        if before is not None:
            before(layer, args[0])
        if getattr(layer, "_call_has_training_arg", False):
            kwargs["training"] = False
        outputs = layer(*args, **kwargs)
        if after is not None:
            outputs = after(node, outputs)
        for t, v in zip(node.outputs, keras.tree.flatten(outputs), strict=True):
            values[id(t)] = v
        for t in node.input_tensors:
            uses[id(t)] -= 1
            if uses[id(t)] <= 0:
                values.pop(id(t), None)
    return [values[id(t)] for t in model.outputs]


__all__ = [
    "PRIVATE_ATTRIBUTES",
    "KerasInternalsError",
    "check_keras_internals",
    "consumers",
    "creation_order",
    "graph_nodes",
    "is_relu",
    "layer_kind",
    "output_layer_names",
    "parent_layers",
    "parents_by_name",
    "replay",
    "run_graph",
    "wire_inputs",
]
