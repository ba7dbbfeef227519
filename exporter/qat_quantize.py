"""The fake-quantized model of quantization-aware training (step 3 of :mod:`derm.exporter.qat`): tfmot's
``quantize_apply`` with the classifier's head kept as the converter should see it, and every quantizer's range started
where the converter will quantize.

Runs in the QAT child process (tf-keras, ``TF_USE_LEGACY_KERAS=1``): it imports nothing at module level that tf-keras
cannot load. tf-keras (Keras 2) has other internals than the Keras 3 that :mod:`derm.trainer.kgraph` reads, so its few
graph helpers are here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from derm.exporter.graph import ExportError, downstream


def _parents(layer: Any) -> list[str]:
    """Names of the layers feeding ``layer`` (a flat tf-keras model's layers have one node each). tf-keras (Keras 2)
    has other internals than the Keras 3 that :mod:`derm.trainer.kgraph` reads, so its two helpers stay here."""
    return [
        p.name
        for node in layer.inbound_nodes
        for p in (node.inbound_layers if isinstance(node.inbound_layers, list) else [node.inbound_layers])
    ]


def _consumers(flat: Any) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for layer in flat.layers:
        for parent in _parents(layer):
            out.setdefault(parent, []).append(layer.name)
    return out


def head_layers(flat: Any) -> set[str]:
    """The global poolings and every layer downstream of them: the classifier's head (``model.layers`` is in
    topological order)."""
    import tf_keras as tfk

    found = downstream(
        flat.layers,
        start=lambda la: isinstance(la, tfk.layers.GlobalAveragePooling2D),
        inputs=_parents,
        outputs=lambda la: [la.name],
    )
    return {layer.name for layer in found}


def quantize_model(flat: Any) -> Any:
    """``quantize_apply`` with the head kept as the converter should see it (:mod:`derm.exporter.qat`, step 3)."""
    import tensorflow_model_optimization as tfmot
    import tf_keras as tfk

    q = tfmot.quantization.keras
    head = head_layers(flat)

    def annotate(layer: Any) -> Any:
        if isinstance(layer, tfk.layers.InputLayer):
            return layer
        in_head = layer.name in head
        if in_head and not isinstance(layer, (tfk.layers.GlobalAveragePooling2D, tfk.layers.Concatenate)):
            return layer.__class__.from_config(layer.get_config())  # float: a fresh copy, weights copied below
        if isinstance(layer, tfk.layers.Rescaling):  # an input scaling that could not be folded stays float
            return layer.__class__.from_config(layer.get_config())
        return q.quantize_annotate_layer(layer)

    with q.quantize_scope():
        qat = q.quantize_apply(tfk.models.clone_model(flat, clone_function=annotate))
    for layer in flat.layers:
        if layer.weights and layer.name in head:
            qat.get_layer(layer.name).set_weights(layer.get_weights())
    for layer in qat.layers:  # the int8 file holds every backbone kernel in int8: training must see them so
        inner = getattr(layer, "layer", None)
        if isinstance(inner, tfk.layers.Conv2D) and not any("kernel_min" in w.name for w in layer.weights):
            raise ExportError(
                f"tfmot left the kernel of {inner.name!r} unquantized ({type(layer.quantize_config).__name__}); "
                f"the fine-tune would not see the int8 weights the file holds."
            )
    return qat


def _node(model: Any, layer: Any) -> Any:
    """``layer``'s node in ``model``'s own graph (cloning leaves layers with nodes in other graphs too)."""
    found = [i for i in range(len(layer.inbound_nodes)) if f"{layer.name}_ib-{i}" in model._network_nodes]
    return layer.inbound_nodes[found[0]]


def init_ranges(qat: Any, flat: Any, images: np.ndarray, batch_size: int = 8) -> dict[str, int]:
    """Start every quantizer where the converter will quantize (:mod:`derm.exporter.qat`, step 3).

    tfmot starts activation ranges at [-6, 6] and kernel ranges at [-6, 6] per channel until a training step has
    run, so a fake-quantized graph that is only converted, or fine-tuned with the ranges held, would quantize with
    ranges far from the real ones. Returns how many kernel, activation and concatenation-shared ranges were set.
    """
    counts = {"kernels": 0, "activations": 0, "shared_with_concat": 0}
    targets = _range_targets(qat, flat, counts)
    names = sorted({n for *_, n in targets if n is not None})
    lo, hi = _output_ranges(flat, names, images, batch_size)
    for vmin, vmax, n in targets:
        a, b = (0.0, 255.0) if n is None else (lo[n], hi[n])  # the image is uint8: its range is exactly [0, 255]
        vmin.assign(min(a, 0.0))  # int8 ranges must contain 0
        vmax.assign(max(b, 0.0))
        counts["activations"] += 1
    return counts


def _range_targets(qat: Any, flat: Any, counts: dict[str, int]) -> list[tuple[Any, Any, str | None]]:
    """Set every kernel quantizer to its kernel's per-channel extremes, and list the activation quantizers as (min
    variable, max variable, the flat layer whose output range they take; None: the image). A tensor feeding a
    concatenation takes the outermost concatenation's range. ``counts`` gets the kernels and the shared ranges."""
    import tf_keras as tfk

    users = _consumers(flat)

    def concat_root(name: str) -> str:  # the outermost concatenation a tensor reaches through concatenations only
        while len(users.get(name, [])) == 1 and isinstance(flat.get_layer(users[name][0]), tfk.layers.Concatenate):
            name = users[name][0]
        return name

    targets: list[tuple[Any, Any, str | None]] = []
    for layer in qat.layers:
        weights = {w.name.split("/")[-1].split(":")[0]: w for w in layer.weights}
        if "kernel_min" in weights:
            kernel = weights["kernel"].numpy()
            peak = np.abs(kernel).max(axis=tuple(range(kernel.ndim - 1)))
            weights["kernel_min"].assign(-peak)
            weights["kernel_max"].assign(peak)
            counts["kernels"] += 1
        for lo, hi in (("post_activation_min", "post_activation_max"), ("output_min", "output_max")):
            if lo in weights:
                root = concat_root(layer.layer.name)
                counts["shared_with_concat"] += root != layer.layer.name
                targets.append((weights[lo], weights[hi], root))
        if "quantize_layer_min" in weights:  # the QuantizeLayer on the image (or an unfolded input scaling)
            source = _node(qat, layer).inbound_layers
            name = source.name if not isinstance(source, tfk.layers.InputLayer) else None
            targets.append((weights["quantize_layer_min"], weights["quantize_layer_max"], name))
    return targets


def _output_ranges(
    flat: Any, names: list[str], images: np.ndarray, batch_size: int
) -> tuple[dict[str, float], dict[str, float]]:
    """The smallest and largest value of each named layer's output in the float model over ``images``."""
    import tf_keras as tfk

    probe = tfk.Model(flat.input, [flat.get_layer(n).output for n in names])
    lo = dict.fromkeys(names, np.inf)
    hi = dict.fromkeys(names, -np.inf)
    x = images.astype(np.float32)
    for i in range(0, len(x), batch_size):
        outs = probe(x[i : i + batch_size], training=False)
        for n, o in zip(names, outs if len(names) > 1 else [outs], strict=True):
            o = np.asarray(o)
            lo[n], hi[n] = min(lo[n], float(o.min())), max(hi[n], float(o.max()))
    return lo, hi
