"""Calls at the argmax against calls at operating points, on a run's held-out predictions (numpy only).

The 3-way answer at the argmax calls many malignant images benign: the model's probabilities are spread over
training classes and benign lesions dominate the training data. The apps do not use the argmax for "should this be
looked at": they show each binary task's call at an operating point (a threshold with a target sensitivity), where
the task applies. This benchmark puts both side by side on the run's test split:

- 3-way: the argmax's confusion and its malignant sensitivity / specificity, against thresholds on P(malignant)
  chosen on the *validation* split for 80/90/95% sensitivity and applied to the test split;
- each binary task: the argmax of its two sides (P >= 0.5), against the validation-chosen thresholds, and against the
  thresholds the run recorded on its test split, which the exporter writes into the manifest (chosen and measured on
  the same images, so optimistic: the apps' real sensitivity is the validation-chosen column's).

    python -m derm.benchmarks.decisions --run runs/reference_cal

reads the run's ``predictions_val.csv`` / ``predictions_test.csv`` and writes ``benchmarks/results/decisions.json``
and ``decisions.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from derm.benchmarks._results import write_results

RESULTS = Path(__file__).resolve().parent / "results"
SENSITIVITIES = ("0.8", "0.9", "0.95")


def _read(run: Path, role: str) -> tuple[np.ndarray, list[str]]:
    with open(run / f"predictions_{role}.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    labels = [k for k in rows[0] if k not in ("image", "label", "node", "role")]
    return np.asarray([[float(r[k]) for k in labels] for r in rows]), [r["node"] for r in rows]


def _rates(y: np.ndarray, call: np.ndarray) -> dict[str, Any]:
    from derm import metrics

    pos, neg = y == 1, y == 0
    tp, tn = int((call & pos).sum()), int((~call & neg).sum())
    return {
        "sensitivity": tp / int(pos.sum()),
        "sensitivity_ci": metrics.proportion_interval(tp, int(pos.sum())),
        "specificity": tn / int(neg.sum()),
        "specificity_ci": metrics.proportion_interval(tn, int(neg.sum())),
        "flagged": int(call.sum()),
    }


def decisions(run: Path) -> dict[str, Any]:
    from derm.partition import Partition
    from derm.taxonomy import Taxonomy

    tax = Taxonomy.from_dict(json.loads((run / "taxonomy.json").read_text(encoding="utf-8")))
    part = Partition.from_dict(json.loads((run / "partition.json").read_text(encoding="utf-8")), tax)
    run_metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    val, test = _read(run, "val"), _read(run, "test")
    three, n_test = _three_way(tax, part, val, test)
    out: dict[str, Any] = {"run": str(run), "n_val": len(val[1]), "n_test": n_test, "three": three, "tasks": {}}
    for task in tax.tasks.values():
        entry = _task(part, tax, task.id, val, test, run_metrics["test"]["tasks"])
        if entry is not None:
            out["tasks"][task.id] = entry
    return out


def _three_way(
    tax: Any, part: Any, val: tuple[np.ndarray, list[str]], test: tuple[np.ndarray, list[str]]
) -> tuple[dict[str, Any], int]:
    """The 3-way argmax's confusion and malignant call against P(malignant) at validation-chosen thresholds; the
    number of test images with a 3-way label."""
    from derm import metrics
    from derm.aggregation import aggregation_matrix, inference_targets

    (p_val, n_val), (p_test, n_test) = val, test
    three = tax.level("three")
    mal = three.index("malignant")
    agg = aggregation_matrix(part, "three", dtype=np.float64)
    y3 = inference_targets(tax, n_test, "three")
    q_test, q_val = p_test @ agg, p_val @ agg
    keep = y3 >= 0
    conf = metrics.confusion_matrix(y3[keep], q_test[keep].argmax(1), len(three))
    y_mal_test = (y3 == mal).astype(int)[keep]
    y_mal_val = (inference_targets(tax, n_val, "three") == mal).astype(int)
    out: dict[str, Any] = {
        "labels": list(three),
        "argmax_confusion": conf.tolist(),
        "argmax_accuracy": float(np.trace(conf) / conf.sum()),
        "argmax_malignant": _rates(y_mal_test, q_test[keep].argmax(1) == mal),
        "p_malignant": {},
    }
    for s in SENSITIVITIES:
        t = metrics.operating_point(y_mal_val, q_val[:, mal], float(s))["threshold"]
        out["p_malignant"][s] = {"threshold": t, **_rates(y_mal_test, q_test[keep, mal] >= t)}
    return out, int(keep.sum())


def _task(
    part: Any,
    tax: Any,
    task_id: str,
    val: tuple[np.ndarray, list[str]],
    test: tuple[np.ndarray, list[str]],
    recorded_tasks: dict[str, Any],
) -> dict[str, Any] | None:
    """One binary task's calls: argmax, validation-chosen and manifest (test-chosen) thresholds; None when either
    split lacks one of its sides."""
    from derm import metrics
    from derm.aggregation import conditional_probability, task_matrix, task_targets

    (p_val, n_val), (p_test, n_test) = val, test
    m = task_matrix(part, task_id, dtype=np.float64)
    yv, yt = task_targets(tax, n_val, task_id), task_targets(tax, n_test, task_id)
    if len(set(yv[yv >= 0])) < 2 or len(set(yt[yt >= 0])) < 2:
        return None
    sv = conditional_probability(p_val[yv >= 0], m)
    st = conditional_probability(p_test[yt >= 0], m)
    yv, yt = yv[yv >= 0], yt[yt >= 0]
    recorded = recorded_tasks[task_id]["operating_points"]
    entry: dict[str, Any] = {
        "n_positive": int(yt.sum()),
        "n_negative": int((yt == 0).sum()),
        "argmax": _rates(yt, st >= 0.5),
        "val_chosen": {},
        "manifest": {},
    }
    for s in SENSITIVITIES:
        t = metrics.operating_point(yv, sv, float(s))["threshold"]
        entry["val_chosen"][s] = {"threshold": t, **_rates(yt, st >= t)}
        entry["manifest"][s] = {"threshold": recorded[s]["threshold"], **_rates(yt, st >= recorded[s]["threshold"])}
    return entry


def _pct(r: dict[str, Any]) -> str:
    lo, hi = r["sensitivity_ci"]
    slo, shi = r["specificity_ci"]
    return f"{r['sensitivity']:.3f} ({lo:.3f}-{hi:.3f}) | {r['specificity']:.3f} ({slo:.3f}-{shi:.3f})"


def markdown(res: dict[str, Any], command: str) -> str:
    th = res["three"]
    lines = [
        "# Calls at the argmax vs at operating points",
        "",
        f"`{command}`: {res['n_test']} test images of `{res['run']}`, thresholds chosen on its {res['n_val']} "
        "validation images unless said. Sensitivity and specificity with 95% Wilson intervals.",
        "",
        "## 3-way: benign / malignant / non-neoplastic",
        "",
        f"Argmax accuracy {th['argmax_accuracy']:.3f}; confusion (rows true, columns called; "
        f"{', '.join(th['labels'])}): `{th['argmax_confusion']}`.",
        "",
        "| malignant call | threshold | sensitivity (95% CI) | specificity (95% CI) | images flagged |",
        "|---|---|---|---|---|",
        f"| argmax | | {_pct(th['argmax_malignant'])} | {th['argmax_malignant']['flagged']} |",
    ]
    for s, r in th["p_malignant"].items():
        lines.append(
            f"| P(malignant) at {float(s):.0%} validation sensitivity | {r['threshold']:.3f} | {_pct(r)} "
            f"| {r['flagged']} |"
        )
    for task, e in res["tasks"].items():
        lines += [
            "",
            f"## {task} ({e['n_positive']} positive / {e['n_negative']} negative test images)",
            "",
            "| call | threshold | sensitivity (95% CI) | specificity (95% CI) | images flagged |",
            "|---|---|---|---|---|",
            f"| argmax (P >= 0.5) | 0.500 | {_pct(e['argmax'])} | {e['argmax']['flagged']} |",
        ]
        for s in SENSITIVITIES:
            v, m = e["val_chosen"][s], e["manifest"][s]
            lines.append(
                f"| {float(s):.0%} point chosen on validation | {v['threshold']:.3f} | {_pct(v)} | {v['flagged']} |"
            )
            lines.append(
                f"| {float(s):.0%} point in the manifest (chosen on test) | {m['threshold']:.3f} | {_pct(m)} "
                f"| {m['flagged']} |"
            )
    lines += [
        "",
        "The apps and `derm classify` show each task's call at the manifest's operating point (90% by default) where "
        "the task applies, and the 3-way / 9-way answers as probabilities, not as a call. The manifest's points are "
        "measured on the split that chose them, so expect the validation-chosen rows' sensitivity on new images (the "
        "predictions files keep 6 significant digits, so an image lying on a recorded threshold may fall either side).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/reference_cal"), help="a run directory with predictions")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--name", default="decisions")
    args = ap.parse_args(argv)
    for role in ("val", "test"):
        if not (args.run / f"predictions_{role}.csv").is_file():
            ap.error(f"{str(args.run)!r} has no predictions_{role}.csv: give a run directory written by derm-train.")
    res = decisions(args.run)
    command = "python -m derm.benchmarks.decisions " + " ".join(
        argv if argv is not None else __import__("sys").argv[1:]
    )
    write_results(args.results, args.name, res, markdown(res, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
