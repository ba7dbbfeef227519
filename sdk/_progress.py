"""Progress bars for long work: rich on a terminal, silent when output is not interactive or when disabled."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress_enabled() -> bool:
    if os.environ.get("DERM_PROGRESS", "").lower() in ("0", "false", "no", "off"):
        return False
    if os.environ.get("DERM_PROGRESS", "").lower() in ("1", "true", "yes", "on"):
        return True
    return sys.stderr.isatty()


def track(iterable: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar on stderr (when enabled)."""
    if not progress_enabled():
        yield from iterable
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        yield from progress.track(iterable, total=total, description=description)
