"""ONNX (run with onnxruntime) and Core ML (checked for structure; predictions need macOS) files of the export graph,
made from a real tiny training run and compared on real images."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from derm.manifest import MANIFEST_KEY, SUPPORTED_FORMATS
from tests.conftest import SMALL_SIZE

pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def exported(small_export):
    e = small_export
    return e["run"], e["part"], e["specs"], e["export"], e["images"], e["reference"]


def _manifest(exported, target, quantize):
    from derm.exporter.manifest import build_manifest

    run, part, specs, *_ = exported
    return build_manifest(run, part, specs, target=target, quantize=quantize, input_size=SMALL_SIZE)


@pytest.fixture(scope="module")
def onnx_files(exported):
    """float32 and int8 ONNX bytes (int8 calibrated on 16 of the images)."""
    pytest.importorskip("tf2onnx")
    pytest.importorskip("onnxruntime")
    from derm.exporter.onnx import convert, quantize_int8

    export, images = exported[3], exported[4]
    fp32 = convert(export, "fp32")
    return {"fp32": fp32, "int8": quantize_int8(fp32, images[:16])}


def test_onnx_fp32_matches_keras(exported, onnx_files):
    from derm.runtimes import ONNXRuntime

    _, _, specs, _, images, reference = exported
    runner = ONNXRuntime(onnx_files["fp32"])
    assert list(runner.outputs) == [s.name for s in specs]  # named and ordered like the specs
    inp = runner.session.get_inputs()[0]
    assert (inp.name, inp.type, inp.shape[1:]) == ("image", "tensor(uint8)", [SMALL_SIZE, SMALL_SIZE, 3])
    got = runner(images)
    for s in specs:
        assert got[s.name].shape == reference[s.name].shape
        assert np.abs(got[s.name] - reference[s.name]).max() < 1e-4, s.name


def test_onnx_int8_concatenations_share_one_scale(onnx_files):
    """Every input of every Concat is quantized on the Concat's own grid (shared_concat_ranges), so onnxruntime does
    not round each Inception block's branches a second time."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(onnx_files["int8"])
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    users: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    concats = [n for n in model.graph.node if n.op_type == "Concat"]
    assert len(concats) >= 11  # mixed0..mixed10 (and mixed9/10's inner ones)
    for node in concats:
        (q,) = [u for u in users[node.output[0]] if u.op_type == "QuantizeLinear"]
        want = (float(consts[q.input[1]]), int(consts[q.input[2]]))
        dequantized = [producer[i] for i in node.input if producer[i].op_type == "DequantizeLinear"]
        quantized = [producer[dq.input[0]] for dq in dequantized if dq.input[0] in producer]
        branches = [
            qi for qi in quantized if producer.get(qi.input[0]) is None or producer[qi.input[0]].op_type != "MaxPool"
        ]
        assert branches, node.name
        for qi in branches:  # a max-pool branch keeps its input's scale, as onnxruntime makes it
            got = (float(consts[qi.input[1]]), int(consts[qi.input[2]]))
            assert got == pytest.approx(want, rel=1e-6), (node.name, qi.name)


