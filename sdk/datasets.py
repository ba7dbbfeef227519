"""Labelled image datasets from a CSV, with labels mapped onto the taxonomy.

A CSV holds at least an image path (relative to the CSV's folder unless absolute) and a label; optionally a group
id (lesion, patient) and any extra columns, which are kept. Labels are mapped through the taxonomy's aliases.
Every problem (unknown label, missing file, unreadable image) is collected and reported at once, before any
training starts; ``on_error="skip"`` drops those rows with a warning instead.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from derm._progress import track
from derm._util import not_utf8, sha256_file
from derm.errors import DatasetError
from derm.preprocess import ImageError
from derm.taxonomy import Taxonomy, default_taxonomy

log = logging.getLogger(__name__)

#: Columns tried, in order, when ``group_column="auto"``: the coarsest grouping first (a patient holds lesions).
GROUP_COLUMNS = ("group", "group_id", "patient_id", "lesion_id")
CheckImages = Literal["none", "header", "decode"]


@dataclass
class Dataset:
    paths: list[Path]  # absolute image paths
    labels: list[str]  # labels as written in the CSV
    nodes: list[str]  # taxonomy node id of each image
    taxonomy: Taxonomy = field(repr=False)
    groups: list[str] | None = None  # group id per image ("" where the row had none)
    group_column: str | None = None
    extras: dict[str, list[str]] = field(default_factory=dict)  # the other CSV columns
    source: Path | None = None  # the CSV
    skipped: list[tuple[int, str, str]] = field(default_factory=list)  # (CSV row, path, reason) dropped by "skip"

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self) -> dict[str, int]:
        """Images labelled exactly at each node (the input of :func:`derm.partition`)."""
        return dict(Counter(self.nodes))

    def label_counts(self) -> dict[str, int]:
        return dict(Counter(self.labels))

    def subset(self, indices: Sequence[int] | np.ndarray) -> Dataset:
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.nonzero(idx)[0]
        take = [int(i) for i in idx]
        return Dataset(
            paths=[self.paths[i] for i in take],
            labels=[self.labels[i] for i in take],
            nodes=[self.nodes[i] for i in take],
            taxonomy=self.taxonomy,
            groups=None if self.groups is None else [self.groups[i] for i in take],
            group_column=self.group_column,
            extras={k: [v[i] for i in take] for k, v in self.extras.items()},
            source=self.source,
        )

    def describe(self) -> dict[str, Any]:
        """What a model trained on this data should say about it (stamped into run directories and exports)."""
        return {
            "source": str(self.source) if self.source else None,
            "csv_sha256": sha256_file(self.source) if self.source and self.source.is_file() else None,
            "images": len(self),
            "groups": len(set(self.groups)) if self.groups is not None else None,
            "group_column": self.group_column,
            "labels": dict(sorted(self.label_counts().items())),
            "taxonomy": {"name": self.taxonomy.name, "sha256": self.taxonomy.sha256},
            **({"skipped_rows": len(self.skipped)} if self.skipped else {}),
        }


_WRAPPED = re.compile(r"ImageError: (.+)")


@contextlib.contextmanager
def readable_images(data: str | os.PathLike[str]) -> Iterator[None]:
    """Work that needs every image of the CSV ``data``: an image that cannot be decoded ends it with one
    :class:`ImageError` naming the file and how to list every such file (not a TensorFlow traceback: tf.data wraps
    errors raised inside its pipeline)."""

    def hinted(message: str) -> ImageError:
        message = message.strip().rstrip(".")
        return ImageError(
            f"{message}. Every listed image is needed here: `derm data check {data} --decode` lists all that cannot "
            "be decoded; fix them or remove their rows."
        )

    try:
        yield
    except ImageError as exc:
        raise hinted(str(exc)) from None
    except Exception as exc:
        found = _WRAPPED.search(str(getattr(exc, "message", "")) or str(exc))
        if found is None or type(exc).__module__.split(".")[0] != "tensorflow":
            raise
        raise hinted(found.group(1)) from None


def csv_header(csv_path: str | os.PathLike[str]) -> list[str]:
    """The column names of a UTF-8 CSV (for messages that say which columns there are)."""
    with open(csv_path, newline="", encoding="utf-8-sig", errors="replace") as f:
        return next(csv.reader(f), [])


def read_dataset(
    csv_path: str | os.PathLike[str],
    taxonomy: Taxonomy | None = None,
    *,
    image_column: str = "image",
    label_column: str = "label",
    group_column: str | None = "auto",
    root: str | os.PathLike[str] | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    check_images: CheckImages = "header",
    workers: int | None = None,
) -> Dataset:
    """Read a labelled dataset.

    Args:
        csv_path: the CSV file.
        taxonomy: maps labels to nodes; default :func:`derm.default_taxonomy`.
        image_column, label_column: column names.
        group_column: column of group ids (lesion or patient) that splits must respect; ``"auto"`` takes the
            first of :data:`GROUP_COLUMNS` present; ``None`` for none.
        root: folder image paths are relative to; default the CSV's folder.
        on_error: ``"raise"`` a :class:`DatasetError` listing every problem, or ``"skip"`` those rows with a warning.
        check_images: ``"header"`` opens each image (fast: catches missing and non-image files),
            ``"decode"`` decodes each fully (also catches truncated files), ``"none"`` checks existence only.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', received {on_error!r}.")
    if check_images not in ("none", "header", "decode"):
        raise ValueError(f"check_images must be 'none', 'header' or 'decode', received {check_images!r}.")
    csv_path = Path(csv_path)
    tax = taxonomy or default_taxonomy()
    base = Path(root) if root is not None else csv_path.parent
    header, rows, group_column = _read_rows(csv_path, image_column, label_column, group_column)
    paths, nodes, problems = _resolve_rows(rows, base, tax, image_column, label_column)
    problems += _check_files(csv_path, rows, paths, image_column, check_images, workers)
    bad_rows = {line - 2 for line, _, _ in problems}
    if problems:
        _report(csv_path, tax, problems, len(bad_rows), len(rows), on_error)
    keep = [i for i in range(len(rows)) if i not in bad_rows]
    if not keep:
        raise DatasetError(f"{str(csv_path)!r}: no usable rows left after skipping {len(bad_rows)} bad ones.", problems)
    groups = None
    if group_column is not None:
        groups = [(rows[i].get(group_column) or "").strip() for i in keep]
    used = {image_column, label_column, *([group_column] if group_column else [])}
    extras = {c: [rows[i].get(c, "") for i in keep] for c in header if c not in used}
    return Dataset(
        paths=[paths[i] for i in keep],
        labels=[rows[i][label_column].strip() for i in keep],
        nodes=[nodes[i] for i in keep],  # type: ignore[misc]
        taxonomy=tax,
        groups=groups,
        group_column=group_column,
        extras=extras,
        source=csv_path.resolve(),
        skipped=[p for p in problems] if on_error == "skip" else [],
    )


