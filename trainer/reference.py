"""The reference model: trained by this project's trainer on all the labelled data in ``../shared``, shipped as a small
committed head, rebuilt anywhere from the pinned backbone.

- :func:`reference_csv` unifies HAM10000, ISIC 2017 train+val and the PAD-UFES-20 phone photos into one labelled CSV
  (labels mapped through the taxonomy's aliases) with a ``source`` column and a ``holdout`` column: a test split of
  every source, group-aware (HAM10000 by lesion, PAD-UFES-20 by patient; ISIC 2017's official validation split).
- :func:`write_samples` draws the committed, licensed sample images from a reference run's split.
- :func:`reference_config` is the reference model's training configuration.

Saving the committed folder and rebuilding a run from it: :mod:`derm.trainer.reference_build`; its model card:
:mod:`derm.trainer.reference_card`; the ``derm-train reference`` commands: :mod:`derm.trainer.reference_cli`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from derm._util import atomic_write
from derm.errors import DermError
from derm.splits import group_components, kfold

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO / "reference"  # the committed reference model (head, run files, model card)
SAMPLES_DIR = REPO / "samples"  # committed, licensed sample images
REFERENCE_FORMAT = 2  # 2: may hold blocks.npz, the fine-tuned backbone weights (format 1 folders read the same)
READABLE_FORMATS = (1, 2)

#: (folder under ``shared/data``, group column, how its test split is chosen)
SOURCES: tuple[tuple[str, str | None, str], ...] = (
    ("ham10000", "lesion_id", "lesion-grouped, 1 of 7 stratified folds"),
    ("isic2017_trainval", None, "the official validation split (150 images)"),
    ("pad_ufes20", "patient_id", "patient-grouped, 1 of 4 stratified folds"),
)
_FOLDS = {"ham10000": 7, "pad_ufes20": 4}
#: The files of a run that the reference folder keeps (model.keras is rebuilt, not committed).
RUN_FILES = (
    "taxonomy.json",
    "partition.json",
    "preprocess.json",
    "config.json",
    "versions.json",
    "metrics.json",
    "history.csv",
)


class ReferenceError(DermError, ValueError):
    """The reference model cannot be built or verified; the message says what is wrong and what to do."""


def shared_dir() -> Path:
    """The project's one data setting: ``$DERM_SHARED``, else ``../shared`` beside the repository."""
    env = os.environ.get("DERM_SHARED")
    return Path(env).expanduser() if env else REPO.parent / "shared"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def reference_csv(shared: Path, out: Path, seed: int = 0) -> Path:
    """One labelled CSV of every source in ``shared/data`` with ``source``, ``group`` and ``holdout`` columns.

    Image paths are absolute. ``holdout`` is ``test`` for the test split of each source and empty otherwise;
    train with ``holdout="holdout=test"`` (the trainer then takes validation images from the rest, group-aware).
    """
    rows: list[dict[str, str]] = []
    for name, group_col, _ in SOURCES:
        base = shared / "data" / name
        if not (base / "labels.csv").is_file():
            raise ReferenceError(
                f"{str(base / 'labels.csv')!r} is missing; the reference model is trained on all of "
                f"{', '.join(s for s, _, _ in SOURCES)} (set DERM_SHARED to their folder)."
            )
        src = read_csv(base / "labels.csv")
        if name in _FOLDS:
            comps = group_components(len(src), [r[group_col] for r in src])  # type: ignore[index]
            test = kfold([r["label"] for r in src], comps, k=_FOLDS[name], seed=seed) == 0
        else:
            test = np.asarray([r.get("split") == "val" for r in src])
        for r, t in zip(src, test, strict=True):
            rows.append(
                {
                    "image": str((base / r["image"]).resolve()),
                    "label": r["label"],
                    "group": f"{name}:{r[group_col]}" if group_col else "",
                    "source": name,
                    "holdout": "test" if t else "",
                }
            )
    with atomic_write(out, newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "label", "group", "source", "holdout"])
        w.writeheader()
        w.writerows(rows)
    log.info("%d images from %d sources in %s.", len(rows), len(SOURCES), out)
    return out


