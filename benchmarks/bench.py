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
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer

from derm._cli import cli_app, setup_logging, user_errors
from derm._util import atomic_write
from derm.benchmarks._bench_markdown import markdown
from derm.benchmarks._bench_measure import accuracy, measure, measure_in_child
from derm.benchmarks._bench_measure import peak_rss_mb as peak_rss_mb  # re-exported: derm.benchmarks.sdk uses it
from derm.benchmarks.adb import Delegate, parse_delegates
from derm.errors import DermError

app = cli_app(
    "derm-bench",
    "Latency, memory and accuracy parity of every exported file. A research aid, not a diagnostic device.",
)
log = logging.getLogger("derm.benchmarks.bench")


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


@dataclasses.dataclass(frozen=True)
class _Labelled:
    """The labelled images with their taxonomy nodes, and the float Keras model's outputs on them (the reference)."""

    images: np.ndarray
    nodes: list[str]
    taxonomy: Any
    specs: Any
    reference: dict[str, np.ndarray]


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
    """Export the targets, then measure them and the given files against the float model; the report."""
    from derm.trainer.rundir import load_run

    # everything that can be wrong with the inputs is found before minutes of exporting
    manifests = _check_files(out, files, threads)
    jobs = _check_targets(targets)
    model, tax, part, _ = load_run(run)
    paths, nodes, source = _labelled_images(run, data, limit, seed, tax)
    images = _load_images(data or run / "split.csv", paths, int(model.input_shape[1]))
    made = _export(run, out, jobs, manifests)
    labelled = _reference(model, part, tax, nodes, images)
    rows: list[dict[str, Any]] = [
        {
            "file": "keras float (reference)",
            "accuracy": accuracy(labelled.reference, _manifest_like(labelled.specs), tax, nodes, n_boot, seed),
        }
    ]
    for path in [*made, *files]:
        rows.append(_file_row(path, manifests[str(path)], labelled, threads, runs, warmup, n_boot, seed))
    report: dict[str, Any] = {
        "run": str(run),
        "images": len(images),
        "source": source,
        "threads": threads,
        "rows": rows,
    }
    if device is not None:
        report["device"] = _device_report(device, [*made, *files], runs)
    return report


def _check_files(out: Path, files: list[str], threads: int | None) -> dict[str, dict[str, Any]]:
    """Refuse an unwritable --out and a damaged or inconsistent file; the given files' manifests."""
    from derm._util import unwritable
    from derm.classifier import Classifier
    from derm.manifest import read_manifest
    from derm.runtimes import RuntimeUnavailable

    if problem := unwritable(out / "bench.json"):
        raise DermError(f"--out {str(out)!r}: {problem}; choose another --out.")
    manifests = {str(path): read_manifest(path) for path in files}
    for path in files:  # a damaged or inconsistent file is refused now (one that cannot run here is measured later)
        with contextlib.suppress(RuntimeUnavailable):
            Classifier.load(path, threads=threads)
    return manifests


def _check_targets(targets: list[str]) -> list[tuple[str, Any, str]]:
    """Each ``target:quantize`` as (name, target, quantize); an unknown target or quantization is refused."""
    from derm.exporter.targets import check_quantize, get_target

    jobs = []
    for spec in targets:
        name, _, quantize = spec.partition(":")
        target = get_target(name)
        jobs.append((name, target, check_quantize(target, quantize or target.default_quantize)))
    return jobs


def _load_images(source: Path, paths: list[str], size: int) -> np.ndarray:
    """The images decoded and resized as the SDK does, an unreadable one reported against its source."""
    from derm.datasets import readable_images
    from derm.preprocess import preprocess

    with readable_images(source):
        return np.stack([preprocess(p, size) for p in paths])


def _export(run: Path, out: Path, jobs: list[tuple[str, Any, str]], manifests: dict[str, dict[str, Any]]) -> list[Any]:
    """Export each target with derm-export's pipeline into ``out``; their manifests are added to ``manifests``."""
    from derm.exporter.export import ExportConfig, export
    from derm.manifest import read_manifest

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
    return made


