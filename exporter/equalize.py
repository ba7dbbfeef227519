"""Activation equalization: give small channels more of an int8 activation tensor's range, exactly.

Full-integer int8 quantizes every activation tensor with one scale (per tensor, not per channel), and TFLite's int8
spec makes a concatenation share that scale with all of its inputs: every branch of an Inception block is quantized
with the range of the block's largest channel. In Inception-v3 the median channel's maximum is 0.2 to 0.5 of its
tensor's (mixed7-10: under 0.2), so most channels use a fraction of the 256 levels.

A ReLU is positively homogeneous, ``relu(g * y) = g * relu(y)`` for ``g > 0``, so each channel of a ReLU output can
be multiplied by a gain ``g`` where it is produced (the convolution's kernel and its batch norm's shift) and divided
by the same ``g`` wherever it is used (the input channels of the next convolutions, through concatenation, max and
average pooling, and the rows of the head's dense layer after global pooling). The float model computes the same
function up to float rounding, but a channel whose maximum is ``m`` in a tensor whose maximum is ``M`` now reaches
``m * g``. With ``g = (M / m) ** alpha`` the largest channel is unchanged (so is the tensor's range) and ``alpha``
balances the activation's rounding (which shrinks by ``g``) against the next layer's weight rounding (whose share
grows by ``g`` for that channel): SmoothQuant's migration strength (Xiao et al., 2023), on a CNN's ReLUs. The
default 0.5 halves the gap between small and large channels on a log scale.

What it buys, and how ``alpha`` was chosen, is measured in ``benchmarks/results/export.md`` (the exporter
benchmark, ``python -m research.export_bench``) and summarized in docs/export.md.

Only ReLUs whose every use is such a channel-wise path are scaled; anything else (an ``Add``, a ``Flatten``, a model
output) leaves the ReLU at gain 1, so the transform is exact on any graph.

:func:`fold_input_scaling` is the other exact rewrite for int8 activations: the model's first layer scales pixels to
[-1, 1] (``x / 127.5 - 1``), and a quantizer that keeps that op (onnxruntime does; TFLite folds it) rounds every pixel
to half a level, since 127.5 is no integer. Folded into the first convolution (valid padding: the offset becomes a
per-channel constant), the integer pixels are that convolution's input, exact in uint8. The fold, equalization and
the shared concatenation ranges of :func:`derm.exporter.onnx.shared_concat_ranges` together took ONNX int8's
nine-class mean absolute difference on the benchmark model from 0.0084 to 0.0043 (most of it the fold).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from derm.trainer.kgraph import consumers, graph_nodes, is_relu, layer_kind, output_layer_names, parent_layers

DEFAULT_ALPHA = 0.5
DEFAULT_MAX_GAIN = 16.0
_PASS = ("Concatenate", "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D", "Dropout")


@dataclass
class Equalization:
    alpha: float
    max_gain: float
    images: int
    tensors: int  # ReLU outputs scaled
    channels: int
    gain_median: float
    gain_max: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


class ReluGraph:
    """Who feeds whom in a functional Keras model, and which tensors each scaled ReLU's gain travels through."""

    def __init__(self, model: Any):
        self.users = consumers(model)
        self.outputs = output_layer_names(model)

    def producer(self, relu: Any) -> tuple[Any, Any | None] | None:
        """``(conv, batch_norm or None)`` that make the ReLU's input, each used only there; None otherwise."""
        import keras

        parents = parent_layers(relu)
        node, bn = (parents[0] if len(parents) == 1 else None), None
        if isinstance(node, keras.layers.BatchNormalization):
            if node.axis not in (-1, len(node.input.shape) - 1) or len(self.users[node.name]) != 1:
                return None
            parents = parent_layers(node)
            node, bn = (parents[0] if len(parents) == 1 else None), node
        if type(node) is not keras.layers.Conv2D or node.groups != 1 or node.activation.__name__ != "linear":
            return None
        if len(self.users[node.name]) != 1:
            return None
        return node, bn

    def consumers_ok(self, layer: Any, seen: set[str] | None = None) -> bool:
        """Every path from ``layer`` runs through channel-wise layers into Conv2D / Dense inputs."""
        import keras

        seen = set() if seen is None else seen
        if layer.name in self.outputs:
            return False
        users = self.users.get(layer.name, [])
        if not users:
            return False
        for user in users:
            if user.name in seen:
                continue
            seen.add(user.name)
            if type(user) is keras.layers.Conv2D and user.groups == 1:
                continue
            if type(user) is keras.layers.Dense and len(user.kernel.shape) == 2:
                continue
            if layer_kind(user) not in _PASS or not self.consumers_ok(user, seen):
                return False
            if layer_kind(user) == "Concatenate" and user.axis not in (-1, 3):
                return False
        return True

    def quantization_group(self, layer: Any) -> Any:
        """The tensor whose int8 scale a ReLU output shares: the outermost concatenation it feeds alone (TFLite
        gives a concatenation's inputs their output's scale), else the ReLU output itself."""
        users = self.users.get(layer.name, [])
        if len(users) == 1 and layer_kind(users[0]) == "Concatenate" and users[0].name not in self.outputs:
            return self.quantization_group(users[0])
        return layer


