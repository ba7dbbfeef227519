"""Accuracy against hours: the frozen-feature head beside the top 1, 2 or 3 Inception blocks fine-tuned on cached
activations (``--unfreeze-top``), on this CPU.

Every run is the trainer benchmark's ISIC 2017 run (train split -> validation split, 2 augmented views, head on
pooled mixed7..mixed10; see :mod:`derm.benchmarks.trainer`) with only ``unfreeze_top`` changed, so the rows differ in
the blocks trained and nothing else. Times are this machine's wall clock from each run's ``metrics.json``: the
extraction pass (pooled features and the cut's activations together) and the training. A run already in
``RUNS/top{N}/isic2017`` is reused, not retrained.

    python -m derm.benchmarks.topblocks --shared ../shared --unfreeze 0,1,2,1@0.0001

(``N@LR``: that run with another top-block learning rate; the run to keep is chosen on the validation column, never
on the test columns) writes ``benchmarks/results/topblocks.json`` and ``topblocks.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from derm.benchmarks._results import write_results

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_LR = 1e-3
BLOCKS = {0: "none (head only)", 1: "mixed10", 2: "mixed9, mixed10", 3: "mixed8, mixed9, mixed10"}


def _row(n: int, lr: float, run: Path, res: dict[str, Any]) -> dict[str, Any]:
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    tops = [r for r in _history(run) if r["stage"] == "top"]
    best = max(tops, key=lambda r: float(r["val_mpca"])) if tops else None
    return {
        "unfreeze_top": n,
        "lr": lr,
        "run": str(run),
        "trained_blocks": BLOCKS[n] + (f", lr {lr:g}" if n and lr != DEFAULT_LR else ""),
        "timings_s": metrics.get("timings", {}),
        "top_epochs_run": len(tops),
        "best_epoch": int(best["epoch"]) if best else None,
        "val_mpca": max((float(r["val_mpca"]) for r in _history(run)), default=None),
        **{k: v for k, v in res.items() if k != "timings_s"},
    }


def _paired(run: Path, head_only: Path) -> dict[str, tuple[float, float, float]]:
    """Paired bootstrap AUC differences (this run minus the head-only run) on the same test images."""
    from derm import metrics
    from derm.benchmarks.trainer import _node_scores, _rows, _task_scores

    a, b = _rows(run / "predictions_test.csv"), _rows(head_only / "predictions_test.csv")
    by_image = {r["image"]: r for r in b}
    b = [by_image[r["image"]] for r in a]  # the same split: same images, aligned by path
    out = {}
    for name, scores in (
        ("melanoma_vs_nevus", lambda rows, d: _task_scores(rows, d, "melanoma_vs_nevus")),
        ("seborrheic_keratosis_vs_rest", lambda rows, d: _node_scores(rows, d, "seborrheic_keratosis")),
    ):
        (y, sa), (_, sb) = scores(a, run), scores(b, head_only)
        out[name] = metrics.paired_auc_difference(y, sa, sb, n_boot=1000, seed=0)
    from derm.trainer.evaluate import load_partition

    _, part = load_partition(run)
    labels = [c.label for c in part.classes]
    truth = np.asarray(part.targets([r["node"] for r in a]))
    calls = [np.asarray([[float(r[c]) for c in labels] for r in rows]).argmax(1) for rows in (a, b)]
    out["labels_mpca"] = metrics.paired_mpca_difference(truth, calls[0], calls[1], len(labels), n_boot=1000, seed=0)
    return out


def _history(run: Path) -> list[dict[str, str]]:
    import csv

    with open(run / "history.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Top blocks fine-tuned on cached activations: accuracy against hours (ISIC 2017 train -> val)",
        "",
        f"`{report['command']}` on {report['machine']}, {report['date']}. {report['setup']}",
        "",
        "| blocks trained | top epochs (best) | extraction s | head s | top blocks s | total h | validation MPCA "
        "| melanoma vs nevus AUC (95% CI) | seb. keratosis vs rest AUC (95% CI) | 3-diagnosis MPCA |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        t = r["timings_s"]
        mvn, sk = r["melanoma_vs_nevus"], r["seborrheic_keratosis_vs_rest"]
        lines.append(
            f"| {r['trained_blocks']} | {r['top_epochs_run'] or ''}"
            + (f" ({r['best_epoch']})" if r["best_epoch"] else "")
            + f" | {t.get('features_s', 0):.0f} | {t.get('head_s', 0):.0f} | {t.get('top_blocks_s', 0):.0f} | "
            f"{t.get('total_s', 0) / 3600:.2f} | {r['val_mpca']:.3f} | "
            f"{mvn['auc']:.3f} ({mvn['lo']:.3f}-{mvn['hi']:.3f}) | "
            f"{sk['auc']:.3f} ({sk['lo']:.3f}-{sk['hi']:.3f}) | {r['labels_mpca']:.3f} |"
        )
    diffs = [r for r in report["rows"] if "vs_head_only" in r]
    if diffs:
        lines += ["", "Paired against the head-only run on the same test images (95% paired bootstrap interval):", ""]
        for r in diffs:
            d = r["vs_head_only"]
            lines.append(
                f"- {r['trained_blocks']}: melanoma vs nevus AUC {d['melanoma_vs_nevus'][0]:+.3f} "
                f"({d['melanoma_vs_nevus'][1]:+.3f} to {d['melanoma_vs_nevus'][2]:+.3f}), seborrheic keratosis vs "
                f"rest {d['seborrheic_keratosis_vs_rest'][0]:+.3f} ({d['seborrheic_keratosis_vs_rest'][1]:+.3f} to "
                f"{d['seborrheic_keratosis_vs_rest'][2]:+.3f}), 3-diagnosis MPCA {d['labels_mpca'][0]:+.3f} "
                f"({d['labels_mpca'][1]:+.3f} to {d['labels_mpca'][2]:+.3f})"
            )
    lines += ["", report["notes"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from derm.benchmarks.trainer import isic2017
    from derm.trainer.train import TrainConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=Path("../shared"))
    ap.add_argument("--runs", type=Path, default=Path("runs/bench_top"))
    ap.add_argument("--unfreeze", default="0,1,2", help="comma-separated unfreeze_top values (0: head only)")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--notes", default="", help="what the table shows, written under it")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    base = TrainConfig(
        data="",
        out="",
        views=args.views,
        pool_layers=["mixed7", "mixed8", "mixed9", "mixed10"],
        epochs=args.epochs,
        patience=args.patience,
    )
    rows = []
    for spec in args.unfreeze.split(","):
        n, _, lr_text = spec.partition("@")
        n, lr = int(n), float(lr_text or DEFAULT_LR)
        folder = args.runs / (f"top{n}" if lr == DEFAULT_LR else f"top{n}_lr{lr:g}")
        cfg = dataclasses.replace(base, unfreeze_top=n, lr=lr)
        res = isic2017(cfg, args.shared / "data/isic2017_trainval/labels.csv", folder)
        rows.append(_row(n, lr, folder / "isic2017", res))
    head_only = args.runs / "top0" / "isic2017"
    for r in rows:
        if r["unfreeze_top"] and (head_only / "predictions_test.csv").is_file():
            r["vs_head_only"] = _paired(Path(r["run"]), head_only)
    report = {
        "command": "python -m derm.benchmarks.topblocks "
        + " ".join(
            f"--shared {args.shared} --runs {args.runs} --unfreeze {args.unfreeze} --views {args.views} "
            f"--epochs {args.epochs} --patience {args.patience}".split()
        ),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores, no GPU",
        "date": time.strftime("%Y-%m-%d"),
        "setup": f"inception-2015 weights, 299x299, head on pooled mixed7..mixed10, {args.views} augmented views per "
        f"training image, head 40 epochs, then up to {args.epochs} top-block epochs (paper's RMSProp, lr 0.001, "
        f"BatchNorm frozen, patience {args.patience}); test: ISIC 2017's 150 validation images, never trained on.",
        "notes": args.notes,
        "rows": rows,
    }
    write_results(args.results, "topblocks", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
