"""The reference model's measurements per data source and its model card (``reference/MODEL_CARD.md``).

Numbers come from a finished run's ``predictions_{val,test}.csv`` (the float Keras model on the plain view of every
held-out image): per source, 3-way and 9-way mean per-class accuracy with a stratified bootstrap interval, the two
binary tasks' AUC with theirs, and the operating points the exported files carry. The card's text, section by
section, is :mod:`derm.trainer.reference_card_text`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from derm import metrics
from derm._util import atomic_write
from derm.aggregation import inference_targets
from derm.evaluation import evaluate, level_probabilities
from derm.trainer.reference import SOURCE_INFO, SOURCES, source_of

TASKS = ("melanoma_vs_nevus", "carcinoma_vs_seborrheic_keratosis")
_CARD_JSONS = ("metrics.json", "config.json", "reference.json")  # read from the committed folder, in this order


def read_predictions(run: Path, role: str) -> tuple[list[str], list[str], np.ndarray]:
    """A run's ``predictions_{role}.csv``: each image's source, its taxonomy node and its training-class
    probabilities (columns in the partition's label order)."""
    with open(run / f"predictions_{role}.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    from derm.trainer.rundir import load_partition

    _, part = load_partition(run)
    probs = np.asarray([[float(r[c]) for c in part.labels] for r in rows], np.float64)
    return [source_of(r["image"]) for r in rows], [r["node"] for r in rows], probs


def evaluate_sources(run: Path, role: str = "test", seed: int = 0) -> dict[str, Any]:
    """Per source and for all sources together: ``{source: {"n", "levels": {level: {mpca, lo, hi, accuracy}},
    "tasks": {task: {auc, lo, hi, n_positive, n_negative}}}}`` on the run's ``role`` split."""
    from derm.trainer.rundir import load_partition

    tax, part = load_partition(run)
    sources, nodes, probs = read_predictions(run, role)
    out: dict[str, Any] = {}
    for name in [*(s for s, _, _ in SOURCES), "all"]:
        idx = np.asarray([i for i, s in enumerate(sources) if name in ("all", s)], dtype=np.int64)
        if not len(idx):
            continue
        sub_nodes = [nodes[i] for i in idx]
        full = evaluate(probs[idx], sub_nodes, part, levels=("three", "nine"), seed=seed)
        entry: dict[str, Any] = {"n": len(idx), "levels": {}, "tasks": {}}
        for level in ("three", "nine"):
            level_nodes = list(tax.level(level))
            y = inference_targets(tax, sub_nodes, level_nodes)
            pred = level_probabilities(probs[idx], part, level_nodes).argmax(1)
            if (y >= 0).any():
                mpca, lo, hi = metrics.bootstrap_mpca(y, pred, len(level_nodes), seed=seed)
                present = sorted({tax[level_nodes[c]].name for c in y[y >= 0]})
                entry["levels"][level] = {
                    "mpca": mpca,
                    "lo": lo,
                    "hi": hi,
                    "accuracy": metrics.accuracy(y[y >= 0], pred[y >= 0]),
                    "classes_present": present,
                }
        for task in TASKS:
            t = full["tasks"].get(task)
            if t:
                entry["tasks"][task] = {
                    "auc": t["auc"],
                    "lo": t["auc_ci"][0],
                    "hi": t["auc_ci"][1],
                    "n_positive": t["n_positive"],
                    "n_negative": t["n_negative"],
                }
        out[name] = entry
    return out


def plot_sources(run: Path, out: Path, role: str = "test", seed: int = 0) -> list[Path]:
    """ROC curves of each binary task, one curve per source (and all together), and the 9-way confusion matrices
    of all sources and of the phone photos, as PNGs in ``out``."""
    from derm.trainer import report
    from derm.trainer.rundir import load_partition

    tax, part = load_partition(run)
    sources, nodes, probs = read_predictions(run, role)
    names = {**{k: v["name"].split(" (")[0] for k, v in SOURCE_INFO.items()}, "all": "all sources"}
    results = {}
    for name in [*(s for s, _, _ in SOURCES), "all"]:
        idx = np.asarray([i for i, s in enumerate(sources) if name in ("all", s)], dtype=np.int64)
        results[name] = evaluate(probs[idx], [nodes[i] for i in idx], part, levels=("nine",), seed=seed)
    written = []
    for task in TASKS:
        curves = {names[n]: r["tasks"][task] for n, r in results.items() if task in r["tasks"]}
        if curves:
            written.append(report.plot_roc(tax.task(task).name, curves, out / f"roc_{task}.png"))
    for name in ("all", "pad_ufes20"):
        lv = results[name]["levels"].get("nine")
        if lv:
            title = f"{names[name]}, 9-way: mean per-class accuracy {lv['mean_per_class_accuracy']:.3f}"
            written.append(
                report.plot_confusion(
                    np.asarray(lv["confusion"]), lv["labels"], out / f"confusion_nine_{name}.png", title
                )
            )
    return written


def _fmt(entry: Mapping[str, Any] | None, key: str = "mpca") -> str:
    if not entry:
        return "-"
    return f"{entry[key]:.3f} ({entry['lo']:.3f}-{entry['hi']:.3f})"


def _task(entry: Mapping[str, Any] | None) -> str:
    if not entry:
        return "-"
    return f"{_fmt(entry, 'auc')}, {entry['n_positive']} / {entry['n_negative']}"


def metrics_table(results: Mapping[str, Any]) -> str:
    lines = [
        "| test split | images | 3-way mean per-class accuracy | 9-way mean per-class accuracy | "
        "melanoma vs nevus AUC, positives / negatives | carcinoma vs seborrheic keratosis AUC, positives / negatives |",
        "|---|---|---|---|---|---|",
    ]
    names = {**{k: v["name"] for k, v in SOURCE_INFO.items()}, "all": "all three"}
    for src, r in results.items():
        lv, tk = r["levels"], r["tasks"]
        lines.append(
            f"| {names[src]} | {r['n']} | {_fmt(lv.get('three'))} | {_fmt(lv.get('nine'))} | "
            f"{_task(tk.get(TASKS[0]))} | {_task(tk.get(TASKS[1]))} |"
        )
    return "\n".join(lines)


def operating_points_table(run_metrics: Mapping[str, Any]) -> str:
    from derm.exporter.manifest import operating_points

    points = operating_points(run_metrics)
    lines = [
        "| task | aimed sensitivity | threshold | sensitivity | specificity | measured on |",
        "|---|---|---|---|---|---|",
    ]
    for task, p in points.items():
        for key, v in sorted(p["by_sensitivity"].items()):
            lines.append(
                f"| {task} | {key} | {v['threshold']:.3f} | {v['sensitivity']:.3f} | {v['specificity']:.3f} | "
                f"{p['source']}: {p['n_positive']} positive, {p['n_negative']} negative |"
            )
    return "\n".join(lines)


def data_table(run_metrics: Mapping[str, Any]) -> str:
    lines = [
        "| source | licence | images | train / validation / test | test split | image type |",
        "|---|---|---|---|---|---|",
    ]
    for s in run_metrics["data"]["sources"]:
        roles = s["roles"]
        split = f"{roles.get('train', 0)} / {roles.get('val', 0)} / {roles.get('test', 0)}"
        if roles.get("excluded"):
            split += f" ({roles['excluded']} excluded)"
        lines.append(
            f"| {s['name']} ({s['citation']}) | {s['licence']} | {s['count']} | {split} | {s['test_split']} | "
            f"{s['images']} |"
        )
    return "\n".join(lines)


def write_json(path: Path, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def weighting_table(rows: list[Mapping[str, Any]]) -> str:
    """The phone-photo weighting comparison: one row per weight, validation (chosen on) and test (reported)."""
    lines = [
        "| weight of a PAD-UFES-20 photo | validation: PAD 9-way MPCA / carcinoma-vs-SK AUC | validation: all 9-way "
        "MPCA | test: PAD 3-way MPCA | test: PAD 9-way MPCA | test: PAD carcinoma vs SK AUC | test: all 9-way MPCA |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        v, t = r["val"], r["test"]
        vp = v.get("pad_ufes20", {})
        vauc = vp.get("tasks", {}).get(TASKS[1])
        lines.append(
            f"| {r['weight']:g}{' (chosen)' if r.get('chosen') else ''} | "
            f"{vp['levels']['nine']['mpca']:.3f} / {vauc['auc']:.3f} | {v['all']['levels']['nine']['mpca']:.3f} | "
            f"{_fmt(t['pad_ufes20']['levels'].get('three'))} | {_fmt(t['pad_ufes20']['levels'].get('nine'))} | "
            f"{_task(t['pad_ufes20']['tasks'].get(TASKS[1]))} | {_fmt(t['all']['levels'].get('nine'))} |"
        )
    return "\n".join(lines)


def write_model_card(
    run: Path,
    out: Path,
    weighting: list[Mapping[str, Any]] | None = None,
    decisions: Mapping[str, Any] | None = None,
) -> Path:
    """``MODEL_CARD.md`` from a finished reference run (its metrics, data description, calibration, operating points),
    the weighting comparison and the argmax-against-operating-points measurement (``derm.benchmarks.decisions`` on
    the same run), plus ``eval/test_by_source.json``."""
    from derm.trainer.reference_card_text import card_text

    jsons = tuple(json.loads((out / name).read_text(encoding="utf-8")) for name in _CARD_JSONS)
    results = evaluate_sources(run, "test")
    write_json(out / "eval" / "test_by_source.json", results)
    write_json(out / "eval" / "val_by_source.json", evaluate_sources(run, "val"))
    plots = plot_sources(run, out / "eval")
    doc = card_text(run, out, jsons, results, plots, weighting, decisions)
    with atomic_write(out / "MODEL_CARD.md") as f:
        f.write(doc)
    return out / "MODEL_CARD.md"
