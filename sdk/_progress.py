"""Progress on long work: a rich bar on a terminal; elsewhere (nohup, CI, a notebook) a log line every half minute
with the count, rate and time left; nothing when ``DERM_PROGRESS=0``."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from derm import _signals

T = TypeVar("T")
log = logging.getLogger("derm.progress")
LOG_EVERY_S = 30.0


def progress_enabled() -> bool:
    if os.environ.get("DERM_PROGRESS", "").lower() in ("0", "false", "no", "off"):
        return False
    if os.environ.get("DERM_PROGRESS", "").lower() in ("1", "true", "yes", "on"):
        return True
    return sys.stderr.isatty()


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def log_progress(
    iterable: Iterable[T], description: str, total: int | None = None, every: float = LOG_EVERY_S
) -> Iterator[T]:
    """Iterate, logging ``description: done/total (rate/s, time left)`` at most every ``every`` seconds."""
    t0 = last = time.monotonic()
    for done, item in enumerate(iterable, 1):
        yield item
        now = time.monotonic()
        if now - last >= every:
            last = now
            rate = done / (now - t0)
            left = f", {_duration((total - done) / rate)} left" if total and rate > 0 else ""
            log.info("%s: %d%s (%.2f/s%s)", description, done, f"/{total}" if total else "", rate, left)


def track(iterable: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar on stderr (a terminal), or log lines (elsewhere), or silently (disabled).

    The loop is also where a command stops: Ctrl-C or SIGTERM during an item is raised (as
    :class:`derm._signals.Interrupted`) when the item is done, before the next one, never inside a library's C code.
    """
    with _signals.safe_points():
        for item in _shown(iterable, description, total):
            yield item
            _signals.check()
    _signals.check()


def _shown(iterable: Iterable[T], description: str, total: int | None) -> Iterator[T]:
    if os.environ.get("DERM_PROGRESS", "").lower() in ("0", "false", "no", "off"):
        yield from iterable
        return
    if not progress_enabled():
        yield from log_progress(iterable, description, total)
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