def test_onnx_int8_is_close_smaller_and_keeps_the_aggregation_exact(exported, onnx_files):
    from derm.classifier import int8_saturates
    from derm.runtimes import ONNXRuntime

    _, _, specs, _, images, reference = exported
    got = ONNXRuntime(onnx_files["int8"], threads=1)(images)
    if not int8_saturates():  # on x86 without VNNI onnxruntime's int8 kernels saturate (the SDK warns there)
        for s in specs:
            assert np.abs(got[s.name] - reference[s.name]).mean() < 0.08, s.name
        agree = (got["probs_three"].argmax(1) == reference["probs_three"].argmax(1)).mean()
        assert agree >= 0.8
    assert len(onnx_files["int8"]) < len(onnx_files["fp32"]) / 3
    # the aggregation after the training softmax stayed float: each level is exactly a sum of training classes
    for s in specs:
        if s.kind == "level":
            np.testing.assert_allclose(got[s.name], got["training_probs"] @ s.matrix, atol=1e-6)
            np.testing.assert_allclose(got[s.name].sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize("quantize", ["fp32", "int8"])
def test_onnx_write_read_manifest_and_check_structure(exported, onnx_files, quantize, tmp_path):
    import onnx

    from derm.exporter import onnx as target
    from derm.exporter.graph import ExportError, OutputSpec
    from derm.exporter.manifest import DISCLAIMER, manifest_json

    _, _, specs, export, images, _ = exported
    manifest = _manifest(exported, "onnx", quantize)
    path = tmp_path / f"model-{quantize}.onnx"
    target.write(export, path, quantize, images[:16], manifest, specs, converted=onnx_files[quantize])
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left beside it
    checks = target.check_structure(path, specs, manifest)
    assert any("aggregation" in c for c in checks)
    assert target.read_manifest(path) == json.loads(manifest_json(manifest))
    meta = target.read_metadata(path)
    for s in specs:
        assert json.loads(meta[f"derm_labels_{s.name}"]) == list(s.labels)
    proto = onnx.load(str(path), load_external_data=False)
    assert proto.producer_name == "derm-exporter" and DISCLAIMER in proto.doc_string
    runner = target.open_runner(path, threads=1)
    assert runner(images[:3])["probs_three"].shape == (3, 3)

    with pytest.raises(ExportError, match="manifest differs"):
        target.check_structure(path, specs, {**manifest, "created": "another time"})
    level = next(i for i, s in enumerate(specs) if s.kind == "level")
    wrong = list(specs)
    wrong[level] = OutputSpec(specs[level].name, "level", specs[level].labels, specs[level].matrix[::-1].copy())
    with pytest.raises(ExportError, match="does not hold its aggregation matrix"):
        target.check_structure(path, wrong, manifest)

    bare = tmp_path / "bare.onnx"
    bare.write_bytes(onnx_files[quantize])
    with pytest.raises(ExportError, match="no derm manifest"):
        target.read_manifest(bare)


def test_onnx_quantization_choices_are_checked_before_converting(exported):
    from derm.exporter.graph import ExportError
    from derm.exporter.onnx import convert

    export = exported[3]
    with pytest.raises(ExportError, match=r"'fp16'.*fp32, int8"):
        convert(export, "fp16")
    with pytest.raises(ExportError, match="calibration"):
        convert(export, "int8")


@pytest.fixture(scope="module")
def coreml_models(exported):
    """fp16 and int8 Core ML models, the int8 one compressed from the fp16 one (as convert(..., "int8") does)."""
    pytest.importorskip("coremltools")
    from derm.exporter.coreml import convert, quantize_int8

    fp16 = convert(exported[3], "fp16")
    return {"fp16": fp16, "int8": quantize_int8(fp16)}


@pytest.mark.parametrize("quantize", ["fp16", "int8"])
def test_coreml_write_check_structure_and_read_manifest(exported, coreml_models, quantize, tmp_path):
    from derm.exporter import coreml as target
    from derm.exporter.graph import ExportError
    from derm.exporter.manifest import DISCLAIMER, manifest_json

    _, _, specs, export, _, _ = exported
    manifest = _manifest(exported, "coreml", quantize)
    path = tmp_path / f"model-{quantize}.mlpackage"
    target.write(export, path, quantize, None, manifest, specs, converted=coreml_models[quantize])
    assert path.is_dir() and (path / "Manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary sibling is gone
    checks = target.check_structure(path, specs, manifest)
    assert any("aggregation" in c for c in checks)
    assert any(("int8" if quantize == "int8" else "float16") in c for c in checks)
    assert target.read_manifest(path) == json.loads(manifest_json(manifest))

    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    assert DISCLAIMER in spec.description.metadata.shortDescription
    assert spec.description.input[0].type.WhichOneof("Type") == "imageType"
    assert [o.name for o in spec.description.output] == [s.name for s in specs]
    for s in specs:
        assert json.loads(spec.description.metadata.userDefined[f"derm_labels_{s.name}"]) == list(s.labels)
    # What the iOS app relies on (ios-demo/DermDemo.swiftpm/Sources/ModelRunner.swift): one RGB image input of the
    # manifest's size, fed a 32BGRA pixel buffer; each output's values (the product of its shape) as many as the
    # manifest's labels for it; the manifest under the key the app reads.
    image = spec.description.input[0].type.imageType
    assert len(spec.description.input) == 1 and image.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB
    assert image.width == image.height == manifest["input"]["shape"][1]
    labels = {o["name"]: o["labels"] for o in manifest["outputs"]}
    for o in spec.description.output:
        assert o.type.WhichOneof("Type") == "multiArrayType"
        assert math.prod(o.type.multiArrayType.shape) == len(labels[o.name])
    assert json.loads(spec.description.metadata.userDefined[MANIFEST_KEY])["format"] in SUPPORTED_FORMATS
    weights = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert weights < (26e6 if quantize == "int8" else 48e6)  # 22 M weights: ~22 MB int8, ~44 MB float16 (fp32 87)

    with pytest.raises(ExportError, match="exists"):
        target.write(export, path, quantize, None, manifest, specs, converted=coreml_models[quantize])
    with pytest.raises(ExportError, match="manifest differs"):
        target.check_structure(path, specs, {**manifest, "created": "another time"})
    with pytest.raises(ExportError, match="fp16 was asked for" if quantize == "int8" else "int8 was asked for"):
        other = "fp16" if quantize == "int8" else "int8"
        target.check_structure(path, specs, {**manifest, "export": {**manifest["export"], "quantize": other}})


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML runs on macOS")
def test_coreml_runner_is_unavailable_off_macos(tmp_path):
    from derm.exporter.coreml import open_runner
    from derm.runtimes import RuntimeUnavailable

    with pytest.raises(RuntimeUnavailable, match="need macOS"):
        open_runner(tmp_path / "model.mlpackage")


def test_coreml_quantization_choices_are_checked(exported):
    from derm.exporter.coreml import convert
    from derm.exporter.graph import ExportError

    with pytest.raises(ExportError, match=r"'fp32'.*fp16, int8"):
        convert(exported[3], "fp32")
