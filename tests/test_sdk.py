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
def files(small_run, small_tflite, tmp_path_factory):
    """A TFLite float16 (the session's, not written to) and an ONNX float32 file of the small run, through
    derm-export's own pipeline."""
    from derm.exporter.export import ExportConfig, export

    _, run = small_run
    out = tmp_path_factory.mktemp("sdk_models")
    onx = export(ExportConfig(run=str(run), target="onnx", quantize="fp32", out=str(out / "m.onnx"), validation_size=8))
    images = [r["image"] for r in read_rows(run / "split.csv")[:6]]
    return Path(small_tflite), Path(onx.path), images


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
    from derm.preprocess import preprocess
    from derm.runtimes import ONNXRuntime

    raw = ONNXRuntime(str(onx))(np.stack([preprocess(p, SMALL_SIZE) for p in images]))
    np.testing.assert_allclose([list(p.levels["nine"].values()) for p in pb], raw["probs_nine"], atol=1e-6)


def test_run_takes_batches_larger_than_one_runtime_call(files, monkeypatch):
    """Classifier.run slices a large batch for onnxruntime (which holds every intermediate of a whole batch) and
    gives the same rows as image-by-image calls."""
    from derm import classifier, runtimes
    from derm.preprocess import preprocess

    _, onx, images = files
    monkeypatch.setattr(runtimes, "ONNX_BATCH", 4)
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
    with pytest.raises(ModelFileError, match="is not a TFLite model: its first bytes"):
        Classifier.load(fake)
    fake.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(64))  # a flatbuffer's header, no metadata
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
    assert res.exit_code == 3, res.output  # finished, but a file could not be read: said, and a distinct status
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
    # the same model by another path is the same model (identified by content): it resumes
    copy = tmp_path / "elsewhere" / "same.tflite"
    copy.parent.mkdir()
    shutil.copyfile(tfl, copy)
    res = cli.invoke(app, ["triage", str(folder), "--model", str(copy), "--out", str(dest)])
    assert res.exit_code == 3 and f"{len(images) + 1} from the previous run" in res.output
    assert (dest / "results.csv").read_bytes() == before
    res = cli.invoke(app, ["triage", str(folder), "--model", str(onx), "--out", str(dest)])
    assert res.exit_code == 2 and "another model" in res.output


def test_triage_lists_what_it_cannot_read_and_never_writes_a_formula(files, folder, tmp_path):
    """Nothing vanishes: a folder or a broken link named like an image is listed as unreadable, other files are
    counted; a file name a spreadsheet would run as a formula is written inert and read back on resume."""
    from derm.cli import app

    tfl, _, images = files
    root = tmp_path / "photos"
    shutil.copytree(folder, root)
    (root / "album.jpg").mkdir()
    (root / "gone.png").symlink_to(root / "no-such-file.png")
    (root / "notes.txt").write_text("not an image")
    (root / "IMG_0001.heic").write_bytes(b"\0" * 16)
    shutil.copyfile(images[0], root / "=HYPERLINK(1).jpg")
    dest = tmp_path / "triage"
    res = cli.invoke(app, ["triage", str(root), "--model", str(tfl), "--out", str(dest)])
    assert res.exit_code == 3, res.output
    assert "3 unreadable" in res.output and "2 other files ignored" in res.output
    rows = {r["image"]: r for r in read_rows(dest / "results.csv")}
    assert rows["album.jpg"]["status"] == "unreadable" and "folder" in rows["album.jpg"]["error"]
    assert rows["gone.png"]["status"] == "unreadable" and "broken symbolic link" in rows["gone.png"]["error"]
    assert "'=HYPERLINK(1).jpg" in rows and rows["'=HYPERLINK(1).jpg"]["status"] == "ok"  # inert in a spreadsheet
    report = (dest / "report.html").read_text()
    assert "Other files (2)" in report and ".heic 1" in report and "Unreadable files (3)" in report
    res = cli.invoke(app, ["triage", str(root), "--model", str(tfl), "--out", str(dest)])
    assert res.exit_code == 3 and "from the previous run" in res.output  # the escaped name was matched on resume
    assert len(read_rows(dest / "results.csv")) == len(rows)


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


