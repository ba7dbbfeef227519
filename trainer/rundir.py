"""The run directory: what a training run writes, and how.

A run is written into ``OUT.partial`` and renamed to ``OUT`` when complete, so ``OUT`` is never half-written. It holds
``config.json``, ``taxonomy.json``, ``partition.json``, ``preprocess.json``, ``versions.json``, ``split.csv`` (written
first), ``predictions_{val,test}.csv``, ``metrics.json``, ``history.csv``, ``model.keras`` and last ``run.json``
(format, classes, input size and the sha256 of every other file).

Reading one: :func:`open_run` checks that it is finished and that every file ``run.json`` lists still has its
recorded sha256, and loads the Keras model only when asked (:attr:`Run.model`); :func:`load_run` and
:func:`load_partition` are its short forms. The exporter, ``derm-eval``, ``derm-bench`` and the benchmarks all open
runs here.
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from derm._util import atomic_write, first_hash_mismatch, sha256_file, unwritable
from derm.errors import DermError
from derm.partition import Partition
from derm.preprocess import PreprocessSpec
from derm.taxonomy import Taxonomy
from derm.trainer.config import TrainConfig, TrainError
from derm.trainer.prepare import Prepared
from derm.trainer.weights import versions as weight_versions

log = logging.getLogger(__name__)

RUN_FORMAT = 1
#: What a finished run must hold to be opened.
REQUIRED = ("run.json", "model.keras", "taxonomy.json", "partition.json", "config.json")


class RunError(DermError, ValueError):
    """A run directory is missing, unfinished or changed since it was written; the message says which file."""


@dataclass
class Run:
    """A finished run directory, checked; ``model`` is loaded (Keras) on first use."""

    path: Path
    info: dict[str, Any]  # run.json
    config: dict[str, Any]
    taxonomy: Taxonomy
    partition: Partition

    @functools.cached_property
    def model(self) -> Any:
        from derm.trainer.model import load_model

        return load_model(self.path / "model.keras")


def load_partition(run_dir: str | os.PathLike[str]) -> tuple[Taxonomy, Partition]:
    """The taxonomy and partition a run was trained with (no TensorFlow, no verification: cheap)."""
    run = Path(run_dir)
    tax = Taxonomy.from_dict(json.loads((run / "taxonomy.json").read_text(encoding="utf-8")), source=str(run))
    return tax, Partition.from_dict(json.loads((run / "partition.json").read_text(encoding="utf-8")), tax)


def open_run(run_dir: str | os.PathLike[str], verify: bool = True) -> Run:
    """Open a finished derm-train run directory; with ``verify``, every file its ``run.json`` lists must still have
    the recorded sha256 (a changed model or partition would otherwise be exported or evaluated silently)."""
    run = Path(run_dir)
    missing = [n for n in REQUIRED if not (run / n).is_file()]
    if missing:
        raise RunError(f"{str(run)!r} is not a finished derm-train run directory: missing {missing}.")
    try:
        info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"{str(run / 'run.json')!r} cannot be read ({exc}); retrain the run.") from None
    if verify:
        bad = first_hash_mismatch(run, info.get("files", {}))
        if bad is not None:
            what = "is missing" if bad[1] is None else "does not match the sha256 run.json recorded for it"
            raise RunError(
                f"{str(run / bad[0])!r} {what}: the run was changed or damaged after training. Restore it, or train "
                "(or rebuild the reference model) again."
            )
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    tax, part = load_partition(run)
    return Run(run, info, config, tax, part)


def load_run(run_dir: str | os.PathLike[str]) -> tuple[Any, Taxonomy, Partition, dict[str, Any]]:
    """``(model, taxonomy, partition, config)`` of a finished, verified run directory."""
    r = open_run(run_dir)
    return r.model, r.taxonomy, r.partition, r.config


def write_json(path: Path, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_np_default)
        f.write("\n")


def _np_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@dataclass
class EpochLog:
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, **row: Any) -> None:
        self.rows.append(row)
        log.info("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))


def write_static(work: Path, cfg: TrainConfig, prep: Prepared) -> None:
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "config.json", cfg.to_dict())
    write_json(work / "taxonomy.json", prep.taxonomy.to_dict())
    write_json(work / "partition.json", prep.partition.to_dict())
    write_json(work / "preprocess.json", PreprocessSpec(size=cfg.input_size).to_dict())
    write_json(work / "versions.json", weight_versions())
    ds = prep.dataset
    with atomic_write(work / "split.csv", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "node", "group", "component", "role", "target"])
        for i in range(len(ds)):
            w.writerow(
                [
                    str(ds.paths[i]),
                    ds.labels[i],
                    ds.nodes[i],
                    ds.groups[i] if ds.groups else "",
                    int(prep.components[i]),
                    prep.roles[i],
                    int(prep.targets[i]),
                ]
            )


def write_predictions(path: Path, prep: Prepared, idx: np.ndarray, probs: np.ndarray) -> None:
    labels = prep.partition.labels
    with atomic_write(path, newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "node", "role", *labels])
        for row, i in zip(probs, idx, strict=True):
            w.writerow(
                [
                    str(prep.dataset.paths[i]),
                    prep.dataset.labels[i],
                    prep.dataset.nodes[i],
                    prep.roles[i],
                    *(f"{p:.6g}" for p in row),
                ]
            )


def is_run_directory(path: Path) -> bool:
    """A folder derm-train wrote: its run.json names the files it holds, and it holds nothing else but those and the
    files written beside them later (exports, evaluations)."""
    try:
        run = json.loads((path / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(run, dict) and run.get("format") == RUN_FORMAT and isinstance(run.get("files"), dict)


def check_out(out: Path, overwrite: bool) -> None:
    """``--out`` can be written: a new or empty folder, or (with ``overwrite``) a run directory; never a file or a
    folder of something else, which ``--overwrite`` would delete."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {str(out)!r} is a file, not a folder; choose a folder for the run directory.")
    problem = unwritable(out)
    if problem:
        raise TrainError(f"--out {str(out)!r}: {problem}; choose another --out.")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise TrainError(
            f"Run directory {str(out)!r} exists and is not empty. Choose another --out or pass --overwrite."
        )
    if not is_run_directory(out):
        held = sorted(p.name for p in out.iterdir())
        shown = ", ".join(held[:6]) + (f" and {len(held) - 6} more" if len(held) > 6 else "")
        raise TrainError(
            f"{str(out)!r} is not a run directory written by derm-train (no valid run.json; it holds {shown}). "
            "--overwrite replaces only run directories, so nothing was deleted: choose another --out."
        )


