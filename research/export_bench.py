"""Exporter benchmark: every target and quantization of the one targets table, on the real model and real images.

For a derm-train run (default: the HAM10000 fold-0 bottleneck run of the trainer benchmark, inception-2015 weights,
299x299), each file is made with ``derm-export``'s own pipeline (:func:`derm.exporter.export.export`, ``force`` so
failures are measured rather than refused) and reported with

- export time and file size;
- parity with the Keras model on the run's held-out HAM10000 images: max / mean absolute difference of the
  inference-class probabilities, top-1 agreement, melanoma-vs-nevus AUC difference, each against its threshold;
- latency on this machine (median of repeated single-image invokes, 1 and 2 threads) against the plain export a user
  would make without this project (``TFLiteConverter.from_keras_model`` / ``tf2onnx.convert.from_keras`` of the same
  Keras model, same quantization, no aggregation outputs, float input).

    python -m research.export_bench --run runs/bench/ham_cv/fold_0

writes ``benchmarks/results/export.json`` and ``export.md``. Core ML files are checked for structure only (Core ML
predictions need macOS). Whether int8 beats float32 depends on the CPU's integer dot-product instructions (VNNI on
x86, dot-product on ARM): the results say which CPU they come from.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from derm._cli import setup_logging
from derm.benchmarks._results import write_results
from derm.exporter.config import DEFAULT_CALIBRATION

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
log = logging.getLogger("research.export_bench")
ISSUE_TARGETS = {"int8_max_mb": 24.0, "int8_top1": 0.99, "int8_auc": 0.005, "fp16_auc": 0.001}


def latency_ms(run_one: Any, image: np.ndarray, repeats: int) -> float:
    run_one(image)  # warm-up (delegate set-up, allocations)
    run_one(image)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_one(image)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _tflite_invoke(model: bytes | str, threads: int) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    kw: dict[str, Any] = {"model_content": model} if isinstance(model, bytes) else {"model_path": model}
    interp = Interpreter(num_threads=threads, **kw)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]

    def run(image: np.ndarray) -> None:
        interp.set_tensor(inp["index"], image.astype(inp["dtype"])[None])
        interp.invoke()

    return run


def _onnx_invoke(model: bytes | str, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    dtype = np.uint8 if "uint8" in inp.type else np.float32

    def run(image: np.ndarray) -> None:
        sess.run(None, {inp.name: image.astype(dtype)[None]})

    return run


def plain_exports(
    model: Any, calibration: np.ndarray, wanted: set[tuple[str, str]] | None = None
) -> dict[tuple[str, str], bytes]:
    """What a user would export without this project: the trained Keras model as it is (float input)."""
    import tensorflow as tf

    def want(target: str, quantize: str) -> bool:
        return not wanted or (target, quantize) in wanted

    out: dict[tuple[str, str], bytes] = {}
    cal = calibration.astype(np.float32)

    def representative() -> Any:
        for i in range(len(cal)):
            yield [cal[i : i + 1]]

    for quantize in ("fp32", "fp16", "dynamic", "int8"):
        if not want("tflite", quantize):
            continue
        conv = tf.lite.TFLiteConverter.from_keras_model(model)
        if quantize != "fp32":
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "fp16":
            conv.target_spec.supported_types = [tf.float16]
        if quantize == "int8":
            conv.representative_dataset = representative
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        out["tflite", quantize] = conv.convert()
    if not (want("onnx", "fp32") or want("onnx", "int8")):
        return out
    import tf2onnx

    spec = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="image"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    out["onnx", "fp32"] = proto.SerializeToString()
    if want("onnx", "int8"):
        from derm.exporter import onnx as onnx_target

        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "plain.onnx", Path(tmp) / "plain8.onnx"
            src.write_bytes(out["onnx", "fp32"])
            onnx_target.quantize_static_file(src, dst, calibration.astype(np.float32))
            out["onnx", "int8"] = dst.read_bytes()
    return out


def _has_vnni() -> bool | None:
    try:
        return "vnni" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/bench/ham_cv/fold_0", help="derm-train run directory")
    ap.add_argument("--out", default="runs/bench/export", help="where the exported files go")
    ap.add_argument(
        "--validation-size",
        type=int,
        default=None,
        help="held-out images compared (default: all of the run's test fold)",
    )
    ap.add_argument("--calibration-size", type=int, default=DEFAULT_CALIBRATION)
    ap.add_argument("--repeats", type=int, default=30, help="timed invokes per latency figure")
    ap.add_argument("--only", default="", help="comma-separated target:quantize pairs (default: all)")
    ap.add_argument(
        "--qat-steps", type=int, default=None, help="also export tflite qat with this many fine-tune steps (0: none)"
    )
    ap.add_argument("--weight-rounding", default="gptq", help="int8 weights: gptq (default) or nearest")
    ap.add_argument("--no-float-head", action="store_true", help="TFLite int8: quantize the head too")
    ap.add_argument("--no-equalize", action="store_true", help="int8: no activation equalization")
    ap.add_argument("--results", default=str(RESULTS))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(logging.INFO, timestamps=True)

    from derm.exporter.export import ExportConfig, calibration_rows, load_images, validation_rows
    from derm.exporter.targets import TARGETS
    from derm.trainer.rundir import load_run

    run = Path(args.run)
    model, tax, _, cfg = load_run(run)
    size = int(model.input_shape[1])
    if args.validation_size is None:  # the whole held-out fold: top-1 agreement over 500 images is +-0.01 by chance
        every = ExportConfig(run=str(run), validation_size=sys.maxsize)
        args.validation_size = len(validation_rows(every, tax)[0])
    wanted = {tuple(x.split(":")) for x in args.only.split(",") if x}
    results: list[dict[str, Any]] = []
    cal_cfg = ExportConfig(run=str(run), calibration_size=args.calibration_size)
    calibration = load_images([r["image"] for r in calibration_rows(cal_cfg)[0]], size, "calibration")
    probe = load_images([calibration_rows(dataclasses.replace(cal_cfg, seed=99))[0][0]["image"]], size, "probe")[0]
    t0 = time.perf_counter()
    plain_wanted = {(t, "int8" if q == "qat" else q) for t, q in wanted}
    plain = plain_exports(model, calibration, plain_wanted)
    plain_seconds = time.perf_counter() - t0
    for target in TARGETS.values():
        for quantize in target.quantizations:
            if (quantize == "qat" and args.qat_steps is None) or (wanted and (target.name, quantize) not in wanted):
                continue  # qat needs the [qat] environment (DERM_QAT_PYTHON) and a training budget
            results.append(_export_row(args, run, target, quantize, plain, probe))
    report = {
        "run": str(run),
        "weights": cfg.get("weights"),
        "input_size": size,
        "validation_size": args.validation_size,
        "calibration_size": len(calibration),
        "plain_export_seconds": plain_seconds,
        "issue_targets": ISSUE_TARGETS,
        "machine": {"cpus": os.cpu_count(), "vnni": _has_vnni()},
        "results": results,
    }
    write_results(Path(args.results), _results_name(args, wanted), report, markdown(report))
    return 0


def _export_row(
    args: argparse.Namespace,
    run: Path,
    target: Any,
    quantize: str,
    plain: dict[tuple[str, str], bytes],
    probe: np.ndarray,
) -> dict[str, Any]:
    """One file made with derm-export's pipeline: its result, int8 preparation, size and latency against the plain
    export of the same quantization."""
    from derm.exporter.export import ExportConfig, export

    log.info("exporting %s %s", target.name, quantize)
    out = Path(args.out) / f"model-{quantize}{target.suffix}"
    res = export(
        ExportConfig(
            run=str(run),
            target=target.name,
            quantize=quantize,
            out=str(out),
            validation_size=args.validation_size,
            calibration_size=args.calibration_size,
            overwrite=True,
            force=True,
            qat_steps=args.qat_steps,
            weight_rounding=args.weight_rounding,
            float_head=not args.no_float_head,
            equalize=not args.no_equalize,
        )
    )
    row = res.to_dict()
    how = row.pop("manifest")["export"]
    row["weight_rounding"] = how.get("weight_rounding", {}).get("method")
    row["float_head"] = how.get("float_head")
    row["equalization"] = how.get("equalization")
    row["qat"] = how.get("qat")
    row["size_mb"] = res.size_bytes / 1e6
    if target.name in ("tflite", "onnx"):
        invoke = _tflite_invoke if target.name == "tflite" else _onnx_invoke
        base = plain.get((target.name, "int8" if quantize == "qat" else quantize))
        row["latency_ms"] = {}
        for threads in (1, 2):
            ours = latency_ms(invoke(str(out), threads), probe, args.repeats)
            theirs = latency_ms(invoke(base, threads), probe, args.repeats) if base else None
            row["latency_ms"][str(threads)] = {"derm_export": ours, "plain": theirs}
        row["plain_size_mb"] = len(base) / 1e6 if base else None
    log.info("%s %s: %.1f MB, ok=%s", target.name, quantize, row["size_mb"], res.ok)
    return row


def _results_name(args: argparse.Namespace, wanted: set[tuple[str, ...]]) -> str:
    """export, or export_<pairs> with --only, and the int8 preparation and QAT steps when not the defaults."""
    name = "export" if not wanted else "export_" + "_".join(sorted(f"{t}_{q}" for t, q in wanted))
    if args.weight_rounding != "gptq" or args.no_float_head or args.no_equalize:
        name += f"_{args.weight_rounding}" + ("_int8head" if args.no_float_head else "")
        name += "_noeq" if args.no_equalize else ""
    if ("tflite", "qat") in wanted:
        name += f"_{args.qat_steps}steps"
    return name


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Exporter benchmark: {report['run']} ({report['weights']}, {report['input_size']}x{report['input_size']})",
        "",
        f"Parity on {report['validation_size']} held-out HAM10000 images of the run (its test fold), against the "
        f"Keras model; int8 calibrated on {report['calibration_size']} training images. Latency: median of "
        "single-image invokes on this machine's CPU, against the plain export of the same Keras model.",
        "",
        "| file | int8 preparation | convert s | MB | max abs (3 / 9) | mean abs (3 / 9) | top-1 (3 / 9) "
        "| images that differ, 3 / 9 (top-1 95% interval) | MvN AUC diff | parity ok | ms 1 thr (plain) "
        "| ms 2 thr (plain) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        p = {(x["output"], x["metric"]): x["value"] for x in r["parity"]}

        def pair(metric: str, fmt: str, p: dict = p) -> str:
            vals = [p.get((f"probs_{lvl}", metric)) for lvl in ("three", "nine")]
            return " / ".join("-" if v is None else format(v, fmt) for v in vals)

        aucd = p.get(("task_melanoma_vs_nevus", "auc_diff"))
        top1 = {x["output"]: x for x in r["parity"] if x["metric"] == "top1"}

        def differ(level: str, top1: dict = top1) -> str:
            x = top1.get(f"probs_{level}")
            if not x or not x.get("interval"):
                return "-"
            lo, hi = x["interval"]
            return f"{x['differ']} ({lo:.3f}-{hi:.3f})"

        lat = r.get("latency_ms") or {}

        def ms(t: str, lat: dict = lat) -> str:
            if t not in lat:
                return "macOS only"
            plain = lat[t]["plain"]
            return f"{lat[t]['derm_export']:.0f} ({plain:.0f})" if plain else f"{lat[t]['derm_export']:.0f}"

        ok = "structure only" if r["parity_skipped"] else ("yes" if r["ok"] else "**NO**")
        lines.append(
            f"| {r['target']} {r['quantize']} | {_preparation(r)} | {r['seconds'].get('convert', 0):.0f} | "
            f"{r['size_mb']:.1f} | "
            f"{pair('max_abs', '.4f')} | {pair('mean_abs', '.5f')} | {pair('top1', '.3f')} | "
            f"{differ('three')} / {differ('nine')} | "
            f"{'-' if aucd is None else format(aucd, '.4f')} | {ok} | {ms('1')} | {ms('2')} |"
        )
    t = report["issue_targets"]
    lines += [
        "",
        "int8 preparation: equalized = ReLU channels rescaled for per-tensor int8 activations "
        "(derm.exporter.equalize); gptq = GPTQ weight rounding (derm.exporter.rounding), nearest = the converter's; "
        "+ float head = TFLite int8 with the head (pooling onward) in float32.",
        "",
        f"Issue targets: int8 TFLite at most {t['int8_max_mb']} MB, top-1 agreement at least {t['int8_top1']}, "
        f"melanoma-vs-nevus AUC within {t['int8_auc']}; float16 AUC within {t['fp16_auc']}.",
    ]
    return "\n".join(lines) + "\n"


def _preparation(r: dict[str, Any]) -> str:
    if r["quantize"] in ("fp32", "fp16") or r["target"] == "coreml":
        return "-"
    eq = r.get("equalization")
    if r["quantize"] == "qat":
        qat = r.get("qat") or {}
        steps = qat.get("images", 0) // max(qat.get("batch_size", 1), 1)
        rounding = r.get("weight_rounding") or "nearest"
        return (f"equalized ({eq['alpha']}) + " if eq else "") + f"{rounding} + QAT ({steps} steps)"
    return (
        (f"equalized ({eq['alpha']}) + " if eq else "")
        + (r.get("weight_rounding") or "nearest")
        + (" + float head" if r.get("float_head") else "")
    )


if __name__ == "__main__":
    raise SystemExit(main())
