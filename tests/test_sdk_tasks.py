"""Binary tasks as conditional probabilities on a real exported file: the manifest names each task's condition, the SDK
computes it, and `derm classify` / `derm triage` show a task only where it applies (summary, histogram, disclaimer)."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import read_rows

pytest.importorskip("tensorflow")

cli = CliRunner()


@pytest.fixture(scope="module")
def labelled(sdk_files, small_run, tmp_path_factory):
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


def test_manifest_says_each_tasks_condition(sdk_files, small_run):
    from derm.classifier import CONDITION_THRESHOLD
    from derm.manifest import read_manifest
    from derm.trainer.rundir import load_partition

    _, run = small_run
    tax, part = load_partition(run)
    for path in sdk_files[:2]:
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


def test_conditions_are_the_training_probabilities_of_the_tasks_classes(sdk_files, labelled):
    from derm.classifier import Classifier

    root, labels = labelled
    clf = Classifier.load(sdk_files[0])
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


def _off_and_on(clf, root, labels):
    """The predictions by file name, an image where melanoma vs nevus does not apply and one where it does."""
    preds = {Path(p.source).name: p for p in clf.predict([str(root / n) for n in labels])}
    off = next(n for n, p in preds.items() if not p.applies["melanoma_vs_nevus"])
    on = next(n for n, p in preds.items() if p.applies["melanoma_vs_nevus"])
    return preds, off, on


def test_classify_shows_a_task_only_where_it_applies(sdk_files, labelled):
    from derm.classifier import Classifier
    from derm.cli import app

    root, labels = labelled
    tfl = sdk_files[0]
    clf = Classifier.load(tfl)
    cond = clf.condition_name("melanoma_vs_nevus")
    preds, off, on = _off_and_on(clf, root, labels)

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


def _check_calls_only_where_tasks_apply(ok, clf, off) -> None:
    """Each CSV row says whether each task applies and calls it only where it does."""
    for r in ok:
        for t in clf.tasks:
            assert r[f"applies_{t}"] == ("yes" if float(r[f"p_condition_{t}"]) >= 0.5 else "no")
            assert r[f"call_{t}"] == ("" if r[f"applies_{t}"] == "no" else r[f"call_{t}"])
            assert r[f"applies_{t}"] == "no" or r[f"call_{t}"] in ("positive", "negative")
    assert next(r for r in ok if r["image"] == off)["call_melanoma_vs_nevus"] == ""


def _check_disclaimer_once_and_self_contained(report: str, clf) -> None:
    """The disclaimer once, at the top, without alarm styling; one self-contained file."""
    assert report.count(html.escape(clf.disclaimer)) == 1 and report.count("not a diagnostic device") == 1
    assert report.index(html.escape(clf.disclaimer)) < report.index("<h1>") and "warn" not in report
    assert "<script" not in report and not re.search(r"""(src|href)=['"]?https?:""", report)


def _check_summary_counts(report: str, clf, ok) -> None:
    """The summary: counts, every operating point of every task counted over the images where the task applies."""
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


def _check_histogram(report: str, ok) -> None:
    """The histogram of P(malignant): one bar per tenth, adding up to the classified images."""
    svg = report[report.index("<svg") : report.index("</svg>")]
    bars = [int(n) for n in re.findall(r"<rect class='bar' data-count='(\d+)'", svg)]
    assert len(bars) == 10 and sum(bars) == len(ok)
    assert bars == [sum(min(9, int(float(r["p_malignant"]) * 10)) == i for r in ok) for i in range(10)]


def _check_cards(report: str, ok, off: str, cond: str) -> None:
    """The task that does not apply is said so, in neutral styling, on that image's card; cards ordered by risk."""
    card = report[report.index(f"<b>{off}</b>") :].split("</div></div>", 1)[0]
    off_row = next(r for r in ok if r["image"] == off)
    line = f"melanoma_vs_nevus: not applicable: P({cond}) {float(off_row['p_condition_melanoma_vs_nevus']):.2f}"
    assert f"<div class='na'>{html.escape(line)}</div>" in card
    order = [report.index(f"<b>{r['image']}</b>") for r in sorted(ok, key=lambda r: -float(r["p_malignant"]))]
    assert order == sorted(order) and "broken.jpg" in report


def test_triage_shows_a_task_only_where_it_applies(sdk_files, labelled, tmp_path):
    from derm.classifier import Classifier
    from derm.cli import app

    root, labels = labelled
    tfl = sdk_files[0]
    clf = Classifier.load(tfl)
    _, off, _ = _off_and_on(clf, root, labels)

    dest = tmp_path / "triage"
    res = cli.invoke(app, ["triage", str(root), "--model", str(tfl), "--out", str(dest)])
    assert res.exit_code == 3, res.output  # one unreadable file
    rows = read_rows(dest / "results.csv")
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == len(labels) and len(rows) == len(labels) + 1
    _check_calls_only_where_tasks_apply(ok, clf, off)

    report = (dest / "report.html").read_text(encoding="utf-8")
    _check_disclaimer_once_and_self_contained(report, clf)
    _check_summary_counts(report, clf, ok)
    _check_histogram(report, ok)
    _check_cards(report, ok, off, clf.condition_name("melanoma_vs_nevus"))


def test_files_without_conditions_keep_every_task(sdk_files, labelled, tmp_path):
    """A file exported before the manifest named the tasks' conditions: every task applies and is shown."""
    import onnx

    from derm.classifier import Classifier
    from derm.cli import app

    root, labels = labelled
    model = onnx.load(str(sdk_files[1]))
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
