"""The one way every ``derm*`` command builds and runs its Typer app: help when called bare, plain tracebacks, no
shell completion installer; Ctrl-C and SIGTERM end it through the normal clean-up paths (temporary files removed,
finished results kept) with one line and exit status 130, never a traceback."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any, NoReturn

import typer

from derm._signals import Interrupted, handled
from derm._signals import received as _received

EXIT_INTERRUPTED = 130

_level_is_a_default: list[bool] = [False]  # the front door set a level the user did not ask for


def setup_logging(level: int = logging.INFO, *, verbose: int | None = None, timestamps: bool = False) -> None:
    """The one logging set-up of every ``derm`` tool: to stderr, ``LEVEL logger: message`` (with the time for long
    benchmarks). ``verbose`` (a count of ``-v``) overrides ``level``: 0 warnings, 1 info, 2 or more debug.

    ``derm`` sets up logging before it hands a command to another tool (``derm train`` runs ``derm-train train``).
    Without ``-v`` that level is only a default: the tool's own level (its progress lines) replaces it, so that
    ``derm train`` logs as ``derm-train train`` does; with ``-v`` the user's choice stays.
    """
    if verbose is not None:
        level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    elif _level_is_a_default[0]:
        _level_is_a_default[0] = False
        logging.getLogger().setLevel(level)
        return
    _level_is_a_default[0] = verbose == 0
    fmt = ("%(asctime)s " if timestamps else "") + "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)


def cli_app(name: str, help: str) -> typer.Typer:
    return typer.Typer(name=name, help=help, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def run_app(app: Any) -> None:
    """Run a command line app with SIGINT / SIGTERM turned into :class:`Interrupted`.

    TensorFlow's C++ log (CUDA probing on a machine without a GPU, and Python tracebacks it logs from input pipeline
    threads when an image cannot be read, which the command reports itself in one line) is off unless the user sets
    ``TF_CPP_MIN_LOG_LEVEL``.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        with handled():
            app()
    except SystemExit as exc:
        if _received and exc.code in (0, None):  # a library swallowed the signal's exception; the work is done
            print(f"Interrupted ({_received[0]}) as the command finished: what it wrote is complete.", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        if _received and exc.code != EXIT_INTERRUPTED:
            _interrupted()  # an error that came of the signal (the command has not said it was interrupted)
        raise
    except BaseException as exc:
        # The signal's exception can surface as another one when it lands inside a library (TensorFlow turns it
        # into a SystemError while tracing a function): any exception after a signal is the interruption.
        if isinstance(exc, Interrupted) or _received:
            _interrupted()
        raise
    if _received:  # as above, for an app that returns instead of exiting
        print(f"Interrupted ({_received[0]}) as the command finished: what it wrote is complete.", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def _interrupted() -> None:
    print(
        f"Interrupted ({_received[0] if _received else 'signal'}): nothing half-written is left; finished results "
        "were kept where the command keeps them (a triage resumes, a training run resumes from its cache).",
        file=sys.stderr,
    )
    sys.exit(EXIT_INTERRUPTED)


EXIT_USAGE = 2  # a bad argument, input or configuration: the message says what to do; nothing half-written is left


def fail(message: str) -> NoReturn:
    """End the command with ``Error: message`` on stderr and exit status 2 (every ``derm`` tool's user error)."""
    typer.secho(f"Error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=EXIT_USAGE)


@contextlib.contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Turn user errors into a one-paragraph message and exit status 2, never a traceback: the library's
    ``DermError`` and, unless ``kinds`` narrows them (a training command keeps a traceback for a ValueError deep in
    TensorFlow), the bad keys, values and paths of the SDK's commands."""
    from derm.errors import DermError

    caught = kinds or (DermError, KeyError, ValueError, OSError)
    try:
        yield
    except caught as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        if isinstance(exc, OSError) and exc.strerror:  # "[Errno 13] Permission denied: 'x'" -> what and where
            where = f" {exc.filename!r}" if exc.filename else ""
            msg = f"cannot use{where}: {exc.strerror.lower()}. Check the path and its permissions."
        fail(msg)
