"""``derm taxonomy`` and ``derm data``: inspect, validate and partition taxonomies; check labelled datasets and make
group-aware folds. Registered on the ``derm`` command by :mod:`derm.cli`."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from derm._cli import user_errors as _user_errors
from derm._version import __version__

if TYPE_CHECKING:
    import numpy as np

    from derm.datasets import Dataset
    from derm.partition import Partition
    from derm.taxonomy import Taxonomy

taxonomy_app = typer.Typer(help="Inspect, validate and partition disease taxonomies.", no_args_is_help=True)
data_app = typer.Typer(help="Check labelled datasets and make group-aware folds.", no_args_is_help=True)

TaxonomyOpt = Annotated[
    Path | None,
    typer.Option("--taxonomy", "-t", help="Taxonomy file (.yaml/.json); default: the shipped dermatology taxonomy."),
]
SkipBadOpt = Annotated[
    bool,
    typer.Option("--skip-bad", help="Skip rows with unknown labels, missing or unreadable images (with a warning)."),
]


def _load(taxonomy: Path | None):
    from derm.taxonomy import load_taxonomy

    return load_taxonomy(taxonomy)


def _read(data: Path, tax, skip_bad: bool, check: str = "header"):
    import warnings

    from derm.datasets import read_dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skip summary is logged and printed below instead
        ds = read_dataset(data, tax, on_error="skip" if skip_bad else "raise", check_images=check)  # type: ignore[arg-type]
    if ds.skipped:
        typer.secho(
            f"Skipped {len(ds.skipped)} bad rows of {data} (run `derm data check` for the list).",
            err=True,
            fg=typer.colors.YELLOW,
        )
    return ds


# ---------------------------------------------------------------------------------------------------- taxonomy
@taxonomy_app.command("show")
def taxonomy_show(
    taxonomy: TaxonomyOpt = None,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Dataset CSV: show image counts per node.")] = None,
    depth: Annotated[int | None, typer.Option("--depth", help="Show nodes down to this depth (0 = roots).")] = None,
    hide_empty: Annotated[
        bool, typer.Option("--hide-empty", help="With --data, hide nodes holding no images.")
    ] = False,
    skip_bad: SkipBadOpt = False,
) -> None:
    """Print the taxonomy tree, with image counts when a dataset is given."""
    from derm.taxonomy import format_tree

    with _user_errors():
        tax = _load(taxonomy)
        counts = None
        if data is not None:
            counts = _read(data, tax, skip_bad).counts()
        typer.echo(f"{tax.name} {tax.version}  ({len(tax)} nodes, sha256 {tax.sha256[:12]})")
        if counts is not None:
            typer.echo(f"image counts from {data}: {sum(counts.values()):,} images")
        typer.echo(format_tree(tax, counts, max_depth=depth, hide_empty=hide_empty))


@taxonomy_app.command("validate")
def taxonomy_validate(file: Annotated[Path, typer.Argument(help="Taxonomy file to check.")]) -> None:
    """Check a taxonomy file: one tree, unique ids, no cycles or orphans, unique aliases, valid levels and tasks."""
    with _user_errors():
        tax = _load(file)
        leaves = len(tax.leaves())
        aliases = sum(len(n.aliases) for n in tax.nodes.values())
        typer.echo(
            f"OK: {tax.name} {tax.version}: {len(tax)} nodes ({len(tax.roots)} roots, {leaves} leaves), "
            f"{aliases} aliases, levels {list(tax.levels)}, tasks {list(tax.tasks)}; sha256 {tax.sha256}"
        )


@taxonomy_app.command("partition")
def taxonomy_partition(
    data: Annotated[Path, typer.Option("--data", "-d", help="Dataset CSV (image,label[,group...]).")],
    max_class_size: Annotated[int, typer.Option("--max-class-size", "-m", help="The paper's maxClassSize.")],
    taxonomy: TaxonomyOpt = None,
    within: Annotated[
        str | None,
        typer.Option(help="Level every training class must lie under (default: the finest level of the taxonomy)."),
    ] = None,
    levels: Annotated[
        list[str] | None, typer.Option("--level", "-l", help="Inference level(s) to aggregate to (default: all).")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the partition and matrices as JSON.")
    ] = None,
    matrix: Annotated[bool, typer.Option("--matrix", help="Print the 0/1 aggregation matrices too.")] = False,
    skip_bad: SkipBadOpt = False,
) -> None:
    """Partition the taxonomy into training classes and show the aggregation to inference classes."""
    from derm.aggregation import aggregation_matrix
    from derm.partition import partition

    with _user_errors():
        tax = _load(taxonomy)
        ds = _read(data, tax, skip_bad)
        level_names = levels or list(tax.levels) or ["roots"]
        if within is None:
            # The finest named level, so every class lies under exactly one node of every level.
            within = max(level_names, key=lambda name: len(tax.level(name)))
        part = partition(tax, ds.counts(), max_class_size, within=within)
        mats = {name: aggregation_matrix(part, name) for name in level_names}

        typer.echo(
            f"{len(part)} training classes from {len(ds):,} images of {data} "
            f"(max_class_size {max_class_size}, within level {within!r}); partition sha256 {part.sha256[:12]}"
        )
        _echo_classes(tax, part, mats, level_names)
        if part.unassigned:
            typer.secho(
                f"Unassigned (labelled above or outside level {within!r}): "
                + ", ".join(f"{k} ({v})" for k, v in part.unassigned.items()),
                fg=typer.colors.YELLOW,
            )
        for name in level_names:
            _echo_aggregation(tax, part, mats[name], name, matrix)
        if json_out is not None:
            _write_partition_json(json_out, part, ds, tax, mats)
            typer.echo(f"\nWrote {json_out}")


def _echo_classes(tax: Taxonomy, part: Partition, mats: dict[str, np.ndarray], level_names: list[str]) -> None:
    """Print the table of training classes: index, label, images and the inference class of each level."""
    w = max(len("training class"), *(len(c.label) for c in part.classes))
    lw = {n: max(len(n), *(len(u) for u in tax.level(n))) for n in level_names}
    head = f"{'#':>4}  {'training class':<{w}}  {'images':>7}  " + "  ".join(f"{n:<{lw[n]}}" for n in level_names)
    typer.echo(head.rstrip())
    typer.echo("-" * len(head.rstrip()))
    for c in part.classes:
        cols = [f"{tax.level(n)[int(mats[n][c.index].argmax())]:<{lw[n]}}" for n in level_names]
        typer.echo((f"{c.index:>4}  {c.label:<{w}}  {c.count:>7,}  " + "  ".join(cols)).rstrip())


def _echo_aggregation(tax: Taxonomy, part: Partition, mat: np.ndarray, name: str, matrix: bool) -> None:
    """Print which training classes add up to each inference class of level ``name`` (and the 0/1 ``matrix``)."""
    nodes = tax.level(name)
    typer.echo(f"\nAggregation to level {name!r} ({len(nodes)} inference classes): P(u) = sum of P(c) for c in u")
    for j, u in enumerate(nodes):
        members = [int(i) for i in mat[:, j].nonzero()[0]]
        n_img = sum(part.classes[i].count for i in members)
        typer.echo(f"  {u:<22} {n_img:>7,} images  <- classes {members if members else '(none: no data)'}")
    if matrix:
        typer.echo("  matrix (rows: training classes, columns: inference classes):")
        for row in mat.astype(int):
            typer.echo("    " + " ".join(str(v) for v in row))


def _write_partition_json(
    json_out: Path, part: Partition, ds: Dataset, tax: Taxonomy, mats: dict[str, np.ndarray]
) -> None:
    """Write the partition, the dataset's description and the aggregation matrices as JSON."""
    from derm._util import atomic_write

    payload = {
        "partition": part.to_dict(),
        "partition_sha256": part.sha256,
        "dataset": ds.describe(),
        "aggregation": {
            name: {"nodes": list(tax.level(name)), "matrix": mat.astype(int).tolist()} for name, mat in mats.items()
        },
        "derm_version": __version__,
    }
    with atomic_write(json_out) as f:
        json.dump(payload, f, indent=2)


