"""``derm triage``: classify every image under a folder, write a CSV and a self-contained HTML report ordered by risk.

Unreadable files are listed and the run goes on. The CSV is rewritten atomically every few hundred images, so an
interrupted run loses little, and a re-run with the same output folder and model resumes where it stopped.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from derm._progress import track
from derm._util import atomic_write, sha256_file
from derm.classifier import Classifier, Prediction
from derm.errors import DermError
from derm.manifest import check_manifest
from derm.preprocess import ImageError, load_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
CHECKPOINT_EVERY = 200
THUMB = 128


class TriageError(DermError, ValueError):
    """A triage run cannot start: bad folder, or an output folder made with another model."""


@dataclass
class TriageSummary:
    images: int
    classified: int
    unreadable: int
    resumed: int
    csv: Path
    report: Path


def find_images(folder: str | os.PathLike[str]) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise TriageError(f"{str(root)!r} is not a folder of images.")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _columns(clf: Classifier) -> list[str]:
    cols = ["image", "status", "error", "top_class", "p_malignant"]
    for lvl in clf.levels:
        cols += [f"{lvl}:{label}" for label in clf.outputs[f"probs_{lvl}"]["labels"]]
    for task in clf.tasks:
        cols += [f"p_{task}", f"call_{task}"]
    return cols


def _row(rel: str, pred: Prediction | ImageError, clf: Classifier) -> dict[str, Any]:
    if isinstance(pred, ImageError):
        return {"image": rel, "status": "unreadable", "error": str(pred)}
    row: dict[str, Any] = {"image": rel, "status": "ok", "error": ""}
    row["top_class"] = pred.top_classes[0][0] if pred.top_classes else ""
    row["p_malignant"] = f"{pred.malignant:.6f}" if pred.malignant is not None else ""
    for lvl, probs in pred.levels.items():
        row.update({f"{lvl}:{k}": f"{v:.6f}" for k, v in probs.items()})
    for task, p in pred.tasks.items():
        row[f"p_{task}"] = f"{p:.6f}"
        row[f"call_{task}"] = "positive" if pred.decisions[task].positive else "negative"
    return row


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with atomic_write(path, newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def triage(
    folder: str | os.PathLike[str],
    classifier: Classifier,
    out: str | os.PathLike[str],
    *,
    workers: int = 2,
    progress: bool = True,
) -> TriageSummary:
    root, out = Path(folder), Path(out)
    images = find_images(root)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, state_path, report_path = out / "results.csv", out / "triage.json", out / "report.html"
    model_sha = sha256_file(classifier.path) if classifier.path.is_file() else None
    state = {
        "model": str(classifier.path),
        "model_sha256": model_sha,
        "folder": str(root.resolve()),
        "operating_point": classifier.threshold if classifier.threshold is not None else classifier.operating_point,
    }
    columns = _columns(classifier)
    done: dict[str, dict[str, Any]] = {}
    if csv_path.exists():
        old = json.loads(state_path.read_text(encoding="utf-8")) if state_path.exists() else {}
        if {k: old.get(k) for k in state} != state:
            raise TriageError(
                f"{str(out)!r} holds results of another model, folder or operating point ({state_path.name}); "
                "choose a new --out or delete it."
            )
        with open(csv_path, newline="", encoding="utf-8") as f:
            done = {r["image"]: r for r in csv.DictReader(f)}
    with atomic_write(state_path) as f:
        json.dump(state, f, indent=1)
    rel = {str(p): p.relative_to(root).as_posix() for p in images}
    todo = [p for p in images if rel[str(p)] not in done]
    resumed = len(images) - len(todo)
    rows = [done[rel[str(p)]] for p in images if rel[str(p)] in done]
    stream: Iterator[Any] = classifier.predict_many([str(p) for p in todo], workers=workers, on_error="skip")
    if progress:
        stream = track(stream, "Classifying", total=len(todo))
    for i, (name, pred) in enumerate(stream, 1):
        rows.append(_row(rel[name], pred, classifier))
        if i % CHECKPOINT_EVERY == 0:
            _write_csv(csv_path, columns, rows)
    order = {rel[str(p)]: i for i, p in enumerate(images)}
    rows.sort(key=lambda r: order.get(r["image"], len(order)))
    _write_csv(csv_path, columns, rows)
    write_report(report_path, rows, classifier, root)
    bad = sum(r["status"] != "ok" for r in rows)
    return TriageSummary(len(images), len(rows) - bad, bad, resumed, csv_path, report_path)


def _thumbnail(path: Path) -> str:
    try:
        im = load_image(path)
    except ImageError:
        return ""
    im.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def write_report(path: Path, rows: list[dict[str, Any]], clf: Classifier, root: Path) -> None:
    """Self-contained HTML: thumbnails ordered by P(malignant), probabilities, calls, unreadable files, disclaimer."""
    m = check_manifest(clf.manifest)
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: -float(r.get("p_malignant") or 0))
    bad = [r for r in rows if r["status"] != "ok"]
    op = (
        f"user threshold {clf.threshold}"
        if clf.threshold is not None
        else f"operating point aiming at {float(clf.operating_point):.0%} sensitivity"
    )
    points = []
    for task in clf.tasks:
        p = m.get("operating_points", {}).get(task, {}).get("by_sensitivity", {}).get(clf.operating_point)
        if p and clf.threshold is None:
            points.append(
                f"<li>{html.escape(task)}: threshold {p['threshold']:.3f} (sensitivity {p['sensitivity']:.2f}, "
                f"specificity {p['specificity']:.2f} on the training run's held-out images)</li>"
            )
    esc = html.escape
    cards = []
    for r in ok:
        calls = " ".join(
            f"<span class='{'pos' if r.get(f'call_{t}') == 'positive' else 'neg'}'>{esc(t)}: "
            f"{float(r[f'p_{t}']):.2f}</span>"
            for t in clf.tasks
            if r.get(f"p_{t}")
        )
        nine = {k.split(":", 1)[1]: float(v) for k, v in r.items() if k.startswith("nine:") and v}
        top9 = ", ".join(f"{esc(k)} {v:.2f}" for k, v in sorted(nine.items(), key=lambda kv: -kv[1])[:3])
        cards.append(
            f"<div class='card'><img src='{_thumbnail(root / r['image'])}' alt=''>"
            f"<div><b>{esc(r['image'])}</b><br>P(malignant) {float(r['p_malignant'] or 0):.3f}<br>{top9}<br>{calls}"
            "</div></div>"
        )
    errors = "".join(f"<li>{esc(r['image'])}: {esc(r['error'])}</li>" for r in bad)
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>derm triage</title><style>
body{{font-family:sans-serif;margin:2em}} .card{{display:flex;gap:1em;margin:.5em 0;padding:.5em;border:1px solid #ccc}}
.card img{{width:{THUMB}px}} .pos{{color:#b00;font-weight:bold}} .neg{{color:#060}}
.warn{{background:#fee;border:2px solid #b00;padding:1em}}</style></head><body>
<p class="warn"><b>Research and triage aid only, not a diagnostic device.</b> {esc(m.get("disclaimer", ""))}</p>
<h1>Triage of {len(rows)} images</h1>
<p>Model {esc(str(clf.path.name))} ({esc(m["export"]["target"])} {esc(m["export"]["quantize"])}), {esc(op)}.
Ordered by P(malignant), highest first. {len(bad)} unreadable.</p><ul>{"".join(points)}</ul>
{"".join(cards)}
<h2>Unreadable files ({len(bad)})</h2><ul>{errors}</ul></body></html>"""
    with atomic_write(path, encoding="utf-8") as f:
        f.write(doc)
