"""The self-contained HTML report of ``derm triage``: summary per operating point, histogram, thumbnails by risk."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from derm._triage_files import IMAGE_SUFFIXES
from derm._util import atomic_write
from derm.classifier import Classifier
from derm.manifest import check_manifest
from derm.preprocess import ImageError, load_image

THUMB = 128


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
