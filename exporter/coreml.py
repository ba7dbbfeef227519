"""Core ML conversion of the export graph: an ML program (``.mlpackage`` directory) for iOS 16 / macOS 13 and later.

- ``fp16``: float16 weights and computation (``compute_precision=FLOAT16``);
- ``int8``: the same program with every conv weight linearly quantized to int8, symmetric, per output channel
  (``ct.optimize.coreml.linear_quantize_weights``); activations stay float16. Small weights (fewer than 2048
  values: the aggregation matrices among them) stay float16, so the levels stay exact sums.

The input is a Core ML *image* (``ImageType`` RGB, scale 1, bias 0: the app passes a ``CVPixelBuffer``/``CGImage``
of s x s pixels, Vision can feed it, and the model scales pixels itself). coremltools accepts an ``ImageType`` on the
export graph's uint8 input, but iOS 16 programs have no uint8 I/O, so it puts an *int32* program tensor behind the
image; Core ML hands image pixels to a program as float (fp32; fp16 only for ``GRAYSCALE_FLOAT16``), the same rule
that makes it refuse non-float image outputs (coremltools issue #2380), and an int32 image input could not be compiled
here to prove otherwise (no macOS). So the converted graph is the same export graph re-applied to a float32
``image`` input (the same layer objects, so the same weights; the uint8 -> float32 cast becomes a no-op): pixel values
0..255 reach the classifier exactly as in the uint8 graph, and :func:`check_structure` checks the program input is
float32. Outputs are float32 arrays (1, width), named like every other target's.

Labels live in the metadata, not in a Core ML classifier: ``ct.ClassifierConfig`` replaces one output by a class
label string and a dictionary, and coremltools 9 cannot build a classifier for a multi-output program (its
``get_func_output`` fails with an IndexError). ``user_defined_metadata`` holds the manifest (``derm_manifest``) and
each output's labels (``derm_labels_<output>``, a JSON list); each output's description lists its labels too.

Predictions need macOS: elsewhere :func:`open_runner` raises :class:`~derm.runtimes.RuntimeUnavailable` and the
file is checked for structure only (:func:`check_structure`, without compiling it).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from derm.exporter.graph import ExportError, OutputSpec
from derm.exporter.manifest import DISCLAIMER, LABELS_KEY, manifest_json, metadata_problems, read_embedded
from derm.manifest import MANIFEST_KEY
from derm.runtimes import CoreMLRuntime

QUANTIZATIONS = ("fp16", "int8")
AUTHOR = "derm-toolchain"
LICENSE = "Apache-2.0 (code); the weights inherit the terms of their training data"
_WEIGHT_OPS = ("conv", "conv_transpose", "linear")  # ops whose weights carry the model (checked for precision)
_COMPRESSED = ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale")  # iOS16 / iOS18 int8 weights


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """coremltools' expected noise, silenced for one call.

    - it drops the temporary directory of each conversion / compression without closing it, so Python warns
      "Implicitly cleaning up <TemporaryDirectory ...>" (a ResourceWarning the package cannot avoid);
    - on import it logs that scikit-learn and TensorFlow are newer than it has tested and that its native
      ``libcoremlpython`` (macOS only) is missing; the conversion here is tested (tests/test_export_onnx_coreml.py);
    - it prints a progress bar per pass on stderr.
    """
    log = logging.getLogger("coremltools")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.filterwarnings("ignore", message="Implicitly cleaning up", category=ResourceWarning)
            yield
    finally:
        log.setLevel(level)


def _ct() -> Any:
    with _quiet():
        import coremltools as ct
    return ct


def convert(export_model: Any, quantize: str = "fp16") -> Any:
    """Convert a :func:`derm.exporter.graph.build_export_model` model into a Core ML ``MLModel`` (ML program)."""
    if quantize not in QUANTIZATIONS:
        raise ExportError(f"Unknown Core ML quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}.")
    import keras
    import tensorflow as tf

    ct = _ct()
    size = int(export_model.input_shape[1])
    # The export graph on a float32 input (see the module docstring): the same layers, so the same weights.
    image = keras.Input(shape=(size, size, 3), dtype="float32", name="image")
    float_model = keras.models.clone_model(export_model, input_tensors=image, clone_function=lambda layer: layer)
    # A concrete function of the Keras model rather than the model object: its structured outputs say which graph
    # tensor ("Identity_3") is which named output, so the Core ML outputs can be renamed without guessing.
    fn = tf.function(lambda x: float_model(x, training=False))
    concrete = fn.get_concrete_function(tf.TensorSpec((1, size, size, 3), tf.float32, name="image"))
    tensors = {key: t.name.split(":")[0] for key, t in concrete.structured_outputs.items()}
    with _quiet():
        mlmodel = ct.convert(
            [concrete],
            source="tensorflow",
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS16,
            inputs=[
                ct.ImageType(
                    name="image",
                    shape=(1, size, size, 3),
                    color_layout=ct.colorlayout.RGB,
                    scale=1.0,
                    bias=[0.0, 0.0, 0.0],
                    channel_first=False,
                )
            ],
            outputs=[ct.TensorType(name=t, dtype=np.float32) for t in tensors.values()],
            compute_precision=ct.precision.FLOAT16,
        )
        spec = mlmodel.get_spec()
        for key, tensor in tensors.items():
            ct.utils.rename_feature(spec, tensor, key, rename_inputs=False)
        mlmodel = ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)
        if quantize == "int8":
            mlmodel = quantize_int8(mlmodel)
    return mlmodel


def quantize_int8(mlmodel: Any) -> Any:
    """int8 weights (linear symmetric, per output channel) for every weight of 2048 values or more that coremltools
    compresses: every convolution's. coremltools 9 leaves the logits ``linear`` weight (2048 x classes) float16."""
    ct = _ct()
    op = ct.optimize.coreml.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
    with _quiet():
        return ct.optimize.coreml.linear_quantize_weights(
            mlmodel, config=ct.optimize.coreml.OptimizationConfig(global_config=op)
        )


