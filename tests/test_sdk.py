"""The SDK on real exported files (made here from the small real run) in ai-edge-litert and onnxruntime: the
manifest, predictions from every kind of input, operating points, test-time views, bad and damaged files.

`derm classify` / `derm triage` are in test_sdk_triage.py, the tasks' conditions in test_sdk_tasks.py."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import SMALL_SIZE

pytest.importorskip("tensorflow")

cli = CliRunner()


def test_both_backends_give_the_manifest_and_agree(sdk_files):
    from derm.classifier import Classifier

    tfl, onx, images = sdk_files
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
    from derm.preprocess import preprocess
    from derm.runtimes import ONNXRuntime

    raw = ONNXRuntime(str(onx))(np.stack([preprocess(p, SMALL_SIZE) for p in images]))
    np.testing.assert_allclose([list(p.levels["nine"].values()) for p in pb], raw["probs_nine"], atol=1e-6)


def test_run_takes_batches_larger_than_one_runtime_call(sdk_files, monkeypatch):
    """Classifier.run slices a large batch for onnxruntime (which holds every intermediate of a whole batch) and
    gives the same rows as image-by-image calls."""
    from derm import classifier, runtimes
    from derm.preprocess import preprocess

    _, onx, images = sdk_files
    monkeypatch.setattr(runtimes, "ONNX_BATCH", 4)
    clf = classifier.Classifier.load(onx, threads=1)
    batch = np.stack([preprocess(p, SMALL_SIZE) for p in images] * 2)  # 12 images: slices of 4, 4, 4
    got = clf.run(batch)
    one = [clf.run(batch[i : i + 1]) for i in range(len(batch))]
    for name, value in got.items():
        assert value.shape[0] == len(batch)
        np.testing.assert_allclose(value, np.concatenate([o[name] for o in one]), atol=1e-6)


def test_every_kind_of_input_gives_the_same_answer(sdk_files):
    from PIL import Image

    from derm.classifier import Classifier

    clf = Classifier.load(sdk_files[0])
    path = sdk_files[2][0]
    ref = clf.predict(path).levels
    data = Path(path).read_bytes()
    pil = Image.open(io.BytesIO(data))
    for source in (data, pil, np.asarray(pil.convert("RGB")), Path(path)):
        assert _close(clf.predict(source).levels, ref)


def _close(a, b) -> bool:
    return all(np.allclose(list(a[k].values()), list(b[k].values()), atol=1e-6) for k in b)


def test_operating_points_and_user_thresholds(sdk_files):
    from derm.classifier import Classifier

    tfl, _, images = sdk_files
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


def test_predict_many_keeps_order_and_goes_on_past_bad_files(sdk_files, tmp_path):
    from derm.classifier import Classifier
    from derm.preprocess import ImageError

    clf = Classifier.load(sdk_files[0])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"PNG? no")
    sources = [*sdk_files[2][:3], str(bad), *sdk_files[2][3:]]
    got = list(clf.predict_many(sources, workers=2, batch_size=2))
    assert [n for n, _ in got] == [str(s) for s in sources]
    assert isinstance(got[3][1], ImageError) and "bad.png" in str(got[3][1])
    one = clf.predict(sdk_files[2][4])
    assert _close(got[5][1].levels, one.levels)
    with pytest.raises(ImageError, match=r"bad\.png"):
        list(clf.predict_many(sources, on_error="raise"))


def test_files_without_a_usable_manifest_are_refused(sdk_files, tmp_path):
    import onnx

    from derm.classifier import Classifier
    from derm.manifest import ModelFileError

    with pytest.raises(ModelFileError, match=r"unknown model file type .\.pb."):
        Classifier.load(tmp_path / "model.pb")
    with pytest.raises(ModelFileError, match="not found"):
        Classifier.load(tmp_path / "missing.tflite")
    model = onnx.load(str(sdk_files[1]))
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
    with pytest.raises(ModelFileError, match="is not a TFLite model: its first bytes"):
        Classifier.load(fake)
    fake.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(64))  # a flatbuffer's header, no metadata
    with pytest.raises(ModelFileError, match="carries no derm manifest"):
        Classifier.load(fake)


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


def test_damaged_or_misnamed_files_never_give_an_answer(sdk_files, tmp_path):
    """A byte flipped inside the weights is caught by the digest the manifest recorded at export; a truncated file and
    an ONNX file renamed .tflite are named for what they are, not as "not written by derm-export"."""
    from derm.classifier import Classifier
    from derm.cli import app
    from derm.manifest import ModelFileError, tflite_weights_digest

    tfl, onx, images = sdk_files
    clf = Classifier.load(tfl)
    assert clf.verified.startswith("weights verified")
    data = bytearray(Path(tfl).read_bytes())
    assert clf.manifest["integrity"]["weights_sha256"] == tflite_weights_digest(bytes(data))
    # flip one byte in the middle of the largest weight buffer
    from ai_edge_litert import schema_py_generated as schema

    raw = bytes(data)
    model = schema.Model.GetRootAs(raw, 0)
    big = max(range(model.BuffersLength()), key=lambda i: model.Buffers(i).DataLength())
    payload = model.Buffers(big).DataAsNumpy().tobytes()
    at = raw.find(payload[:64]) + len(payload) // 2
    assert len(payload) > 1000 and at > 64
    data[at] ^= 0x01
    damaged = tmp_path / "damaged.tflite"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="damaged or was altered after export"):
        Classifier.load(damaged)
    res = cli.invoke(app, ["classify", images[0], "--model", str(damaged)])
    assert res.exit_code == 2 and "damaged or was altered" in res.output and "top classes" not in res.output
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(Path(tfl).read_bytes()[:-5000])
    with pytest.raises(ModelFileError, match="truncated or damaged"):
        Classifier.load(truncated)
    renamed = tmp_path / "renamed.tflite"
    renamed.write_bytes(Path(onx).read_bytes())
    with pytest.raises(ModelFileError, match=r"not a TFLite model.*ONNX"):
        Classifier.load(renamed)
    # an .onnx file records the sha256 of the whole file: one flipped bit anywhere is refused
    assert Classifier.load(onx).verified.startswith("file verified")
    raw = bytearray(Path(onx).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    flipped = tmp_path / "flipped.onnx"
    flipped.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="damaged or was altered after export"):
        Classifier.load(flipped)


def test_test_time_views_are_the_flips_and_quarter_turns_in_order():
    from derm.preprocess import check_tta, tta_views

    image = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    views = tta_views(image, 8)
    assert views.shape == (8, 6, 6, 3) and views.dtype == np.uint8
    assert np.array_equal(views[0], image) and np.array_equal(views[1], image[::-1])  # training's vertical flip
    assert np.array_equal(views[2], image[::-1, ::-1]) and np.array_equal(views[4], np.rot90(image))
    assert len({v.tobytes() for v in views}) == 8  # the 8 symmetries of the square, each once
    assert np.array_equal(tta_views(image, 4), views[:4])
    for bad in (3, 0, 16, 2.0, True, "4"):
        with pytest.raises(ValueError, match=r"tta must be 1, 2, 4 or 8 views.*received"):
            check_tta(bad)


def test_tta_averages_the_file_outputs_over_the_views(sdk_files):
    from derm.classifier import Classifier
    from derm.preprocess import tta_views

    plain = Classifier.load(sdk_files[0])
    tta = Classifier.load(sdk_files[0], tta=4)
    image = plain.prepare(sdk_files[2][0])
    raw = plain.run(tta_views(image, 4))
    got = tta.infer(image[None])
    for name, values in raw.items():
        np.testing.assert_allclose(got[name][0], values.mean(axis=0), rtol=0, atol=1e-6)
    assert abs(sum(tta.predict(sdk_files[2][0]).levels["three"].values()) - 1) < 1e-4
    from derm.cli import app

    res = cli.invoke(app, ["classify", str(sdk_files[2][0]), "-m", str(sdk_files[0]), "--tta", "3"])
    assert res.exit_code == 2 and "tta must be 1, 2, 4 or 8" in res.output
