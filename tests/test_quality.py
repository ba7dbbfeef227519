"""Sharpness measure for dropping blurry images from validation and test."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from derm.quality import sharpness, sharpness_threshold


def test_blur_lowers_sharpness_on_real_images(ham):
    for path in ham.paths[:5]:
        with Image.open(path) as im:
            im = im.convert("RGB")
            sharp = sharpness(im)
            blurred = [sharpness(im.filter(ImageFilter.GaussianBlur(r))) for r in (1, 2, 4)]
        assert sharp > blurred[0] > blurred[1] > blurred[2] >= 0


def test_sharpness_ignores_resolution(ham):
    with Image.open(ham.paths[0]) as im:
        im = im.convert("RGB")
        a = sharpness(im)
        b = sharpness(im.resize((im.width * 2, im.height * 2), Image.Resampling.LANCZOS))
    assert b == pytest.approx(a, rel=0.35)


def test_threshold_quantile_and_errors():
    vals = np.arange(100, dtype=float)
    assert sharpness_threshold(vals, 0.1) == pytest.approx(9.9)
    with pytest.raises(ValueError, match=r"received 1\.5"):
        sharpness_threshold(vals, 1.5)
