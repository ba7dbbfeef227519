"""``derm triage``: classify every image under a folder, write a CSV and a self-contained HTML report ordered by risk.

Unreadable files are listed and the run goes on. The CSV is rewritten atomically every few hundred images, so an
interrupted run loses little, and a re-run with the same output folder and model resumes where it stopped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from derm._progress import track
from derm._signals import Interrupted
from derm._triage_files import IMAGE_SUFFIXES, Found, TriageError, _columns, _read_csv, _row, _write_csv, find_images
from derm._triage_report import HIST_BINS, THUMB, histogram, write_report
from derm._util import atomic_write, sha256_file
from derm.classifier import Classifier
from derm.errors import DermError

__all__ = [
    "CHECKPOINT_EVERY",
    "HIST_BINS",
    "IMAGE_SUFFIXES",
    "THUMB",
    "Found",
    "TriageError",
    "TriageInterrupted",
    "TriageSummary",
    "find_images",
    "histogram",
    "triage",
    "write_report",
]

CHECKPOINT_EVERY = 200


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


def _out_paths(out: Path) -> tuple[Path, Path, Path]:
    """Make the output folder; return its results CSV, resume state and report paths."""
    if out.exists() and not out.is_dir():
        raise TriageError(f"--out {str(out)!r} is a file; give a folder for results.csv and report.html.")
    out.mkdir(parents=True, exist_ok=True)
    return out / "results.csv", out / "triage.json", out / "report.html"


def _run_state(classifier: Classifier, root: Path) -> dict[str, Any]:
    """What a resumed run must share with the first: the model, the folder, the operating point, the test-time views."""
    # the model is identified by its content: the same file given by another path resumes
    model_sha = sha256_file(classifier.path) if classifier.path.is_file() else None
    state = {
        "model_sha256": model_sha,
        "folder": str(root.resolve()),
        "operating_point": classifier.threshold if classifier.threshold is not None else classifier.operating_point,
    }
    if getattr(classifier, "tta", 1) > 1:  # absent when 1: folders written before test-time views still resume
        state["tta"] = classifier.tta
    return state


def _previous_rows(out: Path, csv_path: Path, state_path: Path, state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The rows a previous run left in ``out``, by image; refuses an output folder made with another ``state``."""
    if not csv_path.exists():
        return {}
    old = json.loads(state_path.read_text(encoding="utf-8")) if state_path.exists() else {}
    if {k: old.get(k) for k in state} != state:
        what = [k.replace("_sha256", "") for k in state if old.get(k) != state[k]]
        raise TriageError(
            f"{str(out)!r} holds results of another {' and '.join(what)} ({state_path.name}); choose a new --out "
            "or delete it."
        )
    return _read_csv(csv_path)


def _classify_into(
    rows: list[dict[str, Any]],
    todo: list[Path],
    rel: dict[str, str],
    classifier: Classifier,
    csv_path: Path,
    *,
    total: int,
    workers: int,
    progress: bool,
) -> None:
    """Append a row per image of ``todo`` to ``rows``, saving the CSV every ``CHECKPOINT_EVERY`` images and on Ctrl-C
    (then raising :class:`TriageInterrupted`)."""
    columns = _columns(classifier)
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
            f"Interrupted: {len(rows)} of {total} results saved in {csv_path}; run the "
            "same command again to finish (it resumes)."
        ) from None


def triage(
    folder: str | os.PathLike[str],
    classifier: Classifier,
    out: str | os.PathLike[str],
    *,
    workers: int = 2,
    progress: bool = True,
) -> TriageSummary:
    """Classify every image under ``folder`` into ``out``'s results.csv and report.html, resuming a previous run."""
    root, out = Path(folder), Path(out)
    found = find_images(root)
    images = found.images
    csv_path, state_path, report_path = _out_paths(out)
    state = _run_state(classifier, root)
    done = _previous_rows(out, csv_path, state_path, state)
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
    total = len(images) + len(found.not_files)
    _classify_into(rows, todo, rel, classifier, csv_path, total=total, workers=workers, progress=progress)
    everything = sorted([*images, *found.not_files])
    order = {p.relative_to(root).as_posix(): i for i, p in enumerate(everything)}
    rows.sort(key=lambda r: order.get(r["image"], len(order)))
    _write_csv(csv_path, _columns(classifier), rows)
    write_report(report_path, rows, classifier, root, found.ignored)
    bad = sum(r["status"] != "ok" for r in rows)
    return TriageSummary(len(everything), len(rows) - bad, bad, resumed, csv_path, report_path, found.ignored)
