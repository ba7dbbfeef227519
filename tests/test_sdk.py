"""The SDK on real exported files (made here from the small real run) in ai-edge-litert and onnxruntime: the
manifest, predictions from every kind of input, operating points, bad files, and `derm classify` / `derm triage`."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import SMALL_SIZE, read_rows

pytest.importorskip("tensorflow")

cli = CliRunner()


@pytest.fixture(scope="module")
def files(small_run, tmp_path_factory):
    """A TFLite float16 and an ONNX float32 file of the small run, through derm-export's own pipeline."""
    from derm.exporter.export import ExportConfig, export

    _, run = small_run
    out = tmp_path_factory.mktemp("sdk_models")
    tfl = export(ExportConfig(run=str(run), quantize="fp16", out=str(out / "m.tflite"), validation_size=8))
    onx = export(ExportConfig(run=str(run), target="onnx", quantize="fp32", out=str(out / "m.onnx"), validation_size=8))
    images = [r["image"] for r in read_rows(run / "split.csv")[:6]]
    return Path(tfl.path), Path(onx.path), images


@pytest.fixture(scope="module")
def folder(files, tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    for i, p in enumerate(files[2]):
        (root / ("sub" if i % 2 else "")).mkdir(exist_ok=True)
        shutil.copy(p, root / ("sub" if i % 2 else "") / Path(p).name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "notes.txt").write_text("not an image, not picked up")
    return root


def test_both_backends_give_the_manifest_and_agree(files):
    from derm.classifier import Classifier

    tfl, onx, images = files
    a, b = Classifier.load(tfl), Classifier.load(onx, threads=1)
    assert a.backend.name == "ai-edge-litert" and b.backend.name == "onnxruntime"
    assert a.input_size == b.input_size == SMALL_SIZE and a.levels == b.levels == ["three", "nine"]
    assert a.tasks == b.tasks and "melanoma_vs_nevus" in a.tasks
    pa, pb = a.predict(images), b.predict(images)
    for x, y in zip(pa, pb, strict=True):
        for lvl in a.levels:
            assert sum(x.levels[lvl].values()) == pytest.approx(1.0, abs=1e-3)
            np.testing.assert_allclose(list(x.levels[lvl].values()), list(y.levels[lvl].values()), atol=2e-2)
        assert x.top_classes[0][1] >= x.top_classes[-1][1] and len(x.top_classes) == 3
        for d in x.decisions.values():
            assert 0 <= d.probability <= 1 and d.positive == (d.probability >= d.threshold)
    # the numbers are the file's own: same as running the raw runtime on the project's preprocessing
    from derm.exporter.onnx import ONNXRunner
    from derm.preprocess import preprocess

    raw = ONNXRunner(str(onx))(np.stack([preprocess(p, SMALL_SIZE) for p in images]))
    np.testing.assert_allclose([list(p.levels["nine"].values()) for p in pb], raw["probs_nine"], atol=1e-6)


def test_run_takes_batches_larger_than_one_runtime_call(files, monkeypatch):
    """Classifier.run slices a large batch for onnxruntime (which holds every intermediate of a whole batch) and
    gives the same rows as image-by-image calls."""
    from derm import classifier
    from derm.preprocess import preprocess

    _, onx, images = files
    monkeypatch.setattr(classifier, "BATCH", 4)
    clf = classifier.Classifier.load(onx, threads=1)
    batch = np.stack([preprocess(p, SMALL_SIZE) for p in images] * 2)  # 12 images: slices of 4, 4, 4
    got = clf.run(batch)
    one = [clf.run(batch[i : i + 1]) for i in range(len(batch))]
    for name, value in got.items():
        assert value.shape[0] == len(batch)
        np.testing.assert_allclose(value, np.concatenate([o[name] for o in one]), atol=1e-6)


def test_every_kind_of_input_gives_the_same_answer(files):
    from PIL import Image

    from derm.classifier import Classifier

    clf = Classifier.load(files[0])
    path = files[2][0]
    ref = clf.predict(path).levels
    data = Path(path).read_bytes()
    pil = Image.open(io.BytesIO(data))
    for source in (data, pil, np.asarray(pil.convert("RGB")), Path(path)):
        assert _close(clf.predict(source).levels, ref)


def _close(a, b) -> bool:
    return all(np.allclose(list(a[k].values()), list(b[k].values()), atol=1e-6) for k in b)


def test_operating_points_and_user_thresholds(files):
    from derm.classifier import Classifier

    tfl, _, images = files
    clf = Classifier.load(tfl, operating_point="0.95")
    d = clf.predict(images[0]).decisions["melanoma_vs_nevus"]
    point = clf.manifest["operating_points"]["melanoma_vs_nevus"]["by_sensitivity"]["0.95"]
    assert d.threshold == point["threshold"] and d.sensitivity == point["sensitivity"] and d.operating_point == "0.95"
    user = Classifier.load(tfl, threshold=0.3).predict(images[0]).decisions["melanoma_vs_nevus"]
    assert user.threshold == 0.3 and user.operating_point == "user" and user.positive == (user.probability >= 0.3)
    with pytest.raises(ValueError, match=r"'0.5'.*0.8, 0.9, 0.95"):
        Classifier.load(tfl, operating_point="0.5")
    with pytest.raises(ValueError, match="threshold"):
        Classifier.load(tfl, threshold=2)


def test_predict_many_keeps_order_and_goes_on_past_bad_files(files, tmp_path):
    from derm.classifier import Classifier
    from derm.preprocess import ImageError

    clf = Classifier.load(files[0])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"PNG? no")
    sources = [*files[2][:3], str(bad), *files[2][3:]]
    got = list(clf.predict_many(sources, workers=2, batch_size=2))
    assert [n for n, _ in got] == [str(s) for s in sources]
    assert isinstance(got[3][1], ImageError) and "bad.png" in str(got[3][1])
    one = clf.predict(files[2][4])
    assert _close(got[5][1].levels, one.levels)
    with pytest.raises(ImageError, match=r"bad\.png"):
        list(clf.predict_many(sources, on_error="raise"))


