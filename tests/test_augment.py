import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from derm.trainer.augment import augment, largest_inscribed_rect, rotate_and_crop, view_rng


@settings(max_examples=200, deadline=None)
@given(st.floats(10, 400), st.floats(10, 400), st.floats(0, 360))
def test_inscribed_rect_fits_inside_the_rotated_image(w, h, angle):
    rw, rh = largest_inscribed_rect(w, h, angle)
    assert rw > 0 and rh > 0
    # Each corner of the crop, rotated back into the image frame, lies inside the original rectangle.
    a = math.radians(angle)
    for sx in (-1, 1):
        for sy in (-1, 1):
            x, y = sx * rw / 2, sy * rh / 2
            xr = x * math.cos(a) - y * math.sin(a)
            yr = x * math.sin(a) + y * math.cos(a)
            assert abs(xr) <= w / 2 + 1e-6 and abs(yr) <= h / 2 + 1e-6


def test_inscribed_rect_known_values():
    assert largest_inscribed_rect(200, 150, 0) == (200, 150)
    assert largest_inscribed_rect(200, 150, 90) == (150, 200)
    w, h = largest_inscribed_rect(100, 100, 45)
    assert w == pytest.approx(100 / math.sqrt(2)) and h == pytest.approx(100 / math.sqrt(2))


@pytest.mark.parametrize("angle", [0, 13, 45, 90, 137, 200, 271, 359])
def test_crop_holds_no_fill(angle):
    white = Image.new("RGB", (200, 150), (255, 255, 255))
    out = np.asarray(rotate_and_crop(white, angle))
    assert out.min() >= 250, angle  # the black fill of the rotation never enters the crop


def test_augment_on_a_real_image_is_reproducible(ham):
    im = Image.open(ham.paths[0]).convert("RGB")
    a = augment(im, view_rng(0, 5, 1), 64)
    b = augment(im, view_rng(0, 5, 1), 64)
    c = augment(im, view_rng(0, 5, 2), 64)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert (a == b).all()
    assert not (a == c).all()
