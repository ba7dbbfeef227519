"""What ``derm triage`` reads and writes: the image files of a folder and the results CSV (inert to spreadsheets)."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from derm._util import atomic_write
from derm.classifier import Classifier, Prediction
from derm.errors import DermError
from derm.preprocess import ImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


class TriageError(DermError, ValueError):
    """A triage run cannot start: bad folder, or an output folder made with another model."""


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
