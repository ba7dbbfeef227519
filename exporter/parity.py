"""An exported file's parity with its float Keras model on the same images: one row per output and metric, each
judged by :class:`~derm.exporter.targets.Parity`'s rule (intervals, so a small validation set cannot pass or fail a
file by luck)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from derm.aggregation import task_targets
from derm.exporter.graph import ExportError, OutputSpec
from derm.exporter.targets import Parity
from derm.metrics import proportion_interval
from derm.taxonomy import Taxonomy


@dataclass
class ParityRow:
    output: str
    metric: str  # max_abs | mean_abs | top1 | mpca_diff | auc_diff (the last two: float model minus file, a loss)
    value: float
    threshold: float
    ok: bool
    n: int = 0  # images the line rests on (for auc_diff / mpca_diff: the labelled ones)
    interval: tuple[float, float] | None = None  # 95%: Wilson (top1) or paired bootstrap (auc_diff, mpca_diff)
    differ: int | None = None  # top1: images whose top class differs
    margin: float | None = None  # top1: the largest float-model margin (top class minus runner-up) among those images
    detail: str = ""  # what the line rests on, in words

    @property
    def rule(self) -> str:
        """How the threshold is applied (see :class:`derm.exporter.targets.Parity`)."""
        if self.metric == "top1":
            return f"95% upper >= {self.threshold:g}"
        if self.metric in ("auc_diff", "mpca_diff"):
            return f"95% lower <= {self.threshold:g}"
        return f"<= {self.threshold:g}"


def parity(
    reference: Mapping[str, np.ndarray],
    got: Mapping[str, np.ndarray],
    specs: Sequence[OutputSpec],
    thresholds: Parity,
    taxonomy: Taxonomy,
    nodes: Sequence[str | None],
    seed: int = 0,
) -> list[ParityRow]:
    """Compare an exported file's outputs with the Keras model's on the same images, as
    :class:`~derm.exporter.targets.Parity` says (the rules and the reasons for them live there).

    Per inference level: max and mean absolute difference of the probabilities; top-1 agreement with its 95% Wilson
    interval, the number of images that differ and the largest float-model margin among them (near-ties flip, a
    confident call should not); on the labelled images, the loss of mean per-class accuracy with a paired bootstrap
    interval. Per binary task, on the images labelled for it: the loss of AUC with a paired bootstrap interval.
    """
    rows: list[ParityRow] = []
    labelled = _Labelled(taxonomy, nodes, [i for i, n in enumerate(nodes) if n is not None], seed)
    for s in specs:
        ref, out = np.asarray(reference[s.name], np.float64), np.asarray(got[s.name], np.float64)
        if ref.shape != out.shape:
            raise ExportError(f"Output {s.name!r}: the file gives shape {out.shape}, the Keras model {ref.shape}.")
        if s.kind == "level":
            rows += _level_rows(s, ref, out, thresholds)
            if labelled.known:
                rows += _mpca_rows(s, ref, out, thresholds, labelled)
        elif s.kind == "task" and labelled.known:
            rows += _auc_rows(s, ref, out, thresholds, labelled)
    for r in rows:
        r.ok = _passes(r)
    return rows


def _passes(r: ParityRow) -> bool:
    """Whether a row meets its threshold by its rule (see :attr:`ParityRow.rule`)."""
    if r.metric == "top1":
        return r.interval is not None and r.interval[1] >= r.threshold
    if r.metric in ("auc_diff", "mpca_diff"):
        return r.interval is not None and r.interval[0] <= r.threshold
    return r.value <= r.threshold


def _level_rows(s: OutputSpec, ref: np.ndarray, out: np.ndarray, thresholds: Parity) -> list[ParityRow]:
    """A level's max and mean absolute difference, and its top-1 agreement (with the images that differ and the
    largest float-model margin among them)."""
    diff = np.abs(ref - out)
    n = len(ref)
    rows = [
        ParityRow(s.name, "max_abs", float(diff.max()), thresholds.max_abs, False, n),
        ParityRow(s.name, "mean_abs", float(diff.mean()), thresholds.mean_abs, False, n),
    ]
    differs = ref.argmax(1) != out.argmax(1)
    top2 = np.sort(ref, axis=1)[:, -2:]
    margin = float((top2[:, 1] - top2[:, 0])[differs].max()) if differs.any() else None
    k = int(differs.sum())
    note = f"{k} of {n} images differ" + (f"; largest float margin among them {margin:.3f}" if k else "")
    rows.append(
        ParityRow(
            s.name, "top1", (n - k) / n, thresholds.top1, False, n, proportion_interval(n - k, n), k, margin, note
        )
    )
    return rows


@dataclass(frozen=True)
class _Labelled:
    """The compared images' labels: taxonomy nodes (None: unlabelled), the indices of the labelled ones, and the
    bootstrap seed of the paired intervals."""

    taxonomy: Taxonomy
    nodes: Sequence[str | None]
    known: list[int]
    seed: int


def _mpca_rows(s: OutputSpec, ref: np.ndarray, out: np.ndarray, thresholds: Parity, lab: _Labelled) -> list[ParityRow]:
    """A level's loss of mean per-class accuracy on the labelled images (none if no image has a class there)."""
    from derm.aggregation import inference_targets
    from derm.metrics import paired_mpca_difference

    y = np.full(len(ref), -1, np.int64)
    y[lab.known] = inference_targets(lab.taxonomy, [lab.nodes[i] for i in lab.known], list(s.labels))
    if not (y >= 0).any():
        return []
    d, lo, hi = paired_mpca_difference(y, ref.argmax(1), out.argmax(1), len(s.labels), seed=lab.seed)
    classes = len(np.unique(y[y >= 0]))
    labelled = int((y >= 0).sum())
    detail = f"{labelled} labelled images in {classes} classes"
    return [ParityRow(s.name, "mpca_diff", d, thresholds.mpca, False, labelled, (lo, hi), detail=detail)]


def _auc_rows(s: OutputSpec, ref: np.ndarray, out: np.ndarray, thresholds: Parity, lab: _Labelled) -> list[ParityRow]:
    """A task's loss of AUC on the images labelled for it (none unless both sides are there)."""
    from derm.metrics import paired_auc_difference

    y = np.full(len(lab.nodes), -1, np.int8)
    y[lab.known] = task_targets(lab.taxonomy, [lab.nodes[i] for i in lab.known], s.labels[0])
    keep = y >= 0
    pos = int(y[keep].sum())
    if not (keep.sum() and 0 < pos < keep.sum()):
        return []
    d, lo, hi = paired_auc_difference(y[keep], ref[keep, 0], out[keep, 0], seed=lab.seed)
    n = int(keep.sum())
    return [
        ParityRow(
            s.name, "auc_diff", d, thresholds.auc, False, n, (lo, hi), detail=f"{pos} positive, {n - pos} negative"
        )
    ]


def format_parity(rows: Sequence[ParityRow]) -> str:
    """The parity table as text: each line's value, its 95% interval, the rule it is judged by, what it rests on."""
    lines = [f"{'output':<44} {'metric':<9} {'value':>8} {'95% interval':>17}  {'rule':<18} ok   rests on"]
    for r in rows:
        iv = f"{r.interval[0]:.4f} - {r.interval[1]:.4f}" if r.interval is not None else ""
        rests = r.detail or f"{r.n} images"
        ok = "yes" if r.ok else "NO"
        lines.append(f"{r.output:<44} {r.metric:<9} {r.value:>8.4f} {iv:>17}  {r.rule:<18} {ok:<4} {rests}")
    return "\n".join(line.rstrip() for line in lines)
