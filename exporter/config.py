"""What ``derm-export`` is asked (:class:`ExportConfig`) and what it answers (:class:`ExportResult`)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from derm.exporter.equalize import DEFAULT_ALPHA
from derm.exporter.graph import DEFAULT_LEVELS
from derm.exporter.parity import ParityRow
from derm.exporter.targets import Target

log = logging.getLogger(__name__)

MIN_CALIBRATION = 8  # fewer images cannot give int8 ranges worth trusting
DEFAULT_CALIBRATION = 300
DEFAULT_VALIDATION = 200
DEFAULT_ROUNDING_IMAGES = 64


@dataclass
class ExportConfig:
    run: str  # a derm-train run directory
    target: str = "tflite"
    quantize: str | None = None  # default: the target's (see derm.exporter.targets)
    out: str | None = None  # default: <run>/export/model-<quantize><suffix>
    levels: tuple[str, ...] = DEFAULT_LEVELS
    calibration: str | None = None  # CSV with an image column; default: the run's training images
    calibration_size: int = DEFAULT_CALIBRATION
    validation: str | None = None  # labelled CSV; default: the run's held-out images (test, else val)
    validation_size: int = DEFAULT_VALIDATION
    image_column: str = "image"
    label_column: str = "label"
    seed: int = 0
    overwrite: bool = False
    force: bool = False  # keep the file even when parity fails
    threads: int | None = None
    qat_epochs: int = 1  # quantization-aware fine-tuning (quantize="qat")
    qat_steps: int | None = None
    weight_rounding: str = "gptq"  # int8 weights (see derm.exporter.rounding): "gptq" or "nearest" (the converters')
    rounding_images: int = DEFAULT_ROUNDING_IMAGES  # calibration images GPTQ measures layers on
    equalize: bool = True  # full-integer int8: equalize ReLU channels first (see derm.exporter.equalize)
    equalize_alpha: float = DEFAULT_ALPHA
    float_head: bool = True  # TFLite int8: keep the head (pooling onward) in float32


@dataclass
class ExportResult:
    path: str
    target: str
    quantize: str
    size_bytes: int
    sha256: str | None
    seconds: dict[str, float]
    structure: list[str]
    parity: list[ParityRow] = field(default_factory=list)
    parity_skipped: str | None = None  # why numbers were not compared (e.g. Core ML off macOS)
    n_calibration: int = 0
    n_validation: int = 0
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.parity)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def default_out(cfg: ExportConfig, target: Target, quantize: str) -> Path:
    return Path(cfg.run) / "export" / f"model-{quantize}{target.suffix}"
