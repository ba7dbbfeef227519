"""Temperature scaling (Guo et al., "On calibration of modern neural networks", ICML 2017): one number ``T`` that
divides the logits, fitted on the validation images by likelihood, so that a probability of 0.9 is right about 90%
of the time there. It does not change which class is most likely, nor any ROC curve or AUC: only how confident the
numbers are (and so the thresholds, which the run measures after it).

The temperature is folded into the model's ``logits`` layer (kernel and bias divided by ``T``), so every file
exported from the run, and every app, gets calibrated probabilities with nothing new to apply; the run records ``T``
and the expected calibration error before and after (``metrics.json`` -> ``calibration``, copied into each export's
manifest).

Softmax is unchanged by adding a constant to every logit, so ``softmax(log(p) / T)`` equals ``softmax(z / T)`` for
``p = softmax(z)``: the temperature is fitted and applied from probabilities alone.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: The interval searched for T; a model whose best T lies at an end of it is reported as such (``at_bound``).
T_RANGE = (0.05, 20.0)
ECE_BINS = 15
#: Fewer validation images than this fit a temperature to noise (13 separable images pull it towards 0): the run
#: then keeps its model as trained and says why.
MIN_IMAGES = 50


def _log(probs: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(probs, np.float64), 1e-38))


def apply_temperature(probs: np.ndarray, t: float) -> np.ndarray:
    """Probabilities with their logits divided by ``t`` (rows sum to 1)."""
    z = _log(probs) / t
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def nll(probs: np.ndarray, targets: np.ndarray, t: float = 1.0) -> float:
    """Mean negative log-likelihood of the targets at temperature ``t``."""
    z = _log(probs) / t
    m = z.max(axis=1, keepdims=True)
    logz = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(logz - z[np.arange(len(z)), targets]))


def fit_temperature(probs: np.ndarray, targets: np.ndarray) -> float:
    """The temperature that minimises the validation NLL: golden-section search on log T (the NLL is convex in
    1 / T), to a relative precision of about 1e-4."""
    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(probs, targets, math.exp(a)), nll(probs, targets, math.exp(b))
    while hi - lo > 1e-4:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(probs, targets, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(probs, targets, math.exp(b))
    return float(math.exp((lo + hi) / 2))


def top_label_ece(probs: np.ndarray, targets: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of the most likely class's probability (equal-width bins, count-weighted)."""
    conf = probs.max(axis=1)
    right = probs.argmax(axis=1) == targets
    idx = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    ece = 0.0
    for j in np.unique(idx):
        sel = idx == j
        ece += sel.sum() * abs(conf[sel].mean() - right[sel].mean())
    return float(ece / len(probs))


def fold_temperature(model: Any, t: float) -> None:
    """Divide the model's ``logits`` layer by ``t``: its softmax then gives the calibrated probabilities."""
    layer = model.get_layer("logits")
    layer.set_weights([w / np.float32(t) for w in layer.get_weights()])


def calibrate(probs: dict[str, np.ndarray], targets: dict[str, np.ndarray]) -> tuple[float | None, dict[str, Any]]:
    """Fit T on ``probs["val"]``; returns T and the report (NLL and top-label ECE of every role, before and after),
    or None and the reason when there are too few validation images to fit it."""
    if len(probs["val"]) < MIN_IMAGES:
        return None, {
            "skipped": f"only {len(probs['val'])} validation images; a temperature needs at least {MIN_IMAGES}, so "
            "the model is kept as trained"
        }
    t = fit_temperature(probs["val"], targets["val"])
    report: dict[str, Any] = {
        "method": "temperature scaling, fitted on the validation images (NLL), folded into the logits layer",
        "temperature": round(t, 4),
        "at_bound": bool(min(abs(math.log(t / b)) for b in T_RANGE) < 1e-3),
        "ece_bins": ECE_BINS,
    }
    for role, p in probs.items():
        after = apply_temperature(p, t)
        report[role] = {
            "n": len(p),
            "nll_before": round(nll(p, targets[role]), 4),
            "nll_after": round(nll(after, targets[role]), 4),
            "ece_before": round(top_label_ece(p, targets[role]), 4),
            "ece_after": round(top_label_ece(after, targets[role]), 4),
        }
    return t, report