def add_metadata(mlmodel: Any, manifest: Mapping[str, Any], specs: Sequence[OutputSpec]) -> None:
    """Description, author, version, licence, the manifest and each output's labels, in place."""
    names = {o.name for o in mlmodel.get_spec().description.output}
    if names != {s.name for s in specs}:
        raise ExportError(
            f"The Core ML outputs {sorted(names)} are not the export graph's {sorted(s.name for s in specs)}."
        )
    size = manifest["input"]["shape"][1]
    mlmodel.short_description = (
        f"Skin-lesion classifier after Esteva et al. 2017. {DISCLAIMER} "
        f"Labels, levels, tasks and operating points: user-defined metadata '{MANIFEST_KEY}' (JSON)."
    )
    mlmodel.author = AUTHOR
    mlmodel.license = LICENSE
    mlmodel.version = str(manifest.get("versions", {}).get("derm", ""))
    mlmodel.user_defined_metadata[MANIFEST_KEY] = manifest_json(manifest)
    for s in specs:
        mlmodel.user_defined_metadata[LABELS_KEY.format(s.name)] = json.dumps(list(s.labels), ensure_ascii=False)
    mlmodel.input_description["image"] = (
        f"RGB image of {size}x{size} pixels (the app resizes; pixel values 0..255, scaling is inside the model)."
    )
    described = {o["name"]: o.get("description", "") for o in manifest.get("outputs", [])}
    for s in specs:
        mlmodel.output_description[s.name] = f"{described.get(s.name, '')}; columns: {', '.join(s.labels)}"


def write(
    export_model: Any,
    path: str | os.PathLike[str],
    quantize: str,
    calibration: np.ndarray | None,
    manifest: Mapping[str, Any],
    specs: Sequence[OutputSpec],
    converted: Any = None,
) -> None:
    """Convert (or take ``converted``, an ``MLModel``), add the metadata and save the ``.mlpackage`` atomically: into a
    temporary directory beside ``path``, then renamed onto it. ``path`` must not exist. ``calibration`` is unused
    (Core ML int8 here quantizes weights only)."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise ExportError(f"{str(path)!r} exists; remove it first (derm-export --overwrite does).")
    mlmodel = converted if converted is not None else convert(export_model, quantize)
    add_metadata(mlmodel, manifest, specs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        package = tmp / "model.mlpackage"  # MLModel.save wants the .mlpackage suffix
        with _quiet():
            mlmodel.save(str(package))
        os.replace(package, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_runner(path: str | os.PathLike[str], threads: int | None = None) -> CoreMLRuntime:
    """The SDK's runtime for the package (macOS only; elsewhere :class:`~derm.runtimes.RuntimeUnavailable`)."""
    return CoreMLRuntime(path, threads)