#: What the model card and the manifest say about each source.
SOURCE_INFO: dict[str, dict[str, str]] = {
    "ham10000": {
        "name": "HAM10000",
        "images": "dermoscopy, 200x150 (downsampled from 600x450)",
        "licence": "CC BY-NC 4.0",
        "citation": "Tschandl, Rosendahl, Kittler, Sci. Data 5:180161 (2018)",
    },
    "isic2017_trainval": {
        "name": "ISIC 2017 (training + validation)",
        "images": "dermoscopy, 256x256 (squashed)",
        "licence": "CC-0",
        "citation": "Codella et al., ISBI 2018; ISIC Archive",
    },
    "pad_ufes20": {
        "name": "PAD-UFES-20 (360 of its 2,298 photos)",
        "images": "smartphone photos, mostly 300x300",
        "licence": "CC BY 4.0",
        "citation": "Pacheco et al., Data in Brief 32:106221 (2020)",
    },
}


# ------------------------------------------------------------------------------------------------ sample images

#: Sample images the project ships: (source, label, how many) for the demo set (from the reference model's test
#: split) and the int8 calibration set (from its training split). Only CC-0 and CC BY sources.
DEMO = (
    ("isic2017_trainval", "melanoma", 4),
    ("isic2017_trainval", "nevus", 4),
    ("isic2017_trainval", "seborrheic_keratosis", 4),
    ("pad_ufes20", "BCC", 3),
    ("pad_ufes20", "SCC", 1),
    ("pad_ufes20", "MEL", 2),
    ("pad_ufes20", "NEV", 2),
    ("pad_ufes20", "SEK", 2),
    ("pad_ufes20", "ACK", 2),
)
CALIBRATION = (
    ("isic2017_trainval", "melanoma", 8),
    ("isic2017_trainval", "nevus", 8),
    ("isic2017_trainval", "seborrheic_keratosis", 8),
    ("pad_ufes20", "BCC", 3),
    ("pad_ufes20", "SCC", 2),
    ("pad_ufes20", "MEL", 2),
    ("pad_ufes20", "NEV", 3),
    ("pad_ufes20", "SEK", 3),
    ("pad_ufes20", "ACK", 3),
)
MAX_SAMPLE_BYTES = 150_000


def write_samples(split_csv: Path, out: Path = SAMPLES_DIR, seed: int = 0) -> Path:
    """Copy the sample images (unchanged bytes) from a finished reference run's ``split.csv`` into ``out``:
    ``images/`` (demo, from the test split), ``calibration/`` (from the training split), ``samples.csv`` and
    ``calibration.csv`` (image, label, source, licence), and ``ATTRIBUTION.md``."""
    rows = read_csv(split_csv)
    by_source: dict[tuple[str, str, str], list[dict[str, str]]] = {}
    for r in rows:
        src = source_of(r["image"])
        by_source.setdefault((src, r["label"], r["role"]), []).append(r)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    listing: dict[str, list[dict[str, str]]] = {}
    for folder, plan, role in (("images", DEMO, "test"), ("calibration", CALIBRATION, "train")):
        (out / folder).mkdir(exist_ok=True)
        chosen = []
        for src, label, k in plan:
            pool = sorted(
                (
                    r
                    for r in by_source.get((src, label, role), [])
                    if Path(r["image"]).stat().st_size <= MAX_SAMPLE_BYTES
                ),
                key=lambda r: r["image"],
            )
            if len(pool) < k:
                raise ReferenceError(f"Only {len(pool)} {role} images of {src} {label}; {k} wanted.")
            for i in sorted(rng.choice(len(pool), k, replace=False)):
                r = pool[i]
                dest = out / folder / Path(r["image"]).name
                shutil.copyfile(r["image"], dest)
                chosen.append(
                    {
                        "image": f"{dest.name}",
                        "label": label,
                        "source": src,
                        "licence": SOURCE_INFO[src]["licence"],
                    }
                )
        with atomic_write(out / folder / "labels.csv", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["image", "label", "source", "licence"])
            w.writeheader()
            w.writerows(chosen)
        listing[folder] = chosen
    with atomic_write(out / "ATTRIBUTION.md") as f:
        f.write(_attribution(listing))
    return out


