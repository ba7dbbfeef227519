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
        cols += [f"p_{task}", f"call_{task}", f"applies_{task}", f"p_condition_{task}"]
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
        applies = pred.applies.get(task, True)
        row[f"p_{task}"] = f"{p:.6f}"
        # no call where the task's condition does not hold (e.g. melanoma vs nevus on a carcinoma)
        row[f"call_{task}"] = ("positive" if pred.decisions[task].positive else "negative") if applies else ""
        row[f"applies_{task}"] = "yes" if applies else "no"
        row[f"p_condition_{task}"] = f"{pred.conditions[task]:.6f}" if task in pred.conditions else ""
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


HIST_BINS = 10  # bars of the P(malignant) histogram, each 1 / HIST_BINS wide


def _applies(row: dict[str, Any], task: str) -> bool:
    """Whether a task applies to a CSV row; rows without the column (files or CSVs made before it) always do."""
    return row.get(f"applies_{task}") != "no"


def _condition(row: dict[str, Any], task: str) -> float | None:
    value = row.get(f"p_condition_{task}")
    return float(value) if value else None


def _points(clf: Classifier, task: str) -> list[tuple[str, str, float, float | None, float | None, bool]]:
    """The thresholds the summary counts at: (key, label, threshold, sensitivity, specificity, used for the calls):
    the manifest's operating points (keyed by target sensitivity), and the user's threshold ("user") or the 0.5
    default ("default") where the calls use one."""
    by = clf.manifest.get("operating_points", {}).get(task, {}).get("by_sensitivity", {}) or {}
    rows = []
    for key in sorted(by, key=float):
        v, used = by[key], clf.threshold is None and key == clf.operating_point
        label = f"{float(key):.0%} sensitivity"
        rows.append((key, label, float(v["threshold"]), v.get("sensitivity"), v.get("specificity"), used))
    if clf.threshold is not None:
        rows.append(("user", "your threshold", clf.threshold, None, None, True))
    elif not by:
        rows.append(("default", "default 0.5 (no operating point in the file)", 0.5, None, None, True))
    return rows


def histogram(values: list[float], bins: int = HIST_BINS) -> list[int]:
    """Counts of probabilities in ``bins`` equal bins over [0, 1] (1.0 in the last)."""
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int(v * bins)))] += 1
    return counts


def _svg_histogram(counts: list[int]) -> str:
    """Inline SVG bars (no script, no external resource); each bar carries its count in ``data-count``."""
    w, h, pad, bw = 420, 160, 24, 36
    top = max(counts) or 1
    bars = []
    for i, n in enumerate(counts):
        bh = round((h - 2 * pad) * n / top)
        x, y = pad + i * (bw + 4), h - pad - bh
        lo, hi = i / len(counts), (i + 1) / len(counts)
        bars.append(
            f"<rect class='bar' data-count='{n}' x='{x}' y='{y}' width='{bw}' height='{bh}' fill='#6a7f99'>"
            f"<title>P(malignant) {lo:.1f}-{hi:.1f}: {n} image{'' if n == 1 else 's'}</title></rect>"
            f"<text x='{x + bw / 2:g}' y='{y - 3}' font-size='10' text-anchor='middle'>{n}</text>"
            f"<text x='{x:g}' y='{h - pad + 12}' font-size='9'>{lo:.1f}</text>"
        )
    x_end = pad + len(counts) * (bw + 4) - 4
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' role='img' "
        f"aria-label='histogram of P(malignant)'>{''.join(bars)}"
        f"<text x='{x_end:g}' y='{h - pad + 12}' font-size='9' text-anchor='end'>1.0</text>"
        f"<line x1='{pad}' y1='{h - pad}' x2='{x_end}' y2='{h - pad}' stroke='#333'/></svg>"
    )


