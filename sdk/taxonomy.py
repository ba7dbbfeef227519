"""The disease taxonomy: one tree (a forest under an implicit root), the single source of truth.

A taxonomy file (YAML or JSON) holds a flat list of nodes, each with a stable ``id``, a ``name``, its ``parent``
(omitted for roots) and, optionally, the dataset label ``aliases`` that map onto it and a ``note``. It may also
name inference ``levels`` (sets of nodes whose probabilities an app reads), conditional binary ``tasks`` (the
paper's melanoma-vs-nevus and carcinoma-vs-keratosis) and the label sets of known ``datasets`` (checked on load).
Loading validates everything and reports every problem at once, naming the offending nodes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from derm._util import normalize_label, not_utf8, sha256_json
from derm.errors import TaxonomyError

SCHEMA_VERSION = 1
DEFAULT_TAXONOMY = "default_taxonomy.yaml"


@dataclass(frozen=True)
class Node:
    id: str  # stable identifier, used in partitions, manifests and model outputs
    name: str  # human-readable name
    parent: str | None  # id of the parent node; None for a root
    aliases: tuple[str, ...] = ()  # dataset labels that map onto this node (as written in the file)
    note: str | None = None  # free text, e.g. why a mixture label maps here


@dataclass(frozen=True)
class BinaryTask:
    """A conditional binary task: ``P(positive | positive or negative)`` from the training classes under them.

    ``eval_positive``/``eval_negative`` select the labelled images the task is evaluated on (default: the
    probability nodes themselves), e.g. carcinoma vs *seborrheic keratosis* images while the probability is
    P(malignant | epidermal).
    """

    id: str
    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    eval_positive: tuple[str, ...]
    eval_negative: tuple[str, ...]


@dataclass
class Taxonomy:
    nodes: dict[str, Node]  # in file order, which fixes the order of children and so of training classes
    levels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    tasks: dict[str, BinaryTask] = field(default_factory=dict)
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    name: str = "taxonomy"
    version: str = ""
    description: str = ""
    source: str | None = None  # where it was loaded from, for messages

    def __post_init__(self) -> None:
        self.children: dict[str, tuple[str, ...]] = {}
        kids: dict[str, list[str]] = {nid: [] for nid in self.nodes}
        for node in self.nodes.values():
            if node.parent is not None and node.parent in kids:
                kids[node.parent].append(node.id)
        self.children = {k: tuple(v) for k, v in kids.items()}
        self.roots: tuple[str, ...] = tuple(n.id for n in self.nodes.values() if n.parent is None)
        self._alias_index: dict[str, str] = {}
        for node in self.nodes.values():
            self._alias_index.setdefault(normalize_label(node.id), node.id)
        for node in self.nodes.values():
            for alias in node.aliases:
                self._alias_index[normalize_label(alias)] = node.id

    # ----------------------------------------------------------------------------------------------------- tree
    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.nodes

    def __getitem__(self, node_id: str) -> Node:
        try:
            return self.nodes[node_id]
        except KeyError:
            raise KeyError(f"No node with id {node_id!r} in taxonomy {self.name!r}.") from None

    def parent(self, node_id: str) -> str | None:
        return self[node_id].parent

    def ancestors(self, node_id: str) -> list[str]:
        """Strict ancestors, nearest first."""
        out = []
        parent = self[node_id].parent
        while parent is not None:
            out.append(parent)
            parent = self.nodes[parent].parent
        return out

    def depth(self, node_id: str) -> int:
        return len(self.ancestors(node_id))

    def is_under(self, node_id: str, ancestor: str) -> bool:
        """True if ``node_id`` is ``ancestor`` or lies in its subtree."""
        return node_id == ancestor or ancestor in self.ancestors(node_id)

    def descendants(self, node_id: str, include_self: bool = True) -> list[str]:
        """The subtree in depth-first pre-order (file order among siblings)."""
        out: list[str] = []
        stack = [node_id]
        while stack:
            nid = stack.pop()
            out.append(nid)
            stack.extend(reversed(self.children[nid]))
        return out if include_self else out[1:]

    def walk(self) -> Iterator[tuple[str, int]]:
        """(node id, depth) for every node, depth-first pre-order from each root."""
        for root in self.roots:
            stack = [(root, 0)]
            while stack:
                nid, depth = stack.pop()
                yield nid, depth
                stack.extend((c, depth + 1) for c in reversed(self.children[nid]))

    def leaves(self) -> list[str]:
        return [nid for nid, _ in self.walk() if not self.children[nid]]

    def path(self, node_id: str) -> list[str]:
        """Root-to-node ids."""
        return [*reversed(self.ancestors(node_id)), node_id]

    # ---------------------------------------------------------------------------------------------- labels
    def resolve(self, label: str) -> str:
        """Node id for a dataset label (alias or node id, normalised). Raises ``KeyError`` naming the label."""
        nid = self.try_resolve(label)
        if nid is None:
            raise KeyError(
                f"Label {label!r} matches no alias or node id of taxonomy {self.name!r}. "
                "Add it to a node's aliases in the taxonomy file."
            )
        return nid

    def try_resolve(self, label: str) -> str | None:
        return self._alias_index.get(normalize_label(label))

    # -------------------------------------------------------------------------------------------- counting
    def subtree_counts(self, counts: Mapping[str, int]) -> dict[str, int]:
        """Images in each node's subtree, given images labelled exactly at each node."""
        unknown = sorted(set(counts) - set(self.nodes))
        if unknown:
            raise KeyError(f"Counts name nodes not in taxonomy {self.name!r}: {unknown}")
        total = {nid: int(counts.get(nid, 0)) for nid in self.nodes}
        for nid, _depth in sorted(self.walk(), key=lambda t: -t[1]):
            parent = self.nodes[nid].parent
            if parent is not None:
                total[parent] += total[nid]
        return total

    # ------------------------------------------------------------------------------------- levels and tasks
    def level(self, level: str | Sequence[str]) -> tuple[str, ...]:
        """Inference nodes for a level name (``three``, ``nine``, ``roots``, ``depth:N``) or an explicit list."""
        if isinstance(level, str):
            if level in self.levels:
                return self.levels[level]
            if level == "roots":
                return self.roots
            if level.startswith("depth:") and level[6:].isdigit():
                d = int(level[6:])
                return tuple(nid for nid, depth in self.walk() if depth == d)
            raise KeyError(
                f"Unknown inference level {level!r}. Known: {[*self.levels, 'roots', 'depth:N']}, "
                "or pass a list of node ids."
            )
        nodes = tuple(level)
        check_antichain(self, nodes, "inference nodes")
        return nodes

    def task(self, task_id: str) -> BinaryTask:
        try:
            return self.tasks[task_id]
        except KeyError:
            raise KeyError(f"Unknown task {task_id!r}. Known tasks: {sorted(self.tasks)}") from None

    # ----------------------------------------------------------------------------------------- identity
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "levels": {k: list(v) for k, v in self.levels.items()},
            "tasks": [
                {
                    "id": t.id,
                    "name": t.name,
                    "positive": list(t.positive),
                    "negative": list(t.negative),
                    "eval_positive": list(t.eval_positive),
                    "eval_negative": list(t.eval_negative),
                }
                for t in self.tasks.values()
            ],
            "datasets": self.datasets,
            "nodes": [
                {
                    k: v
                    for k, v in (
                        ("id", n.id),
                        ("name", n.name),
                        ("parent", n.parent),
                        ("aliases", list(n.aliases)),
                        ("note", n.note),
                    )
                    if v not in (None, [])
                }
                for n in self.nodes.values()
            ],
        }

    @property
    def sha256(self) -> str:
        """Hash of what changes a model's meaning: nodes (ids, parents, aliases), levels and tasks.

        Names, notes, descriptions and the documentation of datasets do not enter it.
        """
        return sha256_json(
            {
                "nodes": [[n.id, n.parent, sorted(normalize_label(a) for a in n.aliases)] for n in self.nodes.values()],
                "levels": {k: list(v) for k, v in sorted(self.levels.items())},
                "tasks": [
                    [t.id, t.positive, t.negative, t.eval_positive, t.eval_negative] for t in self.tasks.values()
                ],
            }
        )

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> Taxonomy:
        from derm.taxonomy_file import build_taxonomy

        return build_taxonomy(data, source)


