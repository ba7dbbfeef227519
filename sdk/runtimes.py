"""One light runtime per exported format: open a file (a path, or bytes where the runtime reads memory), threads,
batching, and why it cannot run here.

The :class:`~derm.classifier.Classifier`, the exporter's parity check (:mod:`derm.exporter.export`) and
``derm-bench`` all run exported files through these classes, so the parity an export is judged by is measured
through the code users run. Every runtime is called on a batch of uint8 images (N x s x s x 3, RGB) and returns each
named output with one row per image, in the file's output order. No TensorFlow: ai-edge-litert (or tflite-runtime),
onnxruntime and coremltools are imported when a file of theirs is opened.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from derm.manifest import ModelFileError, model_kind

#: Images per onnxruntime call: it keeps every intermediate of the whole batch (2,000 images at 299x299 took > 24 GB).
ONNX_BATCH = 16

Source = bytes | str | os.PathLike[str]


class RuntimeUnavailable(ModelFileError):
    """The file may be fine, but it cannot run here: its runtime is not installed or not available on this platform."""


class Runtime(Protocol):
    name: str  # the runtime's package
    outputs: list[str]  # output names, in the file's order

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]: ...


class TFLiteRuntime:
    """A ``.tflite`` file through its signature, one image per invoke (the exported graph has batch 1)."""

    def __init__(self, model: Source, threads: int | None = None, options: Mapping[str, Any] | None = None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:  # optional fallback; it breaks under numpy 2 and lacks some newer ops
            try:
                from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
            except ImportError:
                raise RuntimeUnavailable(
                    "Running .tflite files needs ai-edge-litert (pip install ai-edge-litert) or tflite-runtime."
                ) from None
        kwargs = dict(options or {})
        if threads:
            kwargs["num_threads"] = threads
        if isinstance(model, bytes):
            self.interpreter = Interpreter(model_content=model, **kwargs)
        else:
            self.interpreter = Interpreter(model_path=os.fspath(model), **kwargs)
        self.runner = self.interpreter.get_signature_runner()
        self.outputs = list(self.interpreter.get_signature_list()["serving_default"]["outputs"])
        self.name = "ai-edge-litert" if "ai_edge_litert" in Interpreter.__module__ else "tflite-runtime"

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.asarray(images, dtype=np.uint8)
        rows = [self.runner(image=images[i : i + 1]) for i in range(len(images))]
        return {k: np.concatenate([r[k] for r in rows]) for k in self.outputs}


class ONNXRuntime:
    """An ONNX file with onnxruntime (CPU unless ``options["providers"]`` says otherwise), in slices of
    :data:`ONNX_BATCH` images."""

    name = "onnxruntime"

    def __init__(self, model: Source, threads: int | None = None, options: Mapping[str, Any] | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeUnavailable("Running .onnx files needs onnxruntime (pip install onnxruntime).") from None
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        providers = list((options or {}).get("providers", ["CPUExecutionProvider"]))
        source = model if isinstance(model, bytes) else os.fspath(model)
        self.session = ort.InferenceSession(source, opts, providers=providers)
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.asarray(images, dtype=np.uint8)
        parts = [
            self.session.run(self.outputs, {self.input: images[i : i + ONNX_BATCH]})
            for i in range(0, len(images), ONNX_BATCH)
        ]
        return {k: np.concatenate([p[j] for p in parts]) for j, k in enumerate(self.outputs)}


class CoreMLRuntime:
    """An ``.mlpackage`` with Core ML, which predicts on macOS only (``threads`` is Core ML's own business)."""

    name = "coremltools"

    def __init__(self, model: Source, threads: int | None = None, options: Mapping[str, Any] | None = None):
        if platform.system() != "Darwin":
            raise RuntimeUnavailable(
                f"Core ML files run on macOS only (predictions need macOS; this is {platform.system()}); export "
                "--target tflite or onnx to run here."
            )
        if isinstance(model, bytes):
            raise RuntimeUnavailable("Core ML reads .mlpackage folders, not bytes; save the package first.")
        import coremltools as ct

        self.model = ct.models.MLModel(os.fspath(model), **dict(options or {}))
        self.outputs = [o.name for o in self.model.get_spec().description.output]

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        from PIL import Image

        rows = [self.model.predict({"image": Image.fromarray(np.asarray(im, dtype=np.uint8))}) for im in images]
        return {k: np.stack([np.asarray(r[k], np.float32).reshape(-1) for r in rows]) for k in self.outputs}


#: The runtime of each kind of file (:func:`derm.manifest.model_kind`).
RUNTIMES: dict[str, type] = {"tflite": TFLiteRuntime, "onnx": ONNXRuntime, "mlpackage": CoreMLRuntime}


def open_runtime(
    model: Source, kind: str | None = None, threads: int | None = None, options: Mapping[str, Any] | None = None
) -> Runtime:
    """The runtime for ``model`` (its kind from the file name unless given; bytes need ``kind``)."""
    if kind is None:
        if isinstance(model, bytes):
            raise ValueError("open_runtime needs kind= for a model given as bytes ('tflite' or 'onnx').")
        kind = model_kind(model)
    if kind not in RUNTIMES:
        raise ValueError(f"Unknown model kind {kind!r}; known: {', '.join(RUNTIMES)}.")
    return RUNTIMES[kind](model, threads, options)


__all__ = [
    "ONNX_BATCH",
    "RUNTIMES",
    "CoreMLRuntime",
    "ONNXRuntime",
    "Runtime",
    "RuntimeUnavailable",
    "TFLiteRuntime",
    "open_runtime",
]
