"""Reading and checking a taxonomy file (YAML or JSON): every problem is collected and reported at once, naming the
offending nodes, levels, tasks or datasets. :meth:`derm.taxonomy.Taxonomy.from_dict` and
:func:`derm.taxonomy.load_taxonomy` call in here."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from derm._util import normalize_label
from derm.errors import TaxonomyError
from derm.taxonomy import SCHEMA_VERSION, BinaryTask, Node, Taxonomy, check_antichain

_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
_NODE_KEYS = {"id", "name", "parent", "aliases", "note"}
_TASK_KEYS = {"id", "name", "positive", "negative", "eval_positive", "eval_negative", "note"}
_TOP_KEYS = {"schema_version", "name", "version", "description", "levels", "tasks", "datasets", "nodes"}


def parse_text(text: str, suffix: str, source: str) -> Any:
    try:
        if suffix == ".json":
            return json.loads(text)
        if suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
    except Exception as exc:
        raise TaxonomyError(f"Cannot parse taxonomy file {source!r}: {exc}") from exc
    raise TaxonomyError(f"Taxonomy file {source!r} has suffix {suffix!r}; expected .yaml, .yml or .json.")


def _as_str_list(value: Any, where: str, problems: list[str]) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Iterable):
        problems.append(f"{where}: expected a list of strings, received {value!r}")
        return ()
    items = list(value)
    bad = [v for v in items if not isinstance(v, str) or not v.strip()]
    if bad:
        problems.append(f"{where}: every entry must be a non-empty string, received {bad!r}")
    return tuple(str(v) for v in items if isinstance(v, str) and v.strip())


def build_taxonomy(data: Any, source: str | None) -> Taxonomy:
    """A checked :class:`Taxonomy` from a parsed file; :class:`TaxonomyError` lists every problem found."""
    where = source or "taxonomy"
    problems: list[str] = []
    raw_nodes = _check_top(data, where, problems)
    nodes = _read_nodes(raw_nodes, problems)
    _check_parents(nodes, problems)
    if problems:
        raise TaxonomyError(_format(where, problems))
    _check_cycles(nodes, problems)
    if problems:
        raise TaxonomyError(_format(where, problems))
    _check_aliases(nodes, problems)
    tax = Taxonomy(
        nodes=nodes,
        name=str(data.get("name") or Path(where).stem),
        version=str(data.get("version") or ""),
        description=str(data.get("description") or "").strip(),
        source=source,
    )
    _read_levels(tax, data.get("levels") or {}, problems)
    _read_tasks(tax, data.get("tasks") or [], problems)
    _read_datasets(tax, data.get("datasets") or {}, problems)
    if problems:
        raise TaxonomyError(_format(where, problems))
    return tax


def _check_top(data: Any, where: str, problems: list[str]) -> list[Any]:
    """The top level: a mapping of known keys, a supported schema, a non-empty node list (which it returns)."""
    if not isinstance(data, Mapping):
        raise TaxonomyError(
            f"{where}: the top level must be a mapping with a 'nodes' list, received {type(data).__name__}."
        )
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise TaxonomyError(
            f"{where}: unsupported schema_version {version!r}; this version of derm reads schema_version "
            f"{SCHEMA_VERSION}. Upgrade derm or convert the file."
        )
    extra = sorted(set(data) - _TOP_KEYS)
    if extra:
        problems.append(f"unknown top-level keys {extra}; allowed: {sorted(_TOP_KEYS)}")
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise TaxonomyError(f"{where}: 'nodes' must be a non-empty list of nodes, received {raw_nodes!r:.80}.")
    return raw_nodes


def _read_nodes(raw_nodes: list[Any], problems: list[str]) -> dict[str, Node]:
    nodes: dict[str, Node] = {}
    for i, raw in enumerate(raw_nodes):
        label = f"node #{i + 1}"
        if not isinstance(raw, Mapping):
            problems.append(f"{label}: expected a mapping with id, name, parent, received {raw!r:.80}")
            continue
        nid = raw.get("id")
        if not isinstance(nid, str) or not nid or not set(nid) <= _ID_CHARS:
            problems.append(
                f"{label}: id must be a non-empty string of letters, digits, '_', '-', '.', received {nid!r}"
            )
            continue
        node = _read_node(nid, raw, problems)
        if nid in nodes:
            problems.append(f"node {nid!r}: duplicate id (ids must be unique)")
            continue
        nodes[nid] = node
    return nodes


def _read_node(nid: str, raw: Mapping[str, Any], problems: list[str]) -> Node:
    label = f"node {nid!r}"
    unknown = sorted(set(raw) - _NODE_KEYS)
    if unknown:
        problems.append(f"{label}: unknown keys {unknown}; allowed: {sorted(_NODE_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append(f"{label}: name must be a non-empty string, received {name!r}")
        name = nid
    parent = raw.get("parent")
    if parent is not None and not isinstance(parent, str):
        problems.append(f"{label}: parent must be a node id or omitted, received {parent!r}")
        parent = None
    note = raw.get("note")
    if note is not None and not isinstance(note, str):
        problems.append(f"{label}: note must be a string, received {note!r:.80}")
        note = None
    aliases = _as_str_list(raw.get("aliases"), f"{label} aliases", problems)
    return Node(id=nid, name=name.strip(), parent=parent, aliases=aliases, note=note)


def _check_parents(nodes: Mapping[str, Node], problems: list[str]) -> None:
    for node in nodes.values():
        if node.parent is not None and node.parent not in nodes:
            problems.append(f"node {node.id!r}: parent {node.parent!r} does not exist (orphan)")
        if node.parent == node.id:
            problems.append(f"node {node.id!r}: is its own parent")


def _check_cycles(nodes: Mapping[str, Node], problems: list[str]) -> None:
    """Walk up from every node; a walk that revisits a node never reaches a root."""
    in_cycle: set[str] = set()
    for start in nodes:
        seen: list[str] = []
        nid: str | None = start
        while nid is not None and nid not in seen:
            seen.append(nid)
            nid = nodes[nid].parent
        if nid is not None:
            cycle = tuple(sorted(seen[seen.index(nid) :]))
            if cycle[0] not in in_cycle:
                problems.append(f"nodes {list(cycle)} form a cycle (each is its own ancestor)")
            in_cycle.update(cycle)
    if not any(n.parent is None for n in nodes.values()):
        problems.append("no root: at least one node must have no parent")


def _check_aliases(nodes: Mapping[str, Node], problems: list[str]) -> None:
    """Aliases are unique after normalisation, and never another node's id."""
    owner: dict[str, str] = {}
    ids_norm = {normalize_label(nid): nid for nid in nodes}
    for nid in nodes:
        norm = normalize_label(nid)
        if ids_norm[norm] != nid:
            problems.append(f"node ids {ids_norm[norm]!r} and {nid!r} are the same label after normalisation")
    for node in nodes.values():
        for alias in node.aliases:
            norm = normalize_label(alias)
            if not norm:
                problems.append(f"node {node.id!r}: alias {alias!r} is empty after normalisation")
                continue
            if norm in owner:
                other = owner[norm]
                where_ = "twice on the same node" if other == node.id else f"also on node {other!r}"
                problems.append(f"node {node.id!r}: alias {alias!r} (normalised {norm!r}) is {where_}")
                continue
            if norm in ids_norm and ids_norm[norm] != node.id:
                problems.append(f"node {node.id!r}: alias {alias!r} is the id of node {ids_norm[norm]!r}")
            owner[norm] = node.id


