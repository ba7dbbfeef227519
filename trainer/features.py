"""The bottleneck feature cache: the frozen backbone's pooled features of every view of every image, on disk.

Computing Inception-v3 on a CPU is the slow part of training; with a frozen backbone it need happen once per
(image, view). The cache is one SQLite file (atomic commits, so an interrupted extraction resumes where it stopped
and never leaves a half-written row) keyed by

- the backbone: a sha256 over its weights, the input size, the preprocessing and the augmentation version,
  stored in the file and checked on open, so a cache can never serve features of another model;
- the image: the sha256 of its file bytes (renaming or moving images keeps the cache valid);
- the view: 0 is the plain image (validation, test, inference), 1.. are augmented views (the paper's rotation,
  inscribed crop and flip), each drawn from a random stream fixed by (seed, image hash, view).

A row holds all of :data:`derm.trainer.model.POOLABLE` pooled and concatenated (float16), so the head can use any
subset of them. An *activation cache* (``CacheKey.activation``) holds instead one block's whole output (e.g. mixed9's
8x8x2048, float16) of the same views, so that the blocks above it can be trained without running the ones below
(:mod:`derm.trainer.topblocks`); both kinds are filled by one pass of :func:`extract`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from derm import _signals
from derm._progress import track
from derm._util import sha256_file
from derm.errors import DermError
from derm.preprocess import PreprocessSpec, load_image, resize
from derm.trainer.augment import augment as augment_view
from derm.trainer.augment import view_rng
from derm.trainer.model import POOL_DIMS, POOLABLE

log = logging.getLogger(__name__)

AUGMENT_VERSION = "rotate-inscribed-crop-vflip/1"
FEATURE_DIM = sum(POOL_DIMS[p] for p in POOLABLE)
SCHEMA = 1


class FeatureCacheError(DermError, ValueError):
    """The feature cache cannot be used as asked."""


def weights_digest(model: Any) -> str:
    """sha256 over every weight tensor of a Keras model (dtype, shape and bytes), in layer order.

    Names are left out: Keras numbers layers per process ("conv2d_94" in a second build), the values are what count.
    """
    h = hashlib.sha256()
    for w in model.weights:
        arr = np.ascontiguousarray(w.numpy())
        h.update(f"{arr.dtype}:{arr.shape};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def image_digests(paths: Sequence[str | os.PathLike[str]], workers: int | None = None) -> list[str]:
    """sha256 of each image file's bytes (threaded: I/O bound)."""
    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) * 2)) as pool:
        return list(pool.map(sha256_file, paths))


def view_image(path: str | os.PathLike[str], size: int, digest: str, view: int, seed: int) -> np.ndarray:
    """(size, size, 3) uint8: view 0 is the plain preprocessing, views >= 1 are augmented."""
    im = load_image(path)
    if view == 0:
        return resize(im, size)
    return augment_view(im, view_rng(seed, int(digest[:16], 16), view), size)


@dataclass(frozen=True)
class CacheKey:
    weights_sha256: str
    input_size: int
    seed: int
    preprocess: dict[str, Any]
    augment: str = AUGMENT_VERSION
    layers: tuple[str, ...] = POOLABLE
    schema: int = SCHEMA
    activation: str | None = None  # an activation cache: this block's output, unpooled
    shape: tuple[int, ...] | None = None  # its shape (without the batch axis)

    def __post_init__(self) -> None:
        if (self.activation is None) != (self.shape is None):
            raise FeatureCacheError("An activation cache key needs both the block name and its output shape.")

    @property
    def dim(self) -> int:
        """Values in one row."""
        return int(np.prod(self.shape)) if self.shape is not None else FEATURE_DIM

    def to_dict(self) -> dict[str, Any]:
        out = {
            "weights_sha256": self.weights_sha256,
            "input_size": self.input_size,
            "seed": self.seed,
            "preprocess": self.preprocess,
            "augment": self.augment,
            "layers": list(self.layers),
            "schema": self.schema,
        }
        if self.activation is not None:  # pooled-feature keys keep their old form (and their caches' file names)
            out.update(activation=self.activation, shape=list(self.shape or ()))
        return out


