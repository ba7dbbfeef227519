"""derm-bench on a small real run and its exported file: latency in a fresh SDK process, accuracy and parity with the
float model, the CI gate (exit 1 on a parity miss) and bad input (exit 2)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

pytest.importorskip("tensorflow")
cli = CliRunner()


def test_bench_measures_a_file_and_gates_on_parity(small_run, small_tflite, tmp_path, monkeypatch):
    from derm.benchmarks.bench import app
    from derm.exporter import targets

    _, run = small_run
    args = ["--run", str(run), "--targets", "", "--files", small_tflite, "--out", str(tmp_path), "--runs", "5"]
    args += ["--n-boot", "50"]
    res = cli.invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "bench.json").read_text())
    ref, row = report["rows"]
    assert ref["file"].startswith("keras float")
    lat = row["latency"]
    assert lat["backend"] == "ai-edge-litert" and lat["runs"] == 5
    assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] and lat["peak_rss_mb"] > lat["rss_before_load_mb"]
    assert lat["tensorflow_loaded"] is False  # measured by the SDK alone, in its own process
    assert row["accuracy"]["probs_three"]["mean_per_class_accuracy"] == pytest.approx(
        ref["accuracy"]["probs_three"]["mean_per_class_accuracy"], abs=0.1
    )
    assert {p["metric"] for p in row["parity"]} >= {"max_abs", "top1"} and row["ok"]
    assert "| small.tflite |" in (tmp_path / "bench.md").read_text()
    # the CI gate: the same file against thresholds it cannot meet
    strict = targets.Parity(max_abs=0.0, mean_abs=0.0, top1=1.0, auc=0.0, mpca=0.0)
    tfl = targets.TARGETS["tflite"]
    monkeypatch.setitem(targets.TARGETS, "tflite", dataclasses.replace(tfl, parity={**tfl.parity, "fp16": strict}))
    res = cli.invoke(app, args)
    assert res.exit_code == 1 and "Parity thresholds missed by" in res.output
    assert cli.invoke(app, [*args, "--no-fail"]).exit_code == 0


def test_bench_bad_input(small_run, tmp_path):
    from derm.benchmarks.bench import app

    _, run = small_run
    res = cli.invoke(app, ["--run", str(run), "--targets", "tensorrt:int8", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "Unknown target 'tensorrt'" in res.output
    res = cli.invoke(app, ["--run", str(run), "--targets", "onnx:fp16", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "no quantization 'fp16'" in res.output