def _read_rows(
    csv_path: Path, image_column: str, label_column: str, group_column: str | None
) -> tuple[list[str], list[dict[str, str]], str | None]:
    """The CSV's header and rows, its image and label columns checked; the group column resolved."""
    if not csv_path.is_file():
        raise DatasetError(
            f"Dataset CSV not found: {str(csv_path)!r}. Pass the path of a CSV with "
            f"'{image_column}' and '{label_column}' columns."
        )
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{not_utf8(csv_path, exc)} (in a spreadsheet: 'CSV UTF-8').") from None
    for col, what in ((image_column, "image_column"), (label_column, "label_column")):
        if col not in header:
            raise DatasetError(
                f"{str(csv_path)!r} has no column {col!r} ({what}); its columns are {header}. "
                f"Name the right one with {what}= (Python, and a derm-train config file's key; derm: "
                f"--{what.replace('_', '-')})."
            )
    if group_column == "auto":
        group_column = next((c for c in GROUP_COLUMNS if c in header), None)
    elif group_column is not None and group_column not in header:
        raise DatasetError(f"{str(csv_path)!r} has no group column {group_column!r}; its columns are {header}.")
    if not rows:
        raise DatasetError(f"{str(csv_path)!r} has a header but no rows.")
    return header, rows, group_column


