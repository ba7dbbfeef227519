"""The reference model's recipe with its top Inception block fine-tuned on cached activations, beside the committed
frozen-feature recipe, trained on the same images and tested on the same held-out images of every source.

    python -m derm.benchmarks.reference_top --runs runs/reference_top [--unfreeze-top 1] [--views 2] [--lr 0.001]

Two runs of :func:`derm.trainer.reference.reference_config` (the committed ``reference/config.json``: all of
``../shared``, the phone photos weighted 12, calibrated): ``frozen`` with nothing changed (it must reproduce the
committed model's test numbers: the check is reported) and ``top{N}_v{V}`` with ``unfreeze_top=N`` and ``views=V``
(the top-blocks benchmark's mode, :mod:`derm.benchmarks.topblocks`). Each row: validation (what a choice would be
made on) and test numbers per source, paired bootstrap differences on the same test images, and this machine's
hours. A run already in ``RUNS`` is reused. Writes ``benchmarks/results/reference_topblocks.{json,md}``
(``reference_topblocks_lr{LR}.*`` with another top-block ``--lr``, ``..._v{V}.*`` with other than 2 ``--views``); it
does not touch the committed ``reference/`` folder.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from derm._cli import setup_logging
from derm.benchmarks._results import write_results
from derm.benchmarks._topblocks_predictions import LEGACY_VIEWS
from derm.benchmarks.topblocks import BLOCKS, DEFAULT_LR, epochs_cell, kept_top_epoch

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("derm.benchmarks.reference_top")
SOURCE_NAMES = {"ham10000": "HAM10000", "isic2017_trainval": "ISIC 2017", "pad_ufes20": "PAD-UFES-20", "all": "all"}
# (task, the sources it is reported on)
TASKS = (
    ("melanoma_vs_nevus", ("ham10000", "isic2017_trainval", "all")),
    ("carcinoma_vs_seborrheic_keratosis", ("pad_ufes20", "all")),
)
LEVELS = ("three", "nine")


def _scores(run: Path, role: str) -> dict[str, Any]:
    """Per test image: source, 3- and 9-way truth and call, and each task's target and score."""
    from derm.aggregation import conditional_probability, inference_targets, task_matrix, task_targets
    from derm.evaluation import level_probabilities
    from derm.trainer.reference_card import read_predictions
    from derm.trainer.rundir import load_partition

    tax, part = load_partition(run)
    sources, nodes, probs = read_predictions(run, role)
    out: dict[str, Any] = {"source": np.asarray(sources)}
    for level in LEVELS:
        level_nodes = list(tax.level(level))
        out[f"{level}_y"] = inference_targets(tax, nodes, level_nodes)
        out[f"{level}_call"] = level_probabilities(probs, part, level_nodes).argmax(1)
        out[f"{level}_k"] = len(level_nodes)
    for task, _ in TASKS:
        out[f"{task}_y"] = task_targets(tax, nodes, task)
        out[f"{task}_score"] = conditional_probability(probs, task_matrix(part, task, dtype=np.float64))
    return out


