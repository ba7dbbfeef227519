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


def test_topblocks_predictions_pool_folds_run_on_another_day(tmp_path):
    """The top-blocks benchmark's predictions file round-trips (gzipped deterministically), and pooling takes the
    earlier folds the new run lacks, the new run's own folds winning; per-fold and pooled accuracy follow."""
    import numpy as np

    from derm.benchmarks import _topblocks_predictions as tp
    from derm.benchmarks.topblocks import DATASETS

    aucs, classes = DATASETS["ham10000"]["aucs"], ["mel", "nv", "bcc"]

    def tab(fold: int, images: list[str], truth: list[str], call: list[str]) -> dict[str, np.ndarray]:
        y = np.asarray([{"mel": 1, "nv": 0}.get(t, -1) for t in truth])
        return {
            "fold": np.full(len(images), fold),
            "image": np.asarray(images),
            "truth": np.asarray(truth),
            "call": np.asarray(call),
            "melanoma_vs_nevus_y": y,
            "melanoma_vs_nevus_score": np.linspace(0.1, 0.9, len(images)),
        }

    f0 = tab(0, ["a.jpg", "c.jpg", "e.jpg"], ["nv", "mel", "bcc"], ["nv", "mel", "nv"])
    f1 = tab(1, ["b.jpg", "d.jpg"], ["mel", "nv"], ["nv", "nv"])
    old = {(1, 0.001): {c: np.concatenate([f0[c], f1[c]]) for c in f0}}
    path = tmp_path / "p.csv.gz"
    tp.write_predictions(path, aucs, old)
    first = path.read_bytes()
    tp.write_predictions(path, aucs, old)
    assert path.read_bytes() == first  # no timestamp in the gzip header
    back = tp.read_predictions(path, aucs)
    assert list(back) == [(1, 0.001)] and back[(1, 0.001)]["image"].tolist() == [
        "a.jpg",
        "c.jpg",
        "e.jpg",
        "b.jpg",
        "d.jpg",
    ]
    new = tab(1, ["b.jpg", "d.jpg"], ["mel", "nv"], ["mel", "nv"])  # fold 1 run again, now right on both
    both = tp.pooled(new, back[(1, 0.001)])
    assert both["image"].tolist() == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]
    assert both["fold"].tolist() == [0, 1, 0, 1, 0] and both["call"].tolist() == ["nv", "mel", "mel", "nv", "nv"]
    assert tp.mpca(both, classes) == pytest.approx((1 + 1 + 0) / 3)  # mel 2/2, nv 2/2, bcc 0/1
    folds = tp.per_fold(aucs, both, classes)
    assert folds["1"]["n_test_images"] == 2 and folds["0"]["n_test_images"] == 3
    with pytest.raises(ValueError, match="lacks"):
        tp.mpca(both, ["mel", "nv"])
    with pytest.raises(ValueError, match="not predictions of this benchmark"):
        tp.read_predictions(path, DATASETS["isic2017"]["aucs"])