# --------------------------------------------------------------------------- conditional tasks, summary, disclaimer
@pytest.fixture(scope="module")
def labelled(files, small_run, tmp_path_factory):
    """Three real images of each of the small run's diagnoses (mel, nv, bkl, bcc) in a folder with one broken file,
    and their labels by file name."""
    _, run = small_run
    root = tmp_path_factory.mktemp("labelled")
    labels: dict[str, str] = {}
    for r in read_rows(run / "split.csv"):
        if sum(v == r["label"] for v in labels.values()) < 3:
            shutil.copy(r["image"], root / Path(r["image"]).name)
            labels[Path(r["image"]).name] = r["label"]
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root, labels


def test_manifest_says_each_tasks_condition(files, small_run):
    from derm.classifier import CONDITION_THRESHOLD
    from derm.manifest import read_manifest
    from derm.trainer.rundir import load_partition

    _, run = small_run
    tax, part = load_partition(run)
    for path in files[:2]:
        manifest = read_manifest(path)
        tasks = [o["task"] for o in manifest["outputs"] if o["kind"] == "task"]
        assert {t["id"] for t in tasks} == {"melanoma_vs_nevus", "carcinoma_vs_seborrheic_keratosis"}
        for t in tasks:
            under = {
                side: [c.label for c in part.classes if any(tax.is_under(c.node, u) for u in t[side])]
                for side in ("positive", "negative")
            }
            assert t["positive_classes"] == under["positive"] and t["negative_classes"] == under["negative"]
            assert t["positive_classes"] and t["negative_classes"]
            assert not set(t["positive_classes"]) & set(t["negative_classes"])
            assert set(t["positive_classes"]) | set(t["negative_classes"]) <= set(manifest["partition"]["classes"])
            # short words from the task's name ("Melanoma vs nevus"): its two sides
            assert t["condition"] == " or ".join(h[:1].lower() + h[1:] for h in t["name"].split(" vs "))
            assert t["condition_threshold"] == CONDITION_THRESHOLD == 0.5
    mvn = next(t for t in tasks if t["id"] == "melanoma_vs_nevus")
    assert mvn["condition"] == "melanoma or nevus"
    assert mvn["positive_name"] == "melanoma"


def test_conditions_are_the_training_probabilities_of_the_tasks_classes(files, labelled):
    from derm.classifier import Classifier

    root, labels = labelled
    clf = Classifier.load(files[0])
    paths = [str(root / name) for name in labels]
    preds = clf.predict(paths)
    raw = clf.run(np.stack([clf.prepare(p) for p in paths]))["training_probs"].astype(np.float64)
    names = clf.outputs["training_probs"]["labels"]
    for pred, p in zip(preds, raw, strict=True):
        assert set(pred.conditions) == set(pred.applies) == set(clf.tasks)
        for t in clf.tasks:
            info = clf.task_info[t]
            expected = sum(p[names.index(c)] for c in info["positive_classes"] + info["negative_classes"])
            assert pred.conditions[t] == pytest.approx(expected, abs=1e-6)
            assert pred.applies[t] == (expected >= 0.5) == pred.decisions[t].applies
        d = json.loads(json.dumps(pred.to_dict()))
        assert d["conditions"] == pytest.approx(pred.conditions) and d["applies"] == pred.applies
        assert all(d["decisions"][t]["applies"] == pred.applies[t] for t in clf.tasks)
    # on real images of the classes it was trained on: melanoma vs nevus applies to some (melanocytic) images and
    # not to others (keratinocytic)
    mvn = {labels[Path(p.source).name]: p.applies["melanoma_vs_nevus"] for p in preds}
    assert any(not p.applies["melanoma_vs_nevus"] for p in preds) and any(
        p.applies["melanoma_vs_nevus"] for p in preds
    ), mvn


