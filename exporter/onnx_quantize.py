"""ONNX static int8 quantization (onnxruntime's QDQ format) of a float32 file from :func:`derm.exporter.onnx.to_onnx`.

Weights per channel (int8), activations uint8 with min/max ranges from real calibration images; the inputs of each
concatenation share its range, and the classifier's head (or, without global pooling, everything after the logits)
stays float (see the module docstring of :mod:`derm.exporter.onnx` for why).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from derm.exporter.graph import ExportError, downstream


@contextlib.contextmanager
def quiet_loggers(*loggers: str) -> Iterator[None]:
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
    with tempfile.TemporaryDirectory() as tmp, quiet_loggers("onnxruntime"):
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