def _load_spec(path: str | os.PathLike[str]) -> Any:
    path = Path(path)
    if not (path / "Manifest.json").is_file():
        raise ExportError(f"{str(path)!r} is not a Core ML package (.mlpackage directory with a Manifest.json).")
    ct = _ct()
    try:
        with _quiet():
            return ct.utils.load_spec(str(path))
    except Exception as exc:  # coremltools raises plain Exceptions for unreadable packages
        raise ExportError(f"{str(path)!r} cannot be read as a Core ML package: {exc}") from exc


read_manifest = read_embedded  # the SDK's reader: one for every target


def expected_matrix(spec: OutputSpec) -> np.ndarray:
    from derm.exporter.onnx import expected_matrix as same  # one definition for both targets

    return same(spec)


def _dtype(ct: Any, value_type: Any) -> str:
    return ct.proto.MIL_pb2.DataType.Name(value_type.tensorType.dataType)


def check_structure(
    path: str | os.PathLike[str], specs: Sequence[OutputSpec], manifest: Mapping[str, Any]
) -> list[str]:
    """Input, outputs, metadata, the baked-in aggregation and the weight precision of a written ``.mlpackage``,
    checked from its spec and weights without compiling it (works off macOS)."""
    ct = _ct()
    spec = _load_spec(path)
    size = manifest["input"]["shape"][1]
    quantize = manifest.get("export", {}).get("quantize")
    if spec.WhichOneof("Type") != "mlProgram":
        raise ExportError(f"{str(path)!r} is a Core ML {spec.WhichOneof('Type')}, not an ML program.")
    main = spec.mlProgram.functions["main"]
    block = main.block_specializations[main.opset]
    outputs = {o.name: o for o in spec.description.output}
    producer = {o.name: op for op in block.operations for o in op.outputs}
    problems = _input_problems(ct, spec, main, size)
    problems += _output_problems(ct, outputs, specs)
    problems += metadata_problems(spec.description.metadata.userDefined, manifest, specs, "user-defined metadata")
    problems += _aggregation_problems(ct, path, producer, outputs, specs)
    kinds = _weight_kinds(ct, block, producer)
    problems += _precision_problems(kinds, block, quantize)
    if problems:
        raise ExportError(f"{str(path)!r} failed its structural checks: " + "; ".join(problems))
    summary = ", ".join(f"{n} {k.lower()}" for k, n in sorted(kinds.items()))
    return [
        f"input 'image': RGB image {size}x{size} (float program input)",
        f"{len(specs)} named float32 outputs with their widths",
        f"user-defined metadata: {MANIFEST_KEY} equal, labels of each output",
        f"{sum(s.kind != 'training' for s in specs)} aggregation matmuls hold their matrices",
        f"ML program ({main.opset}), weights: {summary}",
    ]


def _input_problems(ct: Any, spec: Any, main: Any, size: int) -> list[str]:
    """One input, ``image``: an RGB image of the manifest's size, a float32 tensor in the program."""
    inputs = list(spec.description.input)
    if [i.name for i in inputs] != ["image"]:
        return [f"inputs are {[i.name for i in inputs]}, expected ['image']"]
    problems = []
    kind = inputs[0].type.WhichOneof("Type")
    img = inputs[0].type.imageType
    color = ct.proto.FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(img.colorSpace)
    if kind != "imageType" or (img.width, img.height, color) != (size, size, "RGB"):
        problems.append(f"input is {kind} {img.width}x{img.height} {color}, expected an RGB image {size}x{size}")
    (program_input,) = [i for i in main.inputs if i.name == "image"] or [None]
    if program_input is None or _dtype(ct, program_input.type) != "FLOAT32":
        problems.append("the program's image input is not float32 (Core ML compiles image inputs only to float)")
    return problems


