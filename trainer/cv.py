"""k-fold cross-validation: one run per fold (group-aware folds), then a summary over the folds."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from derm._util import atomic_write, unwritable
from derm.evaluation import summary_row
from derm.trainer.config import TrainConfig, TrainError
from derm.trainer.rundir import write_json
from derm.trainer.train import train

log = logging.getLogger(__name__)


def cross_validate(cfg: TrainConfig | Mapping[str, Any], folds: int = 9) -> Path:
    """k-fold cross-validation (group-aware): ``OUT/fold_K`` runs plus ``OUT/cv.json`` and ``OUT/cv.md``."""
    if not isinstance(cfg, TrainConfig):
        cfg = TrainConfig.from_dict(cfg)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {str(out)!r} is a file, not a folder; choose a folder for the fold runs.")
    problem = unwritable(out / "fold_0")
    if problem:
        raise TrainError(f"--out {str(out)!r}: {problem}; choose another --out.")
    rows = []
    for k in range(folds):
        sub = dataclasses.replace(cfg, out=str(out / f"fold_{k}"), folds=folds, fold=k)
        sub.check()
        run = sub.out
        if (Path(run) / "run.json").is_file() and not cfg.overwrite:
            log.info("Fold %d already done: %s", k, run)
        else:
            train(sub)
        res = json.loads((Path(run) / "metrics.json").read_text(encoding="utf-8"))
        rows.append({"fold": k, **summary_row(res["test"])})
    summary = summarize_folds(rows)
    write_json(out / "cv.json", {"folds": rows, "summary": summary, "config": cfg.to_dict()})
    with atomic_write(out / "cv.md") as f:
        f.write(cv_markdown(rows, summary))
    return out


def summarize_folds(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    keys = [k for k in rows[0] if k not in ("fold", "n")]
    out = {}
    for k in keys:
        vals = np.asarray([r[k] for r in rows if r.get(k) is not None], dtype=np.float64)
        if len(vals):
            out[k] = {
                "mean": float(vals.mean()),
                "sd": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                "min": float(vals.min()),
                "max": float(vals.max()),
            }
    return out


def cv_markdown(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Mapping[str, float]]) -> str:
    keys = [k for k in summary if not k.endswith(("_lo", "_hi"))]
    lines = ["| fold | n | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for r in rows:
        lines.append(
            f"| {r['fold']} | {r['n']} | "
            + " | ".join(f"{r[k]:.3f}" if r.get(k) is not None else "" for k in keys)
            + " |"
        )
    lines.append(
        "| mean ± sd | | " + " | ".join(f"{summary[k]['mean']:.3f} ± {summary[k]['sd']:.3f}" for k in keys) + " |"
    )
    return "\n".join(lines) + "\n"


__all__ = ["cross_validate", "cv_markdown", "summarize_folds"]