# ----------------------------------------------------------------------------------------------------- loading
def load_taxonomy(path: str | Path | None = None) -> Taxonomy:
    """Load and validate a taxonomy file (``.yaml``, ``.yml`` or ``.json``); ``None`` gives the default."""
    from derm.taxonomy_file import parse_text

    if path is None:
        return default_taxonomy()
    path = Path(path)
    if not path.is_file():
        raise TaxonomyError(f"Taxonomy file not found: {str(path)!r}. Pass an existing .yaml or .json file.")
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise TaxonomyError(
            f"Taxonomy file {str(path)!r} has suffix {path.suffix!r}; expected .yaml, .yml or .json (a labelled image "
            "CSV goes to --data, not --taxonomy)."
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TaxonomyError(f"Taxonomy file {not_utf8(path, exc)}.") from None
    return Taxonomy.from_dict(parse_text(text, path.suffix.lower(), str(path)), source=str(path))


def default_taxonomy() -> Taxonomy:
    """The shipped dermatology taxonomy (Esteva et al. 2017: 3 roots, 9 clinical classes, diseases)."""
    from derm.taxonomy_file import parse_text

    text = resources.files("derm").joinpath("data", DEFAULT_TAXONOMY).read_text(encoding="utf-8")
    return Taxonomy.from_dict(parse_text(text, ".yaml", DEFAULT_TAXONOMY), source=f"derm:{DEFAULT_TAXONOMY}")


def check_antichain(tax: Taxonomy, ids: Sequence[str], what: str) -> None:
    missing = [i for i in ids if i not in tax.nodes]
    if missing:
        raise TaxonomyError(f"{what}: unknown node ids {missing}")
    dup = sorted({i for i in ids if list(ids).count(i) > 1})
    if dup:
        raise TaxonomyError(f"{what}: listed more than once: {dup}")
    nested = [(a, b) for a in ids for b in ids if a != b and tax.is_under(b, a)]
    if nested:
        raise TaxonomyError(
            f"{what}: {nested[0][1]!r} lies under {nested[0][0]!r}; inference nodes must not contain each other "
            f"(all nested pairs: {nested})"
        )


def format_tree(
    tax: Taxonomy,
    counts: Mapping[str, int] | None = None,
    max_depth: int | None = None,
    hide_empty: bool = False,
) -> str:
    """The tree as indented text, with image counts (subtree total, and own where a node has both)."""
    totals = tax.subtree_counts(counts) if counts is not None else None
    lines = []
    for root in tax.roots:
        _render(tax, root, "", True, 0, counts, totals, max_depth, hide_empty, lines, is_root=True)
    return "\n".join(lines)


def _render(tax, nid, prefix, last, depth, counts, totals, max_depth, hide_empty, lines, is_root=False):
    node = tax.nodes[nid]
    label = f"{node.name} [{nid}]"
    if totals is not None:
        own = int(counts.get(nid, 0))
        label += f"  {totals[nid]:,}"
        if own and tax.children[nid]:
            label += f" ({own:,} labelled here)"
    if is_root:
        lines.append(label)
        child_prefix = ""
    else:
        lines.append(f"{prefix}{'└── ' if last else '├── '}{label}")
        child_prefix = prefix + ("    " if last else "│   ")
    if max_depth is not None and depth >= max_depth:
        return
    kids = [c for c in tax.children[nid] if not (hide_empty and totals is not None and totals[c] == 0)]
    for i, child in enumerate(kids):
        _render(tax, child, child_prefix, i == len(kids) - 1, depth + 1, counts, totals, max_depth, hide_empty, lines)
