"""``derm-export`` end to end on a small real run: the file, its standard TFLite metadata read by MediaPipe Tasks, the
manifest, the parity check that refuses a file, and the errors for bad input (nothing half-written)."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import SMALL_SIZE, read_rows

pytest.importorskip("tensorflow")
pytest.importorskip("mediapipe")

cli = CliRunner()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="module")
def fp32_export(small_run, tmp_path_factory):
    from derm.exporter.cli import app

    _, run = small_run
    out = tmp_path_factory.mktemp("export") / "model.tflite"
    report = out.parent / "report.json"
    res = cli.invoke(app, [str(run), "--quantize", "fp32", "--out", str(out), "--report", str(report)])
    assert res.exit_code == 0, res.output
    return run, out, json.loads(report.read_text()), res.output


def test_cli_writes_a_validated_self_describing_tflite(fp32_export):
    from derm.exporter.tflite import read_manifest
    from derm.trainer.rundir import load_partition

    run, out, report, output = fp32_export
    assert out.is_file() and report["ok"] and report["size_bytes"] == out.stat().st_size
    assert "parity with the Keras model" in output and "NO" not in output
    assert {r["metric"] for r in report["parity"]} >= {"max_abs", "mean_abs", "top1", "auc_diff"}
    assert all(r["ok"] for r in report["parity"])
    tax, part = load_partition(run)
    m = read_manifest(out)
    assert m == report["manifest"]
    assert m["input"]["shape"] == [1, SMALL_SIZE, SMALL_SIZE, 3] and m["input"]["dtype"] == "uint8"
    assert m["taxonomy"]["sha256"] == tax.sha256 and m["partition"]["sha256"] == part.sha256
    assert m["levels"] == ["three", "nine"]
    outputs = {o["name"]: o for o in m["outputs"]}
    assert outputs["training_probs"]["labels"] == part.labels
    assert outputs["probs_three"]["labels"] == list(tax.level("three"))
    assert outputs["task_melanoma_vs_nevus"]["task"]["id"] == "melanoma_vs_nevus"
    assert "not a diagnostic device" in m["disclaimer"]
    assert m["versions"]["ai-edge-litert"] and m["versions"]["tensorflow"]
    # operating points come from the run's own evaluation (val split here: the small run has no test fold)
    assert m["operating_points"]["melanoma_vs_nevus"]["source"].startswith("val")
    assert "skipped" in m["training"]["calibration"]  # the run's calibration (here: too few images), as recorded


def test_mediapipe_image_classifier_reads_the_labels_and_scores(fp32_export):
    """MediaPipe Tasks' ImageClassifier (which reads only the standard metadata) gives every output as a named head
    with our labels, and the same scores as the plain interpreter."""
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions, vision

    from derm.preprocess import preprocess
    from derm.runtimes import TFLiteRuntime

    run, out, report, _ = fp32_export
    image = preprocess(read_rows(run / "split.csv")[0]["image"], SMALL_SIZE)
    expected = TFLiteRuntime(str(out))(image[None])
    options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(out)), max_results=-1)
    with vision.ImageClassifier.create_from_options(options) as classifier:
        result = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image)))
    heads = {c.head_name: c for c in result.classifications}
    labels = {o["name"]: o["labels"] for o in report["manifest"]["outputs"]}
    assert set(heads) == set(labels)
    for name, head in heads.items():
        scores = {c.category_name: c.score for c in head.categories}
        assert set(scores) == set(labels[name])
        got = np.array([scores[label] for label in labels[name]])
        np.testing.assert_allclose(got, expected[name][0], atol=1e-5)


def test_metadata_parser_version(fp32_export):
    """The stand-in for MediaPipe's missing compiled helper stamps the version the schema rules give."""
    from mediapipe.tasks.metadata import metadata_schema_py_generated as fb

    from derm.exporter._metadata_version import ensure_registered, minimum_parser_version

    ensure_registered()
    from mediapipe.tasks.python.metadata.metadata import MetadataDisplayer

    buf = MetadataDisplayer.with_model_file(str(fp32_export[1]))._metadata_buffer
    md = fb.ModelMetadataT.InitFromObj(fb.ModelMetadata.GetRootAsModelMetadata(buf, 0))
    assert md.minParserVersion.decode() == "1.0.0" == minimum_parser_version(buf)  # labels, descriptions, normalisation
    import flatbuffers

    vocab = fb.AssociatedFileT()
    vocab.name, vocab.type = "vocab.txt", fb.AssociatedFileType.VOCABULARY
    md.associatedFiles.append(vocab)
    md.subgraphMetadata[0].customMetadata = [fb.CustomMetadataT()]
    b = flatbuffers.Builder(0)
    b.Finish(md.Pack(b), b"M001")
    assert minimum_parser_version(bytes(b.Output())) == "1.5.0"


