"""The sections of ``derm-eval``'s report.html drawn from the metrics alone: one per binary task (ROC curve with
reader points, sensitivity at set specificities) and one per level of the taxonomy (confusion matrix). The sections
that need the model (t-SNE, saliency) are built in :mod:`derm.trainer.evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def task_sections(result: dict[str, Any], plots: Path, readers: str | Path | None) -> list[dict[str, Any]]:
    """One report section per binary task: its ROC curve (with reader points) and sensitivity at set specificities."""
    from derm.trainer import report, report_html

    sections = []
    reader_points = report_html.read_reader_points(readers) if readers else {}
    for task_id, res in result["tasks"].items():
        png = report.plot_roc(
            res["name"], {"model": res}, plots / f"roc_{task_id}.png", reader_points=reader_points.get(task_id)
        )
        rows = [{"specificity": k, **v} for k, v in res["sens_at_spec"].items()]
        sections.append(
            {
                "title": f"{res['name']}: AUC {res['auc']:.3f} ({res['auc_ci'][0]:.3f}-{res['auc_ci'][1]:.3f})",
                "text": f"{res['n_positive']} positive, {res['n_negative']} negative images; "
                f"calibration error (ECE) {res['ece']:.3f}.",
                "table": rows,
                "images": [png],
            }
        )
    return sections


def level_sections(result: dict[str, Any], plots: Path) -> list[dict[str, Any]]:
    """One report section per level of the taxonomy: its confusion matrix and accuracies."""
    from derm.trainer import report

    sections = []
    for name, res in result["levels"].items():
        png = report.plot_confusion(
            np.asarray(res["confusion"]),
            res["labels"],
            plots / f"confusion_{name}.png",
            title=f"{name}: mean per-class accuracy {res['mean_per_class_accuracy']:.3f}",
        )
        sections.append(
            {
                "title": f"{name} ({len(res['labels'])}-way)",
                "text": f"mean per-class accuracy {res['mean_per_class_accuracy']:.3f}, accuracy {res['accuracy']:.3f}",
                "images": [png],
            }
        )
    return sections
