"""Reading the manifest every ``derm-export`` file carries, without TensorFlow.

- ``.tflite``: the associated file ``manifest.json`` of its standard metadata (those files form a zip archive appended
  to the flatbuffer, so :mod:`zipfile` reads it);
- ``.onnx``: ``metadata_props["derm_manifest"]``, read with onnxruntime;
- ``.mlpackage``: ``user_defined_metadata["derm_manifest"]``, read with coremltools (no compilation).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
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


TFLITE_MAGIC = b"TFL3"  # bytes 4..8 of every TFLite flatbuffer


def tflite_weights_digest(data: bytes) -> str | None:
    """sha256 over every buffer a tensor of a TFLite model reads (weights, biases, quantization tables, the
    aggregation matrices), in buffer order, each with its index and length. A byte flipped in any of them changes
    it; the metadata (labels, the manifest, which holds this digest) lies outside it. None where the flatbuffer
    schema is not importable (ai-edge-litert ships it)."""
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        return None
    model = schema.Model.GetRootAs(data, 0)
    used = set()
    for g in range(model.SubgraphsLength()):
        sub = model.Subgraphs(g)
        for t in range(sub.TensorsLength()):
            used.add(sub.Tensors(t).Buffer())
    h = hashlib.sha256()
    for i in sorted(used):
        buf = model.Buffers(i)
        if buf is None:
            continue
        if buf.DataLength():
            block = buf.DataAsNumpy().tobytes()
        elif buf.Offset() > 1:  # buffers stored after the flatbuffer (models over 2 GB)
            block = data[buf.Offset() : buf.Offset() + buf.Size()]
        else:
            continue
        h.update(struct.pack("<QQ", i, len(block)))
        h.update(block)
    return h.hexdigest()


#: What an exported .onnx file's manifest records as its own sha256 while that digest is computed.
ONNX_DIGEST_PLACEHOLDER = "0" * 64


def onnx_file_digest(data: bytes, recorded: str) -> str:
    """sha256 of a whole .onnx file with the digest its manifest records read back as the placeholder: the graph,
    every weight and all the metadata. (The file cannot hold its own digest, so the digest's 64 characters are
    hashed as zeros; the manifest is plain text inside the protobuf, so they are found by value.)"""
    return hashlib.sha256(
        data.replace(recorded.encode("ascii"), ONNX_DIGEST_PLACEHOLDER.encode("ascii"), 1)
    ).hexdigest()


def verify_weights(path: str | os.PathLike[str], manifest: dict[str, Any]) -> str:
    """Check a file's weights against the digest its manifest recorded at export. Returns how it was verified (a
    sentence); raises :class:`ModelFileError` when the weights changed, so a damaged file never gives an answer."""
    path = Path(path)
    integrity = manifest.get("integrity") or {}
    kind = model_kind(path)
    if kind == "onnx":
        want = integrity.get("file_sha256")
        if not isinstance(want, str) or len(want) != 64:
            return "weights not verified: the file was exported before derm recorded a digest"
        got = onnx_file_digest(path.read_bytes(), want)
        if got != want:
            raise ModelFileError(
                f"{str(path)!r} is damaged or was altered after export: its sha256 is {got[:16]}..., its manifest "
                f"recorded {want[:16]}... No result is given from it; export the model again or copy the original file."
            )
        return f"file verified (sha256 {want[:16]}...)"
    want = integrity.get("weights_sha256")
    if kind != "tflite":
        return "weights not verified: .mlpackage files carry no digest yet"
    if not want:
        return "weights not verified: the file was exported before derm recorded a weights digest"
    data = path.read_bytes()
    got = tflite_weights_digest(data)
    if got is None:
        return "weights not verified: the TFLite schema (ai-edge-litert) is not installed"
    if got != want:
        raise ModelFileError(
            f"{str(path)!r} is damaged or was altered after export: its weights' sha256 is {got[:16]}..., its manifest "
            f"recorded {want[:16]}... No result is given from it; export the model again or copy the original file."
        )
    return f"weights verified (sha256 {want[:16]}...)"


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
        with open(path, "rb") as f:
            head = f.read(8)
        if head[4:8] != TFLITE_MAGIC:
            raise ModelFileError(
                f"{str(path)!r} is not a TFLite model: its first bytes are {head!r}, not a TFLite flatbuffer's "
                f"(bytes 4-8 {TFLITE_MAGIC!r}){_looks_like(head)}. Give the .tflite file derm-export wrote."
            )
        try:
            with zipfile.ZipFile(path) as z:
                text = z.read(MANIFEST_FILE).decode("utf-8")
        except (zipfile.BadZipFile, KeyError, OSError, EOFError, zipfile.LargeZipFile):
            raise _no_manifest(
                path, f" that can be read ({path.stat().st_size:,} bytes: the file may be truncated or damaged)"
            ) from None
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


def _looks_like(head: bytes) -> str:
    if head.startswith(b"PK"):
        return "; it looks like a zip archive"
    if head[:1] == b"\x08":
        return "; it looks like an ONNX (protobuf) file: rename it .onnx"
    return ""


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
