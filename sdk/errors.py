"""User-facing errors. Each one says what was received and what to do."""

from __future__ import annotations


class DermError(Exception):
    """Base class of every error this package raises for bad user input."""


class TaxonomyError(DermError, ValueError):
    """The taxonomy file is malformed: the message names the offending node(s)."""


class PartitionError(DermError, ValueError):
    """A partition or aggregation request cannot be satisfied."""


class DatasetError(DermError, ValueError):
    """A labelled dataset has unknown labels, missing files or unreadable images.

    ``problems`` holds every problem found (not just the first), as ``(row, path, reason)`` tuples.
    """

    def __init__(self, message: str, problems: list[tuple[int, str, str]] | None = None):
        super().__init__(message)
        self.problems = problems or []


class WeightsError(DermError, ValueError):
    """Pretrained weights cannot be obtained, verified or loaded; the message says what was received and what to do."""
