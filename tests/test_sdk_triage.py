"""`derm classify` and `derm triage` on a real exported file: results, report, unreadable files, formulas, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import read_rows

pytest.importorskip("tensorflow")

cli = CliRunner()


@pytest.fixture(scope="module")
def folder(sdk_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    for i, p in enumerate(sdk_files[2]):
        (root / ("sub" if i % 2 else "")).mkdir(exist_ok=True)
        shutil.copy(p, root / ("sub" if i % 2 else "") / Path(p).name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "notes.txt").write_text("not an image, not picked up")
    return root


def test_cli_classify_and_triage_with_resume(sdk_files, folder, tmp_path):
    from derm.cli import app

    tfl, onx, images = sdk_files
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


def test_triage_lists_what_it_cannot_read_and_never_writes_a_formula(sdk_files, folder, tmp_path):
    """Nothing vanishes: a folder or a broken link named like an image is listed as unreadable, other files are
    counted; a file name a spreadsheet would run as a formula is written inert and read back on resume."""
    from derm.cli import app

    tfl, _, images = sdk_files
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


def test_triage_interrupted_keeps_finished_results_and_resumes(sdk_files, folder, tmp_path, monkeypatch):
    """Ctrl-C in the middle of a triage: the results so far are written (not lost up to the next checkpoint), the
    command says so and exits 130, and the same command finishes the rest."""
    from derm.classifier import Classifier
    from derm.cli import app

    tfl, _, images = sdk_files
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
