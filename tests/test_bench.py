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
    old = {(1, 0.001, 2): {c: np.concatenate([f0[c], f1[c]]) for c in f0}}
    path = tmp_path / "p.csv.gz"
    tp.write_predictions(path, aucs, old)
    first = path.read_bytes()
    tp.write_predictions(path, aucs, old)
    assert path.read_bytes() == first  # no timestamp in the gzip header
    back = tp.read_predictions(path, aucs)
    assert list(back) == [(1, 0.001, 2)] and back[(1, 0.001, 2)]["image"].tolist() == [
        "a.jpg",
        "c.jpg",
        "e.jpg",
        "b.jpg",
        "d.jpg",
    ]
    new = tab(1, ["b.jpg", "d.jpg"], ["mel", "nv"], ["mel", "nv"])  # fold 1 run again, now right on both
    both = tp.pooled(new, back[(1, 0.001, 2)])
    assert both["image"].tolist() == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]
    assert both["fold"].tolist() == [0, 1, 0, 1, 0] and both["call"].tolist() == ["nv", "mel", "mel", "nv", "nv"]
    assert tp.mpca(both, classes) == pytest.approx((1 + 1 + 0) / 3)  # mel 2/2, nv 2/2, bcc 0/1
    folds = tp.per_fold(aucs, both, classes)
    assert folds["1"]["n_test_images"] == 2 and folds["0"]["n_test_images"] == 3
    with pytest.raises(ValueError, match="lacks"):
        tp.mpca(both, ["mel", "nv"])
    with pytest.raises(ValueError, match="not predictions of this benchmark"):
        tp.read_predictions(path, DATASETS["isic2017"]["aucs"])
    # files written before rows named their views (2026-12-01..07, all at 2 views) read as 2-view rows
    import gzip

    legacy = gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()
    legacy = [",".join(line.split(",")[:2] + line.split(",")[3:]) for line in legacy]
    path.write_bytes(gzip.compress(("\n".join(legacy) + "\n").encode("utf-8")))
    assert list(tp.read_predictions(path, aucs)) == [(1, 0.001, 2)]
    tp.write_predictions(path, aucs, {(1, 0.001, 4): old[(1, 0.001, 2)], (0, 0.001, 1): f0})
    assert list(tp.read_predictions(path, aucs)) == [(0, 0.001, 1), (1, 0.001, 4)]


def test_topblocks_report_the_top_epoch_kept_or_that_the_head_was_kept():
    """A top stage none of whose epochs beat the head's best validation MPCA leaves the head-trained model in the run:
    the tables say "head kept" there, not the stage's best epoch (PAD-UFES-20 fold 4 and the reference at lr 0.001)."""
    from derm.benchmarks.topblocks import epochs_cell, kept_top_epoch

    def history(head: list[float], top: list[float]) -> list[dict[str, str]]:
        rows = [{"stage": "head", "epoch": str(i + 1), "val_mpca": str(v)} for i, v in enumerate(head)]
        return rows + [{"stage": "top", "epoch": str(i + 1), "val_mpca": str(v)} for i, v in enumerate(top)]

    assert kept_top_epoch(history([0.50, 0.53, 0.52], [0.48, 0.52, 0.51])) is None
    assert kept_top_epoch(history([0.50, 0.53, 0.52], [0.48, 0.56, 0.59, 0.55])) == 3
    assert kept_top_epoch(history([0.50, 0.53], [0.53])) is None  # a tie does not replace the head
    assert kept_top_epoch(history([0.5], [])) is None
    assert [epochs_cell(5, None), epochs_cell(8, 3), epochs_cell(0, None)] == ["5 (head kept)", "8 (3)", ""]


