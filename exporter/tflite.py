"""TFLite conversion of the export graph: float32, float16 weights, dynamic range, full-integer int8.

Full-integer int8 quantizes every op with ranges from a representative set of real calibration images; the input
stays uint8 (the image as the app has it) and the float outputs stay float32 so probabilities keep their meaning.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from derm._util import atomic_write
from derm.exporter._metadata_version import ensure_registered
from derm.exporter.graph import ExportError, OutputSpec, downstream
from derm.exporter.manifest import DISCLAIMER, manifest_json, read_embedded
from derm.manifest import MANIFEST_FILE
from derm.runtimes import TFLiteRuntime

QUANTIZATIONS = ("fp32", "fp16", "dynamic", "int8")


def convert(
    export_model: Any, quantize: str = "fp32", calibration: np.ndarray | None = None, float_head: bool = True
) -> bytes:
    """Convert a :func:`derm.exporter.graph.build_export_model` model; ``calibration`` (n, s, s, 3) uint8 for int8.

    int8 with ``float_head`` (the default) keeps the classifier head in float32 (see :func:`_int8_float_head`).
    """
    import tensorflow as tf

    if quantize not in QUANTIZATIONS:
        raise ExportError(f"Unknown TFLite quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}.")
    conv = tf.lite.TFLiteConverter.from_keras_model(export_model)
    if quantize == "fp16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif quantize == "dynamic":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    elif quantize == "int8":
        if calibration is None or len(calibration) == 0:
            raise ExportError("int8 quantization needs calibration images (--calibration CSV).")
        cal = np.asarray(calibration, dtype=np.uint8)

        def representative():
            for i in range(len(cal)):
                yield {"image": cal[i : i + 1]}

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = representative
        # the graph's input is uint8 already and its outputs float32: no input/output type override needed
        if float_head:
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
            with _quiet_converter():
                return _int8_float_head(conv, cal[:1])
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with _quiet_converter():
        return conv.convert()


@contextlib.contextmanager
def _quiet_converter() -> Iterator[None]:
    # Keras' export (which the converter calls) prints every captured variable to stdout: keep the CLI's output clean.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        # int8: the uint8 image input feeds a Cast, so the converter finds no input statistics to record and says so;
        # raw pixels need none (they are exact integers), so that one message is noise.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        # int8 calibration runs TensorFlow's own (deprecated) tf.lite.Interpreter inside the converter
        warnings.filterwarnings("ignore", message=r"\s*Warning: tf.lite.Interpreter is deprecated")
        yield


def head_nodes(calibrated: bytes) -> list[str]:
    """Output tensor names of the classifier head of a calibrated (float, statistics-carrying) model: the global
    average pooling (MEAN) ops and every op downstream of them (features, logits, softmax, aggregation matmuls)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=calibrated)
    names = {t["index"]: t["name"] for t in interp.get_tensor_details()}
    head = downstream(
        interp._get_ops_details(),  # execution order: producers before consumers
        lambda op: op["op_name"] == "MEAN",
        lambda op: [int(i) for i in op["inputs"]],
        lambda op: [int(i) for i in op["outputs"]],
    )
    return [names[int(i)] for op in head for i in op["outputs"]]


def _int8_float_head(conv: Any, sample: np.ndarray) -> bytes:
    """Full-integer int8 backbone, float32 head (pooling onward).

    The head is under 0.1% of the compute, but its int8 version rounds the pooled features onto one shared range and
    the logits onto steps of ~0.1 before the softmax: on the exporter benchmark's model that alone flips 1.2% of the
    9-way predictions. TFLite's quantizer takes a list of nodes to leave in float; TensorFlow exposes it through the
    quantization debugger, which calibrates once and then quantizes with that list.
    """
    import tensorflow as tf

    debugger = tf.lite.experimental.QuantizationDebugger(converter=conv, debug_dataset=lambda: iter([[sample]]))
    nodes = head_nodes(debugger.calibrated_model)
    if nodes:  # none without global pooling: nothing to keep in float
        debugger.options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=nodes)
    return debugger.get_nondebug_quantized_model()


