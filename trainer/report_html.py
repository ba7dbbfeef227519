"""The evaluation report's HTML (one self-contained file, plots inlined) and the readers' operating points a ROC
plot shows beside the model's (a CSV ``task,name,sensitivity,specificity``)."""

from __future__ import annotations

import base64
import csv
import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from derm._util import atomic_write
from derm._version import __version__
from derm.trainer.report import DISCLAIMER, PNG_SIGNATURE

__all__ = ["read_reader_points", "write_html_report"]

# ------------------------------------------------------------------------------------------------------ readers

_READER_COLUMNS = ("task", "name", "sensitivity", "specificity")


def read_reader_points(csv_path: str | os.PathLike[str]) -> dict[str, list[dict[str, Any]]]:
    """Reader (dermatologist) operating points from a CSV with columns ``task,name,sensitivity,specificity``.

    Returns ``{task_id: [{"name", "sensitivity", "specificity"}, ...]}`` in [0, 1]. Values may be fractions or
    percentages: a value with a ``%`` sign, or any value above 1, makes the whole file percent (a file mixing the two
    scales is refused).
    Column names are matched case-insensitively; other columns are ignored.
    """
    csv_path = Path(csv_path)
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{csv_path}: empty file; expected columns {', '.join(_READER_COLUMNS)}.")
        cols = {h.strip().lower(): i for i, h in enumerate(header)}
        missing = [c for c in _READER_COLUMNS if c not in cols]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}; found {header}.")
        raw = []
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < len(header):
                row = row + [""] * (len(header) - len(row))
            raw.append((line, *(row[cols[c]].strip() for c in _READER_COLUMNS)))
    parsed, percent_at = [], None
    for line, task, name, *values in raw:
        if not task:
            raise ValueError(f"{csv_path}, row {line}: empty task.")
        nums = []
        for col, v in zip(("sensitivity", "specificity"), values, strict=True):
            pct = v.endswith("%")
            try:
                x = float(v.rstrip("%").strip())
            except ValueError:
                raise ValueError(f"{csv_path}, row {line}: {col} {v!r} is not a number.") from None
            if not math.isfinite(x) or x < 0 or x > 100:
                raise ValueError(f"{csv_path}, row {line}: {col} {v!r} is outside 0..1 (or 0..100 %).")
            if (pct or x > 1) and percent_at is None:
                percent_at = (line, col, v)
            nums.append((x, pct, col, v))
        parsed.append((line, task, name or f"reader {len(parsed) + 1}", nums))
    out: dict[str, list[dict[str, Any]]] = {}
    for line, task, name, nums in parsed:
        if percent_at is not None:
            for x, pct, col, v in nums:
                if 0 < x <= 1 and not pct:
                    raise ValueError(
                        f"{csv_path}, row {line}: {col} {v!r} looks like a fraction, but the file gives percentages "
                        f"(row {percent_at[0]}: {percent_at[1]} {percent_at[2]!r}); use one scale throughout."
                    )
        scale = 100.0 if percent_at is not None else 1.0
        sens, spec = (x / scale for x, *_ in nums)
        out.setdefault(task, []).append({"name": name, "sensitivity": sens, "specificity": spec})
    return out


# --------------------------------------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
header { border-bottom: 2px solid #444; margin-bottom: 1.5em; }
.disclaimer { color: #a00; font-weight: bold; }
section { margin-bottom: 2.5em; }
.text { white-space: pre-wrap; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th { background: #eee; }
img { max-width: 100%; margin: 0.5em 0; display: block; }
footer { color: #777; font-size: 0.8em; border-top: 1px solid #ccc; padding-top: 0.5em; }
"""

_SECTION_KEYS = {"title", "text", "table", "images"}


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def _table_html(rows: Sequence[Mapping[str, Any]], where: str) -> str:
    if not all(isinstance(r, Mapping) for r in rows):
        raise ValueError(f"{where}: 'table' must be a list of dicts (one per row).")
    columns: list[str] = []
    for r in rows:
        columns.extend(str(k) for k in r if str(k) not in columns)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c)))}</td>" for c in columns) + "</tr>"
        for r in ({str(k): v for k, v in row.items()} for row in rows)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image_html(png: str | os.PathLike[str], where: str) -> str:
    p = Path(png)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ValueError(f"{where}: cannot read image {p}: {exc}") from None
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{where}: {p} is not a PNG file.")
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(p.name)}">'


def write_html_report(path: str | os.PathLike[str], title: str, sections: Sequence[Mapping[str, Any]]) -> Path:
    """A self-contained HTML report: each section ``{"title", "text"?, "table"?, "images"?}``.

    ``table`` is a list of dict rows (columns in order of first appearance), ``images`` a list of PNG paths embedded
    as base64 data URIs. All text is HTML-escaped. The header states that this is research use only.
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(str(title))}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{html.escape(str(title))}</h1>",
        f'<p class="disclaimer">{html.escape(DISCLAIMER)}</p></header>',
    ]
    for i, sec in enumerate(sections):
        where = f"section {i}"
        if not isinstance(sec, Mapping) or "title" not in sec:
            raise ValueError(f"{where}: each section must be a dict with a 'title', received {sec!r:.200}.")
        unknown = set(sec) - _SECTION_KEYS
        if unknown:
            raise ValueError(
                f"{where} ({sec['title']!r}): unknown keys {sorted(unknown)}; allowed {sorted(_SECTION_KEYS)}."
            )
        where = f"section {i} ({sec['title']!r})"
        parts.append(f"<section><h2>{html.escape(str(sec['title']))}</h2>")
        if sec.get("text"):
            parts.append(f'<div class="text">{html.escape(str(sec["text"]))}</div>')
        if sec.get("table"):
            parts.append(_table_html(sec["table"], where))
        images = sec.get("images") or []
        if isinstance(images, (str, os.PathLike)):
            images = [images]
        parts.extend(_image_html(png, where) for png in images)
        parts.append("</section>")
    parts.append(f"<footer>derm {html.escape(__version__)}. {html.escape(DISCLAIMER)}</footer></body></html>")
    path = Path(path)
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + "\n")
    return path