def _output_problems(ct: Any, outputs: Mapping[str, Any], specs: Sequence[OutputSpec]) -> list[str]:
    """Every spec's output present, float32, one value per label; no other outputs."""
    problems = []
    for s in specs:
        if s.name not in outputs:
            problems.append(f"output {s.name!r} missing")
            continue
        array = outputs[s.name].type.multiArrayType
        if list(array.shape)[-1:] != [len(s.labels)]:
            problems.append(f"output {s.name!r} has shape {list(array.shape)}, expected [1, {len(s.labels)}]")
        dtype = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array.dataType)
        if dtype != "FLOAT32":
            problems.append(f"output {s.name!r} is {dtype}, expected FLOAT32")
    extra = set(outputs) - {s.name for s in specs}
    if extra:
        problems.append(f"unexpected outputs {sorted(extra)}")
    return problems


def _arg(op: Any, name: str) -> str | None:
    """The name of the tensor an op takes as its argument ``name`` (None if it has none)."""
    args = op.inputs[name].arguments if name in op.inputs else []
    return args[0].name if args and args[0].name else None


def _immediate_bool(producer: Mapping[str, Any], name: str | None) -> bool:
    """The value of a constant boolean tensor (False when ``name`` is not a constant)."""
    op = producer.get(name) if name else None
    if op is None or op.type != "const":
        return False
    return bool(op.attributes["val"].immediateValue.tensor.bools.values[0])


def _aggregation_problems(
    ct: Any,
    path: str | os.PathLike[str],
    producer: Mapping[str, Any],
    outputs: Mapping[str, Any],
    specs: Sequence[OutputSpec],
) -> list[str]:
    """Each level and task output made by a matmul (or linear) whose constant weight is its aggregation matrix."""
    problems = []
    weights: dict[str, Any] | None = None
    for s in specs:
        if s.kind == "training" or s.name not in outputs:
            continue
        op = producer.get(s.name)
        while op is not None and op.type in ("cast", "identity"):
            op = producer.get(_arg(op, "x") or "")
        if op is None or op.type not in ("matmul", "linear"):
            problems.append(f"output {s.name!r} is not made by a matmul (found {op.type if op else None})")
            continue
        name = _arg(op, "y" if op.type == "matmul" else "weight")
        const = producer.get(name) if name else None
        if const is None or const.type != "const":
            problems.append(f"the matmul of {s.name!r} has no constant matrix ({const.type if const else None})")
            continue
        if weights is None:  # reads every constant, blob files included (public API; ~1 s)
            with _quiet():
                model = ct.models.MLModel(str(path), skip_model_load=True)
                weights = dict(ct.optimize.coreml.get_weights_metadata(model, weight_threshold=0))
        keys = [const.outputs[0].name]  # the op's name is its output's unless the proto says otherwise
        if "name" in const.attributes:
            keys.insert(0, const.attributes["name"].immediateValue.tensor.strings.values[0])
        key = next((k for k in keys if k in weights), None)
        got = np.asarray(weights[key].val, np.float32) if key is not None else None
        if got is not None and (op.type == "linear" or _immediate_bool(producer, _arg(op, "transpose_y"))):
            got = got.T
        want = expected_matrix(s)
        if got is None or got.shape != want.shape or not np.array_equal(got, want):
            problems.append(f"the matmul of {s.name!r} does not hold its aggregation matrix")
    return problems


def _weight_kinds(ct: Any, block: Any, producer: Mapping[str, Any]) -> dict[str, int]:
    """How many weight-carrying ops hold their weights in each data type (or how else they get them)."""
    kinds: dict[str, int] = {}
    for op in block.operations:
        if op.type not in _WEIGHT_OPS:
            continue
        source = producer.get(_arg(op, "weight") or "")
        if source is None:
            kind = "computed"
        elif source.type == "const":
            kind = _dtype(ct, source.outputs[0].type)
        elif source.type in _COMPRESSED:
            data = source.attributes["quantized_data" if "quantized_data" in source.attributes else "data"]
            kind = _dtype(ct, data.type)
        else:
            kind = source.type
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def _precision_problems(kinds: Mapping[str, int], block: Any, quantize: str | None) -> list[str]:
    """The weights in the precision asked for: all float16 for fp16; every convolution int8 (the rest float16) for
    int8."""
    convs = sum(op.type == "conv" for op in block.operations)
    if quantize == "fp16" and set(kinds) != {"FLOAT16"}:
        return [f"fp16 was asked for but the weights are {kinds}"]
    if quantize == "int8" and (kinds.get("INT8", 0) < convs or not set(kinds) <= {"INT8", "FLOAT16"}):
        return [f"int8 was asked for but the weights are {kinds} ({convs} convolutions)"]
    return []
