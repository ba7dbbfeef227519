"""``derm-export``'s pipeline: run directory in; a converted, quantized, self-describing, validated file out.

1. check every argument before any heavy work (target, quantization, output path, calibration CSV);
2. build the export graph (:mod:`derm.exporter.graph`) and the manifest (:mod:`derm.exporter.manifest`); for int8,
   the graph is converted from a second copy of the model whose ReLU channels are equalized for full-integer
   activations (:mod:`derm.exporter.equalize`) and whose weights GPTQ rounded onto the int8 grid
   (:mod:`derm.exporter.rounding`), while the parity reference stays the run's own model;
3. convert into a temporary path beside the output, reload it in its runtime, check its structure and compare it with
   the Keras model on real images (:func:`parity`);
4. only when every difference is within the target's thresholds (or ``force``) move it onto the output path.

On any failure nothing is left at the output path, and no temporary file stays behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from derm._util import sha256_file, unwritable
from derm.exporter.config import (
    ExportConfig,
    ExportResult,
    default_out,
)
from derm.exporter.graph import ExportError, OutputSpec, build_export_model, output_specs
from derm.exporter.images import calibration_rows, load_images, validation_rows
from derm.exporter.manifest import build_manifest
from derm.exporter.parity import format_parity, parity
from derm.exporter.rounding import METHODS as ROUNDING_METHODS
from derm.exporter.targets import Target, check_quantize, get_target
from derm.runtimes import RuntimeUnavailable
from derm.taxonomy import Taxonomy

log = logging.getLogger(__name__)


def _converter_versions(target: Target) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from derm.trainer.weights import versions

    out = versions()
    wanted = {
        "tflite": ["ai-edge-litert", "mediapipe", "tensorflow-model-optimization"],
        "onnx": ["tf2onnx", "onnx", "onnxruntime"],
        "coreml": ["coremltools"],
    }[target.name]
    for pkg in wanted:
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def check_writable_parent(path: Path, option: str) -> None:
    """``path`` can be created (checked before minutes of conversion, not after)."""
    problem = unwritable(path)
    if problem:
        raise ExportError(f"{option} {str(path)!r}: {problem}; choose another {option}.")


def export(cfg: ExportConfig) -> ExportResult:
    """Run the whole pipeline (check, prepare, convert, verify, publish; see the module docstring). Raises
    :class:`ExportError` with the parity table when the file is not close enough to the Keras model (unless
    ``cfg.force``); nothing is written then."""
    target = get_target(cfg.target)
    quantize = check_quantize(target, cfg.quantize or target.default_quantize)
    out = _check_request(cfg, target, quantize)
    job = _prepare(cfg, target, quantize)
    module = target.load()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".partial-{os.getpid()}-{out.name}"  # keeps the suffix runtimes look at
    _remove(tmp)
    try:
        _convert(cfg, target, quantize, job, module, tmp)
        result = _verify(cfg, target, quantize, job, module, tmp, out)
        if cfg.overwrite:
            _remove(out)
        os.replace(tmp, out)
        return result
    finally:
        _remove(tmp)


def _check_request(cfg: ExportConfig, target: Target, quantize: str) -> Path:
    """Every option checked before minutes of work; the output path."""
    run = Path(cfg.run)
    if not (run / "model.keras").is_file():
        raise ExportError(
            f"{str(run)!r} is not a finished derm-train run directory (no model.keras); pass the folder derm-train "
            "train wrote (its --out)."
        )
    out = Path(cfg.out) if cfg.out else default_out(cfg, target, quantize)
    if out.exists() and target.is_directory != out.is_dir() and not out.is_symlink():
        kind = "folder" if out.is_dir() else "file"
        raise ExportError(f"Output {str(out)!r} exists and is a {kind}; choose another --out.")
    check_writable_parent(out, "--out")
    if out.suffix != target.suffix:
        raise ExportError(f"Output {str(out)!r} should end in {target.suffix!r} for target {target.name!r}.")
    if (out.exists() or out.is_symlink()) and not cfg.overwrite:
        raise ExportError(f"{str(out)!r} exists; pass --overwrite to replace it.")
    for name, value in (
        ("calibration_size", cfg.calibration_size),
        ("validation_size", cfg.validation_size),
        ("rounding_images", cfg.rounding_images),
    ):
        if value < 1:
            raise ExportError(f"{name} must be at least 1, received {value}.")
    if cfg.weight_rounding not in ROUNDING_METHODS:
        raise ExportError(
            f"Unknown weight rounding {cfg.weight_rounding!r}; choose one of {', '.join(ROUNDING_METHODS)}."
        )
    if cfg.qat_epochs < 0 or (cfg.qat_steps is not None and cfg.qat_steps < 0):
        raise ExportError(
            f"qat_epochs and qat_steps must be at least 0 (0 steps: convert without fine-tuning), received "
            f"{cfg.qat_epochs} and {cfg.qat_steps}."
        )
    if not 0.0 < cfg.equalize_alpha <= 1.0:
        raise ExportError(f"equalize_alpha must be in (0, 1], received {cfg.equalize_alpha!r}; 0.5 is the default.")
    return out


@dataclass
class _Job:
    """What the conversion and the check work from: the run (opened and verified), the export graph, the images,
    the manifest."""

    run: Path
    taxonomy: Taxonomy
    partition: Any
    specs: list[OutputSpec]
    export_model: Any
    val_paths: list[str]
    val_nodes: list[str | None]
    val_source: str
    val_images: np.ndarray
    cal_images: np.ndarray
    manifest: dict[str, Any]
    rounds: bool  # GPTQ weight rounding
    equalizes: bool
    seconds: dict[str, float] = field(default_factory=dict)


def _prepare(cfg: ExportConfig, target: Target, quantize: str) -> _Job:
    """Open the run (its files verified against run.json), build the export graph, read the images, write the
    manifest."""
    from derm.trainer.rundir import RunError, open_run

    run = Path(cfg.run)
    rounds = quantize in target.rounds_weights and cfg.weight_rounding == "gptq"
    equalizes = quantize in target.equalizes and cfg.equalize
    cal_rows: list[dict[str, str]] = []
    cal_source = ""
    if quantize in target.needs_calibration or rounds or equalizes:
        cal_rows, cal_source = calibration_rows(cfg)
    t0 = time.perf_counter()
    try:
        opened = open_run(run)
        model = opened.model
    except RunError as exc:
        raise ExportError(str(exc)) from exc
    tax, part = opened.taxonomy, opened.partition
    size = int(model.input_shape[1])
    specs = output_specs(part, cfg.levels)
    val_paths, val_nodes, val_source = validation_rows(cfg, tax)
    cal_images = load_images(
        [r[cfg.image_column if cfg.calibration else "image"] for r in cal_rows], size, "calibration"
    )
    manifest = build_manifest(
        run,
        part,
        specs,
        target=target.name,
        quantize=quantize,
        input_size=size,
        calibration=_calibration_info(cfg, cal_rows, cal_source),
        versions=_converter_versions(target),
    )
    if target.name == "tflite" and quantize == "int8":
        manifest["export"]["float_head"] = cfg.float_head
    job = _Job(
        run,
        tax,
        part,
        specs,
        build_export_model(model, part, specs),
        list(val_paths),
        list(val_nodes),
        val_source,
        load_images(val_paths, size, "validation"),
        cal_images,
        manifest,
        rounds,
        equalizes,
    )
    job.seconds["prepare"] = time.perf_counter() - t0
    return job


def _calibration_info(cfg: ExportConfig, cal_rows: list[dict[str, str]], cal_source: str) -> dict[str, Any]:
    """The manifest's record of the calibration images (empty when none were read)."""
    if not cal_rows:
        return {}
    return {
        "n": len(cal_rows),
        "source": cal_source,
        "seed": cfg.seed,
        "csv_sha256": sha256_file(cfg.calibration) if cfg.calibration else None,
    }


