"""The paper's evaluation of training-class probabilities, in numpy (no TensorFlow).

- k-way mean per-class accuracy at inference levels (the 3 roots, the 9 clinical classes, or any node list such as a
  dataset's own diagnoses), with confusion matrices: ``P(inference class)`` is the sum over its training classes;
- the binary tasks (melanoma vs nevus, carcinoma vs seborrheic keratosis): the conditional probability
  ``P(positive | positive or negative)`` on the images labelled under the task's evaluation nodes, with AUC and its
  bootstrap interval, sensitivity at fixed specificities and the reverse, operating points and calibration error.

Used by ``derm-train`` (validation and test folds), ``derm-eval``, the exporter's parity checks and ``derm-bench``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from derm import metrics
from derm.aggregation import aggregation_matrix, conditional_probability, inference_targets, task_matrix, task_targets
from derm.errors import PartitionError
from derm.partition import Partition
from derm.taxonomy import Taxonomy

log = logging.getLogger(__name__)

DEFAULT_LEVELS = ("three", "nine")


def dataset_level(tax: Taxonomy, node_ids: Sequence[str]) -> tuple[str, ...]:
    """The distinct label nodes of a dataset, in taxonomy order: the "labels" level (e.g. ISIC 2017's 3 diagnoses)."""
    present = set(node_ids)
    return tuple(nid for nid, _ in tax.walk() if nid in present)


def resolve_level(partition: Partition, level: str | Sequence[str], node_ids: Sequence[str]) -> tuple[str, ...]:
    if isinstance(level, str) and level == "labels":
        try:
            return partition.taxonomy.level(dataset_level(partition.taxonomy, node_ids))
        except ValueError as exc:  # e.g. HAM10000's "akiec" node lies above its "bcc" node
            raise ValueError(f"the dataset's labels are not an inference level: {exc}") from None
    return partition.taxonomy.level(level)


def level_probabilities(probs: np.ndarray, partition: Partition, nodes: Sequence[str]) -> np.ndarray:
    return np.asarray(probs, dtype=np.float64) @ aggregation_matrix(partition, list(nodes), dtype=np.float64)


def evaluate(
    probs: np.ndarray,
    node_ids: Sequence[str],
    partition: Partition,
    *,
    levels: Sequence[str | Sequence[str]] = DEFAULT_LEVELS,
    tasks: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics of training-class probabilities ``probs`` (n, classes) against labelled nodes ``node_ids``.

    Returns a JSON-serialisable dict: ``{"n", "training_classes": {...}, "levels": {name: {...}},
    "tasks": {task_id: {...}}}``. Levels or tasks the partition cannot express (a training class spanning two
    inference nodes, no training class on one side of a task) or the labels do not cover are reported under
    ``"skipped"`` with the reason instead of failing.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(partition.classes):
        raise ValueError(
            f"probs must have shape (images, {len(partition.classes)} training classes), received {probs.shape}."
        )
    if len(node_ids) != len(probs):
        raise ValueError(f"{len(node_ids)} labels for {len(probs)} rows of probabilities.")
    tax = partition.taxonomy
    out: dict[str, Any] = {"n": len(probs), "levels": {}, "tasks": {}, "skipped": {}}
    targets = np.asarray([-1 if (c := partition.class_of(n)) is None else c for n in node_ids], dtype=np.int64)
    if (targets >= 0).any():
        out["training_classes"] = metrics.multiclass_metrics(targets, probs, partition.labels)
    for level in levels:
        name = level if isinstance(level, str) else "custom"
        try:
            nodes = resolve_level(partition, level, node_ids)
            p = level_probabilities(probs, partition, nodes)
        except (PartitionError, KeyError, ValueError) as exc:
            out["skipped"][f"level:{name}"] = str(exc)
            continue
        y = inference_targets(tax, node_ids, list(nodes))
        if not (y >= 0).any():
            out["skipped"][f"level:{name}"] = "no image is labelled under these inference nodes"
            continue
        res = metrics.multiclass_metrics(y, p, [tax[u].id for u in nodes])
        res["nodes"] = list(nodes)
        out["levels"][name] = res
    for task_id in tasks if tasks is not None else list(tax.tasks):
        try:
            m = task_matrix(partition, task_id, dtype=np.float64)
        except PartitionError as exc:
            out["skipped"][f"task:{task_id}"] = str(exc)
            continue
        y = task_targets(tax, node_ids, task_id)
        npos, nneg = int((y == 1).sum()), int((y == 0).sum())
        if npos == 0 or nneg == 0:
            out["skipped"][f"task:{task_id}"] = f"needs both classes labelled; found {npos} positive, {nneg} negative"
            continue
        score = conditional_probability(probs, m)
        res = metrics.binary_task_metrics(y, score, n_boot=n_boot, seed=seed)
        res["name"] = tax.task(task_id).name
        out["tasks"][task_id] = res
    return out


def summary_row(result: dict[str, Any]) -> dict[str, float | None]:
    """The headline numbers of :func:`evaluate` in one flat row (for tables and cross-validation summaries)."""
    row: dict[str, float | None] = {"n": result.get("n")}
    if "training_classes" in result:
        row["train_classes_mpca"] = result["training_classes"]["mean_per_class_accuracy"]
    for name, res in result.get("levels", {}).items():
        row[f"{name}_mpca"] = res["mean_per_class_accuracy"]
        row[f"{name}_accuracy"] = res["accuracy"]
    for task_id, res in result.get("tasks", {}).items():
        row[f"{task_id}_auc"] = res["auc"]
        row[f"{task_id}_auc_lo"] = res["auc_ci"][0]
        row[f"{task_id}_auc_hi"] = res["auc_ci"][1]
    return row


def format_summary(result: dict[str, Any]) -> str:
    lines = [f"images {result.get('n')}"]
    if "training_classes" in result:
        tc = result["training_classes"]
        lines.append(
            f"training classes ({len(tc['labels'])}): mean per-class accuracy {tc['mean_per_class_accuracy']:.3f}"
        )
    for name, res in result.get("levels", {}).items():
        lines.append(
            f"{name} ({len(res['labels'])}-way): mean per-class accuracy {res['mean_per_class_accuracy']:.3f}, "
            f"accuracy {res['accuracy']:.3f}"
        )
    for task_id, res in result.get("tasks", {}).items():
        lo, hi = res["auc_ci"]
        lines.append(
            f"{task_id}: AUC {res['auc']:.3f} ({lo:.3f}-{hi:.3f}), {res['n_positive']} positive, "
            f"{res['n_negative']} negative"
        )
    for what, why in result.get("skipped", {}).items():
        lines.append(f"skipped {what}: {why}")
    return "\n".join(lines)
