"""The top-blocks benchmark's test predictions, one row per image: pooled over folds (also folds run on another day,
from the predictions file a run writes), scored per fold and pooled, and compared paired against the head only.

A table is a dict of equal-length arrays: ``fold``, ``image`` (file name), ``truth`` and ``call`` (training class
labels; "" where a diagnosis has none), and per reported AUC ``KEY_y`` (-1: outside the task) and ``KEY_score``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from derm._util import atomic_write

Aucs = list[tuple[str, str, str, str]]  # per reported AUC: (key, column title, "task" or "node", task or node id)


def table(aucs: Aucs, runs: list[Path], folds: list[int]) -> dict[str, np.ndarray]:
    """One row per test image of ``runs`` (sorted by image): its fold, file name, diagnosis (training class label),
    argmax call, and per reported AUC its label there (-1: outside the task) and score. What pooling needs, and what
    the predictions file keeps so that folds run on another day can be pooled with these (``--pool-with``)."""
    import derm
    from derm.benchmarks.trainer import _rows
    from derm.trainer.rundir import load_partition

    tax, part = load_partition(runs[0])
    rows = sorted(
        ((k, r) for k, run in zip(folds, runs, strict=True) for r in _rows(run / "predictions_test.csv")),
        key=lambda kr: kr[1]["image"],
    )
    probs = np.asarray([[float(r[c]) for c in part.labels] for _, r in rows])
    nodes = [r["node"] for _, r in rows]
    labels, targets = np.asarray(part.labels), np.asarray(part.targets(nodes))
    out = {
        "fold": np.asarray([k for k, _ in rows], np.int64),
        "image": np.asarray([Path(r["image"]).name for _, r in rows]),
        "truth": np.where(targets >= 0, labels[np.maximum(targets, 0)], ""),  # "": above the training classes
        "call": labels[probs.argmax(1)],
    }
    for key, _, kind, ident in aucs:
        if kind == "task":
            out[f"{key}_y"] = np.asarray(derm.task_targets(tax, nodes, ident), np.int64)
            out[f"{key}_score"] = derm.conditional_probability(probs, derm.task_matrix(part, ident, dtype=np.float64))
        else:
            cols = [i for i, c in enumerate(part.classes) if tax.is_under(c.node, ident)]
            out[f"{key}_y"] = np.asarray([tax.is_under(n, ident) for n in nodes], np.int64)
            out[f"{key}_score"] = probs[:, cols].sum(1)
    return out


def _indices(labels: np.ndarray, classes: list[str]) -> np.ndarray:
    """Training class labels as indices into ``classes`` (-1 for "": no training class)."""
    idx = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels.tolist()) - set(idx) - {""})
    if unknown:
        raise ValueError(f"predictions name classes {unknown} that the runs' partition lacks ({classes})")
    return np.asarray([idx.get(c, -1) for c in labels], np.int64)


def mpca(t: dict[str, np.ndarray], classes: list[str]) -> float:
    from derm import metrics

    return metrics.mean_per_class_accuracy(_indices(t["truth"], classes), _indices(t["call"], classes), len(classes))[0]


def per_fold(aucs: Aucs, t: dict[str, np.ndarray], classes: list[str]) -> dict[str, dict[str, float]]:
    """Each fold's own test numbers (no intervals): for a cross-validation summary across folds."""
    from derm import metrics

    out = {}
    for k in sorted(set(t["fold"].tolist())):
        f = {name: v[t["fold"] == k] for name, v in t.items()}
        out[str(k)] = {"labels_mpca": mpca(f, classes), "n_test_images": len(f["image"])}
        for key, *_ in aucs:
            keep = f[f"{key}_y"] >= 0
            out[str(k)][key] = metrics.auc(f[f"{key}_y"][keep], f[f"{key}_score"][keep])
    return out


def paired(
    aucs: Aucs, a: dict[str, np.ndarray], b: dict[str, np.ndarray], classes: list[str]
) -> dict[str, tuple[float, float, float]]:
    """Paired bootstrap differences (the rows of ``a`` minus the head-only rows ``b``) on the same test images."""
    from derm import metrics

    if not np.array_equal(a["image"], b["image"]):
        raise ValueError("the runs compared were tested on other images; rerun them with the same splits")
    out = {}
    for key, *_ in aucs:
        keep = a[f"{key}_y"] >= 0
        y = a[f"{key}_y"][keep]
        out[key] = metrics.paired_auc_difference(
            y, a[f"{key}_score"][keep], b[f"{key}_score"][keep], n_boot=1000, seed=0
        )
    truth, ca, cb = (_indices(x[k], classes) for x, k in ((a, "truth"), (a, "call"), (b, "call")))
    out["labels_mpca"] = metrics.paired_mpca_difference(truth, ca, cb, len(classes), n_boot=1000, seed=0)
    return out


def _columns(aucs: Aucs) -> list[str]:
    return ["fold", "image", "truth", "call"] + [f"{k}_{x}" for k, *_ in aucs for x in ("y", "score")]


Row = tuple[int, float, int]  # a benchmark row: (unfreeze_top, lr, views)
LEGACY_VIEWS = 2  # the views of every row in predictions files written before they named them


def write_predictions(path: Path, aucs: Aucs, tables: dict[Row, dict[str, np.ndarray]]) -> None:
    """Every row's test predictions, one line per (row, image), gzipped deterministically and atomically: what
    ``--pool-with`` reads to pool folds run on another day or machine with new ones."""
    import csv
    import gzip
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["unfreeze_top", "lr", "views", *_columns(aucs)])
    for (n, lr, views), t in tables.items():
        for i in range(len(t["image"])):
            w.writerow(
                [n, f"{lr:g}", views] + [f"{t[c][i]:.6f}" if c.endswith("_score") else t[c][i] for c in _columns(aucs)]
            )
    with atomic_write(path, "wb") as f:
        f.write(gzip.compress(buf.getvalue().encode("utf-8"), mtime=0))


def read_predictions(path: Path, aucs: Aucs) -> dict[Row, dict[str, np.ndarray]]:
    """The tables :func:`write_predictions` wrote, by (unfreeze_top, lr, views); files without a views column are
    the 2-view runs of 2026-12-01..07."""
    import csv
    import gzip
    import io

    rows = list(csv.DictReader(io.StringIO(gzip.decompress(path.read_bytes()).decode("utf-8"))))
    missing = set(_columns(aucs)) - set(rows[0] if rows else {})
    if missing:
        raise ValueError(
            f"--pool-with {str(path)!r}: not predictions of this benchmark for these AUCs (no {sorted(missing)})"
        )
    kinds = {"fold": np.int64, "image": str, "truth": str, "call": str}

    def row(r: dict[str, str]) -> Row:
        return int(r["unfreeze_top"]), float(r["lr"]), int(r.get("views") or LEGACY_VIEWS)

    out: dict[Row, dict[str, np.ndarray]] = {}
    for key in sorted({row(r) for r in rows}):
        mine = [r for r in rows if row(r) == key]
        out[key] = {
            c: np.asarray([r[c] for r in mine]).astype(kinds.get(c, np.float64 if c.endswith("_score") else np.int64))
            for c in _columns(aucs)
        }
    return out


def pooled(t: dict[str, np.ndarray], earlier: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """``t`` with the rows of ``earlier`` whose folds ``t`` lacks (the folds run here win), sorted by image."""
    if earlier is None:
        return t
    take = ~np.isin(earlier["fold"], t["fold"])
    both = {c: np.concatenate([t[c], earlier[c][take]]) for c in t}
    order = np.argsort(both["image"], kind="stable")
    return {c: v[order] for c, v in both.items()}
