"""Evaluation metrics in pure numpy: confusion matrices, ROC curves and AUC, bootstrap intervals, operating points.

No scikit-learn and no TensorFlow: the light SDK and the benchmarks use this module. The binary functions follow
scikit-learn's conventions (``roc_curve`` with ``drop_intermediate=False``: thresholds decreasing, the first one
``+inf``) and the rule **predict positive when** ``score >= threshold``. Labels below 0 mean "not in this task" and
are ignored where a function says so. The ``*_metrics`` functions return JSON-serialisable dicts: NaN and infinite
values there are written as ``None``.

The functions live in private modules by job (``_metrics_classes``: k-way; ``_metrics_binary``: ROC, AUC, operating
points, calibration; ``_metrics_intervals``: bootstrap and Wilson intervals); import them from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from derm._metrics_binary import (
    _roc_counts,
    _thin_curve,
    auc,
    calibration,
    operating_point,
    roc_curve,
    sensitivity_at_specificity,
    specificity_at_sensitivity,
)
from derm._metrics_checks import _binary, _both_classes, _int_labels, _json_float, _scores
from derm._metrics_classes import accuracy, confusion_matrix, log_loss, mean_per_class_accuracy, multiclass_metrics
from derm._metrics_intervals import (
    bootstrap_auc,
    bootstrap_mpca,
    paired_auc_difference,
    paired_mpca_difference,
    proportion_interval,
)

__all__ = [
    "accuracy",
    "auc",
    "binary_task_metrics",
    "bootstrap_auc",
    "bootstrap_mpca",
    "calibration",
    "confusion_matrix",
    "log_loss",
    "mean_per_class_accuracy",
    "multiclass_metrics",
    "operating_point",
    "paired_auc_difference",
    "paired_mpca_difference",
    "proportion_interval",
    "roc_curve",
    "sensitivity_at_specificity",
    "specificity_at_sensitivity",
]

MAX_CURVE_POINTS = 500


def _key(x: float) -> str:
    return f"{float(x):g}"


def binary_task_metrics(
    y: Any,
    score: Any,
    *,
    specificities: Sequence[float] = (0.8, 0.9, 0.95),
    sensitivities: Sequence[float] = (0.8, 0.9, 0.95),
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every binary metric of a task at once, as a JSON-serialisable dict. Entries with ``y < 0`` are ignored.

    Keys: ``n``, ``n_positive``, ``n_negative``, ``n_excluded``, ``auc``, ``auc_ci`` ``[lo, hi]`` (95 % stratified
    bootstrap with ``n_boot`` resamples; ``[None, None]`` when ``n_boot`` is 0), ``sens_at_spec``
    ``{"0.9": {"sensitivity", "threshold"}}``, ``spec_at_sens`` ``{"0.9": {"specificity", "threshold"}}``,
    ``operating_points`` ``{"0.9": {"threshold", "sensitivity", "specificity"}}`` (see :func:`operating_point`),
    ``ece`` and ``calibration`` bins (``None`` when the scores are not probabilities in [0, 1]), and the ROC curve
    ``fpr``, ``tpr`` thinned to at most ``MAX_CURVE_POINTS`` points. Infinite thresholds are written as ``None``.
    """
    arr = _int_labels(y, "y")
    _scores(score, len(arr))
    n_excluded = int((arr < 0).sum())
    yb, s = _binary(arr, score, ignore_negative=True)
    n_pos, n_neg = _both_classes(yb, "binary_task_metrics")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise ValueError(f"n_boot must be a non-negative integer, received {n_boot!r}.")
    point = auc(yb, s)
    lo, hi = bootstrap_auc(yb, s, n_boot=n_boot, seed=seed)[1:] if n_boot else (None, None)
    sens_at_spec = {}
    for sp in specificities:
        sens, thr = sensitivity_at_specificity(yb, s, sp)
        sens_at_spec[_key(sp)] = {"sensitivity": sens, "threshold": _json_float(thr)}
    spec_at_sens, ops = {}, {}
    for se in sensitivities:
        spec, thr = specificity_at_sensitivity(yb, s, se)
        spec_at_sens[_key(se)] = {"specificity": spec, "threshold": _json_float(thr)}
        op = operating_point(yb, s, se)
        ops[_key(se)] = {**op, "threshold": _json_float(op["threshold"])}
    cal = calibration(yb, s) if s.min() >= 0 and s.max() <= 1 else None
    fps, tps = _thin_curve(*_roc_counts(yb, s)[:2], MAX_CURVE_POINTS)
    return {
        "n": len(yb),
        "n_positive": n_pos,
        "n_negative": n_neg,
        "n_excluded": n_excluded,
        "auc": point,
        "auc_ci": [lo, hi],
        "sens_at_spec": sens_at_spec,
        "spec_at_sens": spec_at_sens,
        "operating_points": ops,
        "ece": None if cal is None else cal["ece"],
        "calibration": None if cal is None else cal["bins"],
        "fpr": [round(float(v), 6) for v in fps / n_neg],
        "tpr": [round(float(v), 6) for v in tps / n_pos],
    }