def test_bad_arguments_fail_clearly_and_write_nothing(small_run, tmp_path):
    from derm.exporter.cli import app

    _, run = small_run
    out = tmp_path / "m.tflite"
    cases = [
        (["--target", "tensorrt"], "'tensorrt' is not one of 'tflite', 'onnx', 'coreml'"),  # an Enum: click says so
        (["--weight-rounding", "stochastic"], "'stochastic' is not one of 'gptq', 'nearest'"),
        (["--quantize", "int4"], "no quantization 'int4'"),
        (["--target", "onnx", "--quantize", "fp16"], "no quantization 'fp16'"),
        (["--out", str(tmp_path / "m.onnx")], "should end in '.tflite'"),
    ]
    for args, message in cases:
        res = cli.invoke(app, [str(run), "--out", str(out), *args])
        said = " ".join(res.output.replace("│", " ").split())  # click's usage errors come in a box
        assert res.exit_code == 2 and message in said and not out.exists(), (args, res.output)
    res = cli.invoke(app, [str(tmp_path / "nope"), "--out", str(out)])
    assert res.exit_code == 2 and "not a finished derm-train run" in res.output
    # calibration: unreadable images are named; too few are refused
    good = read_rows(run / "split.csv")[0]["image"]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    cal = tmp_path / "cal.csv"
    with open(cal, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image"])
        w.writerows([[good]] * 9 + [[str(broken)]])
    res = cli.invoke(app, [str(run), "--out", str(out), "--calibration", str(cal)])
    assert res.exit_code == 2 and "cannot be read" in res.output and "broken.jpg" in res.output
    res = cli.invoke(app, [str(run), "--out", str(out), "--calibration", str(cal), "--calibration-size", "3"])
    assert res.exit_code == 2 and "Only 3 calibration image(s)" in res.output
    assert _leftovers(tmp_path) == ["broken.jpg", "cal.csv"]
    # an existing output is kept unless --overwrite
    out.write_bytes(b"keep me")
    res = cli.invoke(app, [str(run), "--out", str(out)])
    assert res.exit_code == 2 and "--overwrite" in res.output and out.read_bytes() == b"keep me"


def test_parity_failure_leaves_nothing_unless_forced(small_run, tmp_path, monkeypatch):
    """A file outside its thresholds is refused with the table, and nothing stays behind; --force keeps it."""
    from derm.exporter import targets
    from derm.exporter.export import ExportConfig, export
    from derm.exporter.graph import ExportError

    _, run = small_run
    strict = targets.Parity(max_abs=0.0, mean_abs=0.0, top1=1.0, auc=0.0, mpca=0.0)  # float16 weights cannot be exact
    tflite = targets.TARGETS["tflite"]
    strict_tflite = dataclasses.replace(tflite, parity={**tflite.parity, "fp16": strict})
    monkeypatch.setitem(targets.TARGETS, "tflite", strict_tflite)
    cfg = ExportConfig(run=str(run), quantize="fp16", out=str(tmp_path / "m.tflite"), validation_size=8)
    with pytest.raises(ExportError, match=r"not close enough(.|\n)*max_abs .* NO"):
        export(cfg)
    assert _leftovers(tmp_path) == []
    result = export(dataclasses.replace(cfg, force=True))
    assert not result.ok and Path(result.path).is_file() and _leftovers(tmp_path) == ["m.tflite"]


def _three_way_specs():
    from derm.exporter.graph import output_specs
    from derm.partition import partition
    from derm.taxonomy import default_taxonomy

    tax = default_taxonomy()
    part = partition(tax, {"melanocytic_nevus": 50, "malignant_melanoma": 50, "basal_cell_carcinoma": 50}, 100, "nine")
    specs = [s for s in output_specs(part, ["three"]) if s.name in ("probs_three", "task_melanoma_vs_nevus")]
    return tax, specs


def test_parity_table_measures_what_it_says():
    from derm.exporter.parity import format_parity, parity
    from derm.exporter.targets import Parity

    tax, specs = _three_way_specs()
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), size=40)
    ref = {"probs_three": p, "task_melanoma_vs_nevus": p[:, :1]}
    moved = p.copy()
    moved[0] = np.roll(moved[0], 1)  # one image's probabilities rotated: its top class changes
    got = {"probs_three": moved, "task_melanoma_vs_nevus": p[:, :1] + 0.01}
    nodes = ["melanocytic_nevus"] * 20 + ["malignant_melanoma"] * 20
    rows = {(r.output, r.metric): r for r in parity(ref, got, specs, Parity(0.5, 0.01, 0.99, 1e-6, 0.01), tax, nodes)}
    diff = np.abs(p - moved)
    assert rows["probs_three", "max_abs"].value == pytest.approx(diff.max())
    assert rows["probs_three", "mean_abs"].value == pytest.approx(diff.mean())
    top1 = rows["probs_three", "top1"]
    assert top1.value == 39 / 40 == pytest.approx((p.argmax(1) == moved.argmax(1)).mean())
    # with its sample size and 95% interval: one image in 40 leaves the agreement anywhere from about 0.87 to 1, so
    # it is no evidence against a 0.99 bar (the bar is judged on the interval's upper end)
    assert top1.n == 40 and top1.differ == 1
    lo, hi = top1.interval
    assert lo < 39 / 40 < hi and hi - lo > 0.1 and hi >= 0.99 and top1.ok
    top2 = np.sort(p[0])[-2:]
    assert top1.margin == pytest.approx(top2[1] - top2[0])  # the flipped image's float margin
    table = format_parity(list(rows.values()))
    assert "1 of 40 images differ" in table and "95% upper >= 0.99" in table
    auc = rows["task_melanoma_vs_nevus", "auc_diff"]
    assert auc.value == pytest.approx(0.0, abs=1e-12) and auc.ok  # a shift keeps ranks
    assert auc.n == 40 and auc.detail == "20 positive, 20 negative"
    # labels reach the three-way level: its mean per-class accuracy loss, float minus file, on the same images
    mpca = rows["probs_three", "mpca_diff"]
    assert mpca.n == 40 and mpca.interval[0] <= mpca.value <= mpca.interval[1]


