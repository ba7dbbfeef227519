"""Small helpers shared across the package: hashing, atomic writes, label normalisation."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def normalize_label(label: str) -> str:
    """Canonical form of a dataset label or alias.

    Lower-cased, every run of non-alphanumeric characters turned into one ``_``, leading and trailing ``_``
    stripped: ``"Seborrheic keratosis"``, ``"seborrheic_keratosis"`` and ``"SEBORRHEIC-KERATOSIS"`` are one label.
    """
    return _NON_ALNUM.sub("_", str(label).strip().lower()).strip("_")


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the form that is hashed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def first_hash_mismatch(folder: str | os.PathLike[str], files: dict[str, str]) -> tuple[str, str | None] | None:
    """The first of ``files`` (name -> recorded sha256) that is missing from ``folder`` (``(name, None)``) or whose
    sha256 differs (``(name, its sha256)``); None when every file matches."""
    for name, want in files.items():
        path = Path(folder) / name
        if not path.is_file():
            return name, None
        got = sha256_file(path)
        if got != want:
            return name, got
    return None


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[Any]:
    """Open a temporary file beside ``path``; rename it over ``path`` only if the block succeeds.

    Nothing half-written is ever left at ``path``: on an exception the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result is an ordinary file, readable as the umask allows
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def unwritable(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` (a file or folder to be created or replaced) cannot be written, in words; None when it can.

    Checked before long work, so that a bad output path fails in a second, not after minutes of computation: the
    nearest existing folder above ``path`` must be a folder and writable.
    """
    path = Path(path)
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        return f"{str(parent)!r} is a file, not a folder"
    if not os.access(parent, os.W_OK):
        return f"the folder {str(parent)!r} is not writable"
    return None


def not_utf8(path: str | os.PathLike[str], exc: UnicodeDecodeError) -> str:
    """The one wording for a text file that is not UTF-8 (echoes the file and where the bad byte is)."""
    return f"{str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
