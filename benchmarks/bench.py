"""``derm-bench``: how fast is each exported file, where does it run, and did quantization cost accuracy.

    derm-bench --run RUN [--data CSV] [--targets tflite:int8,tflite:fp16,onnx:int8] [--files a.tflite,b.onnx]
               [--device SERIAL --benchmark-model PATH --delegates cpu,gpu,nnapi]

For each file (exported here with derm-export's pipeline, or given): load time, first inference, latency over
``--runs`` single-image runs (mean, p50, p90, p99) and peak memory, measured in a fresh process with the SDK (no
TensorFlow in it); on labelled images, 3-way and 9-way mean per-class accuracy, melanoma-vs-nevus and
carcinoma-vs-keratosis AUC with bootstrap intervals, top-1 agreement with the float Keras model and the AUC
difference, against the thresholds of the targets table. With ``--device`` each .tflite also runs on the phone
through adb (``benchmark_model``, one row per delegate). Prints one table, writes ``bench.json`` and ``bench.md``,
and exits 1 when a file misses its parity thresholds (a CI gate), 2 on bad input.
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer

from derm._cli import cli_app
from derm._util import atomic_write
from derm.errors import DermError

app = cli_app(
    "derm-bench",
    "Latency, memory and accuracy parity of every exported file. A research aid, not a diagnostic device.",
)
log = logging.getLogger("derm.benchmarks.bench")


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike getrusage's maxrss it does not carry the parent's peak
    across fork and exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * (1024 if sys.platform == "darwin" else 1))


def measure(path: str, threads: int | None, runs: int, warmup: int) -> dict[str, Any]:
    """Load time, first inference, latency percentiles and peak RSS of one file, in this (fresh) process."""
    from derm.classifier import Classifier

    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    clf = Classifier.load(path, threads=threads)
    load_s = time.perf_counter() - t0
    s = clf.input_size
    image = np.random.default_rng(0).integers(0, 256, (1, s, s, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    clf.run(image)
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        clf.run(image)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        clf.run(image)
        times.append((time.perf_counter() - t0) * 1e3)
    q = np.percentile(times, [50, 90, 99])
    return {
        "backend": clf.backend.name,
        "load_s": load_s,
        "first_ms": first_ms,
        "mean_ms": statistics.fmean(times),
        "p50_ms": float(q[0]),
        "p90_ms": float(q[1]),
        "p99_ms": float(q[2]),
        "runs": runs,
        "threads": threads,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_load_mb": rss0,
        "tensorflow_loaded": "tensorflow" in sys.modules,  # the SDK alone: memory is the app's, not TensorFlow's
    }


def measure_in_child(path: str, threads: int | None, runs: int, warmup: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "derm.benchmarks.bench",
        "_measure",
        path,
        "--runs",
        str(runs),
        "--warmup",
        str(warmup),
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def accuracy(
    outputs: dict[str, np.ndarray], manifest: dict[str, Any], taxonomy: Any, nodes: list[str], n_boot: int, seed: int
) -> dict[str, Any]:
    from derm.aggregation import inference_targets, task_targets
    from derm.metrics import bootstrap_auc, multiclass_metrics

    out: dict[str, Any] = {}
    for o in manifest["outputs"]:
        if o["kind"] == "level":
            y = inference_targets(taxonomy, nodes, o["labels"])
            m = multiclass_metrics(y, outputs[o["name"]], o["labels"])
            out[o["name"]] = {"mean_per_class_accuracy": m["mean_per_class_accuracy"], "accuracy": m["accuracy"]}
        elif o["kind"] == "task":
            y = task_targets(taxonomy, nodes, o["task"]["id"])
            keep = y >= 0
            if keep.sum() and 0 < y[keep].sum() < keep.sum():
                a, lo, hi = bootstrap_auc(y[keep], outputs[o["name"]][keep, 0], n_boot=n_boot, seed=seed)
                out[o["name"]] = {"auc": a, "auc_ci": [lo, hi], "n_positive": int(y[keep].sum()), "n": int(keep.sum())}
    return out


def _labelled_images(
    run: Path, data: Path | None, limit: int, seed: int, taxonomy: Any
) -> tuple[list[str], list[str], str]:
    from derm.datasets import read_dataset
    from derm.exporter.export import ExportConfig, validation_rows

    if data is None:
        paths, nodes, source = validation_rows(ExportConfig(run=str(run), validation_size=limit, seed=seed), taxonomy)
        keep = [i for i, n in enumerate(nodes) if n]
        return [paths[i] for i in keep], [nodes[i] for i in keep], source  # type: ignore[misc]
    ds = read_dataset(data, taxonomy, on_error="skip", check_images="none")
    idx = np.arange(len(ds))
    if len(idx) > limit:
        idx = np.sort(np.random.default_rng(seed).choice(len(idx), limit, replace=False))
    return [str(ds.paths[i]) for i in idx], [ds.nodes[i] for i in idx], str(data)


def bench(
    run: Path,
    data: Path | None,
    targets: list[str],
    files: list[str],
    out: Path,
    runs: int,
    warmup: int,
    threads: int | None,
    limit: int,
    seed: int,
    n_boot: int,
    device: dict[str, Any] | None,
) -> dict[str, Any]:
    from derm._util import unwritable
    from derm.classifier import Classifier
    from derm.datasets import readable_images
    from derm.exporter.export import ExportConfig, export
    from derm.exporter.graph import build_export_model, output_specs
    from derm.exporter.parity import parity
    from derm.exporter.targets import check_quantize, get_target
    from derm.manifest import read_manifest
    from derm.preprocess import preprocess
    from derm.runtimes import RuntimeUnavailable
    from derm.trainer.rundir import load_run

    # everything that can be wrong with the inputs is found before minutes of exporting
    if problem := unwritable(out / "bench.json"):
        raise DermError(f"--out {str(out)!r}: {problem}; choose another --out.")
    manifests = {str(path): read_manifest(path) for path in files}
    for path in files:  # a damaged or inconsistent file is refused now (one that cannot run here is measured later)
        with contextlib.suppress(RuntimeUnavailable):
            Classifier.load(path, threads=threads)
    jobs = []
    for spec in targets:
        name, _, quantize = spec.partition(":")
        target = get_target(name)
        jobs.append((name, target, check_quantize(target, quantize or target.default_quantize)))
    model, tax, part, _ = load_run(run)
    size = int(model.input_shape[1])
    paths, nodes, source = _labelled_images(run, data, limit, seed, tax)
    with readable_images(data or run / "split.csv"):
        images = np.stack([preprocess(p, size) for p in paths])
    made = []
    for name, target, quantize in jobs:
        res = export(
            ExportConfig(
                run=str(run),
                target=name,
                quantize=quantize,
                out=str(out / f"model-{quantize}{target.suffix}"),
                overwrite=True,
                force=True,
                validation_size=8,
            )
        )
        made.append(res.path)
        manifests[str(res.path)] = read_manifest(res.path)
    specs = output_specs(part)
    reference = build_export_model(model, part, specs).predict(images, batch_size=16, verbose=0)
    rows: list[dict[str, Any]] = [
        {
            "file": "keras float (reference)",
            "accuracy": accuracy(reference, _manifest_like(specs), tax, nodes, n_boot, seed),
        }
    ]
    for path in [*made, *files]:
        manifest = manifests[str(path)]
        target = get_target(manifest["export"]["target"])
        quantize = manifest["export"]["quantize"]
        row: dict[str, Any] = {"file": str(path), "target": target.name, "quantize": quantize}
        row["size_mb"] = (
            sum(p.stat().st_size for p in Path(path).rglob("*")) / 1e6
            if Path(path).is_dir()
            else (Path(path).stat().st_size / 1e6)
        )
        try:
            clf = Classifier.load(path, threads=threads)
        except RuntimeUnavailable as exc:  # e.g. Core ML off macOS; a damaged file is an error, not a skip
            row["skipped"] = str(exc)
            rows.append(row)
            continue
        row["latency"] = measure_in_child(str(path), threads, runs, warmup)
        got = clf.run(images)
        row["accuracy"] = accuracy(got, manifest, tax, nodes, n_boot, seed)
        row["parity"] = [vars(r) for r in parity(reference, got, specs, target.parity[quantize], tax, nodes)]
        row["ok"] = all(r["ok"] for r in row["parity"])
        rows.append(row)
    report: dict[str, Any] = {
        "run": str(run),
        "images": len(images),
        "source": source,
        "threads": threads,
        "rows": rows,
    }
    if device is not None:
        from derm.benchmarks import adb

        dev = adb.choose_device(adb.find_adb(device.get("adb")), device.get("serial"))
        binary = adb.benchmark_binary(dev.abi, device.get("benchmark_model"))
        report["device"] = {"serial": dev.serial, "model": dev.model, "abi": dev.abi, "rows": []}
        for path in [*made, *files]:
            if str(path).endswith(".tflite"):
                for r in adb.run_on_device(dev, path, binary, device["delegates"], device["threads"], runs):
                    report["device"]["rows"].append({"file": str(path), **r})
    return report


def _manifest_like(specs: Any) -> dict[str, Any]:
    """The outputs part of a manifest for the Keras reference (same names, labels, tasks)."""
    outs = []
    for s in specs:
        entry: dict[str, Any] = {"name": s.name, "kind": s.kind, "labels": list(s.labels)}
        if s.kind == "task":
            entry["task"] = {"id": s.labels[0]}
        outs.append(entry)
    return {"outputs": outs}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# derm-bench: {report['run']} on {report['images']} labelled images ({report['source']})",
        "",
        "| file | MB | load s | first ms | mean / p50 / p90 / p99 ms | peak RSS MB | 3-way MPCA | 9-way MPCA "
        "| MvN AUC (95% CI) | carc-vs-SK AUC | top-1 agree (3 / 9) | AUC diff | parity |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        acc = r.get("accuracy", {})
        lat = r.get("latency", {})

        def auc(name: str, acc: dict = acc) -> str:
            a = acc.get(name)
            return f"{a['auc']:.3f} ({a['auc_ci'][0]:.3f}-{a['auc_ci'][1]:.3f})" if a else "-"

        par = {(p["output"], p["metric"]): p["value"] for p in r.get("parity", [])}
        top1 = " / ".join(
            f"{par[(f'probs_{lv}', 'top1')]:.3f}" for lv in ("three", "nine") if (f"probs_{lv}", "top1") in par
        )
        aucd = par.get(("task_melanoma_vs_nevus", "auc_diff"))
        status = (r.get("skipped", "") and "not run here") or ("yes" if r.get("ok", True) else "**NO**")
        lat_s = (
            f"{lat['mean_ms']:.1f} / {lat['p50_ms']:.1f} / {lat['p90_ms']:.1f} / {lat['p99_ms']:.1f}"
            if "mean_ms" in lat
            else "-"
        )

        def num(value: Any, fmt: str) -> str:
            return "-" if value is None else format(value, fmt)

        three = acc.get("probs_three", {}).get("mean_per_class_accuracy")
        nine = acc.get("probs_nine", {}).get("mean_per_class_accuracy")
        lines.append(
            f"| {Path(r['file']).name if 'target' in r else r['file']} | {num(r.get('size_mb'), '.1f')} | "
            f"{num(lat.get('load_s'), '.2f')} | {num(lat.get('first_ms'), '.0f')} | {lat_s} | "
            f"{num(lat.get('peak_rss_mb'), '.0f')} | {num(three, '.3f')} | {num(nine, '.3f')} | "
            f"{auc('task_melanoma_vs_nevus')} | {auc('task_carcinoma_vs_seborrheic_keratosis')} | {top1 or '-'} | "
            f"{num(aucd, '.4f')} | {status} |"
        )
    if "device" in report:
        d = report["device"]
        lines += [
            "",
            f"On {d['model']} ({d['serial']}, {d['abi']}) via adb, TFLite benchmark_model:",
            "",
            "| file | delegate | threads | init ms | first ms | avg ms | peak MB | error |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in d["rows"]:
            lines.append(
                f"| {Path(r['file']).name} | {r['delegate']} | {r['threads']} | {r.get('init_ms', '-')} | "
                f"{r.get('first_ms', '-')} | {r.get('avg_ms', '-')} | {r.get('peak_memory_mb', '-')} | "
                f"{r.get('error', '')} |"
            )
    return "\n".join(lines) + "\n"


@app.command()
def main_command(
    run: Annotated[Path, typer.Option(help="A derm-train run directory (its float model is the reference).")],
    data: Annotated[Optional[Path], typer.Option(help="Labelled CSV; default the run's held-out images.")] = None,  # noqa: UP045
    targets: Annotated[
        str, typer.Option(help="Comma-separated target:quantize to export and measure.")
    ] = "tflite:int8,tflite:fp16,onnx:fp32,onnx:int8",
    files: Annotated[str, typer.Option(help="Comma-separated exported files to measure as they are.")] = "",
    out: Annotated[Path, typer.Option(help="Folder for exported files and bench.json / bench.md.")] = Path("bench"),
    runs: Annotated[int, typer.Option(help="Timed single-image runs per file.")] = 50,
    warmup: Annotated[int, typer.Option(help="Untimed runs first.")] = 5,
    threads: Annotated[Optional[int], typer.Option(help="Runtime threads.")] = None,  # noqa: UP045
    limit: Annotated[int, typer.Option(help="Labelled images used (seeded sample).")] = 500,
    seed: Annotated[int, typer.Option()] = 0,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for AUC intervals.")] = 1000,
    device: Annotated[str | None, typer.Option(help="Android device serial ('auto': the only one attached).")] = None,
    adb_path: Annotated[Optional[str], typer.Option("--adb", help="adb executable.")] = None,  # noqa: UP045
    benchmark_model: Annotated[Optional[str], typer.Option(help="TFLite benchmark_model binary for the phone.")] = None,  # noqa: UP045
    delegates: Annotated[str, typer.Option(help="On the phone: cpu, gpu, nnapi.")] = "cpu,gpu,nnapi",
    device_threads: Annotated[int, typer.Option(help="Threads on the phone.")] = 4,
    fail: Annotated[
        bool, typer.Option("--fail/--no-fail", help="Exit 1 when a file misses its parity thresholds.")
    ] = True,
) -> None:
    """Measure every exported file: latency, memory, accuracy, parity with the float model."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    dev = None
    if device is not None:
        dev = {
            "serial": None if device == "auto" else device,
            "adb": adb_path,
            "benchmark_model": benchmark_model,
            "delegates": [d for d in delegates.split(",") if d],
            "threads": device_threads,
        }
    try:
        report = bench(
            run,
            data,
            [t for t in targets.split(",") if t],
            [f for f in files.split(",") if f],
            out,
            runs,
            warmup,
            threads,
            limit,
            seed,
            n_boot,
            dev,
        )
    except DermError as exc:
        typer.secho(f"Error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=2) from None
    with atomic_write(out / "bench.json") as f:
        json.dump(report, f, indent=1)
    md = markdown(report)
    with atomic_write(out / "bench.md") as f:
        f.write(md)
    typer.echo(md)
    failed = [r["file"] for r in report["rows"] if r.get("ok") is False]
    if failed and fail:
        typer.secho(f"Parity thresholds missed by: {', '.join(failed)}", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=1)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_measure":  # the child process of measure_in_child
        args = sys.argv[2:]
        opts = dict(zip(args[1::2], args[2::2], strict=False))
        threads = int(opts["--threads"]) if "--threads" in opts else None
        print(json.dumps(measure(args[0], threads, int(opts["--runs"]), int(opts["--warmup"]))))
        return
    from derm._cli import run_app

    run_app(app)


if __name__ == "__main__":
    main()