def _summary(ok: list[dict[str, Any]], bad: list[dict[str, Any]], clf: Classifier) -> str:
    esc = html.escape
    parts = [f"<p>{len(ok)} images classified, {len(bad)} unreadable.</p>"]
    table = []
    for task in clf.tasks:
        scored = [r for r in ok if r.get(f"p_{task}")]
        applies = [r for r in scored if _applies(r, task)]
        cond = clf.condition_name(task)
        where = f"{len(applies)} images" + (
            f" where it applies (P({esc(cond)}) at least {clf.condition_threshold(task):g})" if cond else ""
        )
        for key, label, t, sens, spec, used in _points(clf, task):
            n = sum(float(r[f"p_{task}"]) >= t for r in applies)
            measured = (
                f"sensitivity {sens:.2f}, specificity {spec:.2f}" if sens is not None and spec is not None else ""
            )
            table.append(
                f"<tr data-task='{esc(task)}' data-point='{esc(key)}' data-threshold='{t!r}'"
                f"{' class=used' if used else ''}>"
                f"<td>{esc(task)}</td><td>{esc(label)}</td><td>{t:.3f}</td><td>{measured}</td>"
                f"<td class='above'>{n}</td><td>{where}</td></tr>"
            )
    if table:
        parts.append(
            "<table><tr><th>task</th><th>operating point</th><th>threshold</th><th>on held-out images</th>"
            "<th>images at or above</th><th>out of</th></tr>" + "".join(table) + "</table>"
        )
    risks = [float(r["p_malignant"]) for r in ok if r.get("p_malignant")]
    if risks:
        parts.append(f"<h3>P(malignant) of the {len(risks)} classified images</h3>{_svg_histogram(histogram(risks))}")
    return "".join(parts)


def write_report(path: Path, rows: list[dict[str, Any]], clf: Classifier, root: Path) -> None:
    """Self-contained HTML: the disclaimer, a summary (counts per operating point, a histogram of P(malignant)),
    thumbnails ordered by P(malignant) with their probabilities and calls, unreadable files."""
    m = check_manifest(clf.manifest)
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: -float(r.get("p_malignant") or 0))
    bad = [r for r in rows if r["status"] != "ok"]
    op = (
        f"user threshold {clf.threshold}"
        if clf.threshold is not None
        else f"operating point aiming at {float(clf.operating_point):.0%} sensitivity"
    )
    esc = html.escape
    cards = []
    for r in ok:
        lines = []
        for t in clf.tasks:
            if not r.get(f"p_{t}"):
                continue
            applies, call = _applies(r, t), r.get(f"call_{t}")
            text = clf.explain(
                t, float(r[f"p_{t}"]), _condition(r, t), applies=applies, positive=call == "positive" if call else None
            )
            style = "na" if not applies else "pos" if call == "positive" else "neg"
            lines.append(f"<div class='{style}'>{esc(text)}</div>")
        nine = {k.split(":", 1)[1]: float(v) for k, v in r.items() if k.startswith("nine:") and v}
        top9 = ", ".join(f"{esc(k)} {v:.2f}" for k, v in sorted(nine.items(), key=lambda kv: -kv[1])[:3])
        cards.append(
            f"<div class='card'><img src='{_thumbnail(root / r['image'])}' alt=''>"
            f"<div><b>{esc(r['image'])}</b><br>P(malignant) {float(r['p_malignant'] or 0):.3f}<br>{top9}"
            f"{''.join(lines)}</div></div>"
        )
    errors = "".join(f"<li>{esc(r['image'])}: {esc(r['error'])}</li>" for r in bad)
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>derm triage</title><style>
body{{font-family:sans-serif;margin:2em}} .card{{display:flex;gap:1em;margin:.5em 0;padding:.5em;border:1px solid #ccc}}
.card img{{width:{THUMB}px}} .pos{{font-weight:bold}} .na{{color:#777}}
.disclaimer{{border-left:4px solid #999;padding:.3em 1em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.2em .5em;text-align:left}} tr.used{{font-weight:bold}}</style></head><body>
<p class="disclaimer">{esc(clf.disclaimer)}</p>
<h1>Triage of {len(rows)} images</h1>
<p>Model {esc(str(clf.path.name))} ({esc(m["export"]["target"])} {esc(m["export"]["quantize"])}), calls at the {esc(op)}
(the rows in bold below). Each binary task is a conditional probability: it is called only for images where its
condition holds, and says "not applicable" elsewhere.</p>
<h2>Summary</h2>{_summary(ok, bad, clf)}
<h2>Images, ordered by P(malignant), highest first</h2>
{"".join(cards)}
<h2>Unreadable files ({len(bad)})</h2><ul>{errors}</ul></body></html>"""
    with atomic_write(path, encoding="utf-8") as f:
        f.write(doc)