def paired(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """``a`` minus ``b`` on the same images, per source: each level's MPCA and each task's AUC, with 95% paired
    bootstrap intervals."""
    from derm import metrics

    if not np.array_equal(a["source"], b["source"]):
        raise ValueError("the two runs were tested on other images; rerun them on the same split")
    out: dict[str, dict[str, list[float]]] = {}
    for name in SOURCE_NAMES:
        keep = np.ones(len(a["source"]), bool) if name == "all" else a["source"] == name
        row: dict[str, list[float]] = {}
        for level in LEVELS:
            y = a[f"{level}_y"][keep]
            if (y >= 0).any():
                d = metrics.paired_mpca_difference(
                    y, a[f"{level}_call"][keep], b[f"{level}_call"][keep], a[f"{level}_k"], n_boot=1000, seed=0
                )
                row[f"{level}_mpca"] = list(d)
        for task, where in TASKS:
            y = a[f"{task}_y"][keep]
            m = y >= 0
            if name in where and (y[m] == 1).any() and (y[m] == 0).any():
                d = metrics.paired_auc_difference(
                    y[m], a[f"{task}_score"][keep][m], b[f"{task}_score"][keep][m], n_boot=1000, seed=0
                )
                row[task] = list(d)
        out[name] = row
    return out


def _row(name: str, run: Path) -> dict[str, Any]:
    import csv

    from derm.trainer.reference_card import evaluate_sources

    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    with open(run / "history.csv", newline="", encoding="utf-8") as f:
        history = list(csv.DictReader(f))
    top = [r for r in history if r["stage"] == "top"]
    return {
        "name": name,
        "run": str(run),
        "timings_s": metrics.get("timings", {}),
        "top_epochs_run": len(top),
        "best_top_epoch": kept_top_epoch(history),
        "temperature": (metrics.get("calibration") or {}).get("temperature"),
        "test_ece": (metrics.get("calibration") or {}).get("test"),
        "val": evaluate_sources(run, "val"),
        "test": evaluate_sources(run, "test"),
    }


def reproduces_committed(test: dict[str, Any], committed: Path) -> dict[str, Any]:
    """The largest difference between ``test`` and the committed model's test numbers (``eval/test_by_source.json``)
    over every source's MPCAs and AUCs: 0 when the frozen recipe retrained here is the committed model."""
    if not committed.is_file():
        return {"checked": False, "why": f"{committed} is missing"}
    ref = json.loads(committed.read_text(encoding="utf-8"))
    diffs = []
    for src, entry in ref.items():
        if src not in test:
            return {"checked": False, "why": f"the retrained run has no test images of {src}"}
        for level, v in entry.get("levels", {}).items():
            diffs.append(abs(v["mpca"] - test[src]["levels"][level]["mpca"]))
        for task, v in entry.get("tasks", {}).items():
            diffs.append(abs(v["auc"] - test[src]["tasks"][task]["auc"]))
    return {"checked": True, "max_abs_difference": float(max(diffs)), "numbers_compared": len(diffs)}


def committed_recipe(config: Path, unfreeze_top: int, views: int, lr: float) -> int | None:
    """Which of the two runs the committed reference was trained as: 0 when its ``config.json`` is the frozen head
    (or unreadable), 1 when it fine-tuned the same top blocks at the same learning rate and views, None when it
    fine-tuned blocks in another way than the run compared here (then neither run retrains it, and nothing is
    checked against its numbers)."""
    from derm.trainer.reference import committed_top_blocks

    committed = committed_top_blocks(config)
    if committed == 0:
        return 0
    if committed != unfreeze_top:
        return None
    conf = json.loads(config.read_text(encoding="utf-8"))  # readable: it named the same top blocks
    return 1 if (int(conf.get("views", 1)), float(conf.get("lr", DEFAULT_LR))) == (views, lr) else None


def _cell(entry: dict[str, Any], level: str | None = None, task: str | None = None) -> str:
    v = entry.get("levels", {}).get(level) if level else entry.get("tasks", {}).get(task)
    return f"{v.get('mpca', v.get('auc')):.3f} ({v['lo']:.3f}-{v['hi']:.3f})" if v else ""


def _diff(d: list[float] | None) -> str:
    return f"{d[0]:+.3f} ({d[1]:+.3f} to {d[2]:+.3f})" if d else ""


def markdown(res: dict[str, Any]) -> str:
    a, b = res["rows"]
    cols = [("three", None, "3-way MPCA"), ("nine", None, "9-way MPCA")] + [
        (None, t, "melanoma vs nevus AUC" if t == TASKS[0][0] else "carcinoma vs SK AUC") for t, _ in TASKS
    ]
    head = "| source | run | " + " | ".join(c[2] for c in cols) + " |"
    lines = [
        "# The reference model with its top block fine-tuned, beside the committed frozen recipe",
        "",
        f"`{res['command']}` on {res['machine']}, {res['date']}. Same training, validation and test images (the "
        "reference split: every source's held-out test split, group-aware); test numbers with 95% bootstrap "
        "intervals; differences paired on the same test images. Nothing was chosen on these test numbers.",
        "",
        head,
        "|" + "---|" * (len(cols) + 2),
    ]
    for src, title in SOURCE_NAMES.items():
        if src not in a["test"]:
            continue
        for r in (a, b):
            entry = r["test"].get(src, {})
            lines.append(f"| {title} | {r['name']} | " + " | ".join(_cell(entry, lv, t) for lv, t, _ in cols) + " |")
        d = res["paired"][src]
        keys = [f"{lv}_mpca" if lv else t for lv, t, _ in cols]
        lines.append(f"| {title} | difference | " + " | ".join(_diff(d.get(k)) for k in keys) + " |")
    lines += [
        "",
        "| run | validation 9-way MPCA (all) | top epochs (kept) | temperature | test ECE before / after | total h |",
        "|---|---|---|---|---|---|",
    ]
    for r in (a, b):
        t = r["timings_s"]
        epochs = epochs_cell(r["top_epochs_run"], r["best_top_epoch"])
        temp = f"{r['temperature']:.3f}" if r["temperature"] else ""
        ece = f"{r['test_ece']['ece_before']:.3f} / {r['test_ece']['ece_after']:.3f}" if r["test_ece"] else ""
        mpca = r["val"]["all"]["levels"]["nine"]["mpca"]
        hours = t.get("total_s", 0) / 3600
        lines.append(f"| {r['name']} | {mpca:.3f} | {epochs} | {temp} | {ece} | {hours:.2f} |")
    rep = res["frozen_reproduces_committed"]
    who = (
        f"The {res['committed_recipe']} run (the committed reference's recipe) retrained here, against its test "
        "numbers: "
        if res.get("committed_recipe")
        else "The committed reference's test numbers: "
    )
    lines += [
        "",
        who
        + (
            f"largest difference {rep['max_abs_difference']:.4f} over {rep['numbers_compared']} MPCAs and AUCs."
            if rep["checked"]
            else f"not checked ({rep['why']})."
        ),
    ]
    if res.get("notes"):
        lines += ["", res["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from derm.trainer.reference import REFERENCE_DIR, reference_config, reference_csv, shared_dir
    from derm.trainer.train import train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=Path("runs/reference_top"))
    ap.add_argument("--shared", type=Path, default=None)
    ap.add_argument("--unfreeze-top", type=int, default=1, help="top Inception blocks fine-tuned (1-3)")
    ap.add_argument("--views", type=int, default=LEGACY_VIEWS, help="augmented views per training image for that run")
    ap.add_argument("--lr", type=float, default=DEFAULT_LR, help="the top blocks' learning rate (the head's stays)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--notes", default="", help="a paragraph appended to the markdown")
    args = ap.parse_args(argv)
    setup_logging(logging.INFO, timestamps=True)
    if args.unfreeze_top not in BLOCKS or not args.unfreeze_top:
        ap.error(f"--unfreeze-top {args.unfreeze_top}: choose 1, 2 or 3 (the top Inception blocks fine-tuned)")
    if not args.lr > 0:
        ap.error(f"--lr {args.lr}: the top blocks' learning rate must be > 0 (the paper's is {DEFAULT_LR:g})")
    data = reference_csv(args.shared or shared_dir(), args.runs / "data.csv")
    tuned = f"_lr{args.lr:g}" if args.lr != DEFAULT_LR else ""
    variants = {
        "frozen (head only, 1 view)": (args.runs / "frozen", {"unfreeze_top": 0, "views": 1}),
        f"{args.views} views, {BLOCKS[args.unfreeze_top]} at lr {args.lr:g} (kept if better on validation)": (
            args.runs / f"top{args.unfreeze_top}_v{args.views}{tuned}",
            {"unfreeze_top": args.unfreeze_top, "views": args.views, "lr": args.lr},
        ),
    }
    rows, scores = [], []
    for name, (out, overrides) in variants.items():
        if not (out / "run.json").is_file():
            log.info("Training %s in %s.", name, out)
            train(reference_config(data, out, **overrides))
        rows.append(_row(name, out))
        scores.append(_scores(out, "test"))
    committed = REFERENCE_DIR / "eval" / "test_by_source.json"
    recipe = committed_recipe(REFERENCE_DIR / "config.json", args.unfreeze_top, args.views, args.lr)
    res = {
        "command": f"python -m derm.benchmarks.reference_top --runs {args.runs} --unfreeze-top {args.unfreeze_top} "
        f"--views {args.views}" + (f" --lr {args.lr:g}" if tuned else ""),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores, no GPU",
        "date": datetime.date.today().isoformat(),
        "rows": rows,
        "paired": paired(scores[1], scores[0]),
        "committed_recipe": rows[recipe]["name"] if recipe is not None else None,
        "frozen_reproduces_committed": reproduces_committed(rows[recipe]["test"], committed)
        if recipe is not None
        else {"checked": False, "why": "the committed reference was trained as neither of these runs"},
        "notes": args.notes,
    }
    other_views = f"_v{args.views}" if args.views != LEGACY_VIEWS else ""  # the views of the files written before
    write_results(args.results, f"reference_topblocks{tuned}{other_views}", res, markdown(res))


if __name__ == "__main__":
    main()
