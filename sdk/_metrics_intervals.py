"""Confidence intervals: the Wilson interval of a proportion and stratified percentile bootstraps of AUC and mean
per-class accuracy, alone or paired (the difference of two models on the same images)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from derm._metrics_binary import auc
from derm._metrics_checks import _binary, _both_classes, _check_boot, _fraction, _pair
from derm._metrics_classes import mean_per_class_accuracy


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
