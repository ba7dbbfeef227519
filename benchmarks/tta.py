"""Test-time augmentation benchmark: what ``--tta N`` (the SDK's averaging over flips and quarter turns,
``derm.preprocess.TTA_VIEWS``) buys in AUC and costs in latency, with an exported file on held-out images.

Every image is run once per view (8 views); ``--tta N`` is the mean of the first N, so one pass measures N = 1, 2,
4, 8 on the same images. AUCs with their bootstrap intervals; latency is one image's ``Classifier.predict`` from a
decoded array, median of timed runs.

    python -m derm.benchmarks.tta --model runs/reference/export/model-int8.tflite --split runs/reference_cal/split.csv

(``--split``: a run's ``split.csv``; its ``test`` rows, which that run never trained on) writes
``benchmarks/results/tta.json`` and ``tta.md``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from derm.benchmarks._results import write_results
from derm.trainer.config import Role

RESULTS = Path(__file__).resolve().parent / "results"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/reference/export/model-int8.tflite")
    ap.add_argument("--split", default="runs/reference_cal/split.csv", help="a run's split.csv (its test rows)")
    ap.add_argument("--n", type=int, default=400, help="test images (seeded sample)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=str(RESULTS))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    from derm.classifier import Classifier
    from derm.taxonomy import default_taxonomy

    rows = _test_rows(args.split, args.n, args.seed)
    clf = Classifier.load(args.model, threads=args.threads)
    tax = default_taxonomy()
    nodes = [r["node"] for r in rows]
    outs = _every_view(clf, rows)
    from derm.trainer.rundir import load_partition

    _, partition = load_partition(Path(args.split).parent)
    report: dict[str, Any] = {"model": args.model, "split": args.split, "n": len(rows), "threads": args.threads}
    report["by_n"] = {}
    image = clf.prepare(rows[0]["image"])
    for n in (1, 2, 4, 8):
        mean = {k: v[:, :n].mean(axis=1) for k, v in outs.items()}
        row = _accuracy(mean, nodes, partition, clf.tasks, tax, args.seed)
        row["ms_per_image"] = _latency_ms(args.model, args.threads, n, image)
        report["by_n"][str(n)] = row
    write_results(args.results, "tta", report, markdown(report, clf.tasks))
    return 0


def _test_rows(split: str, n: int, seed: int) -> list[dict[str, str]]:
    """A seeded sample of the split's test rows, in file order."""
    with open(split, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["role"] == Role.TEST]
    rng = np.random.default_rng(seed)
    return [rows[i] for i in sorted(rng.choice(len(rows), size=min(n, len(rows)), replace=False))]


def _every_view(clf: Any, rows: list[dict[str, str]]) -> dict[str, np.ndarray]:
    """Each output on every view of every image: (images, views, values), with progress every 50 images."""
    from derm.preprocess import TTA_VIEWS, tta_views

    per_view: dict[str, list[np.ndarray]] = {}
    t0 = time.perf_counter()
    for i, r in enumerate(rows):
        out = clf.run(tta_views(clf.prepare(r["image"]), len(TTA_VIEWS)))
        for k, v in out.items():
            per_view.setdefault(k, []).append(v)
        if (i + 1) % 50 == 0:
            print(f"{i + 1}/{len(rows)} images, {time.perf_counter() - t0:.0f} s", flush=True)
    return {k: np.stack(v) for k, v in per_view.items()}


def _accuracy(
    mean: dict[str, np.ndarray], nodes: list[str], partition: Any, tasks: list[str], tax: Any, seed: int
) -> dict[str, Any]:
    """3-way accuracy, each task's AUC and P(malignant)'s AUC of the outputs averaged over the first N views."""
    from derm import metrics
    from derm.aggregation import task_targets
    from derm.evaluation import evaluate

    res = evaluate(mean["training_probs"], nodes, partition, levels=["three"], tasks=[], seed=seed)
    row: dict[str, Any] = {}
    three = res["levels"]["three"]
    row["three_accuracy"] = three.get("accuracy")
    row["three_mpca"] = three.get("mean_per_class_accuracy")
    for task in tasks:
        y = task_targets(tax, nodes, task)
        keep = y >= 0
        if (y[keep] == 1).any() and (y[keep] == 0).any():
            m = metrics.binary_task_metrics(y[keep], mean[f"task_{task}"][keep, 0], n_boot=1000, seed=seed)
            row[task] = {"auc": m["auc"], "auc_ci": m["auc_ci"], "n_pos": m["n_positive"], "n_neg": m["n_negative"]}
    mal = np.asarray([tax.is_under(x, "malignant") if x in tax else False for x in nodes], dtype=np.int64)
    m = metrics.binary_task_metrics(mal, mean["probs_three"][:, 1], n_boot=1000, seed=seed)
    row["malignant_auc"] = {"auc": m["auc"], "auc_ci": m["auc_ci"]}
    return row


def _latency_ms(model: str, threads: int, n: int, image: np.ndarray) -> float:
    """Median ms of ``infer`` on one decoded image with ``--tta n``."""
    from derm.classifier import Classifier

    timed = Classifier.load(model, threads=threads, tta=n)
    for _ in range(2):
        timed.infer(image[None])
    ms = []
    for _ in range(10):
        t = time.perf_counter()
        timed.infer(image[None])
        ms.append(1000 * (time.perf_counter() - t))
    return statistics.median(ms)


def markdown(r: dict[str, Any], tasks: list[str]) -> str:
    def auc(v: dict[str, Any]) -> str:
        return f"{v['auc']:.3f} ({v['auc_ci'][0]:.3f}-{v['auc_ci'][1]:.3f})"

    head = ["--tta", "P(malignant) AUC", *[f"{t} AUC" for t in tasks], "3-way accuracy", "ms / image"]
    lines = [
        f"# Test-time augmentation: {r['model']}, {r['n']} held-out images ({r['split']} test rows), "
        f"{r['threads']} threads",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for n, row in r["by_n"].items():
        cells = [n, auc(row["malignant_auc"])]
        cells += [auc(row[t]) if t in row else "-" for t in tasks]
        cells += [f"{row['three_accuracy']:.3f}", f"{row['ms_per_image']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