def test_parity_judges_accuracy_with_its_uncertainty():
    """A loss of AUC that a handful of labelled images cannot tell from chance passes; the same loss on many images,
    or a loss the images do show, fails; the line says what it rests on."""
    from derm.exporter.parity import parity
    from derm.exporter.targets import Parity

    tax, specs = _three_way_specs()
    gate = Parity(max_abs=1.0, mean_abs=1.0, top1=0.0, auc=0.005, mpca=1.0)

    def auc_row(n_pos: int, n_neg: int, noise: float) -> object:
        rng = np.random.default_rng(1)
        y = np.r_[np.ones(n_pos), np.zeros(n_neg)]
        s = np.clip(0.5 + 0.25 * (y - 0.5) + rng.normal(0, 0.2, len(y)), 0, 1)
        p = np.stack([s, (1 - s) / 2, (1 - s) / 2], 1)
        got = s + rng.normal(0, noise, len(y))  # quantization noise on the task's probability
        nodes = ["malignant_melanoma"] * n_pos + ["melanocytic_nevus"] * n_neg
        ref_out = {"probs_three": p, "task_melanoma_vs_nevus": s[:, None]}
        got_out = {"probs_three": p, "task_melanoma_vs_nevus": got[:, None]}
        rows = parity(ref_out, got_out, specs, gate, tax, nodes)
        return next(r for r in rows if r.metric == "auc_diff")

    few = auc_row(15, 41, 0.05)
    assert few.value > 0.005 and few.ok and few.detail == "15 positive, 41 negative"  # one or two swapped pairs
    many = auc_row(1500, 4100, 0.15)
    assert many.value > 0.01 and many.interval[0] > 0.005 and not many.ok
    faithful = auc_row(1500, 4100, 0.002)
    assert abs(faithful.value) < 0.002 and faithful.ok


