"""The images an export uses: calibration images (the run's training images by default) for int8 ranges and GPTQ, and
labelled validation images (the run's held-out ones by default) for the parity check."""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from derm._progress import track
from derm._util import not_utf8
from derm.exporter.config import MIN_CALIBRATION, ExportConfig
from derm.exporter.graph import ExportError
from derm.preprocess import ImageError, preprocess
from derm.taxonomy import Taxonomy
from derm.trainer.config import Role

log = logging.getLogger(__name__)


def _rows_of(csv_path: Path, image_column: str) -> list[dict[str, str]]:
    if not csv_path.is_file():
        raise ExportError(f"Image list {str(csv_path)!r} does not exist.")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise ExportError(
                    f"Image list {str(csv_path)!r} is empty; pass a CSV with a header row and an {image_column!r} "
                    "column."
                )
            if image_column not in reader.fieldnames:
                raise ExportError(
                    f"{str(csv_path)!r} has no column {image_column!r} (columns: {reader.fieldnames}); pass "
                    "--image-column."
                )
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise ExportError(f"{not_utf8(csv_path, exc)}.") from None
    for r in rows:
        p = Path(r[image_column])
        r[image_column] = str(p if p.is_absolute() else (csv_path.parent / p))
    return rows


def _sample(rows: list[dict[str, str]], n: int, seed: int) -> list[dict[str, str]]:
    if len(rows) <= n:
        return rows
    idx = np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))
    return [rows[i] for i in idx]


def load_images(paths: Sequence[str], size: int, what: str) -> np.ndarray:
    """uint8 (n, size, size, 3) images exactly as an app gives them; every unreadable file is named."""
    out, bad = [], []
    for p in track(paths, f"Reading {what} images", total=len(paths)):
        try:
            out.append(preprocess(p, size))
        except (ImageError, OSError) as exc:
            bad.append(f"{p}: {exc}")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ExportError(f"{len(bad)} {what} image(s) cannot be read: {shown}. Fix or remove them from the list.")
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def calibration_rows(cfg: ExportConfig) -> tuple[list[dict[str, str]], str]:
    if cfg.calibration:
        rows, source = _rows_of(Path(cfg.calibration), cfg.image_column), cfg.calibration
    else:
        split = Path(cfg.run) / "split.csv"
        rows = [r for r in _rows_of(split, "image") if r.get("role") == Role.TRAIN]
        source = f"{split} (role train)"
        _images_here(rows, split, "--calibration")
    rows = _sample(rows, cfg.calibration_size, cfg.seed)
    if len(rows) < MIN_CALIBRATION:
        raise ExportError(
            f"Only {len(rows)} calibration image(s) in {source}; int8 quantization needs at least {MIN_CALIBRATION} "
            f"(a few hundred is better). Pass --calibration with a CSV of real images like the ones the app will see."
        )
    return rows, source


def validation_rows(cfg: ExportConfig, taxonomy: Taxonomy) -> tuple[list[str], list[str | None], str]:
    """Image paths, their taxonomy node ids (None where unlabelled) and a description of the source."""
    if cfg.validation:
        rows = _rows_of(Path(cfg.validation), cfg.image_column)
        nodes: list[str | None] = []
        for r in rows:
            label = r.get(cfg.label_column)
            try:
                nodes.append(taxonomy.resolve(label) if label else None)
            except KeyError:
                nodes.append(None)
        source = cfg.validation
        paths = [r[cfg.image_column] for r in rows]
    else:
        split = Path(cfg.run) / "split.csv"
        all_rows = _rows_of(split, "image")
        role = Role.TEST if any(r.get("role") == Role.TEST for r in all_rows) else Role.VAL
        rows = [r for r in all_rows if r.get("role") == role]
        _images_here(rows, split, "--validation")
        paths, nodes, source = [r["image"] for r in rows], [r.get("node") or None for r in rows], f"{split} ({role})"
    idx = list(range(len(paths)))
    if len(idx) > cfg.validation_size:
        idx = sorted(np.random.default_rng(cfg.seed + 1).choice(len(idx), cfg.validation_size, replace=False))
    if not idx:
        raise ExportError(f"No validation images in {source}; pass --validation with a labelled CSV.")
    return [paths[i] for i in idx], [nodes[i] for i in idx], source


def _images_here(rows: Sequence[Mapping[str, str]], split: Path, option: str) -> None:
    """The run's own images are on another machine (a rebuilt reference model without ../shared): say what to pass."""
    if rows and not any(Path(r["image"]).is_file() for r in rows[:50]):
        raise ExportError(
            f"The images {str(split)!r} lists are not on this machine (e.g. {rows[0]['image']!r}): the run was trained "
            f"elsewhere or its data folder is missing. Pass {option} with a CSV of real images (an image column, and "
            "a label column for --validation), e.g. samples/calibration/labels.csv and samples/images/labels.csv."
        )
