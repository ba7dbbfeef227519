"""The cache of converted backbone weights: where it lives, the JSON sidecar beside each ``.weights.h5`` (hashes and
versions), the check that a cached file is intact and the atomic save of a new one. Used by
:mod:`derm.trainer.weights`, which re-exports these names."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from derm._util import atomic_write, sha256_file
from derm._version import __version__

if TYPE_CHECKING:
    import keras

log = logging.getLogger("derm.trainer.weights")  # the name its messages had before the split


def cache_dir() -> Path:
    """Where converted weights live: ``$DERM_CACHE``, else ``~/.cache/derm``."""
    env = os.environ.get("DERM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "derm"


def sidecar_path(weights: Path) -> Path:
    """The JSON beside a ``.weights.h5``: ``x.weights.h5`` -> ``x.json``."""
    name = weights.name
    stem = name[: -len(".weights.h5")] if name.endswith(".weights.h5") else weights.stem
    return weights.with_name(stem + ".json")


def versions() -> dict[str, str]:
    import h5py
    import keras

    versions = {"derm": __version__, "python": platform.python_version(), "numpy": np.__version__}
    versions["keras"] = keras.__version__
    versions["h5py"] = h5py.__version__
    with contextlib.suppress(Exception):
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
    return versions


def cached(weights: Path) -> bool:
    """True when ``weights`` and its sidecar exist and the sidecar's sha256 matches the file."""
    side = sidecar_path(weights)
    if not (weights.is_file() and side.is_file()):
        return False
    try:
        recorded = json.loads(side.read_text(encoding="utf-8"))["weights"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("Unreadable sidecar %s (%s); converting again.", side, exc)
        return False
    got = sha256_file(weights)
    if got != recorded:
        log.warning("Cached %s has sha256 %s, its sidecar records %s; converting again.", weights, got, recorded)
        return False
    return True


def save_cached(model: keras.Model, dest: Path, meta: dict[str, Any]) -> Path:
    """``model.save_weights`` to a temporary file beside ``dest``, sidecar first, then an atomic rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".weights.h5", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.unlink()  # Keras refuses to overwrite without asking
        model.save_weights(str(tmp))
        meta = {
            **meta,
            "weights": {"file": dest.name, "size": tmp.stat().st_size, "sha256": sha256_file(tmp)},
            "parameters": int(model.count_params()),
            "versions": versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        with atomic_write(sidecar_path(dest)) as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    log.info("Cached %s (%s bytes).", dest, f"{dest.stat().st_size:,}")
    return dest
