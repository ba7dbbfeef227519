"""The one table of export targets: it drives ``derm-export``, the parity validation and the benchmarks.

Each target names the module that converts and runs it. That module provides:

- ``write(export_model, path, quantize, calibration, manifest, specs, **options) -> None``: writes the file (or, for
  Core ML, the ``.mlpackage`` directory) at ``path`` with the manifest embedded;
- ``open_runner(path, threads=None) -> Runner``: something callable on a uint8 image batch that returns every named
  output as an array with one row per image; raises :class:`RunnerUnavailable` (with the reason) where this machine
  cannot run the file (Core ML off macOS);
- ``check_structure(path, specs, manifest) -> list[str]``: what was checked without running the file (inputs,
  outputs, labels, the manifest); raises :class:`~derm.exporter.graph.ExportError` on a mismatch;
- ``read_manifest(path) -> dict``: the manifest back from the file.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from derm.exporter.graph import ExportError


class RunnerUnavailable(RuntimeError):
    """This machine cannot run the exported file; the message says why (e.g. Core ML predictions need macOS)."""


@dataclass(frozen=True)
class Parity:
    """How close an exported file's inference-class probabilities must stay to the Keras model's.

    ``max_abs``/``mean_abs``: absolute differences over every probability of every inference level; ``top1``: the
    fraction of images whose most likely class agrees, per level; ``auc``: absolute AUC difference on each binary
    task whose labels the validation images have.
    """

    max_abs: float
    mean_abs: float
    top1: float
    auc: float


@dataclass(frozen=True)
class Target:
    name: str
    suffix: str
    runtime: str  # what runs the file
    module: str  # implements write / open_runner / check_structure / read_manifest
    parity: dict[str, Parity]  # quantization -> thresholds; its keys are the quantizations the target offers
    default_quantize: str
    needs_calibration: tuple[str, ...] = ()  # quantizations that need calibration images
    rounds_weights: tuple[str, ...] = ()  # quantizations whose int8 weights GPTQ rounds (derm.exporter.rounding)
    equalizes: tuple[str, ...] = ()  # full-integer quantizations whose ReLU channels are equalized first
    is_directory: bool = False  # the export is a directory (.mlpackage), not one file

    @property
    def quantizations(self) -> tuple[str, ...]:
        return tuple(self.parity)

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


# Float files must agree almost exactly; float16 keeps the AUC within 0.001 and int8 within 0.005 (issue #4's
# targets), with at least 99% top-1 agreement. Dynamic range quantizes weights only, so it is held to int8's bar.
_FLOAT32 = Parity(max_abs=1e-4, mean_abs=1e-5, top1=1.0, auc=1e-4)
_FLOAT16 = Parity(max_abs=2e-2, mean_abs=2e-3, top1=0.99, auc=1e-3)
_INT8 = Parity(max_abs=0.35, mean_abs=0.03, top1=0.99, auc=5e-3)

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "tflite",
            ".tflite",
            "ai-edge-litert",
            "derm.exporter.tflite",
            {"fp32": _FLOAT32, "fp16": _FLOAT16, "dynamic": _INT8, "int8": _INT8, "qat": _INT8},
            default_quantize="int8",
            needs_calibration=("int8", "qat"),
            rounds_weights=("int8", "dynamic", "qat"),
            equalizes=("int8", "qat"),
        ),
        Target(
            "onnx",
            ".onnx",
            "onnxruntime",
            "derm.exporter.onnx",
            {"fp32": _FLOAT32, "int8": _INT8},
            default_quantize="fp32",
            needs_calibration=("int8",),
            rounds_weights=("int8",),
            equalizes=("int8",),
        ),
        Target(
            "coreml",
            ".mlpackage",
            "coremltools (predictions on macOS only)",
            "derm.exporter.coreml",
            {"fp16": _FLOAT16, "int8": _INT8},
            default_quantize="fp16",
            is_directory=True,
        ),
    )
}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise ExportError(f"Unknown target {name!r}; choose one of {', '.join(TARGETS)}.") from None


def check_quantize(target: Target, quantize: str) -> str:
    if quantize not in target.parity:
        raise ExportError(
            f"Target {target.name!r} has no quantization {quantize!r}; choose one of {', '.join(target.quantizations)}."
        )
    return quantize