class FeatureCache:
    """One SQLite file of feature rows keyed by (image sha256, view), bound to one :class:`CacheKey`."""

    def __init__(self, path: str | os.PathLike[str], key: CacheKey):
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=60)
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS features (image TEXT NOT NULL, view INTEGER NOT NULL, "
                "data BLOB NOT NULL, PRIMARY KEY (image, view))"
            )
            row = self.db.execute("SELECT v FROM meta WHERE k = 'key'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise FeatureCacheError(
                f"{str(self.path)!r} is not a usable feature cache ({exc}). Delete it or choose another --cache."
            ) from exc
        want = json.dumps(key.to_dict(), sort_keys=True)
        if row is None:
            with self.db:
                self.db.execute("INSERT INTO meta VALUES ('key', ?)", (want,))
        elif row[0] != want:
            have = json.loads(row[0])
            diff = sorted(k for k in set(have) | set(key.to_dict()) if have.get(k) != key.to_dict().get(k))
            raise FeatureCacheError(
                f"Feature cache {str(self.path)!r} was made for another backbone or setting (differs in {diff}). "
                "Use another cache file; caches are per (weights, input size, seed)."
            )

    @staticmethod
    def stored_key(path: str | os.PathLike[str]) -> CacheKey:
        """The key an existing cache file was made with (to reopen it without rebuilding the backbone)."""
        path = Path(path)
        if not path.is_file():
            raise FeatureCacheError(f"No feature cache at {str(path)!r}.")
        try:
            with contextlib.closing(sqlite3.connect(path)) as db:
                row = db.execute("SELECT v FROM meta WHERE k = 'key'").fetchone()
            data = json.loads(row[0])
            shape = tuple(data["shape"]) if data.get("shape") is not None else None
            return CacheKey(**{**data, "layers": tuple(data["layers"]), "shape": shape})
        except (sqlite3.DatabaseError, TypeError, ValueError, KeyError) as exc:
            raise FeatureCacheError(f"{str(path)!r} is not a usable feature cache ({exc}).") from exc

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM features").fetchone()[0])

    def have(self) -> set[tuple[str, int]]:
        return {(str(a), int(b)) for a, b in self.db.execute("SELECT image, view FROM features")}

    def put(self, rows: Sequence[tuple[str, int, np.ndarray]]) -> None:
        """Store rows in one transaction (all or nothing)."""
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO features VALUES (?, ?, ?)",
                [(d, int(v), np.asarray(f, dtype=np.float16).tobytes()) for d, v, f in rows],
            )

    def get(self, digests: Sequence[str], views: Sequence[int], dtype: Any = np.float32) -> np.ndarray:
        """Array (len(views), len(digests), key.dim) of ``dtype``; raises if a row is missing. Activation rows are
        large: ask for float16 (as stored) to hold many in memory."""
        dim = self.key.dim
        out = np.empty((len(views), len(digests), dim), dtype=dtype)
        pos = {d: i for i, d in enumerate(digests)}
        found = np.zeros((len(views), len(digests)), dtype=bool)
        vpos = {int(v): j for j, v in enumerate(views)}
        uniq = sorted(pos)
        for start in range(0, len(uniq), 500):
            chunk = uniq[start : start + 500]
            q = ",".join("?" * len(chunk))
            for d, v, data in self.db.execute(f"SELECT image, view, data FROM features WHERE image IN ({q})", chunk):
                j = vpos.get(int(v))
                if j is None:
                    continue
                row = np.frombuffer(data, dtype=np.float16)
                if row.size != dim:
                    raise FeatureCacheError(f"Corrupt row in {str(self.path)!r} (image {d}, view {v}).")
                out[j, pos[d]] = row
                found[j, pos[d]] = True
        # duplicates (same bytes at two paths) share one row
        for j in range(len(views)):
            for i, d in enumerate(digests):
                if not found[j, i]:
                    src = pos[d]
                    if found[j, src]:
                        out[j, i] = out[j, src]
                        found[j, i] = True
        if not found.all():
            j, i = np.argwhere(~found)[0]
            raise FeatureCacheError(f"No cached features for image {digests[i]} view {views[j]}; extract them first.")
        return out


@dataclass
class ExtractStats:
    computed: int  # rows computed now
    reused: int  # rows already in the cache
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else float("nan")


def cache_key(extractor: Any, input_size: int, seed: int) -> CacheKey:
    """The key of a feature extractor (:func:`derm.trainer.model.feature_extractor`): its weights are the backbone's."""
    return CacheKey(
        weights_sha256=weights_digest(extractor),
        input_size=int(input_size),
        seed=int(seed),
        preprocess=PreprocessSpec(size=int(input_size)).to_dict(),
    )


