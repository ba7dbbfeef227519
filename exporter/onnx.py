"""ONNX conversion of the export graph: float32 (tf2onnx, opset 17) and static int8 (onnxruntime's QDQ quantization).

int8 quantizes weights per channel and activations with ranges from real calibration images (min/max); the input
stays uint8 (the image as the app has it) and the outputs float32. The frozen aggregation after the training
softmax (the level matmuls, each task's select-matmul/softmax/matmul) and that softmax itself stay float: they are a
few multiply-adds, and quantizing them made the level probabilities stop summing to one (by up to 2e-2 on the test
run) and moved the task probabilities further from the float model; kept float, every level sums to 1 within 1e-7
and equals ``training_probs @ matrix`` exactly as in the float file.

The manifest is ``metadata_props["derm_manifest"]`` (plus ``derm_labels_<output>``, a JSON list, per output), which
onnxruntime alone reads back (``InferenceSession.get_modelmeta().custom_metadata_map``): the SDK needs no ``onnx``.

This module converts, adds the metadata and writes; the int8 quantization lives in :mod:`derm.exporter.onnx_quantize`
and the structural check of a written file in :mod:`derm.exporter.onnx_check` (both importable from here too).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from derm._util import atomic_write
from derm.exporter.graph import ExportError, OutputSpec
from derm.exporter.manifest import DISCLAIMER, LABELS_KEY, manifest_json, read_embedded
from derm.exporter.onnx_check import check_structure, expected_matrix
from derm.exporter.onnx_quantize import (
    POOLING_OPS,
    float_after_logits,
    float_head,
    quantize_int8,
    quantize_static_file,
    shared_concat_ranges,
)
from derm.exporter.onnx_quantize import quiet_loggers as _quiet
from derm.manifest import MANIFEST_KEY
from derm.runtimes import ONNXRuntime

__all__ = [  # the target interface (derm.exporter.targets) and the names moved to the two modules above
    "OPSET",
    "POOLING_OPS",
    "PRODUCER",
    "QUANTIZATIONS",
    "add_metadata",
    "check_structure",
    "convert",
    "expected_matrix",
    "float_after_logits",
    "float_head",
    "open_runner",
    "quantize_int8",
    "quantize_static_file",
    "read_manifest",
    "read_metadata",
    "shared_concat_ranges",
    "to_onnx",
    "write",
]

QUANTIZATIONS = ("fp32", "int8")
OPSET = 17
PRODUCER = "derm-exporter"


def convert(export_model: Any, quantize: str = "fp32", calibration: np.ndarray | None = None) -> bytes:
    """Convert a :func:`derm.exporter.graph.build_export_model` model; ``calibration`` (n, s, s, 3) uint8 for int8."""
    if quantize not in QUANTIZATIONS:
        raise ExportError(f"Unknown ONNX quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}.")
    if quantize == "int8" and (calibration is None or len(calibration) == 0):
        raise ExportError("ONNX int8 quantization needs calibration images (--calibration CSV).")
    buf = to_onnx(export_model)
    if quantize == "int8":
        buf = quantize_int8(buf, calibration)
    return buf


def to_onnx(export_model: Any) -> bytes:
    """The float32 ONNX graph: input ``image`` uint8 (batch, s, s, 3), one output per dict key, in the model's order."""
    import onnx
    import tensorflow as tf
    import tf2onnx

    size = int(export_model.input_shape[1])
    signature = (tf.TensorSpec((None, size, size, 3), tf.uint8, name="image"),)
    # tf2onnx reports each rewriter pass on stdout; keep the CLI's output clean.
    with contextlib.redirect_stdout(io.StringIO()), _quiet("tf2onnx"):
        proto, _ = tf2onnx.convert.from_keras(export_model, input_signature=signature, opset=OPSET)
    wanted = list(export_model.output) if isinstance(export_model.output, dict) else list(export_model.output_names)
    _name_outputs(proto, wanted)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _name_outputs(proto: Any, wanted: Sequence[str]) -> None:
    """Make the graph outputs exactly ``wanted``, in that order (tf2onnx names them after the dict keys already; a
    ``:0`` tensor suffix is the one difference other versions made, and is renamed away)."""
    outputs = {o.name: o for o in proto.graph.output}
    for name in list(outputs):
        base = name.split(":")[0]
        if name not in wanted and base in wanted and base not in outputs:
            _rename_tensor(proto.graph, name, base)
            outputs[base] = outputs.pop(name)
    if set(outputs) != set(wanted):
        raise ExportError(f"The ONNX graph's outputs {sorted(outputs)} are not the export graph's {sorted(wanted)}.")
    ordered = [outputs[n] for n in wanted]
    for o in ordered:
        proto.graph.output.remove(o)
    proto.graph.output.extend(ordered)


