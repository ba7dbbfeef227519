"""Accuracy against hours: the frozen-feature head beside the top 1, 2 or 3 Inception blocks fine-tuned on cached
activations (``--unfreeze-top``), on this CPU.

Every run is one of the trainer benchmark's runs (see :mod:`derm.benchmarks.trainer`: head on pooled
mixed7..mixed10, 2 augmented views) with only ``unfreeze_top`` changed, and with ``--views 1,2,4`` the views per
training image too (the rows then differ in blocks and views, and are paired with the head-only run of as many views),
so the rows differ in nothing else:

- ``--data isic2017``: ISIC 2017 train split -> validation split; melanoma vs nevus, seborrheic keratosis vs rest,
  3-diagnosis mean per-class accuracy.
- ``--data ham10000 --folds 0,1``: the lesion-grouped 5-fold cross-validation of HAM10000, the folds named (the first
  fold costs an extraction pass over ~17,000 (image, view) pairs, ~12-20 min here; later folds find most of their
  activations in the cache and cost mostly their 5-8 min of training); melanoma vs nevus AUC pooled over the folds
  run (with ``--pool-with``, also over an earlier run's folds), 7-diagnosis mean per-class accuracy.
- ``--data pad_ufes20 --folds 0``: the trainer benchmark's phone-photo test: each fold trains on all of HAM10000 and
  ISIC 2017 plus 4/5 of the PAD-UFES-20 patients and tests on the other fifth (patient-grouped); carcinoma vs
  seborrheic keratosis AUC pooled over the folds run, mean per-class accuracy over the PAD photos' diagnoses.

Times are this machine's wall clock from each run's ``metrics.json``: the extraction pass (pooled features and the
cut's activations together) and the training. A run already in ``RUNS/top{N}/isic2017`` (``ham_fold{K}``,
``pad_fold{K}``) is reused,
not retrained.

    python -m derm.benchmarks.topblocks --shared ../shared --unfreeze 0,1,2,1@0.0001
    python -m derm.benchmarks.topblocks --shared ../shared --data ham10000 --folds 0 --unfreeze 0,1
    python -m derm.benchmarks.topblocks --shared ../shared --unfreeze 0,1 --views 1,2,4,8 --name topblocks_views

(``N@LR``: that run with another top-block learning rate; the run to keep is chosen on the validation column, never
on the test columns) writes ``benchmarks/results/topblocks.json`` and ``topblocks.md`` (``topblocks_ham10000.*``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from derm._cli import setup_logging
from derm.benchmarks._results import write_results
from derm.benchmarks._topblocks_predictions import (
    LEGACY_VIEWS,
    mpca,
    paired,
    per_fold,
    pooled,
    read_predictions,
    table,
    write_predictions,
)

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_LR = 1e-3
CROSS_VALIDATED = ("ham10000", "pad_ufes20")  # --folds and --pool-with apply to these
HAM_FOLDS = 5  # the trainer benchmark's lesion-grouped (HAM10000) and patient-grouped (PAD-UFES-20) folds
BLOCKS = {0: "none (head only)", 1: "mixed10", 2: "mixed9, mixed10", 3: "mixed8, mixed9, mixed10"}
# per dataset: the AUCs reported ((key, column title, "task" or "node", id)) and the accuracy column's title
DATASETS = {
    "isic2017": {
        "title": "ISIC 2017 train -> val",
        "aucs": [
            ("melanoma_vs_nevus", "melanoma vs nevus AUC", "task", "melanoma_vs_nevus"),
            ("seborrheic_keratosis_vs_rest", "seb. keratosis vs rest AUC", "node", "seborrheic_keratosis"),
        ],
        "mpca": "3-diagnosis MPCA",
        "test": "ISIC 2017's 150 validation images, never trained on",
    },
    "ham10000": {
        "title": "HAM10000 lesion-grouped 5-fold",
        "aucs": [("melanoma_vs_nevus", "melanoma vs nevus AUC (pooled)", "task", "melanoma_vs_nevus")],
        "mpca": "7-diagnosis MPCA (pooled)",
        "held_out": "held-out lesions",
        "test": "each fold's held-out lesions (lesion-grouped, never trained on), pooled over the folds run",
    },
    "pad_ufes20": {
        "title": "PAD-UFES-20 patient-grouped 5-fold, trained with all of HAM10000 and ISIC 2017",
        "aucs": [
            (
                "carcinoma_vs_seborrheic_keratosis",
                "carcinoma vs keratosis AUC (pooled)",
                "task",
                "carcinoma_vs_seborrheic_keratosis",
            )
        ],
        "mpca": "PAD diagnoses MPCA (pooled)",
        "held_out": "held-out patients' photos",
        "test": "each fold's held-out PAD-UFES-20 patients' phone photos (never trained on), pooled over the folds run",
    },
}


def train_runs(data: str, cfg: Any, shared: Path, folder: Path, folds: list[int]) -> list[Path]:
    """The runs of one row (trained unless already there): ISIC 2017's one run, or the folds of HAM10000 or
    PAD-UFES-20."""
    from derm.benchmarks.trainer import combined_csv, isic2017, pad_fold_run
    from derm.trainer.train import train

    if data == "isic2017":
        isic2017(cfg, shared / "data/isic2017_trainval/labels.csv", folder)
        return [folder / "isic2017"]
    if data == "pad_ufes20":  # as the trainer benchmark's pad_phone
        combined = combined_csv(shared, folder / "combined.csv", HAM_FOLDS, cfg.seed)
        return [pad_fold_run(cfg, combined, folder / f"pad_fold{k}", k) for k in folds]
    runs = []
    for k in folds:
        run = folder / f"ham_fold{k}"
        if not (run / "run.json").is_file():
            # as the trainer benchmark's ham_cv: one training class per diagnosis
            ham = str(shared / "data/ham10000/labels.csv")
            train(
                dataclasses.replace(
                    cfg, data=ham, out=str(run), within="nine", max_class_size=100, folds=HAM_FOLDS, fold=k
                )
            )
        runs.append(run)
    return runs


def _row(
    data: str, n: int, lr: float, views: int, runs: list[Path], t: dict[str, np.ndarray], classes: list[str]
) -> dict[str, Any]:
    from derm import metrics

    timings: dict[str, float] = {}
    tops, val, best = [], [], []
    for run in runs:
        for k, v in json.loads((run / "metrics.json").read_text(encoding="utf-8")).get("timings", {}).items():
            timings[k] = timings.get(k, 0.0) + float(v)
        history = _history(run)
        tops.append([r for r in history if r["stage"] == "top"])
        val.append(max((float(r["val_mpca"]) for r in history), default=float("nan")))
        best.append(kept_top_epoch(history))
    row = {
        "unfreeze_top": n,
        "lr": lr,
        "views": views,
        "runs": [str(r) for r in runs],
        "trained_blocks": BLOCKS[n] + (f", lr {lr:g}" if n and lr != DEFAULT_LR else ""),
        "timings_s": timings,
        "top_epochs_run": [len(t) for t in tops],
        "best_epoch": best,
        "val_mpca": float(np.mean(val)),
        "n_test_images": len(t["image"]),
        "labels_mpca": mpca(t, classes),
        "per_fold": per_fold(DATASETS[data]["aucs"], t, classes),
    }
    for key, *_ in DATASETS[data]["aucs"]:
        keep = t[f"{key}_y"] >= 0
        auc, lo, hi = metrics.bootstrap_auc(t[f"{key}_y"][keep], t[f"{key}_score"][keep], n_boot=1000, seed=0)
        row[key] = {"auc": auc, "lo": lo, "hi": hi}
    return row


def kept_top_epoch(history: list[dict[str, str]]) -> int | None:
    """The top-block epoch a run kept: the best validation MPCA of the top stage if it beat the head's best (the
    trainer's first score to beat), else None: no top epoch did, and the run kept the head-trained model."""
    top = [r for r in history if r["stage"] == "top"]
    head = max((float(r["val_mpca"]) for r in history if r["stage"] != "top"), default=float("-inf"))
    best = max(top, key=lambda r: float(r["val_mpca"]), default=None)
    return int(best["epoch"]) if best is not None and float(best["val_mpca"]) > head else None


