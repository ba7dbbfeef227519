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
import csv
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from derm._progress import track
from derm._util import first_hash_mismatch, not_utf8, sha256_file, unwritable
from derm.aggregation import task_targets
from derm.exporter.equalize import DEFAULT_ALPHA
from derm.exporter.graph import DEFAULT_LEVELS, ExportError, OutputSpec, build_export_model, output_specs
from derm.exporter.manifest import build_manifest
from derm.exporter.rounding import METHODS as ROUNDING_METHODS
from derm.exporter.targets import Parity, RunnerUnavailable, Target, check_quantize, get_target
from derm.metrics import proportion_interval
from derm.preprocess import ImageError, preprocess
from derm.taxonomy import Taxonomy

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
class ParityRow:
    output: str
    metric: str  # max_abs | mean_abs | top1 | mpca_diff | auc_diff (the last two: float model minus file, a loss)
    value: float
    threshold: float
    ok: bool
    n: int = 0  # images the line rests on (for auc_diff / mpca_diff: the labelled ones)
    interval: tuple[float, float] | None = None  # 95%: Wilson (top1) or paired bootstrap (auc_diff, mpca_diff)
    differ: int | None = None  # top1: images whose top class differs
    margin: float | None = None  # top1: the largest float-model margin (top class minus runner-up) among those images
    detail: str = ""  # what the line rests on, in words

    @property
    def rule(self) -> str:
        """How the threshold is applied (see :class:`derm.exporter.targets.Parity`)."""
        if self.metric == "top1":
            return f"95% upper >= {self.threshold:g}"
        if self.metric in ("auc_diff", "mpca_diff"):
            return f"95% lower <= {self.threshold:g}"
        return f"<= {self.threshold:g}"


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


def _rows_of(csv_path: Path, image_column: str) -> list[dict[str, str]]:
    if not csv_path.is_file():
        raise ExportError(f"Image list {str(csv_path)!r} does not exist.")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise ExportError(
                    f"Image list {str(csv_path)!r} is empty; pass a CSV with a header row and an {image_column!r} "
                    "column."
                )
            if image_column not in reader.fieldnames:
                raise ExportError(
                    f"{str(csv_path)!r} has no column {image_column!r} (columns: {reader.fieldnames}); pass "
                    "--image-column."
                )
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise ExportError(f"{not_utf8(csv_path, exc)}.") from None
    for r in rows:
        p = Path(r[image_column])
        r[image_column] = str(p if p.is_absolute() else (csv_path.parent / p))
    return rows


def _sample(rows: list[dict[str, str]], n: int, seed: int) -> list[dict[str, str]]:
    if len(rows) <= n:
        return rows
    idx = np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))
    return [rows[i] for i in idx]


def load_images(paths: Sequence[str], size: int, what: str) -> np.ndarray:
    """uint8 (n, size, size, 3) images exactly as an app gives them; every unreadable file is named."""
    out, bad = [], []
    for p in track(paths, f"Reading {what} images", total=len(paths)):
        try:
            out.append(preprocess(p, size))
        except (ImageError, OSError) as exc:
            bad.append(f"{p}: {exc}")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ExportError(f"{len(bad)} {what} image(s) cannot be read: {shown}. Fix or remove them from the list.")
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def calibration_rows(cfg: ExportConfig) -> tuple[list[dict[str, str]], str]:
    if cfg.calibration:
        rows, source = _rows_of(Path(cfg.calibration), cfg.image_column), cfg.calibration
    else:
        split = Path(cfg.run) / "split.csv"
        rows = [r for r in _rows_of(split, "image") if r.get("role") == "train"]
        source = f"{split} (role train)"
        _images_here(rows, split, "--calibration")
    rows = _sample(rows, cfg.calibration_size, cfg.seed)
    if len(rows) < MIN_CALIBRATION:
        raise ExportError(
            f"Only {len(rows)} calibration image(s) in {source}; int8 quantization needs at least {MIN_CALIBRATION} "
            f"(a few hundred is better). Pass --calibration with a CSV of real images like the ones the app will see."
        )
    return rows, source


