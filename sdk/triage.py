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

from derm._cli import Interrupted
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


class TriageInterrupted(DermError):
    """Ctrl-C (or SIGTERM) during a triage: the results so far are saved; re-running resumes."""


@dataclass
class TriageSummary:
    images: int
    classified: int
    unreadable: int
    resumed: int
    csv: Path
    report: Path
    ignored: dict[str, int] | None = None  # files left out for their suffix: suffix -> count


@dataclass
class Found:
    """What a folder holds: image files to classify, entries named like images that are not readable files (a
    folder, a broken link: listed as unreadable, never dropped silently) and other files, counted by suffix."""

    images: list[Path]
    not_files: dict[Path, str]
    ignored: dict[str, int]


def find_images(folder: str | os.PathLike[str]) -> Found:
    root = Path(folder)
    if not root.is_dir():
        raise TriageError(f"{str(root)!r} is not a folder of images.")
    images, not_files, ignored = [], {}, {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            if p.is_file() or p.is_symlink():
                key = p.suffix.lower() or "(no suffix)"
                ignored[key] = ignored.get(key, 0) + 1
        elif p.is_symlink() and not p.exists():
            not_files[p] = f"a broken symbolic link (to {os.readlink(p)!r})"
        elif p.is_dir():
            not_files[p] = "a folder named like an image, not an image file"
        elif not p.is_file():
            not_files[p] = "not a regular file (a device, socket or pipe)"
        else:
            images.append(p)
    return Found(images, not_files, ignored)


_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula (``=cmd|...``) gets a leading apostrophe (OWASP's CSV
    injection rule); :func:`_uncell` takes it off when the CSV is read back."""
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA) else value


def _uncell(value: str) -> str:
    return value[1:] if value.startswith("'") and value[1:].startswith(_FORMULA) else value


_TEXT_COLUMNS = ("image", "error", "top_class")


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
        w.writerows({k: (_cell(v) if k in _TEXT_COLUMNS else v) for k, v in r.items()} for r in rows)


def _read_csv(path: Path) -> dict[str, dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [{k: (_uncell(v) if k in _TEXT_COLUMNS and v else v) for k, v in r.items()} for r in csv.DictReader(f)]
    return {r["image"]: r for r in rows}


def triage(
    folder: str | os.PathLike[str],
    classifier: Classifier,
    out: str | os.PathLike[str],
    *,
    workers: int = 2,
    progress: bool = True,
) -> TriageSummary:
    root, out = Path(folder), Path(out)
    found = find_images(root)
    images = found.images
    if out.exists() and not out.is_dir():
        raise TriageError(f"--out {str(out)!r} is a file; give a folder for results.csv and report.html.")
    out.mkdir(parents=True, exist_ok=True)
    csv_path, state_path, report_path = out / "results.csv", out / "triage.json", out / "report.html"
    # the model is identified by its content: the same file given by another path resumes
    model_sha = sha256_file(classifier.path) if classifier.path.is_file() else None
    state = {
        "model_sha256": model_sha,
        "folder": str(root.resolve()),
        "operating_point": classifier.threshold if classifier.threshold is not None else classifier.operating_point,
    }
    if getattr(classifier, "tta", 1) > 1:  # absent when 1: folders written before test-time views still resume
        state["tta"] = classifier.tta
    columns = _columns(classifier)
    done: dict[str, dict[str, Any]] = {}
    if csv_path.exists():
        old = json.loads(state_path.read_text(encoding="utf-8")) if state_path.exists() else {}
        if {k: old.get(k) for k in state} != state:
            what = [k.replace("_sha256", "") for k in state if old.get(k) != state[k]]
            raise TriageError(
                f"{str(out)!r} holds results of another {' and '.join(what)} ({state_path.name}); choose a new --out "
                "or delete it."
            )
        done = _read_csv(csv_path)
    with atomic_write(state_path) as f:
        json.dump({**state, "model": str(classifier.path)}, f, indent=1)
    rel = {str(p): p.relative_to(root).as_posix() for p in images}
    todo = [p for p in images if rel[str(p)] not in done]
    resumed = len(images) - len(todo)
    rows = [done[rel[str(p)]] for p in images if rel[str(p)] in done]
    rows += [
        {"image": p.relative_to(root).as_posix(), "status": "unreadable", "error": why}
        for p, why in found.not_files.items()
    ]
    stream: Iterator[Any] = classifier.predict_many([str(p) for p in todo], workers=workers, on_error="skip")
    if progress:
        stream = track(stream, "Classifying", total=len(todo))
    try:
        for i, (name, pred) in enumerate(stream, 1):
            rows.append(_row(rel[name], pred, classifier))
            if i % CHECKPOINT_EVERY == 0:
                _write_csv(csv_path, columns, rows)
    except (KeyboardInterrupt, Interrupted):
        _write_csv(csv_path, columns, rows)
        raise TriageInterrupted(
            f"Interrupted: {len(rows)} of {len(images) + len(found.not_files)} results saved in {csv_path}; run the "
            "same command again to finish (it resumes)."
        ) from None
    everything = sorted([*images, *found.not_files])
    order = {p.relative_to(root).as_posix(): i for i, p in enumerate(everything)}
    rows.sort(key=lambda r: order.get(r["image"], len(order)))
    _write_csv(csv_path, columns, rows)
    write_report(report_path, rows, classifier, root, found.ignored)
    bad = sum(r["status"] != "ok" for r in rows)
    return TriageSummary(len(everything), len(rows) - bad, bad, resumed, csv_path, report_path, found.ignored)


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


def _ignored_html(ignored: dict[str, int] | None) -> str:
    if not ignored:
        return ""
    items = ", ".join(f"{html.escape(k)} {v}" for k, v in sorted(ignored.items()))
    n = sum(ignored.values())
    return (
        f"<h2>Other files ({n})</h2><p>Not classified, their suffix is not an image's ({items}); image suffixes: "
        f"{', '.join(sorted(IMAGE_SUFFIXES))}. Convert other images (e.g. HEIC) to JPEG first.</p>"
    )


def write_report(
    path: Path, rows: list[dict[str, Any]], clf: Classifier, root: Path, ignored: dict[str, int] | None = None
) -> None:
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
<p>Model {esc(str(clf.path.name))} ({esc(m["export"]["target"])} {esc(m["export"]["quantize"])};
{esc(clf.verified)}), calls at the {esc(op)}
(the rows in bold below). Each binary task is a conditional probability: it is called only for images where its
condition holds, and says "not applicable" elsewhere.</p>
<h2>Summary</h2>{_summary(ok, bad, clf)}
<h2>Images, ordered by P(malignant), highest first</h2>
{"".join(cards)}
<h2>Unreadable files ({len(bad)})</h2><ul>{errors}</ul>{_ignored_html(ignored)}</body></html>"""
    with atomic_write(path, encoding="utf-8") as f:
        f.write(doc)
