"""Evaluation metrics in pure numpy: confusion matrices, ROC curves and AUC, bootstrap intervals, operating points.

No scikit-learn and no TensorFlow: the light SDK and the benchmarks use this module. The binary functions follow
scikit-learn's conventions (``roc_curve`` with ``drop_intermediate=False``: thresholds decreasing, the first one
``+inf``) and the rule **predict positive when** ``score >= threshold``. Labels below 0 mean "not in this task" and
are ignored where a function says so. The ``*_metrics`` functions return JSON-serialisable dicts: NaN and infinite
values there are written as ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

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


# ---------------------------------------------------------------------------------------------------- validation


def _int_labels(values: Any, name: str) -> np.ndarray:
    """A 1-d int64 array of class indices (bools and integer-valued floats accepted)."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-d array of class indices, received shape {arr.shape}.")
    if arr.dtype == bool or np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            raise ValueError(f"{name} must hold integer class indices, received {arr[bad][:5].tolist()}.")
        return arr.astype(np.int64)
    raise ValueError(f"{name} must hold integer class indices, received dtype {arr.dtype}.")


def _n_classes(n_classes: Any) -> int:
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive integer, received {n_classes!r}.")
    return int(n_classes)


def _pair(y_true: Any, y_pred: Any, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated (y_true, y_pred) restricted to the entries with ``y_true >= 0``."""
    yt, yp = _int_labels(y_true, "y_true"), _int_labels(y_pred, "y_pred")
    if yt.shape != yp.shape:
        raise ValueError(f"y_true and y_pred differ in length: {yt.shape} vs {yp.shape}.")
    keep = yt >= 0
    yt, yp = yt[keep], yp[keep]
    if (yt >= n_classes).any():
        raise ValueError(f"y_true holds class indices >= n_classes={n_classes}: {np.unique(yt[yt >= n_classes])}.")
    bad = (yp < 0) | (yp >= n_classes)
    if bad.any():
        raise ValueError(f"y_pred holds class indices outside [0, {n_classes}): {np.unique(yp[bad])[:10].tolist()}.")
    return yt, yp


def _scores(score: Any, n: int, name: str = "score") -> np.ndarray:
    s = np.asarray(score, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"{name} must be a 1-d array, received shape {s.shape}.")
    if len(s) != n:
        raise ValueError(f"y and {name} differ in length: {n} vs {len(s)}.")
    if not np.isfinite(s).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(s)).sum())} non-finite values (NaN or inf).")
    return s


def _binary(y: Any, score: Any, *, ignore_negative: bool = False, name: str = "score") -> tuple[np.ndarray, np.ndarray]:
    """Validated (y as bool, score as float64); with ``ignore_negative`` entries with ``y < 0`` are dropped."""
    arr = _int_labels(y, "y")
    s = _scores(score, len(arr), name)
    if ignore_negative:
        keep = arr >= 0
        arr, s = arr[keep], s[keep]
    bad = (arr != 0) & (arr != 1)
    if bad.any():
        raise ValueError(
            f"y must hold only 0 (negative) and 1 (positive), received {np.unique(arr[bad])[:10].tolist()}."
        )
    return arr.astype(bool), s


def _both_classes(y: np.ndarray, what: str) -> tuple[int, int]:
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"{what} needs both classes in y: found {n_pos} positive and {n_neg} negative samples "
            "(undefined with only one class)."
        )
    return n_pos, n_neg


def _fraction(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], received {value!r}.") from None
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], received {value!r}.")
    return v


def _json_float(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


# ------------------------------------------------------------------------------------------------------ k-way


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


def proportion_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``successes / n`` (e.g. top-1 agreement over ``n`` images).

    Unlike the normal approximation it stays inside [0, 1] and is not degenerate at 0 or ``n`` successes; with
    ``n == 0`` it is ``(0, 1)``.
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"Need 0 <= successes <= n, received successes={successes!r}, n={n!r}.")
    confidence = _fraction(confidence, "confidence")
    if confidence in (0.0, 1.0):
        raise ValueError(f"confidence must lie strictly between 0 and 1, received {confidence!r}.")
    if n == 0:
        return 0.0, 1.0
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if successes == 0 else lo), (1.0 if successes == n else hi)  # exact ends, not 1 - 1e-16


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


# ----------------------------------------------------------------------------------------------------- binary


def _roc_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (false positives, true positives, thresholds) at each distinct score, highest first, from (0, 0)."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tps = np.cumsum(y_sorted)[last]
    fps = last + 1 - tps
    return np.r_[0, fps], np.r_[0, tps], np.r_[np.inf, s_sorted[last]]


def roc_curve(y: Any, score: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr, thresholds)``, as scikit-learn's ``roc_curve(..., drop_intermediate=False)``.

    One point per distinct score (ties give one point), thresholds decreasing, the first ``+inf`` (nothing called
    positive). Point ``i`` is the rule "positive when ``score >= thresholds[i]``".
    """
    yb, s = _binary(y, score)
    n_pos, n_neg = _both_classes(yb, "roc_curve")
    fps, tps, thr = _roc_counts(yb, s)
    return fps / n_neg, tps / n_pos, thr


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks of ``s`` ascending, ties sharing their mean rank."""
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    starts = np.r_[0, np.flatnonzero(np.diff(s_sorted)) + 1]
    ends = np.r_[starts[1:], len(s)]
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auc(y: Any, score: Any) -> float:
    """Area under the ROC curve: ``P(score_pos > score_neg) + P(tie) / 2`` (Mann-Whitney U / (n_pos n_neg)).

    Equal to the trapezoid area under :func:`roc_curve` and to scikit-learn's ``roc_auc_score``.
    """
    yb, s = _binary(y, score)
    n_pos, n_neg = _both_classes(yb, "auc")
    rank_sum = _average_ranks(s)[yb].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _check_boot(n_boot: Any, alpha: Any) -> float:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, received {n_boot!r}.")
    alpha = _fraction(alpha, "alpha")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be strictly between 0 and 1, received {alpha!r}.")
    return alpha


def _resampled_aucs(s: np.ndarray, pos_draw: np.ndarray, neg_draw: np.ndarray) -> np.ndarray:
    """AUC of scores ``s`` on each resample: row ``i`` takes positives ``s[pos_draw[i]]`` and negatives
    ``s[neg_draw[i]]``. Each score becomes the index of its distinct value, so a resample's AUC follows from the two
    class histograms over them (ties count half)."""
    uniq, code = np.unique(s, return_inverse=True)
    k = len(uniq)
    b, n_pos = pos_draw.shape
    n_neg = neg_draw.shape[1]
    offset = (np.arange(b) * k)[:, None]
    hp = np.bincount((code[pos_draw] + offset).ravel(), minlength=b * k).reshape(b, k)
    hn = np.bincount((code[neg_draw] + offset).ravel(), minlength=b * k).reshape(b, k)
    below = np.cumsum(hn, axis=1) - hn  # negatives strictly below each distinct value
    return (hp * (below + 0.5 * hn)).sum(axis=1) / (n_pos * n_neg)


def bootstrap_auc(
    y: Any, score: Any, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """AUC with a ``1 - alpha`` percentile bootstrap interval: ``(auc, lo, hi)``.

    Positives and negatives are resampled separately (stratified, with replacement, at their own counts), so each
    resample holds both classes. Deterministic for a given ``seed``.
    """
    yb, s = _binary(y, score)
    n_pos, n_neg = _both_classes(yb, "bootstrap_auc")
    alpha = _check_boot(n_boot, alpha)
    point = auc(yb, s)
    pos, neg = np.nonzero(yb)[0], np.nonzero(~yb)[0]
    rng = np.random.default_rng(seed)
    chunk = max(1, min(int(n_boot), 4_000_000 // max(len(np.unique(s)), n_pos, n_neg)))
    aucs = np.empty(int(n_boot))
    for start in range(0, int(n_boot), chunk):
        b = min(chunk, int(n_boot) - start)
        pos_draw, neg_draw = pos[rng.integers(0, n_pos, size=(b, n_pos))], neg[rng.integers(0, n_neg, size=(b, n_neg))]
        aucs[start : start + b] = _resampled_aucs(s, pos_draw, neg_draw)
    lo, hi = np.percentile(aucs, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return point, float(lo), float(hi)


def bootstrap_mpca(
    y_true: Any, y_pred: Any, n_classes: int, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """Mean per-class accuracy with a ``1 - alpha`` percentile bootstrap interval that resamples the images of each
    class at its own count (``y_true < 0`` ignored). Returns ``(mpca, lo, hi)``."""
    yt, yp = _pair(y_true, y_pred, n_classes)
    alpha = _check_boot(n_boot, alpha)
    if not len(yt):
        raise ValueError("bootstrap_mpca needs at least one labelled image.")
    rng = np.random.default_rng(seed)
    classes = np.unique(yt)
    boots = np.zeros(int(n_boot))
    for c in classes:
        ok = yp[yt == c] == c
        boots += ok[rng.integers(0, len(ok), (int(n_boot), len(ok)))].mean(axis=1)
    boots /= len(classes)
    lo, hi = np.percentile(boots, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return mean_per_class_accuracy(yt, yp, n_classes)[0], float(lo), float(hi)


def paired_auc_difference(
    y: Any, score_a: Any, score_b: Any, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """``AUC(a) - AUC(b)`` on the same images, with a ``1 - alpha`` paired percentile bootstrap interval.

    Each resample draws positives and negatives separately (stratified, as :func:`bootstrap_auc`) and scores both
    models on the same drawn images, so the interval is that of the difference, far narrower than the two AUCs'
    own intervals. Used to judge whether a quantized file lost AUC against its float model beyond what the number of
    labelled images can tell apart. Returns ``(difference, lo, hi)``.
    """
    yb, sa = _binary(y, score_a, name="score_a")
    _, sb = _binary(y, score_b, name="score_b")
    n_pos, n_neg = _both_classes(yb, "paired_auc_difference")
    alpha = _check_boot(n_boot, alpha)
    point = auc(yb, sa) - auc(yb, sb)
    pos, neg = np.nonzero(yb)[0], np.nonzero(~yb)[0]
    rng = np.random.default_rng(seed)
    diffs = np.empty(int(n_boot))
    chunk = max(1, 4_000_000 // (n_pos + n_neg))
    for start in range(0, int(n_boot), chunk):
        b = min(chunk, int(n_boot) - start)
        pos_draw, neg_draw = pos[rng.integers(0, n_pos, (b, n_pos))], neg[rng.integers(0, n_neg, (b, n_neg))]
        diffs[start : start + b] = _resampled_aucs(sa, pos_draw, neg_draw) - _resampled_aucs(sb, pos_draw, neg_draw)
    lo, hi = np.percentile(diffs, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(point), float(lo), float(hi)


def paired_mpca_difference(
    y_true: Any, pred_a: Any, pred_b: Any, n_classes: int, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """Mean per-class accuracy of predictions ``a`` minus that of ``b`` on the same images (``y_true < 0``
    ignored), with a ``1 - alpha`` paired bootstrap interval that resamples the images of each class at its own count
    (so every class keeps its weight in the mean). Returns ``(difference, lo, hi)``."""
    ya, pa = _pair(y_true, pred_a, n_classes)
    _, pb = _pair(y_true, pred_b, n_classes)
    alpha = _check_boot(n_boot, alpha)
    if not len(ya):
        raise ValueError("paired_mpca_difference needs at least one labelled image.")
    point = mean_per_class_accuracy(ya, pa, n_classes)[0] - mean_per_class_accuracy(ya, pb, n_classes)[0]
    rng = np.random.default_rng(seed)
    diffs = np.zeros(int(n_boot))
    classes = np.unique(ya)
    for c in classes:
        ok_a, ok_b = (pa[ya == c] == c), (pb[ya == c] == c)
        draw = rng.integers(0, len(ok_a), (int(n_boot), len(ok_a)))
        diffs += ok_a[draw].mean(axis=1) - ok_b[draw].mean(axis=1)
    diffs /= len(classes)
    lo, hi = np.percentile(diffs, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(point), float(lo), float(hi)


def sensitivity_at_specificity(y: Any, score: Any, specificity: float) -> tuple[float, float]:
    """The highest sensitivity on the ROC curve with specificity ``>= specificity``: ``(sensitivity, threshold)``.

    Among equal sensitivities the highest threshold (the best specificity) is returned. Positive means
    ``score >= threshold``; the threshold is ``+inf`` when only "nothing positive" meets the constraint.
    """
    specificity = _fraction(specificity, "specificity")
    yb, s = _binary(y, score)
    n_pos, n_neg = _both_classes(yb, "sensitivity_at_specificity")
    fps, tps, thr = _roc_counts(yb, s)
    ok = np.flatnonzero((n_neg - fps) / n_neg >= specificity)  # a prefix, never empty: fps[0] == 0
    i = ok[np.argmax(tps[ok])]  # first index of the maximum
    return float(tps[i] / n_pos), float(thr[i])


def specificity_at_sensitivity(y: Any, score: Any, sensitivity: float) -> tuple[float, float]:
    """The highest specificity on the ROC curve with sensitivity ``>= sensitivity``: ``(specificity, threshold)``.

    Positive means ``score >= threshold``.
    """
    sensitivity = _fraction(sensitivity, "sensitivity")
    yb, s = _binary(y, score)
    n_pos, n_neg = _both_classes(yb, "specificity_at_sensitivity")
    fps, tps, thr = _roc_counts(yb, s)
    i = int(np.argmax(tps / n_pos >= sensitivity))  # the first such point has the fewest false positives
    return float((n_neg - fps[i]) / n_neg), float(thr[i])


def operating_point(y: Any, score: Any, sensitivity: float) -> dict[str, float]:
    """The highest threshold whose sensitivity is at least ``sensitivity``, with the rule

    **predict positive when** ``score >= threshold``. Returns ``{"threshold", "sensitivity", "specificity"}``, the
    sensitivity and specificity reached on ``(y, score)`` at that threshold (``+inf`` for a wanted sensitivity of 0).
    """
    sensitivity = _fraction(sensitivity, "sensitivity")
    yb, s = _binary(y, score)
    n_pos, n_neg = _both_classes(yb, "operating_point")
    fps, tps, thr = _roc_counts(yb, s)
    i = int(np.argmax(tps / n_pos >= sensitivity))
    return {
        "threshold": float(thr[i]),
        "sensitivity": float(tps[i] / n_pos),
        "specificity": float((n_neg - fps[i]) / n_neg),
    }


def calibration(y: Any, prob: Any, n_bins: int = 10) -> dict[str, Any]:
    """Expected calibration error of binary probabilities ``prob`` = P(y = 1), with ``n_bins`` equal-width bins.

    Bin ``j`` holds ``j / n_bins <= prob < (j + 1) / n_bins`` (the last bin includes 1). ``ece`` is the
    count-weighted mean of ``|mean_prob - frac_pos|`` over the bins. Returns ``{"ece", "bins": [{"lo", "hi",
    "count", "mean_prob", "frac_pos"}]}`` with every bin listed (``None`` means and fractions when empty).
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, received {n_bins!r}.")
    yb, p = _binary(y, prob, name="prob")
    if len(p) == 0:
        raise ValueError("calibration needs at least one sample, received none.")
    if (p < 0).any() or (p > 1).any():
        raise ValueError(f"prob must lie in [0, 1], received values from {p.min():g} to {p.max():g}.")
    n_bins = int(n_bins)
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=yb.astype(np.float64), minlength=n_bins)
    bins, ece = [], 0.0
    for j in range(n_bins):
        c = int(count[j])
        mean_p = sum_p[j] / c if c else None
        frac = sum_y[j] / c if c else None
        if c:
            ece += c * abs(mean_p - frac)
        bins.append(
            {
                "lo": j / n_bins,
                "hi": (j + 1) / n_bins,
                "count": c,
                "mean_prob": None if mean_p is None else float(mean_p),
                "frac_pos": None if frac is None else float(frac),
            }
        )
    return {"ece": float(ece / len(p)), "bins": bins}


def _thin_curve(fps: np.ndarray, tps: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop collinear intermediate points (on integer counts), then keep ``max_points`` evenly spaced (ends kept)."""
    if len(fps) > 2:
        keep = np.r_[True, np.logical_or(np.diff(fps, 2) != 0, np.diff(tps, 2) != 0), True]
        fps, tps = fps[keep], tps[keep]
    if len(fps) > max_points:
        idx = np.unique(np.round(np.linspace(0, len(fps) - 1, max_points)).astype(np.int64))
        fps, tps = fps[idx], tps[idx]
    return fps, tps


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