# -------------------------------------------------------------------------------------------------------- data
@data_app.command("check")
def data_check(
    data: Annotated[Path, typer.Argument(help="Dataset CSV.")],
    taxonomy: TaxonomyOpt = None,
    decode: Annotated[
        bool, typer.Option("--decode", help="Decode every image fully (catches truncated files).")
    ] = False,
) -> None:
    """Check a dataset: every label known, every image present and readable. Exit code 1 lists the problems."""
    from derm.datasets import read_dataset
    from derm.errors import DatasetError

    with _user_errors():
        tax = _load(taxonomy)
        try:
            ds = read_dataset(data, tax, check_images="decode" if decode else "header")
        except DatasetError as exc:
            if not exc.problems:
                raise
            typer.secho(str(exc), err=True, fg=typer.colors.RED)
            raise typer.Exit(code=1) from None
        desc = ds.describe()
        typer.echo(f"OK: {len(ds):,} images, {desc['groups'] or 'no'} groups (column {ds.group_column!r})")
        for label, n in sorted(desc["labels"].items(), key=lambda kv: -kv[1]):
            nid = tax.resolve(label)
            typer.echo(f"  {label:<28} {n:>7,}  -> {nid} ({tax[nid].name})")


@data_app.command("split")
def data_split(
    data: Annotated[Path, typer.Argument(help="Dataset CSV.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="CSV to write: the input rows plus a 'fold' column.")],
    folds: Annotated[int, typer.Option("--folds", "-k", help="Number of folds.")] = 9,
    seed: Annotated[int, typer.Option(help="Seed for tie-breaking; same seed, same folds.")] = 0,
    near_duplicates: Annotated[
        bool, typer.Option("--near-duplicates/--no-near-duplicates", help="Also join near-identical images.")
    ] = True,
    taxonomy: TaxonomyOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
    skip_bad: SkipBadOpt = False,
) -> None:
    """Group-aware, class-stratified k-fold split: no group (lesion, patient) or near-duplicate straddles folds."""
    from derm._util import atomic_write, unwritable
    from derm.datasets import readable_images
    from derm.splits import describe_folds, group_components, image_fingerprints, kfold

    with _user_errors():
        if out.is_dir():
            raise ValueError(f"--out {str(out)!r} is a folder; give the path of the CSV to write.")
        if out.exists() and not overwrite:
            raise ValueError(f"Output {str(out)!r} exists; pass --overwrite to replace it.")
        if problem := unwritable(out):
            raise ValueError(f"--out {str(out)!r}: {problem}; choose another --out.")
        tax = _load(taxonomy)
        ds = _read(data, tax, skip_bad)
        with readable_images(data):
            fps = image_fingerprints(ds.paths) if near_duplicates else None
        comps = group_components(len(ds), ds.groups, fps)
        fold = kfold(ds.nodes, comps, k=folds, seed=seed)
        with atomic_write(out, newline="") as f:
            writer = csv.writer(f)
            cols = ["image", "label", *([ds.group_column] if ds.group_column else []), *ds.extras, "component", "fold"]
            writer.writerow(cols)
            for i in range(len(ds)):
                try:
                    img = str(ds.paths[i].relative_to(out.resolve().parent))
                except ValueError:
                    img = str(ds.paths[i])
                row = [img, ds.labels[i], *([ds.groups[i]] if ds.groups is not None else [])]
                row += [ds.extras[c][i] for c in ds.extras] + [int(comps[i]), int(fold[i])]
                writer.writerow(row)
        typer.echo(f"{len(ds):,} images in {int(comps.max()) + 1:,} independent groups -> {folds} folds; wrote {out}")
        typer.echo(describe_folds(ds.labels, fold))