def _read_levels(tax: Taxonomy, levels_raw: Any, problems: list[str]) -> None:
    if not isinstance(levels_raw, Mapping):
        problems.append(f"levels: expected a mapping of level name to node ids, received {levels_raw!r:.80}")
        return
    for lname, ids in levels_raw.items():
        ids_t = _as_str_list(ids, f"level {lname!r}", problems)
        missing = [i for i in ids_t if i not in tax.nodes]
        if missing:
            problems.append(f"level {lname!r}: unknown node ids {missing}")
            continue
        try:
            check_antichain(tax, ids_t, f"level {lname!r}")
        except TaxonomyError as exc:
            problems.append(str(exc))
            continue
        tax.levels[str(lname)] = ids_t


def _read_tasks(tax: Taxonomy, tasks_raw: Any, problems: list[str]) -> None:
    if not isinstance(tasks_raw, list):
        problems.append(f"tasks: expected a list, received {tasks_raw!r:.80}")
        return
    for i, raw in enumerate(tasks_raw):
        if not isinstance(raw, Mapping) or not isinstance(raw.get("id"), str):
            problems.append(f"task #{i + 1}: expected a mapping with an id, received {raw!r:.80}")
            continue
        task = _read_task(tax, raw, problems)
        if task is None:
            continue
        if task.id in tax.tasks:
            problems.append(f"task {task.id!r}: duplicate task id")
        tax.tasks[task.id] = task


def _read_task(tax: Taxonomy, raw: Mapping[str, Any], problems: list[str]) -> BinaryTask | None:
    tid = raw["id"]
    unknown = sorted(set(raw) - _TASK_KEYS)
    if unknown:
        problems.append(f"task {tid!r}: unknown keys {unknown}; allowed: {sorted(_TASK_KEYS)}")
    parts = {}
    for key in ("positive", "negative", "eval_positive", "eval_negative"):
        parts[key] = _as_str_list(raw.get(key), f"task {tid!r} {key}", problems)
        missing = [n for n in parts[key] if n not in tax.nodes]
        if missing:
            problems.append(f"task {tid!r}: {key} names unknown nodes {missing}")
    if not parts["positive"] or not parts["negative"]:
        problems.append(f"task {tid!r}: needs at least one positive and one negative node")
        return None
    if any(n not in tax.nodes for k in parts for n in parts[k]):
        return None
    overlap = [(p, q) for p in parts["positive"] for q in parts["negative"] if tax.is_under(p, q) or tax.is_under(q, p)]
    if overlap:
        problems.append(f"task {tid!r}: positive and negative subtrees overlap at {overlap}")
    return BinaryTask(
        id=tid,
        name=str(raw.get("name") or tid),
        positive=parts["positive"],
        negative=parts["negative"],
        eval_positive=parts["eval_positive"] or parts["positive"],
        eval_negative=parts["eval_negative"] or parts["negative"],
    )


def _read_datasets(tax: Taxonomy, datasets_raw: Any, problems: list[str]) -> None:
    if not isinstance(datasets_raw, Mapping):
        problems.append(f"datasets: expected a mapping, received {datasets_raw!r:.80}")
        return
    for dname, spec in datasets_raw.items():
        if not isinstance(spec, Mapping):
            problems.append(f"dataset {dname!r}: expected a mapping with 'labels', received {spec!r:.80}")
            continue
        labels = _as_str_list(spec.get("labels"), f"dataset {dname!r} labels", problems)
        unmapped = spec.get("unmapped") or {}
        unresolved = [lab for lab in labels if tax.try_resolve(lab) is None and lab not in unmapped]
        if unresolved:
            problems.append(
                f"dataset {dname!r}: labels {unresolved} match no node; add them as aliases or list them "
                "under 'unmapped' with a reason"
            )
        tax.datasets[str(dname)] = dict(spec)


def _format(where: str, problems: list[str]) -> str:
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"Invalid taxonomy {where!r} ({len(problems)} problem{'s' * (len(problems) != 1)}):\n{lines}"