def validation_rows(cfg: ExportConfig, taxonomy: Taxonomy) -> tuple[list[str], list[str | None], str]:
    """Image paths, their taxonomy node ids (None where unlabelled) and a description of the source."""
    if cfg.validation:
        rows = _rows_of(Path(cfg.validation), cfg.image_column)
        nodes: list[str | None] = []
        for r in rows:
            label = r.get(cfg.label_column)
            try:
                nodes.append(taxonomy.resolve(label) if label else None)
            except KeyError:
                nodes.append(None)
        source = cfg.validation
        paths = [r[cfg.image_column] for r in rows]
    else:
        split = Path(cfg.run) / "split.csv"
        all_rows = _rows_of(split, "image")
        role = "test" if any(r.get("role") == "test" for r in all_rows) else "val"
        rows = [r for r in all_rows if r.get("role") == role]
        _images_here(rows, split, "--validation")
        paths, nodes, source = [r["image"] for r in rows], [r.get("node") or None for r in rows], f"{split} ({role})"
    idx = list(range(len(paths)))
    if len(idx) > cfg.validation_size:
        idx = sorted(np.random.default_rng(cfg.seed + 1).choice(len(idx), cfg.validation_size, replace=False))
    if not idx:
        raise ExportError(f"No validation images in {source}; pass --validation with a labelled CSV.")
    return [paths[i] for i in idx], [nodes[i] for i in idx], source


def _images_here(rows: Sequence[Mapping[str, str]], split: Path, option: str) -> None:
    """The run's own images are on another machine (a rebuilt reference model without ../shared): say what to pass."""
    if rows and not any(Path(r["image"]).is_file() for r in rows[:50]):
        raise ExportError(
            f"The images {str(split)!r} lists are not on this machine (e.g. {rows[0]['image']!r}): the run was trained "
            f"elsewhere or its data folder is missing. Pass {option} with a CSV of real images (an image column, and "
            "a label column for --validation), e.g. samples/calibration/labels.csv and samples/images/labels.csv."
        )


def parity(
    reference: Mapping[str, np.ndarray],
    got: Mapping[str, np.ndarray],
    specs: Sequence[OutputSpec],
    thresholds: Parity,
    taxonomy: Taxonomy,
    nodes: Sequence[str | None],
    seed: int = 0,
) -> list[ParityRow]:
    """Compare an exported file's outputs with the Keras model's on the same images, as
    :class:`~derm.exporter.targets.Parity` says (the rules and the reasons for them live there).

    Per inference level: max and mean absolute difference of the probabilities; top-1 agreement with its 95% Wilson
    interval, the number of images that differ and the largest float-model margin among them (near-ties flip, a
    confident call should not); on the labelled images, the loss of mean per-class accuracy with a paired bootstrap
    interval. Per binary task, on the images labelled for it: the loss of AUC with a paired bootstrap interval.
    """
    from derm.aggregation import inference_targets
    from derm.metrics import paired_auc_difference, paired_mpca_difference

    rows: list[ParityRow] = []
    known = [i for i, n in enumerate(nodes) if n is not None]
    for s in specs:
        ref, out = np.asarray(reference[s.name], np.float64), np.asarray(got[s.name], np.float64)
        if ref.shape != out.shape:
            raise ExportError(f"Output {s.name!r}: the file gives shape {out.shape}, the Keras model {ref.shape}.")
        if s.kind == "level":
            diff = np.abs(ref - out)
            n = len(ref)
            rows.append(ParityRow(s.name, "max_abs", float(diff.max()), thresholds.max_abs, False, n))
            rows.append(ParityRow(s.name, "mean_abs", float(diff.mean()), thresholds.mean_abs, False, n))
            differs = ref.argmax(1) != out.argmax(1)
            top2 = np.sort(ref, axis=1)[:, -2:]
            margin = float((top2[:, 1] - top2[:, 0])[differs].max()) if differs.any() else None
            k = int(differs.sum())
            note = f"{k} of {n} images differ" + (f"; largest float margin among them {margin:.3f}" if k else "")
            rows.append(
                ParityRow(
                    s.name,
                    "top1",
                    (n - k) / n,
                    thresholds.top1,
                    False,
                    n,
                    proportion_interval(n - k, n),
                    k,
                    margin,
                    note,
                )
            )
            if known:
                y = np.full(n, -1, np.int64)
                y[known] = inference_targets(taxonomy, [nodes[i] for i in known], list(s.labels))
                if (y >= 0).any():
                    d, lo, hi = paired_mpca_difference(y, ref.argmax(1), out.argmax(1), len(s.labels), seed=seed)
                    classes = len(np.unique(y[y >= 0]))
                    rows.append(
                        ParityRow(
                            s.name,
                            "mpca_diff",
                            d,
                            thresholds.mpca,
                            False,
                            int((y >= 0).sum()),
                            (lo, hi),
                            detail=f"{int((y >= 0).sum())} labelled images in {classes} classes",
                        )
                    )
        elif s.kind == "task" and known:
            y = np.full(len(nodes), -1, np.int8)
            y[known] = task_targets(taxonomy, [nodes[i] for i in known], s.labels[0])
            keep = y >= 0
            pos = int(y[keep].sum())
            if keep.sum() and 0 < pos < keep.sum():
                d, lo, hi = paired_auc_difference(y[keep], ref[keep, 0], out[keep, 0], seed=seed)
                rows.append(
                    ParityRow(
                        s.name,
                        "auc_diff",
                        d,
                        thresholds.auc,
                        False,
                        int(keep.sum()),
                        (lo, hi),
                        detail=f"{pos} positive, {int(keep.sum()) - pos} negative",
                    )
                )
    for r in rows:
        if r.metric == "top1":
            r.ok = r.interval is not None and r.interval[1] >= r.threshold
        elif r.metric in ("auc_diff", "mpca_diff"):
            r.ok = r.interval is not None and r.interval[0] <= r.threshold
        else:
            r.ok = r.value <= r.threshold
    return rows