def _reference(model: Any, part: Any, tax: Any, nodes: list[str], images: np.ndarray) -> _Labelled:
    """The float Keras model's outputs on the images, under the exported files' output names."""
    from derm.exporter.graph import build_export_model, output_specs

    specs = output_specs(part)
    reference = build_export_model(model, part, specs).predict(images, batch_size=16, verbose=0)
    return _Labelled(images, nodes, tax, specs, reference)


def _file_row(
    path: Any,
    manifest: dict[str, Any],
    labelled: _Labelled,
    threads: int | None,
    runs: int,
    warmup: int,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """One file's row: size, latency in a fresh process, accuracy, and parity with the reference (or why skipped)."""
    from derm.classifier import Classifier
    from derm.exporter.parity import parity
    from derm.exporter.targets import get_target
    from derm.runtimes import RuntimeUnavailable

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
        return row
    row["latency"] = measure_in_child(str(path), threads, runs, warmup)
    got = clf.run(labelled.images)
    tax, nodes = labelled.taxonomy, labelled.nodes
    row["accuracy"] = accuracy(got, manifest, tax, nodes, n_boot, seed)
    thresholds = target.parity[quantize]
    row["parity"] = [vars(r) for r in parity(labelled.reference, got, labelled.specs, thresholds, tax, nodes)]
    row["ok"] = all(r["ok"] for r in row["parity"])
    return row


def _device_report(device: dict[str, Any], paths: list[Any], runs: int) -> dict[str, Any]:
    """Each .tflite on the phone through adb's benchmark_model, one row per delegate."""
    from derm.benchmarks import adb

    dev = adb.choose_device(adb.find_adb(device.get("adb")), device.get("serial"))
    binary = adb.benchmark_binary(dev.abi, device.get("benchmark_model"))
    report: dict[str, Any] = {"serial": dev.serial, "model": dev.model, "abi": dev.abi, "rows": []}
    for path in paths:
        if str(path).endswith(".tflite"):
            for r in adb.run_on_device(dev, path, binary, device["delegates"], device["threads"], runs):
                report["rows"].append({"file": str(path), **r})
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
    delegates: Annotated[str, typer.Option(help=f"On the phone, comma-separated: {', '.join(Delegate)}.")] = ",".join(
        Delegate
    ),
    device_threads: Annotated[int, typer.Option(help="Threads on the phone.")] = 4,
    fail: Annotated[
        bool, typer.Option("--fail/--no-fail", help="Exit 1 when a file misses its parity thresholds.")
    ] = True,
) -> None:
    """Measure every exported file: latency, memory, accuracy, parity with the float model."""
    setup_logging(logging.WARNING)
    with user_errors(DermError):
        dev = None if device is None else _device_options(device, adb_path, benchmark_model, delegates, device_threads)
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
    _write_report(out, report)
    failed = [r["file"] for r in report["rows"] if r.get("ok") is False]
    if failed and fail:
        typer.secho(f"Parity thresholds missed by: {', '.join(failed)}", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=1)


def _device_options(
    device: str, adb_path: str | None, benchmark_model: str | None, delegates: str, device_threads: int
) -> dict[str, Any]:
    """The phone options of the command line, as :func:`bench` takes them."""
    return {
        "serial": None if device == "auto" else device,
        "adb": adb_path,
        "benchmark_model": benchmark_model,
        "delegates": parse_delegates(delegates),
        "threads": device_threads,
    }


def _write_report(out: Path, report: dict[str, Any]) -> None:
    """bench.json and bench.md, each atomically; the table printed."""
    with atomic_write(out / "bench.json") as f:
        json.dump(report, f, indent=1)
    md = markdown(report)
    with atomic_write(out / "bench.md") as f:
        f.write(md)
    typer.echo(md)


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
