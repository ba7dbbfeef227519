"""The Keras 3 classifier rebuilt as a flat tf-keras model for quantization-aware training (step 2 of
:mod:`derm.exporter.qat`): each Conv2D -> BatchNormalization (-> ReLU) run folded into one biased Conv2D, as the TFLite
converter fuses them.

Runs in the QAT child process (tf-keras, ``TF_USE_LEGACY_KERAS=1``): it imports nothing at module level that tf-keras
cannot load.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from derm.exporter.graph import ExportError

_DROP = ("_initializer", "_regularizer", "_constraint")


def _tf_keras_layer(tfk: Any, class_name: str, config: dict[str, Any]) -> Any:
    config = {k: v for k, v in config.items() if not k.endswith(_DROP) and k not in ("dtype", "build_config")}
    cls = getattr(tfk.layers, class_name, None)
    if cls is None:
        raise ExportError(f"QAT cannot rebuild a {class_name!r} layer in tf-keras.")
    while True:  # drop the Keras-3-only options (quantization_config, lora_rank, ...) tf-keras does not know
        try:
            return cls.from_config(config)
        except TypeError as exc:
            found = re.search(r"not understood:'?,? '(\w+)'", str(exc))
            unknown = found.group(1) if found and found.group(1) in config else None
            if unknown is None or config.get(unknown) not in (None, 0, False):
                raise ExportError(f"QAT cannot rebuild layer {config.get('name')!r} in tf-keras: {exc}") from exc
            config.pop(unknown)


def rebuild_in_tf_keras(model: Any) -> Any:
    """The Keras 3 classifier as a flat tf-keras model: same layer names and wiring, weights copied by name, each
    Conv2D -> BatchNormalization (-> ReLU) run folded into one Conv2D (see :mod:`derm.exporter.qat`, step 2), and an
    identity input scaling (after ``fold_input_scaling``) dropped."""
    import tf_keras as tfk

    config = {layer["name"]: layer for layer in model.get_config()["layers"]}
    bns, relus = _fusions(model, config)
    out = _rebuild_graph(tfk, model, config, bns, relus)
    _copy_weights(model, out, bns, folded={**bns, **relus})
    return out


def _fusions(model: Any, config: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """The batch norms and ReLUs to fold: each maps to the Conv2D it is folded into (a batch norm that is its
    convolution's only user; a ReLU activation that is that batch norm's only user)."""
    from derm.trainer.kgraph import parents_by_name

    parents, _ = parents_by_name(model)
    consumers: dict[str, list[str]] = {}
    for name, feeding in parents.items():
        for parent in feeding:
            consumers.setdefault(parent, []).append(name)

    def only_user(name: str, class_name: str) -> str | None:
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and config[users[0]]["class_name"] == class_name else None

    bns: dict[str, str] = {}  # batch norm -> the Conv2D it is folded into
    relus: dict[str, str] = {}  # ReLU -> the Conv2D (with its batch norm) it is fused into
    for name, layer in config.items():
        if layer["class_name"] != "Conv2D" or layer["config"].get("activation") not in (None, "linear"):
            continue
        bn = only_user(name, "BatchNormalization")
        if bn is None:
            continue
        bns[bn] = name
        relu = only_user(bn, "Activation")
        if relu is not None and config[relu]["config"].get("activation") == "relu":
            relus[relu] = name
    return bns, relus


def _rebuild_graph(tfk: Any, model: Any, config: dict[str, Any], bns: dict[str, str], relus: dict[str, str]) -> Any:
    """The tf-keras model, layer by layer in creation order: folded layers pass their convolution's output on, the
    convolutions they fold into get a bias (and the ReLU), an identity rescaling is skipped."""
    from derm.trainer.kgraph import creation_order, wire_inputs

    folded = {**bns, **relus}
    tensors: dict[str, Any] = {}
    inputs = None
    for name in creation_order(model):
        layer = config[name]
        cfg = dict(layer["config"])
        if layer["class_name"] == "InputLayer":
            shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
            inputs = tensors[name] = tfk.Input(shape=tuple(shape[1:]), dtype="float32", name=name)
            continue
        (node,) = layer["inbound_nodes"]
        if name in folded:
            tensors[name] = tensors[folded[name]]
            continue
        if layer["class_name"] == "Rescaling" and cfg.get("scale") == 1.0 and cfg.get("offset") == 0.0:
            tensors[name] = wire_inputs(node["args"], tensors)[0]
            continue
        if name in folded.values():
            cfg["use_bias"] = True
            cfg["activation"] = "relu" if name in relus.values() else "linear"
        new = _tf_keras_layer(tfk, layer["class_name"], cfg)
        tensors[name] = new(*wire_inputs(node["args"], tensors), **wire_inputs(node["kwargs"], tensors))
    return tfk.Model(inputs, tensors["probs"], name="derm_qat")


def _copy_weights(model: Any, out: Any, bns: dict[str, str], folded: dict[str, str]) -> None:
    """Copy the weights by layer name, each folded batch norm's scale and shift merged into its convolution's kernel
    and bias."""
    conv_bn = {conv: bn for bn, conv in bns.items()}
    for layer in model.layers:
        if not layer.weights or layer.name in folded:
            continue
        weights = [np.asarray(w) for w in layer.get_weights()]
        if layer.name in conv_bn:
            bn = model.get_layer(conv_bn[layer.name])
            gamma = np.asarray(bn.gamma) if bn.scale else 1.0
            scale = gamma / np.sqrt(np.asarray(bn.moving_variance) + bn.epsilon)
            beta = np.asarray(bn.beta) if bn.center else 0.0
            bias = beta - np.asarray(bn.moving_mean) * scale + (weights[1] * scale if len(weights) > 1 else 0.0)
            weights = [weights[0] * scale, bias.astype(np.float32)]
        out.get_layer(layer.name).set_weights(weights)