def format_parity(rows: Sequence[ParityRow]) -> str:
    """The parity table as text: each line's value, its 95% interval, the rule it is judged by, what it rests on."""
    lines = [f"{'output':<44} {'metric':<9} {'value':>8} {'95% interval':>17}  {'rule':<18} ok   rests on"]
    for r in rows:
        iv = f"{r.interval[0]:.4f} - {r.interval[1]:.4f}" if r.interval is not None else ""
        rests = r.detail or f"{r.n} images"
        ok = "yes" if r.ok else "NO"
        lines.append(f"{r.output:<44} {r.metric:<9} {r.value:>8.4f} {iv:>17}  {r.rule:<18} {ok:<4} {rests}")
    return "\n".join(line.rstrip() for line in lines)


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


def _check_run_hashes(run: Path) -> None:
    """The run's files are the ones derm-train wrote: each sha256 that ``run.json`` records must match, so a damaged
    or swapped model.keras is never exported (and stamped into a manifest) as if it were the trained one."""
    import json

    try:
        files = json.loads((run / "run.json").read_text(encoding="utf-8")).get("files") or {}
    except (OSError, ValueError):
        raise ExportError(
            f"{str(run / 'run.json')!r} is missing or unreadable: {str(run)!r} is not a finished derm-train run."
        ) from None
    names = ("model.keras", "partition.json", "taxonomy.json", "metrics.json", "preprocess.json")
    bad = first_hash_mismatch(run, {n: files[n] for n in names if n in files and (run / n).is_file()})
    if bad is not None:
        raise ExportError(
            f"{str(run / bad[0])!r} does not match the sha256 run.json recorded for it: the run was changed or "
            "damaged after training. Restore it, or train (or rebuild the reference model) again."
        )