def _rename_tensor(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for value in list(graph.output) + list(graph.value_info):
        if value.name == old:
            value.name = new


def add_metadata(model: bytes, manifest: Mapping[str, Any], specs: Sequence[OutputSpec]) -> bytes:
    """The model with the manifest, the labels of each output, a producer and a description (with the disclaimer)."""
    import onnx

    proto = onnx.load_from_string(model)
    names = {o.name for o in proto.graph.output}
    if names != {s.name for s in specs}:
        raise ExportError(
            f"The ONNX outputs {sorted(names)} are not the export graph's {sorted(s.name for s in specs)}."
        )
    props = {MANIFEST_KEY: manifest_json(manifest)}
    props.update({LABELS_KEY.format(s.name): json.dumps(list(s.labels), ensure_ascii=False) for s in specs})
    onnx.helper.set_model_props(proto, props)
    proto.producer_name = PRODUCER
    proto.producer_version = str(manifest.get("versions", {}).get("derm", ""))
    proto.doc_string = (
        f"Skin-lesion classifier after Esteva et al. 2017. {DISCLAIMER} "
        f"Labels, levels, tasks and operating points: metadata_props['{MANIFEST_KEY}'] (JSON)."
    )
    size = manifest["input"]["shape"][1]
    for inp in proto.graph.input:
        if inp.name == "image":
            inp.doc_string = f"RGB image, uint8 0..255, NHWC, resized to {size}x{size} by the app; scaling is inside."
    described = {o["name"]: o.get("description", "") for o in manifest.get("outputs", [])}
    for out in proto.graph.output:
        out.doc_string = described.get(out.name, "")
    return proto.SerializeToString()


def write(
    export_model: Any,
    path: str | os.PathLike[str],
    quantize: str,
    calibration: np.ndarray | None,
    manifest: Mapping[str, Any],
    specs: Sequence[OutputSpec],
    converted: bytes | None = None,
) -> None:
    """Convert (or take ``converted``), add the metadata, write atomically."""
    from derm.manifest import ONNX_DIGEST_PLACEHOLDER, onnx_file_digest

    buf = converted if converted is not None else convert(export_model, quantize, calibration)
    if isinstance(manifest, dict):  # the SDK checks it on load: damage never gives an answer
        manifest["integrity"] = {
            "file_sha256": ONNX_DIGEST_PLACEHOLDER,
            "scope": "the whole .onnx file, read with this value as 64 zeros (it cannot hold its own digest)",
        }
    buf = add_metadata(buf, manifest, specs)
    if isinstance(manifest, dict):
        placeholder = ONNX_DIGEST_PLACEHOLDER.encode()
        if buf.count(placeholder) != 1:
            raise ExportError("The ONNX file's digest placeholder is not unique in the file; it was not written.")
        digest = onnx_file_digest(buf, ONNX_DIGEST_PLACEHOLDER)
        buf = buf.replace(placeholder, digest.encode())
        manifest["integrity"]["file_sha256"] = digest
    with atomic_write(path, "wb") as f:
        f.write(buf)


def open_runner(path: str | os.PathLike[str], threads: int | None = None) -> ONNXRuntime:
    """The SDK's runtime for the file: parity is measured through the code users run."""
    return ONNXRuntime(path, threads)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """Every ``metadata_props`` entry, read with onnxruntime alone (no ``onnx`` package needed)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only the metadata is wanted
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
        raise ExportError(f"{str(path)!r} is not an ONNX model onnxruntime can open: {exc}") from exc
    return dict(session.get_modelmeta().custom_metadata_map)


read_manifest = read_embedded  # the SDK's reader: one for every target
