"""From training-class probabilities to inference-class probabilities: one 0/1 matrix.

``P(inference node u) = sum of P(training class c) over the training classes c under u`` (Esteva et al. 2017,
Extended Data Fig. 1). With the partition's training classes as rows and the inference nodes as columns,
``probs @ aggregation_matrix(...)`` gives inference-class probabilities that sum to 1 whenever every training
class lies under exactly one inference node, which this module checks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from derm.errors import PartitionError
from derm.partition import Partition
from derm.taxonomy import BinaryTask, Taxonomy


def aggregation_matrix(partition: Partition, level: str | Sequence[str], dtype: type = np.float32) -> np.ndarray:
    """0/1 matrix of shape (training classes, inference nodes).

    Args:
        partition: the training classes.
        level: a level name of the taxonomy (``"three"``, ``"nine"``, ``"roots"``, ``"depth:N"``) or node ids.

    Raises:
        PartitionError: a training class lies under none of the inference nodes (the partition is coarser than
            the level: partition with ``within=`` that level).
    """
    tax = partition.taxonomy
    nodes = tax.level(level)
    m = np.zeros((len(partition.classes), len(nodes)), dtype=dtype)
    orphans = []
    for c in partition.classes:
        hits = [j for j, u in enumerate(nodes) if tax.is_under(c.node, u)]
        if len(hits) != 1:
            orphans.append(c.label)
            continue
        m[c.index, hits[0]] = 1
    if orphans:
        raise PartitionError(
            f"Training classes {orphans} lie under none of the inference nodes {list(nodes)}. "
            f"Partition with within={level!r} so that every training class lies under one of them."
        )
    return m


def task_matrix(partition: Partition, task: BinaryTask | str, dtype: type = np.float32) -> np.ndarray:
    """0/1 matrix of shape (training classes, 2): column 0 sums the negative side, column 1 the positive."""
    tax = partition.taxonomy
    if isinstance(task, str):
        task = tax.task(task)
    m = np.zeros((len(partition.classes), 2), dtype=dtype)
    for c in partition.classes:
        if any(tax.is_under(c.node, u) for u in task.negative):
            m[c.index, 0] = 1
        elif any(tax.is_under(c.node, u) for u in task.positive):
            m[c.index, 1] = 1
    for side, col in (("negative", 0), ("positive", 1)):
        if not m[:, col].any():
            raise PartitionError(
                f"Task {task.id!r}: no training class lies under its {side} nodes {list(getattr(task, side))}; "
                "the training data holds no images there."
            )
    return m


def conditional_probability(probs: np.ndarray, matrix: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """``P(positive | positive or negative)`` from training-class probabilities and a :func:`task_matrix`."""
    sides = np.asarray(probs, dtype=np.float64) @ matrix.astype(np.float64)
    return sides[..., 1] / np.maximum(sides[..., 0] + sides[..., 1], eps)


def task_targets(taxonomy: Taxonomy, node_ids: Sequence[str], task: BinaryTask | str) -> np.ndarray:
    """Per image: 1 if labelled under the task's ``eval_positive`` nodes, 0 under ``eval_negative``, -1 otherwise."""
    if isinstance(task, str):
        task = taxonomy.task(task)
    out = np.full(len(node_ids), -1, dtype=np.int8)
    for i, nid in enumerate(node_ids):
        if any(taxonomy.is_under(nid, u) for u in task.eval_positive):
            out[i] = 1
        elif any(taxonomy.is_under(nid, u) for u in task.eval_negative):
            out[i] = 0
    return out


def inference_targets(taxonomy: Taxonomy, node_ids: Sequence[str], level: str | Sequence[str]) -> np.ndarray:
    """Per image, the index of the inference node it is labelled under (-1 if above or outside all of them)."""
    nodes = taxonomy.level(level)
    out = np.full(len(node_ids), -1, dtype=np.int64)
    cache: dict[str, int] = {}
    for i, nid in enumerate(node_ids):
        if nid not in cache:
            path = set(taxonomy.path(nid))
            cache[nid] = next((j for j, u in enumerate(nodes) if u in path), -1)
        out[i] = cache[nid]
    return out