def equalize(
    model: Any, images: np.ndarray, alpha: float = DEFAULT_ALPHA, max_gain: float = DEFAULT_MAX_GAIN, batch: int = 8
) -> Equalization:
    """Rescale ``model``'s ReLU channels in place (see the module docstring); ``images`` are the model's own input
    (real calibration images: the ones the converter will take its ranges from). The model's outputs do not change
    beyond float rounding."""

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], received {alpha!r}.")
    if not max_gain >= 1.0:
        raise ValueError(f"max_gain must be at least 1, received {max_gain!r}.")
    if len(images) == 0:
        raise ValueError("Activation equalization needs calibration images.")
    t0 = time.perf_counter()
    graph = ReluGraph(model)
    producers = {r.name: graph.producer(r) for r in model.layers if is_relu(r) and graph.consumers_ok(r)}
    relus = [model.get_layer(name) for name, made_by in producers.items() if made_by]
    groups = {r.name: graph.quantization_group(r) for r in relus}
    probed = list({layer.name: layer for layer in [*relus, *groups.values()]}.values())
    peak = _channel_peaks(model, probed, np.asarray(images, np.float32), batch)

    gains: dict[str, np.ndarray] = {}
    for relu in relus:
        m, top = peak[relu.name], peak[groups[relu.name].name].max()
        g = np.ones_like(m)
        live = m > 0
        g[live] = np.minimum((top / m[live]) ** alpha, max_gain)
        gains[relu.name] = g.astype(np.float64)
    for relu in relus:
        _scale_producer(*producers[relu.name], gains[relu.name])
    _compensate_consumers(model, gains)

    every = np.concatenate(list(gains.values())) if gains else np.ones(1)
    return Equalization(
        alpha=float(alpha),
        max_gain=float(max_gain),
        images=len(images),
        tensors=len(gains),
        channels=int(every.size if gains else 0),
        gain_median=float(np.median(every)),
        gain_max=float(every.max()),
        seconds=time.perf_counter() - t0,
    )


