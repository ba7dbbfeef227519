"""ONNX conversion of the export graph: float32 (tf2onnx, opset 17) and static int8 (onnxruntime's QDQ quantization).

int8 quantizes weights per channel and activations with ranges from real calibration images (min/max); the input
stays uint8 (the image as the app has it) and the outputs float32. The frozen aggregation after the training
softmax (the level matmuls, each task's select-matmul/softmax/matmul) and that softmax itself stay float: they are a
few multiply-adds, and quantizing them made the level probabilities stop summing to one (by up to 2e-2 on the test
run) and moved the task probabilities further from the float model; kept float, every level sums to 1 within 1e-7
and equals ``training_probs @ matrix`` exactly as in the float file.

The manifest is ``metadata_props["derm_manifest"]`` (plus ``derm_labels_<output>``, a JSON list, per output), which
onnxruntime alone reads back (``InferenceSession.get_modelmeta().custom_metadata_map``): the SDK needs no ``onnx``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from derm._util import atomic_write
from derm.exporter.graph import ExportError, OutputSpec, downstream
from derm.exporter.manifest import DISCLAIMER, LABELS_KEY, manifest_json, metadata_problems, read_embedded
from derm.manifest import MANIFEST_KEY
from derm.runtimes import ONNXRuntime

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


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Raise these loggers to WARNING for one call: tf2onnx and onnxruntime's quantizer report every pass at INFO,
    which is noise in ``derm-export``'s log; warnings and errors still show."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


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


class _Calibration:
    """onnxruntime's calibration data reader over uint8 (or float) images, one image per batch.

    ``set_range`` lets onnxruntime calibrate a slice at a time (``CalibStridedMinMax``): it keeps every intermediate
    tensor of the images it is given, which for a few hundred 299x299 images would not fit in memory.
    """

    def __init__(self, images: np.ndarray, input_name: str):
        self.images, self.input_name = images, input_name
        self.set_range(0, len(images))

    def __len__(self) -> int:
        return len(self.images)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next = iter(range(start_index, end_index))

    def get_next(self) -> dict[str, np.ndarray] | None:
        i = next(self._next, None)
        return None if i is None else {self.input_name: self.images[i : i + 1]}


POOLING_OPS = ("GlobalAveragePool", "ReduceMean")


def float_head(model: Any) -> list[str]:
    """Names of the classifier head's nodes: every global average pooling and every node downstream of one (feature
    concatenation, logits, softmax, aggregation). Kept float in int8 files, as in TFLite (see
    :func:`derm.exporter.tflite._int8_float_head`): under 0.1% of the compute, and their int8 version rounds the
    pooled features and the logits coarsely. Empty where the graph has no global pooling."""
    head = downstream(  # ONNX keeps its nodes in topological order
        model.graph.node, lambda n: n.op_type in POOLING_OPS, lambda n: n.input, lambda n: n.output
    )
    return [node.name for node in head]


def float_after_logits(model: Any) -> list[str]:
    """Names of the nodes that compute the outputs from the logits: the training softmax and the whole aggregation.

    Walks back from every graph output and stops at the input of the node that makes ``training_probs`` (the
    logits). Empty where the graph has no ``training_probs`` output (e.g. a plain classifier).
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    probs = producer.get("training_probs")
    while probs is not None and probs.op_type == "Identity":
        probs = producer.get(probs.input[0])
    if probs is None or probs.op_type != "Softmax":
        return []
    logits = probs.input[0]
    found: dict[str, Any] = {}
    todo = [o.name for o in model.graph.output]
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in found or logits in node.output:
            continue
        found[node.name] = node
        todo.extend(node.input)
    return list(found)