def epochs_cell(run: int, kept: int | None) -> str:
    """'8 (3)': top epochs run (the one kept); '5 (head kept)' when none beat the head; '' for a head-only run."""
    return "" if not run else f"{run} ({kept})" if kept else f"{run} (head kept)"


def _history(run: Path) -> list[dict[str, str]]:
    import csv

    with open(run / "history.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _epochs(r: dict[str, Any]) -> str:
    cells = [epochs_cell(n, b) for n, b in zip(r["top_epochs_run"], r["best_epoch"], strict=True)]
    return ", ".join(c for c in cells if c)


def _per_fold_lines(report: dict[str, Any]) -> list[str]:
    """Each fold's own numbers (HAM10000 runs that recorded them), for a summary across folds."""
    rows = [r for r in report["rows"] if len(r.get("per_fold") or {}) > 1]
    if not rows:
        return []
    spec = DATASETS[report["data"]]
    lines = ["", f"Per fold (each fold's {spec['held_out']} on their own; no intervals):", ""]
    for r in rows:
        cells = [
            f"fold {k} ({v['n_test_images']} images): "
            + ", ".join(f"{title.split(' (')[0]} {v[key]:.3f}" for key, title, *_ in spec["aucs"])
            + f", {spec['mpca'].split(' (')[0]} {v['labels_mpca']:.3f}"
            for k, v in r["per_fold"].items()
        ]
        lines.append(f"- {_label(r, report)}: " + "; ".join(cells))
    return lines


def _differences(d: dict[str, Any], spec: dict[str, Any]) -> str:
    parts = [
        f"{title.split(' (')[0]} {d[k][0]:+.3f} ({d[k][1]:+.3f} to {d[k][2]:+.3f})" for k, title, *_ in spec["aucs"]
    ]
    parts.append(
        f"{spec['mpca'].split(' (')[0]} {d['labels_mpca'][0]:+.3f} "
        f"({d['labels_mpca'][1]:+.3f} to {d['labels_mpca'][2]:+.3f})"
    )
    return ", ".join(parts)


def _label(r: dict[str, Any], report: dict[str, Any]) -> str:
    """A row's name in the lines under the table: its blocks, and its views when the rows differ in them."""
    views = {x.get("views", LEGACY_VIEWS) for x in report["rows"]}
    n = r.get("views", LEGACY_VIEWS)
    return r["trained_blocks"] + (f", {n} view{'s' if n != 1 else ''}" if len(views) > 1 else "")


def markdown(report: dict[str, Any]) -> str:
    spec = DATASETS[report["data"]]
    aucs = spec["aucs"]
    lines = [
        f"# Top blocks fine-tuned on cached activations: accuracy against hours ({spec['title']})",
        "",
        f"`{report['command']}` on {report['machine']}, {report['date']}. {report['setup']}",
        "",
        "| blocks trained | views | top epochs (kept) | extraction s | head s | top blocks s | total h | "
        "validation MPCA | " + " | ".join(f"{title} (95% CI)" for _, title, *_ in aucs) + f" | {spec['mpca']} |",
        "|---" * (8 + len(aucs) + 1) + "|",
    ]
    for r in report["rows"]:
        t = r["timings_s"]
        lines.append(
            f"| {r['trained_blocks']} | {r.get('views', LEGACY_VIEWS)} | {_epochs(r)} | "
            f"{t.get('features_s', 0):.0f} | {t.get('head_s', 0):.0f} | "
            f"{t.get('top_blocks_s', 0):.0f} | {t.get('total_s', 0) / 3600:.2f} | {r['val_mpca']:.3f} | "
            + " | ".join(f"{r[k]['auc']:.3f} ({r[k]['lo']:.3f}-{r[k]['hi']:.3f})" for k, *_ in aucs)
            + f" | {r['labels_mpca']:.3f} |"
        )
    for field, against in (
        ("vs_head_only", "the head-only run with as many views"),
        ("vs_legacy_views", f"the same blocks trained on {LEGACY_VIEWS} views (the earlier runs' views)"),
    ):
        diffs = [r for r in report["rows"] if field in r]
        if diffs:
            lines += ["", f"Paired against {against}, on the same test images (95% paired bootstrap interval):", ""]
            lines += [f"- {_label(r, report)}: " + _differences(r[field], spec) for r in diffs]
    lines += _per_fold_lines(report)
    lines += ["", report["notes"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from derm.trainer.config import TrainConfig
    from derm.trainer.rundir import load_partition

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=Path("../shared"))
    ap.add_argument("--runs", type=Path, default=Path("runs/bench_top"))
    ap.add_argument("--data", choices=sorted(DATASETS), default="isic2017")
    ap.add_argument("--folds", default="0", help=f"ham10000, pad_ufes20: comma-separated folds of {HAM_FOLDS} to run")
    ap.add_argument("--unfreeze", default="0,1,2", help="comma-separated unfreeze_top values (0: head only)")
    ap.add_argument(
        "--views",
        default=str(LEGACY_VIEWS),
        help="comma-separated augmented views per training image; each unfreeze value runs with each (the curve of "
        "accuracy against views)",
    )
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--notes", default="", help="what the table shows, written under it")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--name", help="results file name (default: topblocks, or topblocks_DATA)")
    ap.add_argument(
        "--pool-with",
        type=Path,
        help="ham10000, pad_ufes20: a predictions file of an earlier run of this benchmark "
        "(NAME_predictions.csv.gz); its folds that are not run now are pooled with these",
    )
    args = ap.parse_args(argv)
    folds = [int(k) for k in args.folds.split(",")]
    if any(not 0 <= k < HAM_FOLDS for k in folds):
        ap.error(f"--folds {args.folds!r}: folds are 0..{HAM_FOLDS - 1}")
    try:
        view_counts = [int(v) for v in args.views.split(",")]
    except ValueError:
        view_counts = []
    if not view_counts or min(view_counts) < 1:
        ap.error(f"--views {args.views!r}: give whole numbers of at least 1, comma-separated (e.g. 1,2,4)")
    setup_logging(logging.INFO)
    base = TrainConfig(
        data="",
        out="",
        pool_layers=["mixed7", "mixed8", "mixed9", "mixed10"],
        epochs=args.epochs,
        patience=args.patience,
    )
    aucs = DATASETS[args.data]["aucs"]
    earlier = read_predictions(args.pool_with, aucs) if args.pool_with else {}
    rows, tables, classes = [], {}, []
    # fewer views first: a run with more views finds the first ones in the activation cache
    for views in sorted(view_counts):
        for spec in args.unfreeze.split(","):
            n, _, lr_text = spec.partition("@")
            n, lr = int(n), float(lr_text or DEFAULT_LR)
            cfg = dataclasses.replace(base, unfreeze_top=n, lr=lr, views=views)
            runs = train_runs(args.data, cfg, args.shared, run_folder(args.runs, n, lr, views), folds)
            classes = load_partition(runs[0])[1].labels
            t = table(aucs, runs, folds if args.data in CROSS_VALIDATED else [-1])
            tables[(n, lr, views)] = t = pooled(t, earlier.get((n, lr, views)))
            rows.append(_row(args.data, n, lr, views, runs, t, classes))
    for r in rows:
        mine = tables[(r["unfreeze_top"], r["lr"], r["views"])]
        head_only = tables.get((0, DEFAULT_LR, r["views"]))
        if r["unfreeze_top"] and head_only is not None:
            r["vs_head_only"] = paired(aucs, mine, head_only, classes)
        # the same blocks on the earlier runs' 2 views, run now or read from --pool-with, on the same images
        key = (r["unfreeze_top"], r["lr"], LEGACY_VIEWS)
        legacy = tables.get(key, earlier.get(key))
        if r["views"] != LEGACY_VIEWS and legacy is not None and np.array_equal(legacy["image"], mine["image"]):
            r["vs_legacy_views"] = paired(aucs, mine, legacy, classes)
    pooled_folds = sorted({int(k) for r in rows for k in r["per_fold"]})
    name = args.name or ("topblocks" if args.data == "isic2017" else f"topblocks_{args.data}")
    write_predictions(args.results / f"{name}_predictions.csv.gz", aucs, tables)
    report = _report(args, folds, pooled_folds, rows)
    write_results(args.results, name, report, markdown(report))
    return 0


def run_folder(runs: Path, n: int, lr: float, views: int) -> Path:
    """Where a row's runs live: ``top{N}`` (``_lr{LR}`` at another learning rate, ``_v{V}`` at other than the
    2 views every run had before ``--views`` took a list, so those runs are found again)."""
    return runs / (
        f"top{n}" + (f"_lr{lr:g}" if lr != DEFAULT_LR else "") + (f"_v{views}" if views != LEGACY_VIEWS else "")
    )


def _report(args: argparse.Namespace, folds: list[int], pooled_folds: list[int], rows: list[Any]) -> dict[str, Any]:
    ham = args.data in CROSS_VALIDATED
    flags = f"--data {args.data} --folds {args.folds} " if ham else ""
    flags += f"--pool-with {args.pool_with} " if args.pool_with else ""
    flags += f"--name {args.name} " if args.name else ""  # rerun as written, it rewrites the same results file
    earlier = sorted(set(pooled_folds) - set(folds))
    tested = f" (folds {','.join(map(str, pooled_folds))} of {HAM_FOLDS}" + (
        f"; folds {','.join(map(str, earlier))} from {args.pool_with}, run earlier)" if earlier else ")"
    )
    return {
        "data": args.data,
        "folds": folds if ham else None,
        "pooled_folds": pooled_folds if ham else None,
        "command": "python -m derm.benchmarks.topblocks "
        + " ".join(
            f"--shared {args.shared} --runs {args.runs} {flags}--unfreeze {args.unfreeze} --views {args.views} "
            f"--epochs {args.epochs} --patience {args.patience}".split()
        ),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "date": time.strftime("%Y-%m-%d"),
        "setup": f"inception-2015 weights, 299x299, head on pooled mixed7..mixed10, {_views_text(args.views)} per "
        f"training image, head 40 epochs, then up to {args.epochs} top-block epochs (paper's RMSProp, lr 0.001, "
        f"BatchNorm frozen, patience {args.patience}); test: {DATASETS[args.data]['test']}"
        + (tested if ham else "")
        + ".",
        "notes": args.notes,
        "rows": rows,
    }


def _views_text(views: Any) -> str:
    counts = [int(v) for v in str(views).split(",")]
    if len(counts) == 1:
        return f"{counts[0]} augmented view" + ("s" if counts[0] != 1 else "")
    return f"{', '.join(map(str, counts[:-1]))} or {counts[-1]} augmented views (the views column)"


if __name__ == "__main__":
    raise SystemExit(main())