def activation_key(features: CacheKey, block: str, shape: Sequence[int]) -> CacheKey:
    """The key of the cache of ``block``'s output for the same backbone, views and preprocessing as ``features``."""
    return dataclasses.replace(features, layers=(block,), activation=block, shape=tuple(int(d) for d in shape))


def _same_backbone(caches: list[FeatureCache]) -> None:
    """Refuse caches of different backbones or seeds: one extraction fills them all."""
    first = caches[0].key
    for c in caches[1:]:
        if (c.key.weights_sha256, c.key.input_size, c.key.seed) != (first.weights_sha256, first.input_size, first.seed):
            raise FeatureCacheError(
                f"{str(c.path)!r} belongs to another backbone or seed than {str(caches[0].path)!r}."
            )


def _missing(caches: list[FeatureCache], digests: Sequence[str], views: Sequence[int]) -> list[tuple[int, int]]:
    """``(image index, view)`` of the pairs missing from any cache, each image content once (duplicates share a row)."""
    have = set.intersection(*(c.have() for c in caches))
    todo: list[tuple[int, int]] = []
    seen: set[tuple[str, int]] = set()
    for v in views:
        for i, d in enumerate(digests):
            if (d, int(v)) not in have and (d, int(v)) not in seen:
                seen.add((d, int(v)))
                todo.append((i, int(v)))
    return todo


def _view_dataset(
    todo: list[tuple[int, int]],
    paths: Sequence[str],
    digests: Sequence[str],
    key: CacheKey,
    batch_size: int,
    parallel: int | None,
) -> Any:
    """A tf.data pipeline of ``(images, image indices, views)`` batches: decoding and augmentation in a parallel map,
    prefetched so that they overlap the backbone."""
    import tensorflow as tf

    size, seed = int(key.input_size), int(key.seed)

    def load(i: np.int64, v: np.int64) -> np.ndarray:
        return view_image(paths[int(i)], size, digests[int(i)], int(v), seed)

    def one(i, v):
        img = tf.numpy_function(load, [i, v], tf.uint8, stateful=False)
        return tf.cast(tf.ensure_shape(img, (size, size, 3)), tf.float32), i, v

    pairs = np.asarray(todo, dtype=np.int64)
    ds = tf.data.Dataset.from_tensor_slices((pairs[:, 0], pairs[:, 1]))
    ds = ds.map(one, num_parallel_calls=parallel or tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(2)


def extract(
    extractor: Any,
    cache: FeatureCache | Sequence[FeatureCache],
    paths: Sequence[str | os.PathLike[str]],
    digests: Sequence[str],
    views: Sequence[int],
    *,
    batch_size: int = 32,
    parallel: int | None = None,
    description: str = "features",
) -> ExtractStats:
    """Compute and store the rows of (image, view) pairs not yet cached. Resumable: commits every batch.

    With several caches (of one backbone, seed and input size) the extractor has one output per cache, in order, and
    a pair missing from any of them is computed once and stored in all. Decoding and augmentation run in tf.data's
    parallel map and overlap the backbone (prefetch).
    """
    import tensorflow as tf

    caches = [cache] if isinstance(cache, FeatureCache) else list(cache)
    _same_backbone(caches)
    todo = _missing(caches, digests, views)
    reused = len(paths) * len(views) - len(todo)
    t0 = time.perf_counter()
    if not todo:
        return ExtractStats(0, reused, 0.0)

    @tf.function(reduce_retracing=True)
    def run(x):
        out = extractor(x, training=False)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    steps = (len(todo) + batch_size - 1) // batch_size
    # Ctrl-C while the pipeline is built (TensorFlow traces its functions) waits, as in the loop, for a batch's end
    with _signals.safe_points():
        ds = _view_dataset(todo, [str(p) for p in paths], digests, caches[0].key, batch_size, parallel)
        for x, idx, vs in track(ds, description, total=steps):
            outs = run(x)
            if len(outs) != len(caches):
                raise FeatureCacheError(f"The extractor gives {len(outs)} output(s) for {len(caches)} cache(s).")
            keys = [(digests[int(i)], int(v)) for i, v in zip(idx.numpy(), vs.numpy(), strict=True)]
            for c, out in zip(caches, outs, strict=True):
                rows = out.numpy().reshape(len(keys), -1)
                c.put([(d, v, f) for (d, v), f in zip(keys, rows, strict=True)])
    seconds = time.perf_counter() - t0
    log.info("%s: %d rows computed (%.1f/s), %d reused.", description, len(todo), len(todo) / seconds, reused)
    return ExtractStats(len(todo), reused, seconds)
