"""The one way every ``derm*`` command builds its Typer app: help when called bare, plain tracebacks, no shell
completion installer."""

from __future__ import annotations

import typer


def cli_app(name: str, help: str) -> typer.Typer:
    return typer.Typer(name=name, help=help, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
