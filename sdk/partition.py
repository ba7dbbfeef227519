"""The paper's disease-partitioning algorithm (Esteva et al. 2017, Extended Data Table 1).

Starting at each root, a node becomes one *training class* holding its whole subtree when that subtree holds at
most ``max_class_size`` images (or when it is a leaf); a larger node recurses into its children. The paper's
pseudo-code writes ``NumImages(class) < maxClassSize``; we read maxClassSize as the *maximum* class size ("maximum
data points in a class"), so a subtree of exactly ``max_class_size`` images is one class.

Two cases the paper leaves open are made explicit:

* images labelled at an inner node that recurses (a mixture label such as HAM10000's ``bkl``) become a class of
  their own, ``<node>:self`` (``own_only=True``), holding only the images labelled exactly there; a node whose
  images are *all* labelled at itself is treated as a leaf;
* ``within`` (default: the roots) names the inference nodes every training class must lie under. Ancestors of
  those nodes always recurse, so a class never straddles two inference classes; images labelled above them or
  outside every one of them cannot be assigned and are reported in ``Partition.unassigned``.

The result is deterministic: classes come in depth-first order, siblings in taxonomy-file order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from derm._util import sha256_json
from derm.errors import PartitionError
from derm.taxonomy import Taxonomy


@dataclass(frozen=True)
class TrainingClass:
    index: int  # position in the model's softmax
    node: str  # taxonomy node id
    name: str  # the node's name (with "(unspecified)" for own-only classes)
    own_only: bool  # True: only the images labelled exactly at `node`; its children are classes of their own
    count: int  # images in the class

    @property
    def label(self) -> str:
        """Stable label of the class, as written into model files."""
        return f"{self.node}:self" if self.own_only else self.node


@dataclass
class Partition:
    classes: tuple[TrainingClass, ...]
    max_class_size: int
    within: tuple[str, ...]
    taxonomy: Taxonomy = field(repr=False)
    unassigned: dict[str, int] = field(default_factory=dict)  # node id -> images that fit no training class
    _class_of: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self._class_of:
            self._class_of = _index(self.taxonomy, self.classes)

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.classes]

    def class_of(self, node_id: str) -> int | None:
        """Index of the training class holding images labelled at ``node_id``; None if they are unassigned."""
        if node_id not in self.taxonomy.nodes:
            raise KeyError(f"No node {node_id!r} in taxonomy {self.taxonomy.name!r}.")
        return self._class_of.get(node_id)

    def targets(self, node_ids: Sequence[str]) -> list[int]:
        """Training-class index of each image, given the node each is labelled at (-1 where unassigned)."""
        out = []
        for nid in node_ids:
            idx = self.class_of(nid)
            out.append(-1 if idx is None else idx)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_class_size": self.max_class_size,
            "within": list(self.within),
            "taxonomy": {"name": self.taxonomy.name, "version": self.taxonomy.version, "sha256": self.taxonomy.sha256},
            "classes": [
                {
                    "index": c.index,
                    "label": c.label,
                    "node": c.node,
                    "name": c.name,
                    "own_only": c.own_only,
                    "count": c.count,
                }
                for c in self.classes
            ],
            "unassigned": dict(self.unassigned),
        }

    @property
    def sha256(self) -> str:
        """Hash of the class list and the taxonomy it refers to (counts excluded: they do not change outputs)."""
        return sha256_json({"taxonomy": self.taxonomy.sha256, "classes": self.labels})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], taxonomy: Taxonomy) -> Partition:
        """Rebuild a saved partition; refuses one made from a different taxonomy."""
        saved = data.get("taxonomy", {}).get("sha256")
        if saved != taxonomy.sha256:
            raise PartitionError(
                f"Partition was made from taxonomy sha256 {saved!r}, but the given taxonomy "
                f"{taxonomy.name!r} has sha256 {taxonomy.sha256!r}. Load the taxonomy the run used."
            )
        classes = tuple(
            TrainingClass(index=c["index"], node=c["node"], name=c["name"], own_only=c["own_only"], count=c["count"])
            for c in data["classes"]
        )
        return cls(
            classes=classes,
            max_class_size=int(data["max_class_size"]),
            within=tuple(data["within"]),
            taxonomy=taxonomy,
            unassigned=dict(data.get("unassigned", {})),
        )


def _check_inputs(taxonomy: Taxonomy, counts: Mapping[str, int], max_class_size: int) -> None:
    """Refuse a bad ``max_class_size``, negative or non-integer counts, and counts of nodes not in the taxonomy."""
    if isinstance(max_class_size, bool) or not isinstance(max_class_size, int) or max_class_size < 1:
        raise PartitionError(f"max_class_size must be a positive integer, received {max_class_size!r}.")
    bad = {k: v for k, v in counts.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0}
    if bad:
        raise PartitionError(f"Image counts must be non-negative integers, received {bad}.")
    unknown = sorted(set(counts) - set(taxonomy.nodes))
    if unknown:
        raise PartitionError(f"Counts name nodes that are not in taxonomy {taxonomy.name!r}: {unknown}.")


def _forced_and_covered(taxonomy: Taxonomy, within_ids: Sequence[str]) -> tuple[set[str], set[str]]:
    """The strict ancestors of the inference nodes (they must split) and every node under one of them."""
    forced: set[str] = set()
    for nid in within_ids:
        forced.update(taxonomy.ancestors(nid))
    covered: set[str] = set()
    for nid in within_ids:
        covered.update(taxonomy.descendants(nid))
    return forced, covered


def _walk(
    taxonomy: Taxonomy, counts: Mapping[str, int], max_class_size: int, within_ids: Sequence[str]
) -> tuple[list[TrainingClass], dict[str, int]]:
    """The training classes in depth-first order, and the images that fit none (node id -> count)."""
    totals = taxonomy.subtree_counts(counts)
    forced, covered = _forced_and_covered(taxonomy, within_ids)
    classes: list[TrainingClass] = []
    unassigned: dict[str, int] = {}

    def add(node_id: str, own_only: bool, n: int) -> None:
        name = taxonomy.nodes[node_id].name + (" (unspecified)" if own_only else "")
        classes.append(TrainingClass(index=len(classes), node=node_id, name=name, own_only=own_only, count=n))

    # Iterative depth-first pre-order, so deep user trees cannot hit the recursion limit.
    stack = list(reversed(taxonomy.roots))
    while stack:
        nid = stack.pop()
        total = totals[nid]
        if total == 0:
            continue
        if nid not in covered and nid not in forced:
            # Outside every inference node: nothing here can be assigned.
            for d in taxonomy.descendants(nid):
                if counts.get(d, 0):
                    unassigned[d] = int(counts[d])
            continue
        children = taxonomy.children[nid]
        own = int(counts.get(nid, 0))
        # A node whose images are all labelled at itself is a leaf as far as the data goes: it stays one class
        # (so images later labelled at its descendants still map onto it).
        if nid not in forced and (total <= max_class_size or not children or own == total):
            add(nid, False, total)
            continue
        if own:
            if nid in forced:
                unassigned[nid] = own
            else:
                add(nid, True, own)
        stack.extend(reversed(children))
    return classes, unassigned


def partition(
    taxonomy: Taxonomy,
    counts: Mapping[str, int],
    max_class_size: int,
    within: str | Sequence[str] | None = None,
) -> Partition:
    """Partition the taxonomy into training classes.

    Args:
        taxonomy: the disease tree.
        counts: images labelled exactly at each node id (nodes absent count 0).
        max_class_size: the paper's maxClassSize (1,000 in the paper); a positive integer.
        within: inference nodes (a level name such as ``"nine"``, or node ids) each training class must lie
            under; default the roots.
    """
    _check_inputs(taxonomy, counts, max_class_size)
    within_ids = taxonomy.roots if within is None else taxonomy.level(within)
    classes, unassigned = _walk(taxonomy, counts, max_class_size, within_ids)
    return Partition(
        classes=tuple(classes),
        max_class_size=max_class_size,
        within=tuple(within_ids),
        taxonomy=taxonomy,
        unassigned=unassigned,
    )


def _index(tax: Taxonomy, classes: Sequence[TrainingClass]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in classes:
        if c.own_only:
            out[c.node] = c.index
        else:
            for d in tax.descendants(c.node):
                out[d] = c.index
    return out