def test_topblocks_reports_the_phone_photo_folds_with_their_own_task_and_words():
    """--data pad_ufes20 is cross-validated like HAM10000 (folds named in the command, pooled with earlier folds)
    but scores carcinoma vs seborrheic keratosis on held-out patients' photos, not melanoma vs nevus on lesions."""
    import argparse
    from pathlib import Path

    from derm.benchmarks import topblocks as tb

    args = argparse.Namespace(
        data="pad_ufes20", folds="1", pool_with=Path("p.csv.gz"), shared=Path("s"), runs=Path("r"), unfreeze="1,0",
        views=2, epochs=15, patience=5, notes="", name=None,
    )  # fmt: skip
    fold = {"n_test_images": 70, "carcinoma_vs_seborrheic_keratosis": 0.9, "labels_mpca": 0.5}
    row = {
        "unfreeze_top": 1, "lr": 1e-3, "trained_blocks": "mixed10", "timings_s": {"total_s": 3600.0},
        "top_epochs_run": [6, 5], "best_epoch": [2, 1], "val_mpca": 0.6, "labels_mpca": 0.55,
        "carcinoma_vs_seborrheic_keratosis": {"auc": 0.91, "lo": 0.85, "hi": 0.96}, "per_fold": {"0": fold, "1": fold},
    }  # fmt: skip
    report = tb._report(args, [1], [0, 1], [row])
    assert "--data pad_ufes20 --folds 1 --pool-with p.csv.gz" in report["command"]
    assert "folds 0,1 of 5; folds 0 from p.csv.gz, run earlier" in report["setup"]
    args.name, args.views = "topblocks_pad_views", "1,4"
    again = tb._report(args, [1], [0, 1], [row])  # the command, rerun as written, rewrites the same results file
    assert "--name topblocks_pad_views --unfreeze 1,0 --views 1,4" in again["command"]
    assert "1 or 4 augmented views (the views column) per training image" in again["setup"]
    text = tb.markdown(report)
    assert "| carcinoma vs keratosis AUC (pooled) (95% CI) | PAD diagnoses MPCA (pooled) |" in text
    assert "| 0.910 (0.850-0.960) | 0.550 |" in text and "melanoma" not in text
    assert "Per fold (each fold's held-out patients' photos on their own" in text
    assert "fold 1 (70 images): carcinoma vs keratosis AUC 0.900, PAD diagnoses MPCA 0.500" in text


def test_reference_top_pairs_the_two_runs_per_source_and_checks_the_committed_numbers(tmp_path):
    """The reference top-block benchmark's scoring: paired differences per source (a source without a task's two
    classes gets no AUC), the table, and the check that the frozen run retrained here is the committed model."""
    import numpy as np

    from derm.benchmarks import reference_top as rt

    src = np.asarray(["ham10000"] * 4 + ["pad_ufes20"] * 4)
    y3 = np.asarray([0, 0, 1, 1, 0, 1, 1, -1])

    def table(three_call: list[int], mvn: list[float], carc: list[float]) -> dict[str, np.ndarray | int]:
        return {
            "source": src,
            "three_y": y3,
            "three_call": np.asarray(three_call),
            "three_k": 3,
            "nine_y": y3,
            "nine_call": np.asarray(three_call),
            "nine_k": 9,
            "melanoma_vs_nevus_y": np.asarray([0, 0, 1, 1, -1, -1, -1, -1]),
            "melanoma_vs_nevus_score": np.asarray(mvn),
            "carcinoma_vs_seborrheic_keratosis_y": np.asarray([-1, -1, -1, -1, 0, 1, 1, 0]),
            "carcinoma_vs_seborrheic_keratosis_score": np.asarray(carc),
        }

    better = table([0, 0, 1, 1, 0, 1, 1, 2], [0.1, 0.2, 0.8, 0.9] + [0.5] * 4, [0.5] * 4 + [0.1, 0.9, 0.8, 0.2])
    worse = table([0, 1, 1, 0, 0, 0, 1, 2], [0.9, 0.2, 0.8, 0.1] + [0.5] * 4, [0.5] * 4 + [0.9, 0.1, 0.8, 0.2])
    d = rt.paired(better, worse)
    assert d["ham10000"]["three_mpca"][0] == pytest.approx(0.5)  # classes 0 and 1: 2/2 vs 1/2 each
    assert d["ham10000"]["melanoma_vs_nevus"][0] == pytest.approx(1.0 - 0.25)  # 1 of 4 pairs ordered right
    assert "carcinoma_vs_seborrheic_keratosis" not in d["ham10000"]  # HAM rows do not report the phone task
    assert d["pad_ufes20"]["carcinoma_vs_seborrheic_keratosis"][0] == pytest.approx(1.0 - 0.25)
    assert "melanoma_vs_nevus" not in d["pad_ufes20"] and "melanoma_vs_nevus" in d["all"]
    lo, hi = d["all"]["three_mpca"][1:]
    assert lo <= d["all"]["three_mpca"][0] <= hi
    with pytest.raises(ValueError, match="other images"):
        rt.paired(better, {**worse, "source": src[::-1]})

    def entry(mpca: float, auc: float) -> dict:
        level = {"mpca": mpca, "lo": mpca - 0.1, "hi": mpca + 0.1}
        task = {"melanoma_vs_nevus": {"auc": auc, "lo": 0.0, "hi": 1.0}}
        return {"levels": {"three": level, "nine": level}, "tasks": task}

    committed = tmp_path / "test_by_source.json"
    committed.write_text(json.dumps({"ham10000": entry(0.6, 0.85)}), encoding="utf-8")
    assert rt.reproduces_committed({"ham10000": entry(0.6, 0.85)}, committed)["max_abs_difference"] == 0
    assert rt.reproduces_committed({"ham10000": entry(0.61, 0.84)}, committed)["max_abs_difference"] == pytest.approx(
        0.01
    )
    assert not rt.reproduces_committed({"pad_ufes20": entry(0.6, 0.85)}, committed)["checked"]
    assert not rt.reproduces_committed({}, tmp_path / "missing.json")["checked"]

    row = {"timings_s": {"total_s": 3600}, "top_epochs_run": 0, "best_top_epoch": None, "temperature": 1.5}
    row |= {"test_ece": {"ece_before": 0.2, "ece_after": 0.05}, "val": {"all": entry(0.55, 0.8)}}
    rows = [{**row, "name": "frozen", "test": {"ham10000": entry(0.6, 0.85), "all": entry(0.6, 0.85)}}]
    rows.append({**row, "name": "top", "top_epochs_run": 7, "best_top_epoch": "4", "test": rows[0]["test"]})
    res = {"command": "cmd", "machine": "m", "date": "d", "rows": rows, "paired": d, "notes": "Said plainly."}
    res["frozen_reproduces_committed"] = rt.reproduces_committed(rows[0]["test"], committed)
    md = rt.markdown(res)
    assert "| HAM10000 | difference | +0.500 (" in md and "| PAD-UFES-20 |" not in md  # no PAD test entry
    assert "| top | 0.550 | 7 (4) | 1.500 | 0.200 / 0.050 | 1.00 |" in md
    assert "largest difference 0.0000 over 3 MPCAs and AUCs" in md and md.endswith("Said plainly.\n")
    res["committed_recipe"] = "top"  # the reference now trained as the top-block run: that run is the one checked
    assert "The top run (the committed reference's recipe) retrained here, against its test numbers: largest" in (
        rt.markdown(res)
    )

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"unfreeze_top": 1, "views": 2, "lr": 0.0001}), encoding="utf-8")
    assert rt.committed_recipe(config, 1, 2, 0.0001) == 1
    # another learning rate, views count or block count: the committed reference is neither run, nothing is checked
    assert [rt.committed_recipe(config, *other) for other in ((1, 2, 0.001), (1, 4, 0.0001), (2, 2, 0.0001))] == [
        None
    ] * 3
    config.write_text(json.dumps({"views": 1}), encoding="utf-8")  # the frozen head's recipe
    assert rt.committed_recipe(config, 1, 2, 0.0001) == 0 and rt.committed_recipe(tmp_path / "none.json", 1, 2, 1) == 0