def output_order(model: bytes) -> list[str]:
    """Signature output names in the order of the subgraph's output tensors (the order metadata is written in)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=model)
    by_index = {d["index"]: name for name, d in interp.get_signature_runner().get_output_details().items()}
    return [by_index[d["index"]] for d in interp.get_output_details()]


def add_metadata(model: bytes, manifest: Mapping[str, Any], specs: Sequence[OutputSpec]) -> bytes:
    """The model with standard TFLite metadata (image input, one classification head per output, each with its label
    file) and the manifest as the associated file ``manifest.json``.

    The standard part is what MediaPipe Tasks' ImageClassifier and Android Studio's model binding read; the
    manifest is the whole description (levels, tasks, operating points, provenance). Written with MediaPipe's
    metadata writers (tflite-support's need protobuf<4).
    """
    ensure_registered()
    from mediapipe.tasks.python.metadata.metadata_writers import metadata_writer as mw

    writer_class = _manifest_writer_class(manifest)
    by_name = {s.name: s for s in specs}
    order = output_order(model)
    if set(order) != set(by_name):
        raise ExportError(f"The TFLite outputs {sorted(order)} are not the export graph's {sorted(by_name)}.")
    size = manifest["input"]["shape"][1]
    writer = writer_class.create(bytearray(model))
    writer.add_image_input(
        norm_mean=[0.0],
        norm_std=[1.0],
        color_space_type=mw.metadata_fb.ColorSpaceType.RGB,
        name="image",
        description=f"RGB image, uint8 0..255, resized to {size}x{size} by the app; scaling is inside the model.",
    )
    for name in order:
        spec = by_name[name]
        described = next(o for o in manifest["outputs"] if o["name"] == name)
        writer.add_classification_output(
            mw.Labels().add(list(spec.labels), exported_filename=f"labels_{name}.txt"),
            name=name,
            description=described["description"],
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, MANIFEST_FILE)
        Path(path).write_text(manifest_json(manifest), encoding="utf-8")
        writer.add_manifest(path)
        content, _ = writer.populate()
        del writer  # its temporary folder goes now, not at interpreter exit
    return bytes(content)


def _manifest_writer_class(manifest: Mapping[str, Any]) -> Any:
    """MediaPipe's metadata writer class with the general metadata naming the model and ``add_manifest``, which
    attaches the manifest as the associated file ``manifest.json``."""
    from mediapipe.tasks.python.metadata.metadata_writers import metadata_info as mi
    from mediapipe.tasks.python.metadata.metadata_writers import metadata_writer as mw

    class General(mi.GeneralMd):
        def create_metadata(self) -> Any:
            md = super().create_metadata()
            manifest_file = mw.metadata_fb.AssociatedFileT()
            manifest_file.name = MANIFEST_FILE
            manifest_file.description = "The derm manifest (JSON): labels, levels, tasks, operating points, provenance."
            manifest_file.type = mw.metadata_fb.AssociatedFileType.DESCRIPTIONS
            md.associatedFiles = [manifest_file]
            return md

    class Writer(mw.MetadataWriter):
        def add_manifest(self, path: str) -> None:
            self._general_md = General(
                name="derm-classifier",
                version=str(manifest["versions"].get("derm", "")),
                description=f"Skin-lesion classifier after Esteva et al. 2017. {DISCLAIMER}",
                author="derm-toolchain",
                licenses="Apache-2.0 (code); the weights inherit the terms of their training data",
            )
            self._associated_files.append(path)

    return Writer


def write(
    export_model: Any,
    path: str | os.PathLike[str],
    quantize: str,
    calibration: np.ndarray | None,
    manifest: Mapping[str, Any],
    specs: Sequence[OutputSpec],
    converted: bytes | None = None,
    float_head: bool = True,
) -> None:
    """Convert (or take ``converted``, e.g. from quantization-aware training), add the metadata, write atomically."""
    from derm.manifest import tflite_weights_digest

    buf = converted if converted is not None else convert(export_model, quantize, calibration, float_head)
    digest = tflite_weights_digest(buf)
    if isinstance(manifest, dict) and digest is not None:  # the SDK checks it on load: damage never gives an answer
        manifest["integrity"] = {
            "weights_sha256": digest,
            "scope": "every buffer a tensor reads (weights, biases, constants), in buffer order, with index and length",
        }
    buf = add_metadata(buf, manifest, specs)
    if digest is not None and tflite_weights_digest(buf) != digest:
        raise ExportError("Adding the TFLite metadata changed the model's tensor buffers; the file was not written.")
    with atomic_write(path, "wb") as f:
        f.write(buf)


def open_runner(path: str | os.PathLike[str], threads: int | None = None) -> TFLiteRuntime:
    """The SDK's runtime for the file: parity is measured through the code users run."""
    return TFLiteRuntime(path, threads)


read_manifest = read_embedded  # the SDK's reader: one for every target


def check_structure(
    path: str | os.PathLike[str], specs: Sequence[OutputSpec], manifest: Mapping[str, Any]
) -> list[str]:
    """Input, outputs, label files and manifest of a written .tflite file, checked without running it."""
    ensure_registered()
    from mediapipe.tasks.python.metadata.metadata import MetadataDisplayer

    runner = TFLiteRuntime(path)
    inp = runner.interpreter.get_input_details()[0]
    size = manifest["input"]["shape"][1]
    problems = []
    if inp["dtype"] != np.uint8 or list(inp["shape"]) != [1, size, size, 3]:
        problems.append(f"input is {inp['dtype'].__name__} {list(inp['shape'])}, expected uint8 [1, {size}, {size}, 3]")
    details = runner.runner.get_output_details()
    for s in specs:
        if s.name not in details:
            problems.append(f"output {s.name!r} missing")
        elif int(details[s.name]["shape"][-1]) != len(s.labels):
            problems.append(f"output {s.name!r} has {details[s.name]['shape'][-1]} columns, expected {len(s.labels)}")
    displayer = MetadataDisplayer.with_model_file(str(path))
    files = set(displayer.get_packed_associated_file_list())
    wanted = {f"labels_{s.name}.txt" for s in specs} | {MANIFEST_FILE}
    if not wanted <= files:
        problems.append(f"metadata lacks {sorted(wanted - files)}")
    for s in specs:
        name = f"labels_{s.name}.txt"
        if name in files and displayer.get_associated_file_buffer(name).decode("utf-8").splitlines() != list(s.labels):
            problems.append(f"{name} does not list the output's labels")
    if MANIFEST_FILE in files and read_manifest(path) != json.loads(manifest_json(manifest)):
        problems.append("the embedded manifest differs from the one written")
    if problems:
        raise ExportError(f"{str(path)!r} failed its structural checks: " + "; ".join(problems))
    return [
        f"input uint8 [1, {size}, {size}, 3]",
        f"{len(specs)} named outputs with their widths",
        "standard TFLite metadata: image input, a classification head and label file per output",
        "manifest.json embedded and equal",
    ]
