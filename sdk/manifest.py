"""Reading the manifest every ``derm-export`` file carries, without TensorFlow.

- ``.tflite``: the associated file ``manifest.json`` of its standard metadata (those files form a zip archive appended
  to the flatbuffer, so :mod:`zipfile` reads it);
- ``.onnx``: ``metadata_props["derm_manifest"]``, read with onnxruntime;
- ``.mlpackage``: ``user_defined_metadata["derm_manifest"]``, read with coremltools (no compilation).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

from derm.errors import DermError

MANIFEST_FORMAT = "derm-manifest/1"
SUPPORTED_FORMATS = (MANIFEST_FORMAT,)
MANIFEST_FILE = "manifest.json"  # TFLite associated file
MANIFEST_KEY = "derm_manifest"  # ONNX metadata_props / Core ML user_defined_metadata
SUFFIXES = (".tflite", ".onnx", ".mlpackage")


class ModelFileError(DermError, ValueError):
    """A model file cannot be used: missing, of an unknown kind, without a derm manifest, or of a newer schema."""


def model_kind(path: str | os.PathLike[str]) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ModelFileError(
            f"{str(path)!r}: unknown model file type {suffix or '(no suffix)'!r}; expected one of "
            f"{', '.join(SUFFIXES)} (files written by derm-export)."
        )
    return suffix[1:]


def _no_manifest(path: Any, why: str = "") -> ModelFileError:
    return ModelFileError(
        f"{str(path)!r} carries no derm manifest{why}: it was not written by derm-export, so its labels and "
        "preprocessing are unknown. Export the run with derm-export."
    )


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of an exported file, checked for a known schema version."""
    path = Path(path)
    kind = model_kind(path)
    if not path.exists():
        raise ModelFileError(f"Model file not found: {str(path)!r}.")
    if kind == "tflite":
        try:
            with zipfile.ZipFile(path) as z:
                text = z.read(MANIFEST_FILE).decode("utf-8")
        except (zipfile.BadZipFile, KeyError):
            raise _no_manifest(path) from None
    elif kind == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            meta = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).get_modelmeta()
        except Exception as exc:  # onnxruntime has its own exception types
            raise ModelFileError(f"{str(path)!r} is not an ONNX model onnxruntime can open: {exc}") from exc
        if MANIFEST_KEY not in meta.custom_metadata_map:
            raise _no_manifest(path)
        text = meta.custom_metadata_map[MANIFEST_KEY]
    else:
        try:
            import coremltools as ct
        except ImportError:
            raise ModelFileError(f"Reading {str(path)!r} needs coremltools (pip install coremltools).") from None
        try:
            spec = ct.utils.load_spec(str(path))
        except Exception as exc:  # coremltools raises several types for a bad package
            raise ModelFileError(f"{str(path)!r} is not a Core ML package coremltools can read: {exc}") from exc
        meta = spec.description.metadata.userDefined
        if MANIFEST_KEY not in meta:
            raise _no_manifest(path)
        text = meta[MANIFEST_KEY]
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _no_manifest(path, f" that is valid JSON ({exc})") from exc
    return check_manifest(manifest, str(path))


def check_manifest(manifest: Any, source: str = "the manifest") -> dict[str, Any]:
    if not isinstance(manifest, dict) or "format" not in manifest:
        raise ModelFileError(f"{source}: the manifest has no 'format' field; it is not a derm manifest.")
    if manifest["format"] not in SUPPORTED_FORMATS:
        raise ModelFileError(
            f"{source}: manifest format {manifest['format']!r} is not one this version of derm reads "
            f"({', '.join(SUPPORTED_FORMATS)}); upgrade derm-toolchain or re-export with this version."
        )
    for key in ("input", "outputs"):
        if key not in manifest:
            raise ModelFileError(f"{source}: the manifest lacks {key!r}.")
    return manifest