def open_work_dir(out: Path, cfg: TrainConfig) -> Path:
    """``OUT.partial`` for a run to ``out``: an unfinished run of the same configuration is resumed, one of another
    configuration discarded."""
    check_out(out, cfg.overwrite)
    work = out.with_name(out.name + ".partial")
    if (work / "config.json").is_file():
        prev = json.loads((work / "config.json").read_text(encoding="utf-8"))
        if prev != json.loads(json.dumps(cfg.to_dict())):
            log.warning("Discarding the unfinished run in %s: it had another configuration.", work)
            shutil.rmtree(work)
        else:
            log.info("Resuming the unfinished run in %s.", work)
    return work


def file_hashes(run: Path) -> dict[str, str]:
    """``run.json``'s ``files``: the sha256 of every file in the run directory but ``run.json`` itself."""
    return {p.name: sha256_file(p) for p in sorted(run.iterdir()) if p.is_file() and p.name != "run.json"}


def publish(
    work: Path, out: Path, cfg: TrainConfig, prep: Prepared, model: Any, history: EpochLog, result: dict
) -> Path:
    """Write ``metrics.json``, ``history.csv``, ``model.keras`` and last ``run.json`` into ``work``, then rename it to
    ``out`` (replacing a run there: :func:`check_out` allowed it)."""
    result["format"] = RUN_FORMAT
    write_json(work / "metrics.json", result)
    with atomic_write(work / "history.csv", newline="") as f:
        keys = sorted(
            {k for r in history.rows for k in r}, key=["stage", "epoch", "loss", "val_loss", "val_mpca", "lr"].index
        )
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history.rows)
    tmp_model = work / ".model.tmp.keras"
    model.save(tmp_model)
    os.replace(tmp_model, work / "model.keras")
    run = {
        "format": RUN_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "taxonomy_sha256": prep.taxonomy.sha256,
        "partition_sha256": prep.partition.sha256,
        "classes": prep.partition.labels,
        "input_size": cfg.input_size,
        "files": file_hashes(work),
    }
    write_json(work / "run.json", run)
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)
    return out
