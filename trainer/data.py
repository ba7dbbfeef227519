"""tf.data input pipeline: parallel decode with the SDK's own preprocessing, the paper's augmentation, prefetch."""

from __future__ import annotations

import os
from collections.abc import Sequence

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
    augment: bool = False,
    seed: int = 0,
    batch_size: int = 32,
    shuffle: bool = False,
    repeat: bool = False,
    parallel: int | None = None,
):
    """A ``tf.data.Dataset`` of float32 images in 0..255 (the model scales), with targets when given.

    Deterministic for a seed: image ``i`` in epoch ``e`` gets augmentation stream ``(seed, i, e)``.
    """
    import tensorflow as tf

    paths = [str(p) for p in paths]
    n = len(paths)
    if n == 0:
        raise ValueError("image_dataset needs at least one image path.")
    if targets is not None and len(targets) != n:
        raise ValueError(f"{len(targets)} targets for {n} images.")

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
        ds = ds.map(lambda i, e: (one(i, e), tf.gather(t, i)), num_parallel_calls=autotune, deterministic=True)
    else:
        ds = ds.map(lambda i, e: one(i, e), num_parallel_calls=autotune, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def class_weights(targets: Sequence[int], num_classes: int) -> dict[int, float]:
    """Balanced class weights ``n / (classes present * count)``; classes with no images get weight 0."""
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes).astype(np.float64)
    present = int((counts > 0).sum())
    total = counts.sum()
    return {c: (float(total / (present * counts[c])) if counts[c] else 0.0) for c in range(num_classes)}
