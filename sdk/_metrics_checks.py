"""Input checks shared by the :mod:`derm.metrics` modules: class labels, scores, fractions, bootstrap settings."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


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


def _check_boot(n_boot: Any, alpha: Any) -> float:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, received {n_boot!r}.")
    alpha = _fraction(alpha, "alpha")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be strictly between 0 and 1, received {alpha!r}.")
    return alpha
