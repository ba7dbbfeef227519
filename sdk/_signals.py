"""Ctrl-C and SIGTERM for the command line: turned into :class:`Interrupted` in the main thread, at a safe point.

A signal raised wherever it lands can land inside a library's C code (TensorFlow's nest flatten turns it into a
SystemError and prints a traceback of its own). So inside the loops of long work (every :func:`derm._progress.track`
is one) a signal is held and raised between two items, where the loop's own clean-up runs as usual; a second signal
while one is held is raised at once. Outside those loops, and for a command that installs no handler (the SDK used as a
library keeps Python's KeyboardInterrupt), nothing changes.

A signal raised outside a loop can still land where Python cannot raise it: in a finalizer (``__del__``, TensorFlow's
functions are freed there), where it is printed as "Exception ignored" and dropped, and the command would go on to
the end. While :func:`handled` is active such a swallowed signal is held instead and raised at the next safe point.
A signal the process was started ignoring (a background job of a script, ``nohup``) stays ignored, as Python does.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from typing import Any

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM, raised in the main thread so that ``finally`` blocks and context managers clean up. Not a
    KeyboardInterrupt, so that the command line's own handler (click's "Aborted!") does not swallow it first."""


received: list[str] = []  # the signals received while the command ran
_held: list[str] = []  # a signal waiting for the next safe point
_depth = [0]  # how many safe-point loops are running


def on_signal(signum: int, frame: Any) -> None:
    """The handler :func:`derm._cli.run_app` installs: hold the signal inside a safe-point loop, else raise it."""
    name = signal.Signals(signum).name
    received.append(name)
    if _depth[0] > 0 and not _held:
        _held.append(name)
        return
    _held.clear()
    raise Interrupted(name)


@contextlib.contextmanager
def safe_points() -> Iterator[None]:
    """A region where a signal waits for :func:`check` (call it between the items of a loop)."""
    _depth[0] += 1
    try:
        check()  # a signal swallowed since the last loop stops the command before this one starts
        yield
    finally:
        _depth[0] -= 1


def _unraisable(hook: Any, unraisable: Any) -> None:
    """``sys.unraisablehook`` while handled: a swallowed :class:`Interrupted` waits for the next safe point."""
    if isinstance(unraisable.exc_value, Interrupted):
        _held[:] = [str(unraisable.exc_value)]
        return
    hook(unraisable)


def check() -> None:
    """Raise the held signal, if any: call it where stopping leaves everything sound (between two items)."""
    if _held:
        raise Interrupted(_held.pop())


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` (at safe points where there are some) while the block runs."""
    previous = {s: signal.signal(s, on_signal) for s in HANDLED if signal.getsignal(s) is not signal.SIG_IGN}
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: _unraisable(hook, unraisable)
    try:
        yield
    finally:
        sys.unraisablehook = hook
        _held.clear()
        for s, h in previous.items():
            signal.signal(s, h)