def test_files_without_a_usable_manifest_are_refused(files, tmp_path):
    import onnx

    from derm.classifier import Classifier
    from derm.manifest import ModelFileError

    with pytest.raises(ModelFileError, match=r"unknown model file type .\.pb."):
        Classifier.load(tmp_path / "model.pb")
    with pytest.raises(ModelFileError, match="not found"):
        Classifier.load(tmp_path / "missing.tflite")
    model = onnx.load(str(files[1]))
    keep = [p for p in model.metadata_props]
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "plain.onnx"))
    with pytest.raises(ModelFileError, match="carries no derm manifest"):
        Classifier.load(tmp_path / "plain.onnx")
    for p in keep:
        entry = model.metadata_props.add()
        entry.key = p.key
        entry.value = p.value.replace('"derm-manifest/1"', '"derm-manifest/9"') if p.key == "derm_manifest" else p.value
    onnx.save(model, str(tmp_path / "future.onnx"))
    with pytest.raises(ModelFileError, match=r"derm-manifest/9.*upgrade"):
        Classifier.load(tmp_path / "future.onnx")
    fake = tmp_path / "fake.tflite"
    fake.write_bytes(b"TFL3 but not really")
    with pytest.raises(ModelFileError, match="carries no derm manifest"):
        Classifier.load(fake)


def test_cli_classify_and_triage_with_resume(files, folder, tmp_path):
    from derm.cli import app

    tfl, onx, images = files
    res = cli.invoke(app, ["classify", images[0], "--model", str(tfl), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert set(out["levels"]) == {"three", "nine"} and "melanoma_vs_nevus" in out["decisions"]
    res = cli.invoke(app, ["classify", str(folder / "broken.jpg"), "--model", str(tfl)])
    assert res.exit_code == 2 and "broken.jpg" in res.output

    dest = tmp_path / "triage"
    res = cli.invoke(app, ["triage", str(folder), "--model", str(tfl), "--out", str(dest)])
    assert res.exit_code == 0, res.output
    assert f"{len(images) + 1} images: {len(images)} classified, 1 unreadable" in res.output
    rows = read_rows(dest / "results.csv")
    assert len(rows) == len(images) + 1 and sum(r["status"] == "unreadable" for r in rows) == 1
    assert any(r["image"].startswith("sub/") for r in rows)
    report = (dest / "report.html").read_text()
    assert "not a diagnostic device" in report and "Unreadable files (1)" in report and "broken.jpg" in report
    risks = [float(r["p_malignant"]) for r in rows if r["status"] == "ok"]
    order = [report.index(r["image"]) for r in sorted(rows, key=lambda r: -float(r["p_malignant"] or -1))[:-1]]
    assert order == sorted(order) and len(risks) == len(images)  # thumbnails ordered by risk
    before = (dest / "results.csv").read_bytes()
    res = cli.invoke(app, ["triage", str(folder), "--model", str(tfl), "--out", str(dest)])
    assert res.exit_code == 0 and f"{len(images) + 1} from the previous run" in res.output
    assert (dest / "results.csv").read_bytes() == before
    res = cli.invoke(app, ["triage", str(folder), "--model", str(onx), "--out", str(dest)])
    assert res.exit_code == 2 and "another model" in res.output


@pytest.mark.skipif(__import__("platform").system() == "Darwin", reason="off macOS only: on a Mac the file runs")
def test_core_ml_files_are_read_and_refused_off_macos_with_the_reason(small_run, tmp_path):
    pytest.importorskip("coremltools")
    from derm.classifier import Classifier
    from derm.exporter.export import ExportConfig, export
    from derm.manifest import ModelFileError, read_manifest

    _, run = small_run
    res = export(ExportConfig(run=str(run), target="coreml", out=str(tmp_path / "m.mlpackage")))
    assert res.parity_skipped and "macOS" in res.parity_skipped
    manifest = read_manifest(res.path)
    assert manifest["export"]["target"] == "coreml" and manifest["input"]["shape"][1] == SMALL_SIZE
    with pytest.raises(ModelFileError, match="macOS only"):
        Classifier.load(res.path)
