"""Image quality: a sharpness measure, to keep blurry images out of validation and test sets (never training).

Sharpness is the variance of the 4-neighbour Laplacian of the grey image after the shared resize to a fixed side
(so it does not depend on the file's resolution): a focused lesion has strong edges and high variance, a blurred
one low. Thresholds are data-dependent; :func:`sharpness_threshold` picks one as a quantile of a dataset.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from derm._progress import track
from derm.preprocess import ImageSource, load_image, resize

SHARPNESS_SIZE = 299


def sharpness(source: ImageSource, size: int = SHARPNESS_SIZE) -> float:
    """Variance of the Laplacian of the grey image resized to ``size`` x ``size`` (0..255 scale)."""
    rgb = resize(load_image(source), size).astype(np.float32)
    grey = rgb @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    lap = -4.0 * grey[1:-1, 1:-1] + grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:]
    return float(lap.var())


def sharpness_many(paths: Sequence[str | os.PathLike[str]], workers: int | None = None) -> np.ndarray:
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(workers) as pool:
        return np.asarray(list(track(pool.map(sharpness, paths), "Measuring sharpness", total=len(paths))))


def sharpness_threshold(values: Sequence[float], quantile: float) -> float:
    """The ``quantile`` (0..1) of sharpness values: images below it count as blurry."""
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"The blurry quantile must be in [0, 1), received {quantile!r}.")
    return float(np.quantile(np.asarray(values, dtype=np.float64), quantile))