def _resolve_rows(
    rows: list[dict[str, str]], base: Path, tax: Taxonomy, image_column: str, label_column: str
) -> tuple[list[Path], list[str | None], list[tuple[int, str, str]]]:
    """Each row's image path and taxonomy node; the problems (CSV line, image, reason) of empty or unknown ones."""
    problems: list[tuple[int, str, str]] = []
    paths: list[Path] = []
    nodes: list[str | None] = []
    for i, row in enumerate(rows):
        line = i + 2  # 1-based, after the header
        rel = (row.get(image_column) or "").strip()
        label = (row.get(label_column) or "").strip()
        paths.append((base / rel).resolve() if rel else base)
        if not rel:
            problems.append((line, "", "empty image path"))
        if not label:
            problems.append((line, rel, "empty label"))
            nodes.append(None)
            continue
        nid = tax.try_resolve(label)
        nodes.append(nid)
        if nid is None:
            problems.append((line, rel, f"unknown label {label!r}"))
    return paths, nodes, problems


def _check_image(path: Path, check_images: CheckImages) -> str | None:
    if not path.is_file():
        return "file not found"
    if check_images == "none":
        return None
    try:
        with Image.open(path) as im:
            if check_images == "decode":
                im.load()
            elif im.width < 1 or im.height < 1:
                return "empty image"
    except Exception as exc:
        return f"unreadable image ({type(exc).__name__}: {exc})"
    return None


def _check_files(
    csv_path: Path,
    rows: list[dict[str, str]],
    paths: list[Path],
    image_column: str,
    check_images: CheckImages,
    workers: int | None,
) -> list[tuple[int, str, str]]:
    """Every named image exists (and opens or decodes, as asked), checked in threads with progress."""
    todo = [i for i in range(len(rows)) if rows[i].get(image_column, "").strip()]
    with ThreadPoolExecutor(workers or min(8, (os.cpu_count() or 2) * 2)) as pool:
        checked = pool.map(lambda i: _check_image(paths[i], check_images), todo)
        results = list(track(checked, f"Checking {csv_path.name}", total=len(todo)))
    return [(i + 2, rows[i][image_column].strip(), r) for i, r in zip(todo, results, strict=True) if r]


def _report(
    csv_path: Path, tax: Taxonomy, problems: list[tuple[int, str, str]], n_bad: int, n_rows: int, on_error: str
) -> None:
    """Raise :class:`DatasetError` listing the problems, or (``on_error="skip"``) warn that those rows are skipped."""
    problems.sort()
    kinds = Counter(_kind(r) for _, _, r in problems)
    summary = ", ".join(f"{n} {k}" for k, n in kinds.most_common())
    unknown = sorted({r.split("'")[1] for _, _, r in problems if r.startswith("unknown label")})
    listing = "\n".join(f"  row {line}: {p or '-'}: {r}" for line, p, r in problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    hint = (
        f"\nUnknown labels {unknown}: add them to a node's aliases in the taxonomy ({tax.source or tax.name})."
        if unknown
        else ""
    )
    if on_error == "raise":
        raise DatasetError(
            f"{str(csv_path)!r}: {n_bad} of {n_rows} rows have problems ({summary}):\n"
            f"{listing}{more}{hint}\nFix them (`derm data check {csv_path} --decode` lists them all), or skip "
            "those rows with --skip-bad (Python: on_error='skip').",
            problems,
        )
    msg = f"{str(csv_path)!r}: skipping {n_bad} of {n_rows} rows ({summary})."
    warnings.warn(msg, stacklevel=3)  # at the caller of read_dataset
    log.warning("%s\n%s%s", msg, listing, more)


def _kind(reason: str) -> str:
    if reason.startswith("unknown label"):
        return "unknown labels"
    if reason.startswith("unreadable"):
        return "unreadable images"
    return {"file not found": "missing files"}.get(reason, reason + "s")