def _convert(cfg: ExportConfig, target: Target, quantize: str, job: _Job, module: Any, tmp: Path) -> None:
    """The file at ``tmp``: weights rounded and channels equalized first where asked (or quantization-aware
    training), then the target's converter with the manifest embedded."""
    t0 = time.perf_counter()
    converted = None
    to_convert = job.export_model
    manifest = job.manifest
    if quantize in target.rounds_weights and not job.rounds:
        manifest["export"]["weight_rounding"] = {"method": "nearest"}  # the converter's own (or QAT's) rounding
    if quantize == "qat" or job.rounds or job.equalizes:
        prepared = int8_ready_classifier(
            job.run,
            job.cal_images,
            cfg.rounding_images,
            manifest,
            alpha=cfg.equalize_alpha if job.equalizes else None,
            rounds=job.rounds,
            fold=quantize == "qat",  # QAT's input quantizer then reads the exact uint8 pixels (exporter.qat)
        )
        if quantize == "qat":
            from derm.exporter.qat import quantization_aware

            converted, info = quantization_aware(cfg, job.run, prepared, job.cal_images)
            manifest["export"]["qat"] = info
            log.info("Quantization-aware training: %s", info)
        else:
            to_convert = build_export_model(prepared, job.partition, job.specs)
    if target.name == "tflite":
        module.write(
            to_convert,
            tmp,
            quantize,
            job.cal_images,
            manifest,
            job.specs,
            converted=converted,
            float_head=cfg.float_head,
        )
    elif target.name == "onnx":
        module.write(to_convert, tmp, quantize, job.cal_images, manifest, job.specs)
    else:
        module.write(job.export_model, tmp, quantize, None, manifest, job.specs)
    job.seconds["convert"] = time.perf_counter() - t0


