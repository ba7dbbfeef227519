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

    paths = [str(p) for p in paths]
    n = len(paths)
    if n == 0:
        raise ValueError("image_dataset needs at least one image path.")
    if targets is not None and len(targets) != n:
        raise ValueError(f"{len(targets)} targets for {n} images.")
    if sample_weights is not None and (targets is None or len(sample_weights) != n):
        raise ValueError(f"{len(sample_weights)} sample weights for {n} images (weights need targets too).")
    if keras.backend.backend() != "tensorflow":
        return _sequence_class()(
            paths, size, targets, sample_weights, augment, seed, batch_size, shuffle, repeat, steps, parallel
        )
    return _tf_dataset(paths, size, targets, sample_weights, augment, seed, batch_size, shuffle, repeat, parallel)


def _tf_dataset(
    paths: list[str],
    size: int,
    targets: Sequence[int] | None,
    sample_weights: Sequence[float] | None,
    augment: bool,
    seed: int,
    batch_size: int,
    shuffle: bool,
    repeat: bool,
    parallel: int | None,
) -> Any:
    import tensorflow as tf

    n = len(paths)

    def load(i: np.int64, epoch: np.int64) -> np.ndarray:
        return load_view(paths[int(i)], size, augment, seed, int(i), int(epoch))

    def one(i, epoch):
        img = tf.numpy_function(load, [i, epoch], tf.uint8, stateful=False)
        img = tf.ensure_shape(img, (size, size, 3))
        return tf.cast(img, tf.float32)

    epochs = tf.data.Dataset.range(1 if not repeat else 2**31 - 1)

    def epoch_indices(epoch):
        idx = tf.data.Dataset.range(n)
        if shuffle:
            idx = idx.shuffle(n, seed=seed + 1, reshuffle_each_iteration=True)
        return idx.map(lambda i: (i, epoch))

    # Without repeat, a dataset of known cardinality: Keras' predict/evaluate then stop cleanly at the end.
    ds = epochs.flat_map(epoch_indices) if repeat else epoch_indices(tf.constant(0, dtype=tf.int64))
    autotune = parallel or tf.data.AUTOTUNE
    if targets is not None:
        t = tf.constant(np.asarray(targets, dtype=np.int64))
        if sample_weights is not None:
            w = tf.constant(np.asarray(sample_weights, dtype=np.float32))
            ds = ds.map(
                lambda i, e: (one(i, e), tf.gather(t, i), tf.gather(w, i)),
                num_parallel_calls=autotune,
                deterministic=True,
            )
        else:
            ds = ds.map(lambda i, e: (one(i, e), tf.gather(t, i)), num_parallel_calls=autotune, deterministic=True)
    else:
        ds = ds.map(lambda i, e: one(i, e), num_parallel_calls=autotune, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


@cache
def _sequence_class() -> type:
    """:class:`ImageSequence`, made on first use so that importing this module does not import Keras."""
    import keras

    class ImageSequence(keras.utils.PyDataset):
        """The ``tf.data`` pipeline's stream as a ``PyDataset``: Keras epoch ``e``, batch ``j`` holds the positions
        ``(e * steps + j) * batch_size`` onwards of the stream of passes (pass ``k``: every image once, in the
        ``(seed + 1, k)`` permutation when shuffling, each as view ``k``); without ``repeat``, one pass."""

        def __init__(
            self,
            paths: list[str],
            size: int,
            targets: Sequence[int] | None,
            sample_weights: Sequence[float] | None,
            augment: bool,
            seed: int,
            batch_size: int,
            shuffle: bool,
            repeat: bool,
            steps: int | None,
            parallel: int | None,
        ) -> None:
            workers = parallel or min(32, os.cpu_count() or 1)
            super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=4 * workers)
            self.paths, self.size, self.augment, self.seed = paths, int(size), bool(augment), int(seed)
            self.targets = None if targets is None else np.asarray(targets, dtype=np.int64)
            self.weights = None if sample_weights is None else np.asarray(sample_weights, dtype=np.float32)
            self.batch_size, self.shuffle, self.repeat = int(batch_size), bool(shuffle), bool(repeat)
            one_pass = math.ceil(len(paths) / self.batch_size)
            self.steps = int(steps) if repeat and steps else one_pass
            self.epoch = 0  # Keras epochs served so far (on_epoch_end)

        def __len__(self) -> int:
            return self.steps

        def _order(self, k: int) -> np.ndarray:
            n = len(self.paths)
            return np.random.default_rng([self.seed + 1, k]).permutation(n) if self.shuffle else np.arange(n)

        def __getitem__(self, j: int) -> Any:
            n = len(self.paths)
            if self.repeat:
                start = (self.epoch * self.steps + int(j)) * self.batch_size
                pos = np.arange(start, start + self.batch_size)
            else:
                pos = np.arange(int(j) * self.batch_size, min(n, (int(j) + 1) * self.batch_size))
            passes = pos // n
            orders = {int(k): self._order(int(k)) for k in np.unique(passes)}
            idx = np.asarray([orders[int(k)][p % n] for k, p in zip(passes, pos, strict=True)])
            x = np.stack(
                [
                    load_view(self.paths[i], self.size, self.augment, self.seed, int(i), int(k))
                    for i, k in zip(idx, passes, strict=True)
                ]
            ).astype(np.float32)
            if self.targets is None:
                return x
            if self.weights is None:
                return x, self.targets[idx]
            return x, self.targets[idx], self.weights[idx]

        def on_epoch_end(self) -> None:
            self.epoch += 1

    return ImageSequence


def class_weights(targets: Sequence[int], num_classes: int) -> dict[int, float]:
    """Balanced class weights ``n / (classes present * count)``; classes with no images get weight 0."""
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes).astype(np.float64)
    present = int((counts > 0).sum())
    total = counts.sum()
    return {c: (float(total / (present * counts[c])) if counts[c] else 0.0) for c in range(num_classes)}