@pytest.mark.parametrize(("argv", "echo"), [(["--lr", "0"], "--lr 0.0"), (["--unfreeze-top", "4"], "--unfreeze-top 4")])
def test_reference_top_refuses_a_bad_lr_or_block_count_before_training(argv, echo, tmp_path, capsys):
    from derm.benchmarks import reference_top as rt

    with pytest.raises(SystemExit):
        rt.main(["--runs", str(tmp_path / "runs"), *argv])
    assert echo in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing written, nothing trained


def test_reference_weighting_refuses_to_save_frozen_heads_over_the_fine_tuned_reference(tmp_path, capsys):
    """The weighting comparison's frozen recipe trains frozen heads: with --save it would replace the committed
    reference, which fine-tunes mixed10, by a weaker recipe, so it refuses before training anything unless told to."""
    from derm.benchmarks import reference as rb
    from derm.trainer.reference import REFERENCE_DIR, committed_top_blocks

    assert committed_top_blocks(REFERENCE_DIR / "config.json") == 1  # the committed reference fine-tunes mixed10
    with pytest.raises(SystemExit) as exc:
        rb.main(["--save", "--recipe", "frozen", "--runs", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "unfreeze_top 1" in err and "--replace-fine-tuned" in err
    assert not (tmp_path / "runs").exists()  # nothing trained or written
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"views": 1}), encoding="utf-8")
    assert committed_top_blocks(config) == 0 and committed_top_blocks(tmp_path / "missing.json") == 0


def test_reference_weighting_reuses_a_run_only_of_the_same_recipe(tmp_path):
    """A run already in --runs is reused only when it was trained with the configuration the comparison would train
    (paths apart); another recipe is refused, naming the keys that differ."""
    from derm.benchmarks.reference import _check_reused
    from derm.trainer.reference import REFERENCE_DIR, reference_config

    weighting = {"source_weights": {"pad_ufes20": 4.0}}
    cfg = reference_config(tmp_path / "data.csv", tmp_path / "w4", ref=REFERENCE_DIR, **weighting)
    run = tmp_path / "w4"
    run.mkdir()
    same = {**cfg.to_dict(), "data": "elsewhere.csv", "out": "runs/other"}
    (run / "config.json").write_text(json.dumps(same), encoding="utf-8")
    _check_reused(run, cfg)
    (run / "config.json").write_text(json.dumps({**same, "unfreeze_top": 0, "lr": 0.001}), encoding="utf-8")
    with pytest.raises(SystemExit, match=r"\(lr: 0\.001, unfreeze_top: 0; this command trains lr: 0\.0001, unfreeze"):
        _check_reused(run, cfg)