def _verify(
    cfg: ExportConfig, target: Target, quantize: str, job: _Job, module: Any, tmp: Path, out: Path
) -> ExportResult:
    """The file's structure, then its parity with the Keras model on the validation images through the SDK's runtime
    (skipped, saying why, where the file cannot run here); raises when it is not close enough (unless forced)."""
    structure = module.check_structure(tmp, job.specs, job.manifest)
    result = ExportResult(
        path=str(out),
        target=target.name,
        quantize=quantize,
        size_bytes=_size(tmp),
        sha256=sha256_file(tmp) if tmp.is_file() else None,
        seconds=job.seconds,
        structure=structure,
        n_calibration=len(job.cal_images),
        n_validation=len(job.val_images),
        manifest=job.manifest,
    )
    t0 = time.perf_counter()
    try:
        runner = module.open_runner(tmp, cfg.threads)
    except RuntimeUnavailable as exc:
        result.parity_skipped = str(exc)
        return result
    got = runner(job.val_images)
    reference = _reference(job.run, job.export_model, job.val_paths, job.val_images, job.specs)
    result.parity = parity(
        reference, got, job.specs, target.parity[quantize], job.taxonomy, job.val_nodes, seed=cfg.seed
    )
    job.seconds["validate"] = time.perf_counter() - t0
    n, source = len(job.val_images), job.val_source
    log.info("Parity on %d images of %s:\n%s", n, source, format_parity(result.parity))
    if not result.ok and not cfg.force:
        raise ExportError(
            f"The {target.name} {quantize} file is not close enough to the Keras model on {n} images of {source}; "
            f"nothing was written. Differences (NO: the images show the file is worse than allowed):\n"
            f"{format_parity(result.parity)}\nTry another quantization (or --quantize qat for int8), more "
            "--calibration images, or --force to keep it anyway."
        )
    return result


def int8_ready_classifier(
    run: Path,
    images: np.ndarray,
    rounding_images: int,
    manifest: dict[str, Any],
    alpha: float | None,
    rounds: bool,
    fold: bool = False,
) -> Any:
    """A second copy of the run's classifier prepared for int8: input scaling folded into the first convolution (when
    ``fold`` or ``alpha`` is given) and ReLU channels equalized (when ``alpha`` is given) on all the calibration
    ``images`` (the converter's ranges come from the same images), then weights GPTQ-rounded onto the int8 grid on the
    first ``rounding_images`` (when ``rounds``); the manifest records each. The parity reference stays the run's
    own model."""
    from derm.exporter.equalize import equalize, fold_input_scaling
    from derm.exporter.rounding import round_weights, summary
    from derm.trainer.rundir import load_run

    model, *_ = load_run(run)
    x = images.astype(np.float32)
    folded = fold_input_scaling(model) if fold or alpha is not None else False
    if alpha is not None:
        info = {**equalize(model, x, alpha=alpha).to_dict(), "input_scaling_folded": folded}
        manifest["export"]["equalization"] = info
        log.info("Activation equalization: %s", info)
    elif fold:
        manifest["export"]["input_scaling_folded"] = folded
    if rounds:
        t0 = time.perf_counter()
        rows = round_weights(model, x[:rounding_images], "gptq")
        info = {
            "method": "gptq",
            "images": len(x[:rounding_images]),
            **summary(rows),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        manifest["export"]["weight_rounding"] = info
        log.info("Weight rounding: %s", info)
    return model


_REFERENCES: dict[tuple[Any, ...], dict[str, np.ndarray]] = {}


def _reference(
    run: Path, export_model: Any, paths: Sequence[str], images: np.ndarray, specs: Sequence[OutputSpec]
) -> dict[str, np.ndarray]:
    """The Keras model's outputs on the validation images, computed once per process for the same run and images
    (a benchmark exports one run to every target)."""
    model_file = run / "model.keras"
    key = (str(run.resolve()), model_file.stat().st_mtime_ns, tuple(paths), tuple(s.name for s in specs))
    if key not in _REFERENCES:
        _REFERENCES.clear()
        _REFERENCES[key] = export_model.predict(images, batch_size=16, verbose=0)
    return _REFERENCES[key]


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