def _attribution(listing: dict[str, list[dict[str, str]]]) -> str:
    text = [
        "# Sample images: sources, licences, attribution",
        "",
        "Real images from two openly licensed datasets, copied byte for byte from the project's copies of them "
        "(changes made to those copies are named below). No HAM10000 image is here "
        "(its licence, CC BY-NC 4.0, is not for redistribution in an Apache-2.0 repository).",
        "",
        "- **ISIC 2017** (`ISIC_*.jpg`): ISIC Archive, International Skin Imaging Collaboration, CC-0 (public domain). "
        'Challenge: Codella et al., "Skin lesion analysis toward melanoma detection", ISBI 2018. These copies are '
        "the 256x256 (squashed) versions of the official images.",
        '- **PAD-UFES-20** (`PAT_*.jpg`): Pacheco, A. G. C. et al., "PAD-UFES-20: a skin lesion dataset composed of '
        'patient data and clinical images collected from smartphones", Data in Brief 32:106221 (2020), Mendeley Data '
        "doi:10.17632/zr7vgbcyr2.1, licensed CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/). Smartphone "
        "photos. Changed: re-encoded from the released PNG to JPEG (quality 95); not cropped or resized.",
        "",
        "`images/` are from the reference model's test split (never trained on): the quickstart classifies and triages "
        "them, and derm-export checks parity on them. `calibration/` are from its training split: int8 calibration.",
        "Labels are the datasets' own (histopathology or expert consensus).",
    ]
    for folder, rows in listing.items():
        text += ["", f"## {folder}/", "", "| file | label | source | licence |", "|---|---|---|---|"]
        text += [f"| {r['image']} | {r['label']} | {r['source']} | {r['licence']} |" for r in rows]
    return "\n".join(text) + "\n"


def source_of(image: str) -> str:
    for name, _, _ in SOURCES:
        if f"/{name}/" in image.replace(os.sep, "/"):
            return name
    return ""


# ------------------------------------------------------------------------------------------------- training


def committed_top_blocks(config: Path) -> int:
    """How many top backbone blocks a committed reference ``config.json`` fine-tuned (its unfreeze_top; 0 for a
    frozen head, or when there is no readable config)."""
    try:
        return int(json.loads(config.read_text(encoding="utf-8")).get("unfreeze_top") or 0)
    except (OSError, ValueError):
        return 0


def reference_config(data: Path, out: Path, ref: Path | None = REFERENCE_DIR, **overrides: Any) -> Any:
    """The reference model's training configuration: the committed ``config.json`` of ``ref`` (None: the first
    reference's defaults, :data:`DEFAULT_CONFIG`) with this machine's data and output paths."""
    from derm.trainer.config import TrainConfig

    committed = ref / "config.json" if ref is not None else None
    if committed is not None and committed.is_file():
        base: dict[str, Any] = json.loads(committed.read_text(encoding="utf-8"))
    else:
        base, committed = dict(DEFAULT_CONFIG), None
    base.update(data=str(data), out=str(out), feature_cache=None, overwrite=False, **overrides)
    return TrainConfig.from_dict(base, source=str(committed) if committed else "the reference defaults")


#: The first reference model's settings (the committed config.json supersedes them once written).
DEFAULT_CONFIG: dict[str, Any] = {
    "within": "nine",
    "max_class_size": 1000,
    "weights": "inception-2015",
    "input_size": 299,
    "pool_layers": ["mixed7", "mixed8", "mixed9", "mixed10"],
    "views": 1,
    "holdout": "holdout=test",
    "source_column": "source",
}