def export(cfg: ExportConfig) -> ExportResult:
    """Run the whole pipeline; see the module docstring. Raises :class:`ExportError` with the parity table when the
    file is not close enough to the Keras model (unless ``cfg.force``)."""
    from derm.trainer.evaluate import EvalError, load_run

    target = get_target(cfg.target)
    quantize = check_quantize(target, cfg.quantize or target.default_quantize)
    run = Path(cfg.run)
    if not (run / "model.keras").is_file():
        raise ExportError(
            f"{str(run)!r} is not a finished derm-train run directory (no model.keras); pass the folder derm-train "
            "train wrote (its --out)."
        )
    _check_run_hashes(run)
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
    rounds = quantize in target.rounds_weights and cfg.weight_rounding == "gptq"
    equalizes = quantize in target.equalizes and cfg.equalize
    cal_rows: list[dict[str, str]] = []
    cal_source = ""
    if quantize in target.needs_calibration or rounds or equalizes:
        cal_rows, cal_source = calibration_rows(cfg)

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        model, tax, part, _ = load_run(run)
    except EvalError as exc:
        raise ExportError(str(exc)) from exc
    size = int(model.input_shape[1])
    specs = output_specs(part, cfg.levels)
    export_model = build_export_model(model, part, specs)
    val_paths, val_nodes, val_source = validation_rows(cfg, tax)
    val_images = load_images(val_paths, size, "validation")
    cal_images = load_images(
        [r[cfg.image_column if cfg.calibration else "image"] for r in cal_rows], size, "calibration"
    )
    calibration_info: dict[str, Any] = {}
    if cal_rows:
        calibration_info = {
            "n": len(cal_rows),
            "source": cal_source,
            "seed": cfg.seed,
            "csv_sha256": sha256_file(cfg.calibration) if cfg.calibration else None,
        }
    manifest = build_manifest(
        run,
        part,
        specs,
        target=target.name,
        quantize=quantize,
        input_size=size,
        calibration=calibration_info,
        versions=_converter_versions(target),
    )
    if target.name == "tflite" and quantize == "int8":
        manifest["export"]["float_head"] = cfg.float_head
    seconds["prepare"] = time.perf_counter() - t0

    module = target.load()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".partial-{os.getpid()}-{out.name}"  # keeps the suffix runtimes look at
    _remove(tmp)
    try:
        t0 = time.perf_counter()
        converted = None
        to_convert = export_model
        if quantize in target.rounds_weights and not rounds:
            manifest["export"]["weight_rounding"] = {"method": "nearest"}  # the converter's own (or QAT's) rounding
        if quantize == "qat" or rounds or equalizes:
            prepared = int8_ready_classifier(
                run,
                cal_images,
                cfg.rounding_images,
                manifest,
                alpha=cfg.equalize_alpha if equalizes else None,
                rounds=rounds,
                fold=quantize == "qat",  # QAT's input quantizer then reads the exact uint8 pixels (exporter.qat)
            )
            if quantize == "qat":
                from derm.exporter.qat import quantization_aware

                converted, info = quantization_aware(cfg, run, prepared, cal_images)
                manifest["export"]["qat"] = info
                log.info("Quantization-aware training: %s", info)
            else:
                to_convert = build_export_model(prepared, part, specs)
        if target.name == "tflite":
            module.write(
                to_convert, tmp, quantize, cal_images, manifest, specs, converted=converted, float_head=cfg.float_head
            )
        elif target.name == "onnx":
            module.write(to_convert, tmp, quantize, cal_images, manifest, specs)
        else:
            module.write(export_model, tmp, quantize, None, manifest, specs)
        seconds["convert"] = time.perf_counter() - t0
        structure = module.check_structure(tmp, specs, manifest)
        result = ExportResult(
            path=str(out),
            target=target.name,
            quantize=quantize,
            size_bytes=_size(tmp),
            sha256=sha256_file(tmp) if tmp.is_file() else None,
            seconds=seconds,
            structure=structure,
            n_calibration=len(cal_images),
            n_validation=len(val_images),
            manifest=manifest,
        )
        t0 = time.perf_counter()
        try:
            runner = module.open_runner(tmp, cfg.threads)
        except RunnerUnavailable as exc:
            result.parity_skipped = str(exc)
        else:
            got = runner(val_images)
            reference = _reference(run, export_model, val_paths, val_images, specs)
            result.parity = parity(reference, got, specs, target.parity[quantize], tax, val_nodes, seed=cfg.seed)
            seconds["validate"] = time.perf_counter() - t0
            log.info("Parity on %d images of %s:\n%s", len(val_images), val_source, format_parity(result.parity))
        if not result.ok and not cfg.force:
            raise ExportError(
                f"The {target.name} {quantize} file is not close enough to the Keras model on {len(val_images)} "
                f"images of {val_source}; nothing was written. Differences (NO: the images show the file is worse "
                f"than allowed):\n{format_parity(result.parity)}\n"
                "Try another quantization (or --quantize qat for int8), more --calibration images, or --force to "
                "keep it anyway."
            )
        if cfg.overwrite:
            _remove(out)
        os.replace(tmp, out)
        return result
    finally:
        _remove(tmp)


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
    from derm.trainer.evaluate import load_run

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
