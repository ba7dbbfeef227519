"""k-way metrics of class predictions: confusion matrix, accuracy, mean per-class accuracy, log loss."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from derm._metrics_checks import _int_labels, _json_float, _n_classes, _pair


def confusion_matrix(y_true: Any, y_pred: Any, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) int64 counts: rows the true class, columns the predicted. ``y_true < 0`` is ignored."""
    n_classes = _n_classes(n_classes)
    yt, yp = _pair(y_true, y_pred, n_classes)
    return np.bincount(yt * n_classes + yp, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def mean_per_class_accuracy(y_true: Any, y_pred: Any, n_classes: int) -> tuple[float, np.ndarray]:
    """Mean of the per-class recalls over the classes present in ``y_true`` (``y_true < 0`` ignored).

    Returns ``(mean, recalls)``: ``recalls`` has one entry per class, NaN for classes absent from ``y_true`` (left
    out of the mean). The mean is NaN when no entry is left. Equals scikit-learn's ``balanced_accuracy_score``.
    """
    cm = confusion_matrix(y_true, y_pred, n_classes)
    support = cm.sum(axis=1)
    present = support > 0
    recalls = np.full(len(cm), np.nan)
    recalls[present] = np.diag(cm)[present] / support[present]
    mean = float(recalls[present].mean()) if present.any() else math.nan
    return mean, recalls


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of entries with ``y_pred == y_true``, ignoring ``y_true < 0``; NaN when no entry is left."""
    yt, yp = _int_labels(y_true, "y_true"), _int_labels(y_pred, "y_pred")
    if yt.shape != yp.shape:
        raise ValueError(f"y_true and y_pred differ in length: {yt.shape} vs {yp.shape}.")
    keep = yt >= 0
    return float((yt[keep] == yp[keep]).mean()) if keep.any() else math.nan


def log_loss(y_true: Any, probs: Any, eps: float = 1e-12) -> float:
    """Mean negative log of the probability given to each true class (``probs`` (n, k), rows of probabilities),
    each probability clipped to ``[eps, 1]``."""
    yt = _int_labels(y_true, "y_true")
    p = np.asarray(probs)
    if p.ndim != 2 or len(p) != len(yt):
        raise ValueError(f"probs must have shape ({len(yt)}, classes), received {p.shape}.")
    return float(-np.mean(np.log(np.clip(p[np.arange(len(yt)), yt], eps, 1))))


def multiclass_metrics(y_true: Any, probs: Any, labels: Sequence[str]) -> dict[str, Any]:
    """k-way metrics of class probabilities ``probs`` (n, k), predicting the arg-max, against ``y_true`` (n,).

    Returns a JSON-serialisable dict: ``n`` (entries evaluated), ``n_excluded`` (``y_true < 0``), ``accuracy``,
    ``mean_per_class_accuracy``, ``per_class`` ``{label: {"recall", "support"}}`` (recall ``None`` without
    support), ``confusion`` (rows true, columns predicted) and ``labels``.
    """
    labels = [str(v) for v in labels]
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(labels):
        raise ValueError(f"probs must have shape (n, {len(labels)}) for {len(labels)} labels, received {p.shape}.")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be distinct, received {labels}.")
    yt = _int_labels(y_true, "y_true")
    if len(yt) != len(p):
        raise ValueError(f"y_true and probs differ in length: {len(yt)} vs {len(p)}.")
    if np.isnan(p).any():
        raise ValueError(f"probs holds {int(np.isnan(p).sum())} NaN values.")
    k = len(labels)
    y_pred = p.argmax(axis=1) if len(p) else np.zeros(0, dtype=np.int64)
    cm = confusion_matrix(yt, y_pred, k)
    mpca, recalls = mean_per_class_accuracy(yt, y_pred, k)
    support = cm.sum(axis=1)
    return {
        "n": int(support.sum()),
        "n_excluded": int((yt < 0).sum()),
        "accuracy": _json_float(accuracy(yt, y_pred)),
        "mean_per_class_accuracy": _json_float(mpca),
        "per_class": {
            lab: {"recall": _json_float(recalls[i]), "support": int(support[i])} for i, lab in enumerate(labels)
        },
        "confusion": cm.tolist(),
        "labels": labels,
    }