def test_classify_and_triage_show_a_task_only_where_it_applies(files, labelled, tmp_path):
    import html
    import re

    from derm.classifier import Classifier
    from derm.cli import app

    root, labels = labelled
    tfl = files[0]
    clf = Classifier.load(tfl)
    cond = clf.condition_name("melanoma_vs_nevus")
    preds = {Path(p.source).name: p for p in clf.predict([str(root / n) for n in labels])}
    off = next(n for n, p in preds.items() if not p.applies["melanoma_vs_nevus"])
    on = next(n for n, p in preds.items() if p.applies["melanoma_vs_nevus"])

    res = cli.invoke(app, ["classify", str(root / off), "--model", str(tfl)])
    assert res.exit_code == 0, res.output
    p_off = preds[off].conditions["melanoma_vs_nevus"]
    assert f"melanoma_vs_nevus: not applicable: P({cond}) {p_off:.2f}" in res.output
    assert res.output.count(clf.disclaimer) == 1 and res.output.splitlines()[0] == clf.disclaimer
    assert "melanoma_vs_nevus: 0." not in res.output
    res = cli.invoke(app, ["classify", str(root / on), "--model", str(tfl)])
    d = preds[on].decisions["melanoma_vs_nevus"]
    assert (
        f"melanoma_vs_nevus: P(melanoma | {cond}) {d.probability:.2f}: "
        f"{'POSITIVE' if d.positive else 'negative'} at the 90%-sensitivity operating point (threshold "
        f"{d.threshold:.3f}, sensitivity {d.sensitivity:.2f}, specificity {d.specificity:.2f} on held-out images)"
    ) in res.output

    dest = tmp_path / "triage"
    res = cli.invoke(app, ["triage", str(root), "--model", str(tfl), "--out", str(dest)])
    assert res.exit_code == 3, res.output  # one unreadable file
    rows = read_rows(dest / "results.csv")
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == len(labels) and len(rows) == len(labels) + 1
    for r in ok:
        for t in clf.tasks:
            assert r[f"applies_{t}"] == ("yes" if float(r[f"p_condition_{t}"]) >= 0.5 else "no")
            assert r[f"call_{t}"] == ("" if r[f"applies_{t}"] == "no" else r[f"call_{t}"])
            assert r[f"applies_{t}"] == "no" or r[f"call_{t}"] in ("positive", "negative")
    assert next(r for r in ok if r["image"] == off)["call_melanoma_vs_nevus"] == ""

    report = (dest / "report.html").read_text(encoding="utf-8")
    # the disclaimer once, at the top, without alarm styling
    assert report.count(html.escape(clf.disclaimer)) == 1 and report.count("not a diagnostic device") == 1
    assert report.index(html.escape(clf.disclaimer)) < report.index("<h1>") and "warn" not in report
    # one self-contained file
    assert "<script" not in report and not re.search(r"""(src|href)=['"]?https?:""", report)
    # the summary: counts, every operating point of every task counted over the images where the task applies
    assert f"{len(ok)} images classified, 1 unreadable" in report
    counted = {
        (t, key, float(th)): int(n)
        for t, key, th, n in re.findall(
            r"<tr data-task='([^']+)' data-point='([^']+)' data-threshold='([^']+)'[^>]*>.*?<td class='above'>(\d+)<",
            report,
        )
    }
    expected = {
        (t, key, float(v["threshold"])): sum(
            r[f"applies_{t}"] == "yes" and float(r[f"p_{t}"]) >= float(v["threshold"]) for r in ok
        )
        for t in clf.tasks
        # the manifest's operating points; the default 0.5 where the run had none (here carcinoma vs seborrheic
        # keratosis: the small run holds no seborrheic keratosis images to measure it on)
        for key, v in (
            clf.manifest["operating_points"].get(t, {}).get("by_sensitivity") or {"default": {"threshold": 0.5}}
        ).items()
    }
    assert counted == expected and {k for t, k, _ in expected if t == "melanoma_vs_nevus"} == {"0.8", "0.9", "0.95"}
    # the histogram of P(malignant): one bar per tenth, adding up to the classified images
    svg = report[report.index("<svg") : report.index("</svg>")]
    bars = [int(n) for n in re.findall(r"<rect class='bar' data-count='(\d+)'", svg)]
    assert len(bars) == 10 and sum(bars) == len(ok)
    assert bars == [sum(min(9, int(float(r["p_malignant"]) * 10)) == i for r in ok) for i in range(10)]
    # the task that does not apply is said so, in neutral styling, on that image's card
    card = report[report.index(f"<b>{off}</b>") :].split("</div></div>", 1)[0]
    off_row = next(r for r in ok if r["image"] == off)
    line = f"melanoma_vs_nevus: not applicable: P({cond}) {float(off_row['p_condition_melanoma_vs_nevus']):.2f}"
    assert f"<div class='na'>{html.escape(line)}</div>" in card
    order = [report.index(f"<b>{r['image']}</b>") for r in sorted(ok, key=lambda r: -float(r["p_malignant"]))]
    assert order == sorted(order) and "broken.jpg" in report


