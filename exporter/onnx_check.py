"""Structural check of a written ONNX file: input, outputs, metadata and the baked-in aggregation, read from the
graph without running it."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from derm.exporter.graph import ExportError, OutputSpec
from derm.exporter.manifest import metadata_problems
from derm.manifest import MANIFEST_KEY


def expected_matrix(spec: OutputSpec) -> np.ndarray:
    """The constant of the matmul that makes ``spec``'s output (see :func:`derm.exporter.graph.build_export_model`):
    the level matrix itself, or for a task the positive column of its classes (after the task's own softmax)."""
    assert spec.matrix is not None
    if spec.kind == "level":
        return spec.matrix.astype(np.float32)
    cols = np.nonzero(spec.matrix.sum(1))[0]
    return spec.matrix[cols, 1:2].astype(np.float32)


def _constant(graph: Any, name: str, producer: Mapping[str, Any], inits: Mapping[str, Any]) -> tuple[np.ndarray, float]:
    """The value of a constant tensor and the tolerance it is known to (its quantization step where dequantized)."""
    from onnx import numpy_helper

    if name in inits:
        return numpy_helper.to_array(inits[name]).astype(np.float32), 0.0
    node = producer.get(name)
    if node is not None and node.op_type == "DequantizeLinear" and all(i in inits for i in node.input if i):
        q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        zero = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32) if len(node.input) > 2 else 0.0
        if np.ndim(scale) == 1 and q.ndim == 2:  # per-channel along the output axis
            scale, zero = scale[None, :], np.reshape(zero, (1, -1)) if np.ndim(zero) else zero
        return (q - zero) * scale, float(np.max(scale))
    raise KeyError(name)


def check_structure(
    path: str | os.PathLike[str], specs: Sequence[OutputSpec], manifest: Mapping[str, Any]
) -> list[str]:
    """Input, outputs, metadata and the baked-in aggregation of a written ONNX file, checked without running it."""
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ExportError(f"{str(path)!r} is not an ONNX file: {exc}") from exc
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    size = manifest["input"]["shape"][1]
    outputs = {o.name: o for o in graph.output}
    problems = _input_problems(graph, inits, size)
    problems += _output_problems(outputs, specs)
    meta = {p.key: p.value for p in model.metadata_props}
    problems += metadata_problems(meta, manifest, specs, "metadata_props")
    problems += _aggregation_problems(graph, inits, outputs, specs)
    quantized = sum(n.op_type == "DequantizeLinear" for n in graph.node)
    quantize = manifest.get("export", {}).get("quantize")
    if quantize == "int8" and not quantized:
        problems.append("int8 was asked for but the graph has no quantized tensors")
    if quantize == "fp32" and quantized:
        problems.append(f"fp32 was asked for but the graph has {quantized} dequantize nodes")
    if problems:
        raise ExportError(f"{str(path)!r} failed its structural checks: " + "; ".join(problems))
    aggregated = sum(s.kind != "training" for s in specs)
    return [
        f"input 'image' uint8 [batch, {size}, {size}, 3]",
        f"{len(specs)} named outputs with their widths",
        f"metadata_props: {MANIFEST_KEY} equal, labels of each output",
        f"{aggregated} aggregation matmuls hold their matrices",
        f"{quantize}: {quantized} dequantize nodes" if quantize in ("int8", "fp32") else "weights not checked",
    ]


def _input_problems(graph: Any, inits: Mapping[str, Any], size: int) -> list[str]:
    """The graph's one input must be ``image``, uint8 (batch or 1, size, size, 3)."""
    import onnx

    inputs = [i for i in graph.input if i.name not in inits]
    if [i.name for i in inputs] != ["image"]:
        return [f"inputs are {[i.name for i in inputs]}, expected ['image']"]
    t = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    shape_ok = len(dims) == 4 and dims[1:] == [size, size, 3] and dims[0] in (None, 1)
    if t.elem_type != onnx.TensorProto.UINT8 or not shape_ok:
        kind = onnx.TensorProto.DataType.Name(t.elem_type).lower()
        return [f"input is {kind} {dims}, expected uint8 [batch, {size}, {size}, 3]"]
    return []


def _output_problems(outputs: Mapping[str, Any], specs: Sequence[OutputSpec]) -> list[str]:
    """Every spec's output present with one column per label, and no other outputs."""
    problems = []
    for s in specs:
        if s.name not in outputs:
            problems.append(f"output {s.name!r} missing")
            continue
        dims = outputs[s.name].type.tensor_type.shape.dim
        width = dims[-1].dim_value if dims and dims[-1].HasField("dim_value") else None
        if width != len(s.labels):
            problems.append(f"output {s.name!r} has {width} columns, expected {len(s.labels)}")
    extra = set(outputs) - {s.name for s in specs}
    if extra:
        problems.append(f"unexpected outputs {sorted(extra)}")
    return problems


def _aggregation_problems(
    graph: Any, inits: Mapping[str, Any], outputs: Mapping[str, Any], specs: Sequence[OutputSpec]
) -> list[str]:
    """Each level and task output made by a MatMul (or Gemm) whose constant is its aggregation matrix."""
    producer = {out: node for node in graph.node for out in node.output}
    problems = []
    for s in specs:
        if s.kind == "training" or s.name not in outputs:
            continue
        node = producer.get(s.name)
        while node is not None and node.op_type == "Identity":
            node = producer.get(node.input[0])
        if node is None or node.op_type not in ("MatMul", "Gemm"):
            problems.append(f"output {s.name!r} is not made by a MatMul (found {node.op_type if node else None})")
            continue
        want = expected_matrix(s)
        try:
            got, tol = _constant(graph, node.input[1], producer, inits)
        except KeyError:
            problems.append(f"the matmul of {s.name!r} has no constant matrix")
            continue
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            got = got.T
        if got.shape != want.shape or not np.allclose(got, want, rtol=0, atol=tol):
            problems.append(f"the matmul of {s.name!r} does not hold its aggregation matrix")
    return problems
