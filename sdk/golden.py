"""Golden vectors: the contract every runtime (Android, iOS, web) reproduces against the Python SDK.

For a few real images, beside an exported file, ``write_golden`` stores:

- ``images/NAME``: the image file, unchanged;
- ``decoded/NAME.rgb``: its pixels as stored (RGB, 8 bits, row-major, before EXIF orientation), so that an app's test
  can check the SDK's orientation and resize rules apart from its platform's JPEG decoder (decoders may differ by a
  level or two: libjpeg's IDCT is not specified to the bit);
- ``inputs/NAME.rgb``: the exact uint8 input tensor the SDK makes from the file (size x size x 3);
- in ``golden.json``: the EXIF orientation, the file's raw outputs on that tensor and the SDK's prediction;
- ``manifest.json``: the file's manifest (for a test that cannot read it from the file, such as iOS's).

An app must make the same input tensor from ``decoded`` + ``orientation`` (bit-exact: the SDK's resize is Pillow's
fixed-point bilinear filter after an integer box reduction, both reproducible in integer arithmetic), and the same
prediction from the raw outputs. No TensorFlow needed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from derm._util import sha256_file
from derm.errors import DermError
from derm.preprocess import ImageError, _to_rgb, preprocess

if TYPE_CHECKING:
    from derm.classifier import Classifier

GOLDEN_FORMAT = "derm-golden/1"
ORIENTATION_TAG = 0x0112


class GoldenError(DermError, ValueError):
    """Golden vectors cannot be written as asked."""


def decoded_pixels(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """An image's RGB pixels as stored (before EXIF orientation) and its EXIF orientation (1..8)."""
    try:
        with Image.open(path) as im:
            orientation = int(im.getexif().get(ORIENTATION_TAG, 1) or 1)
            rgb = np.asarray(_to_rgb(im), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise ImageError(f"Cannot read image {str(path)!r}: {type(exc).__name__}: {exc}") from None
    return rgb, orientation if 1 <= orientation <= 8 else 1


#: EXIF orientation -> the transpose that shows the image upright (what ``ImageOps.exif_transpose`` applies).
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def oriented(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """Pixels as shown: the EXIF orientation applied."""
    im = Image.fromarray(rgb)
    if orientation in ORIENTATIONS:
        im = im.transpose(ORIENTATIONS[orientation])
    return np.asarray(im, dtype=np.uint8)


def _case_names(images: Sequence[str | os.PathLike[str]], out: Path, overwrite: bool) -> list[str]:
    """Check the request (``out`` free or ``overwrite``, images given, distinct file names); the images' names."""
    if out.exists() and not overwrite:
        raise GoldenError(f"{str(out)!r} exists; pass --overwrite to replace it.")
    if not images:
        raise GoldenError("Give at least one image.")
    names = [Path(p).name for p in images]
    if len(set(names)) != len(names):
        raise GoldenError(f"Image file names must be distinct (they name the golden files): {sorted(names)}.")
    return names


def _write_case(work: Path, path: str | os.PathLike[str], name: str, clf: Classifier, top_k: int) -> dict[str, Any]:
    """Write one image's files (image, decoded pixels, input tensor) into ``work``; return its ``golden.json`` case."""
    rgb, orientation = decoded_pixels(path)
    tensor = preprocess(path, clf.input_size)
    if not np.array_equal(preprocess(oriented(rgb, orientation), clf.input_size), tensor):
        raise GoldenError(f"{str(path)!r}: its decoded pixels and orientation do not give the SDK's tensor.")
    raw = clf.run(tensor[None])
    prediction = clf._results([name], raw, top_k)[0].to_dict()
    shutil.copyfile(path, work / "images" / name)
    (work / "decoded" / f"{name}.rgb").write_bytes(np.ascontiguousarray(rgb).tobytes())
    (work / "inputs" / f"{name}.rgb").write_bytes(tensor.tobytes())
    return {
        "name": name,
        "image": f"images/{name}",
        "decoded": {
            "file": f"decoded/{name}.rgb",
            "width": int(rgb.shape[1]),
            "height": int(rgb.shape[0]),
            "orientation": orientation,
        },
        "input": f"inputs/{name}.rgb",
        "outputs": {k: np.asarray(v[0], dtype=np.float64).reshape(-1).tolist() for k, v in raw.items()},
        "prediction": prediction,
    }


def _golden_doc(
    model: str | os.PathLike[str], out: Path, clf: Classifier, top_k: int, cases: list[dict[str, Any]]
) -> dict[str, Any]:
    """The ``golden.json`` document: the model, the settings, the tolerances an app is held to, the cases."""
    return {
        "format": GOLDEN_FORMAT,
        # the model's path relative to this folder (the default folder lies beside the model)
        "model": {"file": os.path.relpath(Path(model).resolve(), out.resolve()), "sha256": sha256_file(model)},
        "input_size": clf.input_size,
        "operating_point": clf.operating_point,
        "top_k": top_k,
        "tolerance": {
            "input_levels": 0,
            "input_levels_why": "integer arithmetic end to end (box reduction, then Pillow's fixed-point "
            "bilinear filter): an app that follows the rules reproduces every byte",
            "outputs": 1e-6,
            "outputs_why": "the raw outputs are given; the prediction is sums and comparisons of them",
        },
        "cases": cases,
    }


def write_golden(
    model: str | os.PathLike[str],
    images: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    *,
    top_k: int = 3,
    overwrite: bool = False,
) -> Path:
    """Write golden vectors for ``images`` run through the exported file ``model``; returns the folder."""
    from derm.classifier import Classifier

    clf = Classifier.load(model)
    out = Path(out) if out is not None else Path(model).parent / "golden"
    names = _case_names(images, out, overwrite)
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    try:
        for sub in ("images", "decoded", "inputs"):
            (work / sub).mkdir(parents=True)
        cases = [_write_case(work, path, name, clf, top_k) for path, name in zip(images, names, strict=True)]
        doc = _golden_doc(model, out, clf, top_k, cases)
        (work / "golden.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        # the file's manifest as JSON, for a runtime whose test cannot read it from the model file (iOS reads it
        # from Core ML metadata, which a .tflite does not have)
        (work / "manifest.json").write_text(json.dumps(clf.manifest, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out
