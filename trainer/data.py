"""Input pipeline for images: parallel decode with the SDK's own preprocessing, the paper's augmentation, prefetch.

Under Keras' TensorFlow backend a ``tf.data`` pipeline; under any other backend (JAX on a GPU machine that has no
TensorFlow) a ``keras.utils.PyDataset`` fed by threads (Pillow releases the GIL while it decodes, rotates and
resizes). Both serve the same views: image ``i`` in pass ``k`` over the data is view ``(seed, i, k)`` of
:func:`derm.trainer.augment.view_rng`, so a run's augmentation does not depend on the backend; only the shuffled
order of a pass differs (``tf.data``'s shuffle against numpy's permutation).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from derm.preprocess import load_image, resize
from derm.trainer.augment import augment as augment_view
from derm.trainer.augment import view_rng


def load_view(path: str | os.PathLike[str], size: int, augment: bool, seed: int, index: int, view: int) -> np.ndarray:
    """One (size, size, 3) uint8 view of an image: the plain preprocessing, or an augmented view."""
    im = load_image(path)
    if not augment:
        return resize(im, size)
    return augment_view(im, view_rng(seed, index, view), size)


@dataclass(frozen=True)
class Stream:
    """What :func:`image_dataset` serves: ``paths`` at ``size``, with ``targets`` (and per-image ``weights``), plain or
    augmented views, in batches; ``repeat``: endless passes, reshuffled each pass when ``shuffle``; ``steps``: batches
    in one Keras epoch of the ``PyDataset`` (None: one pass); ``parallel``: decoding workers (None: automatic)."""

    paths: tuple[str, ...]
    size: int
    targets: np.ndarray | None = None
    weights: np.ndarray | None = None
    augment: bool = False
    seed: int = 0
    batch_size: int = 32
    shuffle: bool = False
    repeat: bool = False
    steps: int | None = None
    parallel: int | None = None

    def view(self, i: int, k: int) -> np.ndarray:
        """Image ``i`` as it appears in pass ``k`` over the data."""
        return load_view(self.paths[i], self.size, self.augment, self.seed, i, k)


def image_dataset(
    paths: Sequence[str | os.PathLike[str]],
    size: int,
    *,
    targets: Sequence[int] | None = None,
    sample_weights: Sequence[float] | None = None,
    augment: bool = False,
    seed: int = 0,
    batch_size: int = 32,
    shuffle: bool = False,
    repeat: bool = False,
    steps: int | None = None,
    parallel: int | None = None,
) -> Any:
    """Batches of float32 images in 0..255 (the model scales), with targets (and per-image weights) when given.

    Deterministic for a seed: image ``i`` in pass ``k`` over the data gets augmentation stream ``(seed, i, k)``.
    ``repeat``: an endless stream of passes, reshuffled each pass; ``steps`` batches make one Keras epoch of the
    ``PyDataset`` (default: one pass). Returns a ``tf.data.Dataset`` under the TensorFlow backend, else a
    ``keras.utils.PyDataset``.
    """
    import keras

    n = len(paths)
    if n == 0:
        raise ValueError("image_dataset needs at least one image path.")
    if targets is not None and len(targets) != n:
        raise ValueError(f"{len(targets)} targets for {n} images.")
    if sample_weights is not None and (targets is None or len(sample_weights) != n):
        raise ValueError(f"{len(sample_weights)} sample weights for {n} images (weights need targets too).")
    stream = Stream(
        tuple(str(p) for p in paths),
        int(size),
        None if targets is None else np.asarray(targets, dtype=np.int64),
        None if sample_weights is None else np.asarray(sample_weights, dtype=np.float32),
        bool(augment),
        int(seed),
        int(batch_size),
        bool(shuffle),
        bool(repeat),
        steps,
        parallel,
    )
    return _tf_dataset(stream) if keras.backend.backend() == "tensorflow" else _sequence_class()(stream)


def _tf_dataset(s: Stream) -> Any:
    import tensorflow as tf

    n = len(s.paths)

    def load(i: np.int64, epoch: np.int64) -> np.ndarray:
        return s.view(int(i), int(epoch))

    def one(i, epoch):
        img = tf.numpy_function(load, [i, epoch], tf.uint8, stateful=False)
        img = tf.ensure_shape(img, (s.size, s.size, 3))
        return tf.cast(img, tf.float32)

    epochs = tf.data.Dataset.range(1 if not s.repeat else 2**31 - 1)

    def epoch_indices(epoch):
        idx = tf.data.Dataset.range(n)
        if s.shuffle:
            idx = idx.shuffle(n, seed=s.seed + 1, reshuffle_each_iteration=True)
        return idx.map(lambda i: (i, epoch))

    # Without repeat, a dataset of known cardinality: Keras' predict/evaluate then stop cleanly at the end.
    ds = epochs.flat_map(epoch_indices) if s.repeat else epoch_indices(tf.constant(0, dtype=tf.int64))
    autotune = s.parallel or tf.data.AUTOTUNE
    if s.targets is None:
        ds = ds.map(lambda i, e: one(i, e), num_parallel_calls=autotune, deterministic=True)
    elif s.weights is None:
        t = tf.constant(s.targets)
        ds = ds.map(lambda i, e: (one(i, e), tf.gather(t, i)), num_parallel_calls=autotune, deterministic=True)
    else:
        t, w = tf.constant(s.targets), tf.constant(s.weights)
        ds = ds.map(
            lambda i, e: (one(i, e), tf.gather(t, i), tf.gather(w, i)), num_parallel_calls=autotune, deterministic=True
        )
    return ds.batch(s.batch_size).prefetch(tf.data.AUTOTUNE)


@cache
def _sequence_class() -> type:
    """:class:`ImageSequence`, made on first use so that importing this module does not import Keras."""
    import keras

    class ImageSequence(keras.utils.PyDataset):
        """The ``tf.data`` pipeline's stream as a ``PyDataset``: Keras epoch ``e``, batch ``j`` holds the positions
        ``(e * steps + j) * batch_size`` onwards of the stream of passes (pass ``k``: every image once, in the
        ``(seed + 1, k)`` permutation when shuffling, each as view ``k``); without ``repeat``, one pass."""

        def __init__(self, stream: Stream) -> None:
            workers = stream.parallel or min(32, os.cpu_count() or 1)
            super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=4 * workers)
            self.s = stream
            one_pass = math.ceil(len(stream.paths) / stream.batch_size)
            self.steps = int(stream.steps) if stream.repeat and stream.steps else one_pass
            self.epoch = 0  # Keras epochs served so far (on_epoch_end)

        def __len__(self) -> int:
            return self.steps

        def _order(self, k: int) -> np.ndarray:
            n = len(self.s.paths)
            return np.random.default_rng([self.s.seed + 1, k]).permutation(n) if self.s.shuffle else np.arange(n)

        def __getitem__(self, j: int) -> Any:
            s, n = self.s, len(self.s.paths)
            if s.repeat:
                start = (self.epoch * self.steps + int(j)) * s.batch_size
                pos = np.arange(start, start + s.batch_size)
            else:
                pos = np.arange(int(j) * s.batch_size, min(n, (int(j) + 1) * s.batch_size))
            passes = pos // n
            orders = {int(k): self._order(int(k)) for k in np.unique(passes)}
            idx = np.asarray([orders[int(k)][p % n] for k, p in zip(passes, pos, strict=True)])
            x = np.stack([s.view(int(i), int(k)) for i, k in zip(idx, passes, strict=True)]).astype(np.float32)
            if s.targets is None:
                return x
            if s.weights is None:
                return x, s.targets[idx]
            return x, s.targets[idx], s.weights[idx]

        def on_epoch_end(self) -> None:
            self.epoch += 1

    return ImageSequence


def class_weights(targets: Sequence[int], num_classes: int) -> dict[int, float]:
    """Balanced class weights ``n / (classes present * count)``; classes with no images get weight 0."""
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes).astype(np.float64)
    present = int((counts > 0).sum())
    total = counts.sum()
    return {c: (float(total / (present * counts[c])) if counts[c] else 0.0) for c in range(num_classes)}