def _channel_peaks(model: Any, layers: Iterable[Any], images: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    import keras

    layers = list(layers)
    probe = keras.Model(model.input, [layer.output for layer in layers])
    peaks = {layer.name: np.zeros(layer.output.shape[-1]) for layer in layers}
    for i in range(0, len(images), batch):
        outs = probe(images[i : i + batch], training=False)
        for layer, out in zip(layers, outs if isinstance(outs, (list, tuple)) else [outs], strict=True):
            a = keras.ops.convert_to_numpy(out)
            peaks[layer.name] = np.maximum(peaks[layer.name], a.reshape(-1, a.shape[-1]).max(0))
    return peaks


def _scale_producer(conv: Any, bn: Any | None, g: np.ndarray) -> None:
    """Multiply the ReLU's input channel ``c`` by ``g[c]``: conv -> [batch norm] is affine per output channel."""

    def times(variable: Any) -> None:
        variable.assign((np.asarray(variable, np.float64) * g).astype(np.float32))

    if bn is not None and bn.scale:  # y = gamma * (x - mean) / sd + beta: scale gamma and beta
        times(bn.gamma)
        if bn.center:
            times(bn.beta)
        return
    times(conv.kernel)  # per output channel (last axis)
    if conv.use_bias:
        times(conv.bias)
    if bn is not None:  # no gamma: (g x - g mean) / sd + g beta
        times(bn.moving_mean)
        if bn.center:
            times(bn.beta)


def _compensate_consumers(model: Any, gains: dict[str, np.ndarray]) -> None:
    """Carry each tensor's channel gains forward through channel-wise layers; divide them out of Conv2D / Dense."""
    import keras

    carried: dict[str, np.ndarray | None] = {}
    for layer in (node.operation for node in graph_nodes(model)):
        parents = parent_layers(layer)
        incoming = [carried.get(p.name) for p in parents]
        if layer.name in gains:
            carried[layer.name] = gains[layer.name]
        elif layer_kind(layer) == "Concatenate" and any(g is not None for g in incoming):
            carried[layer.name] = np.concatenate(
                [g if g is not None else np.ones(p.output.shape[-1]) for g, p in zip(incoming, parents, strict=True)]
            )
        elif layer_kind(layer) in _PASS and incoming and incoming[0] is not None:
            carried[layer.name] = incoming[0]
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)) and incoming and incoming[0] is not None:
            k = np.asarray(layer.kernel, np.float64)
            shape = (-1, 1) if k.ndim == 2 else (1, 1, -1, 1)
            layer.kernel.assign((k / incoming[0].reshape(shape)).astype(np.float32))
        elif any(g is not None for g in incoming):
            raise AssertionError(f"channel gains reached {layer.name!r}, which cannot carry them")


def fold_input_scaling(model: Any) -> bool:
    """Fold the input ``Rescaling`` (``x * scale + offset``) into the convolution it feeds, in place, leaving the
    rescaling an identity; True when folded. Needs a single Conv2D user with valid padding (zero padding of a shifted
    input would not be a constant), optionally followed by a batch norm (the offset goes into its moving mean)."""
    import keras

    graph = ReluGraph(model)
    scales = [x for x in model.layers if isinstance(x, keras.layers.Rescaling) and x.name not in graph.outputs]
    if len(scales) != 1:
        return False
    users = graph.users.get(scales[0].name, [])
    conv = users[0] if len(users) == 1 else None
    if type(conv) is not keras.layers.Conv2D or conv.padding != "valid" or conv.groups != 1:
        return False
    scale, offset = (np.asarray(getattr(scales[0], a), np.float64) for a in ("scale", "offset"))
    if scale.ndim or offset.ndim:  # per-channel rescaling: not the model's
        return False
    k = np.asarray(conv.kernel, np.float64)
    constant = (k * float(offset)).sum(axis=(0, 1, 2))  # what the offset adds to each output channel
    bn_users = graph.users.get(conv.name, [])
    bn = bn_users[0] if len(bn_users) == 1 and isinstance(bn_users[0], keras.layers.BatchNormalization) else None
    if not conv.use_bias and bn is None:
        return False
    conv.kernel.assign((k * float(scale)).astype(np.float32))
    if conv.use_bias:
        conv.bias.assign((np.asarray(conv.bias, np.float64) + constant).astype(np.float32))
    else:  # (x + c - mean) / sd == (x - (mean - c)) / sd
        bn.moving_mean.assign((np.asarray(bn.moving_mean, np.float64) - constant).astype(np.float32))
    scales[0].scale, scales[0].offset = 1.0, 0.0  # plain attributes, read when a graph is traced:
    model.predict_function = None  # so drop the predict function Keras traced with the old ones
    return True
