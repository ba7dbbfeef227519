"""Binary metrics of a score: ROC curve and AUC, sensitivity and specificity at operating points, calibration.

Positive means ``score >= threshold``; thresholds follow scikit-learn's ``roc_curve`` (decreasing, the first ``+inf``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from derm._metrics_checks import _binary, _both_classes, _fraction


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
