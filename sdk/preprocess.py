"""The one preprocessing function, shared by the trainer and the SDK: any image in, RGB uint8 at the model size out.

Decoding honours EXIF orientation and turns every mode (grayscale, palette, RGBA, CMYK, 16-bit, float) into
8-bit RGB; resizing squashes to a square as the paper's pipeline did (299x299). Scaling to the network's range
happens *inside* the model and every exported graph, so no caller can get normalisation wrong.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from derm.errors import DermError

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray

#: Refuse images larger than this many pixels (decompression bombs); a 200-megapixel photo still loads.
MAX_PIXELS = 200_000_000
RESAMPLE = Image.Resampling.BILINEAR
# Pillow warns from 89 Mpx and refuses from 179 Mpx on its own; the SDK documents one limit and checks it itself
# (from the header, before any pixel is decoded), so Pillow's is raised to it and its warning becomes our error.
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, MAX_PIXELS)


class ImageError(DermError, ValueError):
    """An image could not be read; the message names the file."""


@dataclass(frozen=True)
class PreprocessSpec:
    """What an app must do before the model: stamped into run directories and exported files."""

    size: int = 299  # square input side, pixels
    color: str = "RGB"  # channel order
    dtype: str = "uint8"  # 0..255; the model scales to [-1, 1] itself
    resize: str = "bilinear, aspect ratio not kept (squash), after EXIF orientation"
    scaling_in_model: str = "x / 127.5 - 1"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _name(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{type(source).__name__}>"


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        arr = source
        if arr.size == 0:
            raise ImageError(f"Array image has no pixels (shape {arr.shape}).")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise ImageError(
                f"Array image holds {int((~np.isfinite(arr)).sum())} NaN or infinite values (shape {arr.shape}); "
                "give pixel values in 0..255 (or 0..1 for floats)."
            )
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
            raise ImageError(f"Array image must be HxW, HxWx3 or HxWx4, received shape {arr.shape}.")
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0:
                arr = arr * 255.0
            elif arr.dtype == np.uint16:
                arr = arr / 257.0
            arr = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(source)))
    path = Path(source)
    if not path.is_file():
        raise ImageError(f"Image not found: {str(path)!r}.")
    return Image.open(path)


def load_image(source: ImageSource) -> Image.Image:
    """Decode any supported image to an upright 8-bit RGB PIL image. Raises :class:`ImageError` naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = _open(source)
        if im.width * im.height > MAX_PIXELS:
            raise ImageError(
                f"Image {_name(source)} is {im.width}x{im.height} pixels, over the {MAX_PIXELS:,}-pixel limit; "
                "downscale it first."
            )
        im = ImageOps.exif_transpose(im)
        return _to_rgb(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"Image {_name(source)} is over the {MAX_PIXELS:,}-pixel limit; downscale it first.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"Cannot read image {_name(source)}: {type(exc).__name__}: {exc}") from exc


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        im.load()
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent areas become white
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, P, CMYK, YCbCr, 1, LAB, HSV


def resize(im: Image.Image, size: int) -> np.ndarray:
    """Square ``size`` x ``size`` RGB uint8 array (aspect ratio not kept, as in the paper's pipeline)."""
    if im.size != (size, size):
        if max(im.size) > 4 * size and hasattr(im, "reduce"):
            factor = max(1, min(im.width, im.height) // (2 * size))
            if factor > 1:
                im = im.reduce(factor)  # fast box pre-shrink of huge photos; the final resize stays bilinear
        im = im.resize((size, size), RESAMPLE)
    return np.asarray(im, dtype=np.uint8)


def preprocess(source: ImageSource, size: int = 299) -> np.ndarray:
    """Decode and resize: (size, size, 3) uint8 RGB, ready for an exported model or the trainer."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, received {size!r}.")
    return resize(load_image(source), size)


#: Test-time views, in order: the image, its vertical flip (training's flip), then the 180, 90 and 270 degree
#: rotations, each plain and flipped. ``--tta N`` averages the model's outputs over the first N (1, 2, 4 or 8).
#: Quarter turns of a square are lossless, and within training's augmentation (any rotation, then the largest
#: upright inscribed rectangle: the whole square at multiples of 90 degrees).
TTA_VIEWS = ((0, False), (0, True), (2, False), (2, True), (1, False), (1, True), (3, False), (3, True))


def check_tta(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) not in (1, 2, 4, 8):
        raise ValueError(f"tta must be 1, 2, 4 or 8 views (flips and quarter turns), received {n!r}.")
    return int(n)


def tta_views(image: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` test-time views of one ``(s, s, 3)`` image, as a ``(n, s, s, 3)`` batch."""
    views = []
    for turns, flip in TTA_VIEWS[: check_tta(n)]:
        v = np.rot90(image, turns, axes=(0, 1))
        views.append(v[::-1] if flip else v)
    return np.ascontiguousarray(np.stack(views))