def test_files_without_conditions_keep_every_task(files, labelled, tmp_path):
    """A file exported before the manifest named the tasks' conditions: every task applies and is shown."""
    import onnx

    from derm.classifier import Classifier
    from derm.cli import app

    root, labels = labelled
    model = onnx.load(str(files[1]))
    for prop in model.metadata_props:
        if prop.key == "derm_manifest":
            manifest = json.loads(prop.value)
            for o in manifest["outputs"]:
                for key in (
                    "positive_classes",
                    "negative_classes",
                    "positive_name",
                    "condition",
                    "condition_threshold",
                ):
                    o.get("task", {}).pop(key, None)
            manifest.pop("integrity", None)  # files of that time recorded no digest either
            prop.value = json.dumps(manifest)
    onnx.save(model, str(tmp_path / "old.onnx"))
    clf = Classifier.load(tmp_path / "old.onnx")
    preds = clf.predict([str(root / n) for n in labels])
    assert all(p.conditions == {} and all(p.applies.values()) for p in preds)
    res = cli.invoke(app, ["classify", preds[0].source, "--model", str(tmp_path / "old.onnx")])
    assert res.exit_code == 0 and "not applicable" not in res.output
    assert all(f"  {t}: {clf.task_info[t]['name']}, conditional probability " in res.output for t in clf.tasks)


def test_triage_interrupted_keeps_finished_results_and_resumes(files, folder, tmp_path, monkeypatch):
    """Ctrl-C in the middle of a triage: the results so far are written (not lost up to the next checkpoint), the
    command says so and exits 130, and the same command finishes the rest."""
    from derm.classifier import Classifier
    from derm.cli import app

    tfl, _, images = files
    real = Classifier.predict_many

    def interrupted_after_two(self, sources, **kw):
        for i, item in enumerate(real(self, sources, **kw)):
            if i == 2:
                raise KeyboardInterrupt
            yield item

    dest = tmp_path / "triage"
    monkeypatch.setattr(Classifier, "predict_many", interrupted_after_two)
    res = cli.invoke(app, ["triage", str(folder), "--model", str(tfl), "--out", str(dest)])
    assert res.exit_code == 130 and "Interrupted: 2 of" in res.output and "resumes" in res.output
    assert len(read_rows(dest / "results.csv")) == 2 and "Traceback" not in res.output
    monkeypatch.setattr(Classifier, "predict_many", real)
    res = cli.invoke(app, ["triage", str(folder), "--model", str(tfl), "--out", str(dest)])
    assert res.exit_code == 3 and "2 from the previous run" in res.output
    assert len(read_rows(dest / "results.csv")) == len(images) + 1


def test_damaged_or_misnamed_files_never_give_an_answer(files, tmp_path):
    """A byte flipped inside the weights is caught by the digest the manifest recorded at export; a truncated file and
    an ONNX file renamed .tflite are named for what they are, not as "not written by derm-export"."""
    from derm.classifier import Classifier
    from derm.cli import app
    from derm.manifest import ModelFileError, tflite_weights_digest

    tfl, onx, images = files
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


def test_tta_averages_the_file_outputs_over_the_views(files):
    from derm.classifier import Classifier
    from derm.preprocess import tta_views

    plain = Classifier.load(files[0])
    tta = Classifier.load(files[0], tta=4)
    image = plain.prepare(files[2][0])
    raw = plain.run(tta_views(image, 4))
    got = tta.infer(image[None])
    for name, values in raw.items():
        np.testing.assert_allclose(got[name][0], values.mean(axis=0), rtol=0, atol=1e-6)
    assert abs(sum(tta.predict(files[2][0]).levels["three"].values()) - 1) < 1e-4
    from derm.cli import app

    res = cli.invoke(app, ["classify", str(files[2][0]), "-m", str(files[0]), "--tta", "3"])
    assert res.exit_code == 2 and "tta must be 1, 2, 4 or 8" in res.output
