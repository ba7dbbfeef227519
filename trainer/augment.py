"""The paper's augmentation: random rotation 0-359 degrees, crop of the largest upright inscribed rectangle,
vertical flip with probability 0.5. Pure PIL and numpy, so it runs inside tf.data workers and in tests alike.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from derm.preprocess import RESAMPLE, resize


def largest_inscribed_rect(width: float, height: float, angle_deg: float) -> tuple[float, float]:
    """Width and height of the largest axis-aligned rectangle inside a ``width`` x ``height`` rectangle rotated
    by ``angle_deg`` (both centred on the same point)."""
    if width <= 0 or height <= 0:
        return 0.0, 0.0
    a = math.radians(angle_deg)
    sin_a, cos_a = abs(math.sin(a)), abs(math.cos(a))
    if sin_a < 1e-12:
        return float(width), float(height)
    if cos_a < 1e-12:
        return float(height), float(width)
    long_side, short_side = (width, height) if width >= height else (height, width)
    if short_side <= 2.0 * sin_a * cos_a * long_side or abs(sin_a - cos_a) < 1e-10:
        # Half-constrained: two crop corners touch the longer side.
        x = 0.5 * short_side
        w, h = (x / sin_a, x / cos_a) if width >= height else (x / cos_a, x / sin_a)
    else:
        cos_2a = cos_a * cos_a - sin_a * sin_a
        w = (width * cos_a - height * sin_a) / cos_2a
        h = (height * cos_a - width * sin_a) / cos_2a
    return w, h


def rotate_and_crop(im: Image.Image, angle_deg: float) -> Image.Image:
    """Rotate about the centre and crop the largest upright rectangle holding no fill (rounded inwards)."""
    if angle_deg % 360 == 0:
        return im
    rotated = im.rotate(angle_deg, resample=RESAMPLE, expand=True)
    w, h = largest_inscribed_rect(im.width, im.height, angle_deg)
    w, h = max(1, math.floor(w) - 2), max(1, math.floor(h) - 2)  # 1-px margin: interpolated edges
    cx, cy = rotated.width / 2.0, rotated.height / 2.0
    left, top = round(cx - w / 2.0), round(cy - h / 2.0)
    return rotated.crop((left, top, left + w, top + h))


def augment(im: Image.Image, rng: np.random.Generator, size: int) -> np.ndarray:
    """One augmented view: rotation, inscribed crop, vertical flip (p=0.5), then the shared resize."""
    angle = float(rng.uniform(0.0, 360.0))
    out = rotate_and_crop(im, angle)
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return resize(out, size)


def view_rng(seed: int, index: int, view: int) -> np.random.Generator:
    """Independent, reproducible random stream for view ``view`` of image ``index`` under ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([seed, index, view]))