def quantize_static_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    calibration: np.ndarray,
    nodes_to_exclude: Sequence[str] | None = None,
) -> None:
    """Static int8 QDQ quantization of the ONNX file ``src`` into ``dst``: weights per channel (int8), activations
    uint8 with min/max ranges over ``calibration`` (cast to the model input's dtype), the inputs of each concatenation
    sharing its range (:func:`shared_concat_ranges`).

    ``nodes_to_exclude`` default: :func:`float_head` of the pre-processed graph (else :func:`float_after_logits`).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibration is None or len(calibration) == 0:
        raise ExportError("ONNX int8 quantization needs calibration images (--calibration CSV).")
    with tempfile.TemporaryDirectory() as tmp, _quiet("onnxruntime"):
        pre = Path(tmp) / "pre.onnx"
        # shape inference and graph clean-up first, as onnxruntime recommends (it warns without)
        quant_pre_process(str(src), str(pre))
        model = onnx.load(str(pre), load_external_data=False)
        (inp,) = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        images = np.asarray(calibration).astype(dtype, copy=False)
        exclude = (
            list(nodes_to_exclude) if nodes_to_exclude is not None else float_head(model) or float_after_logits(model)
        )
        overrides = shared_concat_ranges(model, images, inp.name)
        del model
        quantize_static(
            str(pre),
            str(dst),
            _Calibration(images, inp.name),  # type: ignore[arg-type]  # duck-typed CalibrationDataReader
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=exclude,
            extra_options={"CalibStridedMinMax": _stride(len(images)), "TensorQuantOverrides": overrides},
        )


def shared_concat_ranges(model: Any, images: np.ndarray, input_name: str, batch: int = 10) -> dict[str, Any]:
    """onnxruntime's ``TensorQuantOverrides`` that give every ReLU (or nested concatenation) feeding a Concat the
    range of the outermost concatenation it feeds, measured on ``images`` with the float graph.

    onnxruntime quantizes a Concat's inputs each with its own range, then requantizes them all to the output's scale:
    a second rounding at every Inception block (TFLite's int8 spec shares one scale instead). With the shared range the
    inputs are already on the output's grid; it also is what activation equalization (derm.exporter.equalize) assumes.
    """
    import onnx
    import onnxruntime as ort

    producer = {out: node for node in model.graph.node for out in node.output}
    users: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)

    def outermost(tensor: str) -> str:
        only = users.get(tensor, [])
        return outermost(only[0].output[0]) if len(only) == 1 and only[0].op_type == "Concat" else tensor

    def sources(tensor: str) -> list[str]:  # the tensor, and back through layout ops (tf2onnx's Transposes)
        node = producer.get(tensor)
        if node is not None and node.op_type in ("Transpose", "Reshape", "Squeeze", "Unsqueeze"):
            return [tensor, *sources(node.input[0])]
        return [tensor] if node is not None and node.op_type in ("Relu", "Concat") else []

    concats = [node for node in model.graph.node if node.op_type == "Concat"]
    shared = {
        s: outermost(node.output[0]) for node in concats for t in [*node.input, node.output[0]] for s in sources(t)
    }
    if not shared:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    tops = sorted(set(shared.values()))
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(
        onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tops if t not in known
    )
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    lo, hi = dict.fromkeys(tops, 0.0), dict.fromkeys(tops, 0.0)  # int8 ranges must contain 0
    for i in range(0, len(images), batch):
        for t, out in zip(tops, session.run(tops, {input_name: images[i : i + batch]}), strict=True):
            lo[t], hi[t] = min(lo[t], float(out.min())), max(hi[t], float(out.max()))
    return {t: [{"rmin": np.float32(lo[top]), "rmax": np.float32(hi[top])}] for t, top in shared.items()}


def _stride(n: int, most: int = 16) -> int:
    """The largest slice size up to ``most`` that divides ``n`` (onnxruntime needs the slices to tile the set)."""
    return max(d for d in range(1, min(n, most) + 1) if n % d == 0)


def quantize_int8(fp32: bytes, calibration: np.ndarray) -> bytes:
    """The int8 QDQ file of a float32 file from :func:`to_onnx` (see :func:`quantize_static_file`)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        quantize_static_file(src, dst, np.asarray(calibration, dtype=np.uint8))
        return dst.read_bytes()


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
    problems = []

    inputs = [i for i in graph.input if i.name not in inits]
    if [i.name for i in inputs] != ["image"]:
        problems.append(f"inputs are {[i.name for i in inputs]}, expected ['image']")
    else:
        t = inputs[0].type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if (
            t.elem_type != onnx.TensorProto.UINT8
            or len(dims) != 4
            or dims[1:] != [size, size, 3]
            or dims[0] not in (None, 1)
        ):
            kind = onnx.TensorProto.DataType.Name(t.elem_type).lower()
            problems.append(f"input is {kind} {dims}, expected uint8 [batch, {size}, {size}, 3]")

    outputs = {o.name: o for o in graph.output}
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

    meta = {p.key: p.value for p in model.metadata_props}
    problems += metadata_problems(meta, manifest, specs, "metadata_props")

    producer = {out: node for node in graph.node for out in node.output}
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