def _qat_python() -> str | None:
    import os

    given = os.environ.get("DERM_QAT_PYTHON")
    local = Path(__file__).resolve().parents[1] / ".venv-qat" / "bin" / "python"
    return given or (str(local) if local.is_file() else None)


@pytest.mark.skipif(_qat_python() is None, reason="no [qat] environment (.venv-qat or DERM_QAT_PYTHON)")
def test_quantization_aware_training_end_to_end(small_run, tmp_path, monkeypatch):
    """QAT in its own tf-keras environment: a real fine-tune step, int8 weights, the aggregation exact and frozen."""
    from derm.exporter.export import ExportConfig, export
    from derm.preprocess import preprocess
    from derm.runtimes import TFLiteRuntime
    from derm.trainer.rundir import load_partition

    monkeypatch.setenv("DERM_QAT_PYTHON", _qat_python())
    _, run = small_run
    cfg = ExportConfig(
        run=str(run),
        quantize="qat",
        out=str(tmp_path / "q.tflite"),
        qat_steps=2,
        force=True,
        calibration_size=24,
        weight_rounding="nearest",  # GPTQ's own test is the small_int8 fixture's; here it would add 35 s
        validation_size=8,
    )
    result = export(cfg)
    assert result.quantize == "qat" and result.manifest["export"]["quantize"] == "qat"
    qat = result.manifest["export"]["qat"]
    assert qat["images"] == 2 * 16 and len(qat["kl_per_epoch"]) == 1  # 2 steps of 16 images, one epoch
    import keras

    layers = keras.models.load_model(run / "model.keras", compile=False).layers
    convs = [la for la in layers if isinstance(la, keras.layers.Conv2D)]
    assert qat["ranges"]["kernels"] == len(convs) > 0  # every kernel fake-quantized (tfmot had dropped them)
    assert result.manifest["export"]["weight_rounding"]["method"] == "nearest"  # QAT starts from the PTQ preparation
    assert result.size_bytes < 30e6  # int8 weights (float32 would be ~87 MB)
    assert {r.metric for r in result.parity} >= {"max_abs", "top1"}  # measured (thresholds: see the benchmark)
    _, part = load_partition(run)
    images = np.stack([preprocess(r["image"], SMALL_SIZE) for r in read_rows(run / "split.csv")[:6]])
    out = TFLiteRuntime(result.path)(images)
    from derm.exporter.graph import output_specs

    for s in output_specs(part):
        if s.kind == "level":  # the aggregation stays an exact float matmul after QAT
            np.testing.assert_allclose(out[s.name], out["training_probs"] @ s.matrix, atol=1e-5)


def test_int8_calibrated_on_the_wrong_images_is_refused(small_run, small_int8, tmp_path):
    """A deliberately broken quantization: int8 ranges calibrated on flat grey images instead of lesions. The gate
    refuses the file (the table printed, nothing left behind), while the same run's int8 file calibrated on its own
    training images (the small_int8 fixture) is far closer."""
    import re

    from PIL import Image

    from derm.exporter.export import ExportConfig, export
    from derm.exporter.graph import ExportError

    _, run = small_run
    cal = tmp_path / "grey"
    cal.mkdir()
    for i in range(8):
        Image.new("RGB", (64, 64), (100 + 10 * i,) * 3).save(cal / f"g{i}.png")
    (cal / "cal.csv").write_text("image\n" + "".join(f"g{i}.png\n" for i in range(8)), encoding="utf-8")
    out = tmp_path / "out" / "m.tflite"
    cfg = ExportConfig(
        run=str(run),
        out=str(out),
        calibration=str(cal / "cal.csv"),
        validation_size=24,
        weight_rounding="nearest",  # the ranges are what is broken; GPTQ and equalization would only take time
        equalize=False,
    )
    with pytest.raises(ExportError, match=r"not close enough(.|\n)*NO") as err:
        export(cfg)
    assert "95% upper" in str(err.value)
    assert _leftovers(out.parent) == []
    bad = float(re.search(r"probs_nine\s+mean_abs\s+([0-9.]+)", str(err.value)).group(1))
    good = next(r.value for r in small_int8["result"].parity if (r.output, r.metric) == ("probs_nine", "mean_abs"))
    assert bad > 3 * good
