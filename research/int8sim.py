"""Full-integer int8 activations simulated in Keras: where a TFLite int8 file's difference from the float model
comes from.

TFLite's int8 Inception-v3 (``derm-export --quantize int8``) rounds every activation tensor onto one grid per tensor:
256 levels over the range the converter calibrated (the minimum and maximum over the calibration images, widened to
hold zero), with a concatenation's inputs on the concatenation's own grid; a convolution, its folded batch norm and
its ReLU are one op whose output is rounded once; max pooling keeps its input's grid exactly and average pooling
rounds its average back onto it. :func:`simulate` runs a Keras classifier node by node and applies exactly these
roundings (optionally only to some ReLUs), with the model's own weights: after :func:`derm.exporter.rounding
.round_weights` those are the integers the file holds. The head (global pooling onward) stays float, as in the file.

What it is for: attributing the int8 difference to layers, which the file cannot do (its roundings all happen at
once). The simulation reproduces the file's arithmetic op by op (the same ranges, and a convolution fed the file's
own input gives the file's output to within float rounding), but not bit for bit over the whole network: a value
that lands on a rounding boundary in one and not the other flips a level, and such flips spread. Its differences
from the float model have the file's size, not its exact values (``tests/test_int8sim.py`` checks both).
``python -m research.int8_noise`` uses it to split the int8 difference of the benchmark model by block.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from derm.exporter.equalize import ReluGraph
from derm.trainer.kgraph import is_relu, layer_kind, run_graph

LEVELS = 255  # steps of an 8-bit grid


def quantization_groups(model: Any) -> dict[str, str]:
    """Each ReLU layer's name -> the layer whose output range its int8 grid takes (itself, or the outermost
    concatenation it feeds alone)."""
    graph = ReluGraph(model)
    return {layer.name: graph.quantization_group(layer).name for layer in model.layers if is_relu(layer)}


def activation_ranges(model: Any, images: np.ndarray, batch: int = 8) -> dict[str, tuple[float, float]]:
    """Each ReLU layer's name -> the ``(min, max)`` the converter calibrates for its grid on ``images`` (the model's
    own input, e.g. uint8 pixels as float): the extremes of its quantization group's tensor."""
    import keras

    groups = quantization_groups(model)
    probed = sorted(set(groups) | set(groups.values()))
    if not probed:
        return {}
    probe = keras.Model(model.input, [model.get_layer(name).output for name in probed])
    lo = dict.fromkeys(probed, 0.0)
    hi = dict.fromkeys(probed, 0.0)
    for start in range(0, len(images), batch):
        outs = probe(np.asarray(images[start : start + batch], np.float32), training=False)
        for name, out in zip(probed, outs if isinstance(outs, (list, tuple)) else [outs], strict=True):
            a = keras.ops.convert_to_numpy(out)
            lo[name], hi[name] = min(lo[name], float(a.min())), max(hi[name], float(a.max()))
    return {relu: (lo[group], hi[group]) for relu, group in groups.items()}


def fake_quant(x: Any, lo: float, hi: float) -> Any:
    """``x`` rounded onto TFLite's asymmetric 8-bit grid for the range ``[lo, hi]`` (widened to hold 0, so zero is
    exact) and clamped to it."""
    import tensorflow as tf

    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / LEVELS
    if scale == 0:
        return x
    zero = float(np.round(-lo / scale))
    return (tf.clip_by_value(tf.round(x / scale) + zero, 0.0, float(LEVELS)) - zero) * scale


def simulate(
    model: Any,
    images: np.ndarray,
    ranges: dict[str, tuple[float, float]] | None,
    only: Iterable[str] | None = None,
    batch: int = 25,
) -> list[np.ndarray]:
    """The functional ``model``'s outputs on ``images`` with int8 activations: every ReLU in ``ranges`` (or only
    those named in ``only``) rounded onto its grid, average pools after a rounded tensor rounded onto that tensor's
    grid. ``ranges=None`` runs the float model (the same node-by-node path). Nothing after the first global pooling
    is rounded (the exporter's float head)."""
    selected = dict(ranges or {})
    if only is not None:
        keep = set(only)
        unknown = keep - set(selected)
        if unknown:
            raise ValueError(f"No activation range for {sorted(unknown)}; ranges cover {len(selected)} ReLU layers.")
        selected = {name: r for name, r in selected.items() if name in keep}
    parts = [_run(model, np.asarray(images[i : i + batch], np.float32), selected) for i in range(0, len(images), batch)]
    return [np.concatenate(col) for col in zip(*parts, strict=True)]


def _run(model: Any, x: np.ndarray, ranges: dict[str, tuple[float, float]]) -> list[np.ndarray]:
    import keras
    import tensorflow as tf

    grids: dict[int, tuple[float, float]] = {}  # tensor -> the range of the grid its values lie on

    def rounded(node: Any, out: Any) -> Any:
        layer = node.operation
        before = [grids.get(id(t)) for t in node.input_tensors]
        grid = None
        if layer.name in ranges:
            grid = ranges[layer.name]
            out = fake_quant(out, *grid)
        elif layer_kind(layer) == "AveragePooling2D" and before and before[0] is not None:
            grid = before[0]
            out = fake_quant(out, *grid)
        elif layer_kind(layer) in ("MaxPooling2D", "Concatenate") and before and all(g is not None for g in before):
            grid = before[0]  # exact: max pooling picks values on the grid; concatenation inputs share it
        if grid is not None:
            grids.update(dict.fromkeys((id(t) for t in node.outputs), grid))
        return out

    return [keras.ops.convert_to_numpy(v) for v in run_graph(model, tf.constant(x), after=rounded)]


def blocks(model: Any) -> dict[str, str]:
    """Each ReLU layer's name -> the Inception block it belongs to: ``stem`` before ``mixed0``'s branches, else the
    ``mixedN`` concatenation its branch ends in."""
    out: dict[str, str] = {}
    pending: list[str] = []
    stem = True
    for layer in model.layers:  # Keras' layer order: each block's branches, then its concatenation
        if is_relu(layer):
            pending.append(layer.name)
        name = layer.name
        if name.startswith("mixed") and name[5:].isdigit():
            out.update(dict.fromkeys(pending, name))
            pending, stem = [], False
        elif stem and layer_kind(layer) == "MaxPooling2D" and pending:
            out.update(dict.fromkeys(pending, "stem"))
            pending = []
    out.update(dict.fromkeys(pending, "head"))
    return out
