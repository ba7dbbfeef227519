"""Bottleneck mode: the head trained on cached pooled features (and, with ``unfreeze_top``, the top Inception blocks
on the cached activations of the block below them, :mod:`derm.trainer.topblocks`).

The caches (:mod:`derm.trainer.features`) are filled in one pass over the images: the plain view of every held-out
image and ``views`` augmented views of every training image, keyed by the backbone's weights, input size, seed,
preprocessing and augmentation, so runs and folds share them and an interrupted pass resumes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from derm import metrics
from derm.trainer.config import Role, TrainConfig
from derm.trainer.prepare import Prepared, class_weights_for, sample_weights
from derm.trainer.rundir import EpochLog

log = logging.getLogger(__name__)


def feature_cache_path(cfg: TrainConfig, key: Any) -> Path:
    """``feature_cache``, else one file per cache key (backbone, input size, seed, preprocessing, augmentation) in
    the user's cache, so that a run at another input size or seed never meets a cache made for another setting."""
    if cfg.feature_cache:
        return Path(cfg.feature_cache)
    from derm._util import sha256_json
    from derm.trainer.weights import cache_dir

    return cache_dir() / "features" / f"{sha256_json(key.to_dict())[:16]}.sqlite"


def adopt_legacy_cache(path: Path, key: Any) -> None:
    """Caches made before the default name covered the whole key were named by the weights digest alone: rename such
    a file to ``path`` when it holds exactly ``key`` (a re-extraction of ~12,500 images saved); else leave it."""
    from derm.trainer.features import FeatureCache, FeatureCacheError
    from derm.trainer.weights import cache_dir

    old = cache_dir() / "features" / f"{key.weights_sha256[:16]}.sqlite"
    if path.exists() or old == path or not old.is_file():
        return
    try:
        if FeatureCache.stored_key(old) != key:
            return
    except FeatureCacheError:
        return
    os.replace(old, path)
    log.info("Feature cache %s renamed to %s (the name now covers the whole cache key).", old, path)


def activation_cache_path(cfg: TrainConfig, key: Any) -> Path:
    """Beside ``feature_cache`` (``NAME.mixed9.sqlite``), else one file per key in the user's cache."""
    if cfg.feature_cache:
        p = Path(cfg.feature_cache)
        return p.with_name(f"{p.stem}.{key.activation}{p.suffix or '.sqlite'}")
    return feature_cache_path(cfg, key)


def train_head(
    x_views: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    num_classes: int,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    dropout: float,
    class_weight: dict[int, float] | None,
    seed: int,
    history: EpochLog,
    on_epoch: Callable[[int], None] | None = None,
    sample_weight: np.ndarray | None = None,
) -> Any:
    """Train the softmax head on cached features: epoch ``e`` uses view ``e mod views`` of every image. Keeps the
    weights of the epoch with the best validation mean per-class accuracy (training classes). ``sample_weight``
    (per image, see :func:`sample_weights`) replaces ``class_weight`` when given."""
    import keras

    from derm.trainer.model import head_model

    keras.utils.set_random_seed(seed)
    head = head_model(x_views.shape[-1], num_classes, dropout)
    head.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=lr, weight_decay=weight_decay),
        loss="sparse_categorical_crossentropy",
    )
    best, best_weights = -1.0, head.get_weights()
    for epoch in range(epochs):
        x = x_views[epoch % len(x_views)]
        h = head.fit(
            x,
            y,
            batch_size=batch_size,
            epochs=epoch + 1,
            initial_epoch=epoch,
            class_weight=None if sample_weight is not None else class_weight,
            sample_weight=sample_weight,
            shuffle=True,
            verbose=0,
        )
        p = head.predict(x_val, batch_size=1024, verbose=0)
        mpca, _ = metrics.mean_per_class_accuracy(y_val, p.argmax(1), num_classes)
        val_loss = metrics.log_loss(y_val, p)
        history.add(
            stage="head", epoch=epoch + 1, loss=float(h.history["loss"][-1]), val_loss=val_loss, val_mpca=float(mpca)
        )
        if mpca > best:
            best, best_weights = float(mpca), head.get_weights()
        if on_epoch:
            on_epoch(epoch)
    head.set_weights(best_weights)
    return head


@dataclass
class _Cached:
    """What the bottleneck mode trains on, read from the caches: pooled features (views x images x features for
    training, images x features held out) and, for the top blocks, the cut's activations with the pooled blocks below
    it (per view for training, plain view held out)."""

    x_tr: np.ndarray
    x_va: np.ndarray
    x_te: np.ndarray
    a_tr: Any = None
    a_held: dict[str, Any] = field(default_factory=dict)


def fit_bottleneck(
    model: Any, cfg: TrainConfig, prep: Prepared, work: Path, history: EpochLog, timings: dict[str, float]
) -> dict[str, np.ndarray]:
    """Head on cached features, then (``unfreeze_top``) the top blocks on cached activations; the held-out images'
    probabilities computed from the caches, by role."""
    from derm.trainer.model import copy_head

    tr, va = prep.indices(Role.TRAIN), prep.indices(Role.VAL)
    n_cls = len(prep.partition.classes)
    feats = _cached_features(model, cfg, prep, timings)
    t = time.perf_counter()
    head = train_head(
        feats.x_tr,
        prep.targets[tr],
        feats.x_va,
        prep.targets[va],
        n_cls,
        epochs=cfg.head_epochs,
        lr=cfg.head_lr,
        weight_decay=cfg.weight_decay,
        batch_size=cfg.batch_size,
        dropout=cfg.dropout,
        class_weight=class_weights_for(prep.targets[tr], n_cls, cfg.class_weighting),
        seed=cfg.seed,
        history=history,
        sample_weight=sample_weights(cfg, prep, tr) if cfg.source_weights else None,
    )
    timings["head_s"] = time.perf_counter() - t
    copy_head(head, model)
    if not cfg.unfreeze_top:
        return {role: head.predict(x, verbose=0) for role, x in (("val", feats.x_va), ("test", feats.x_te)) if len(x)}
    from derm.trainer.topblocks import predict, train_top

    t = time.perf_counter()
    top = train_top(
        model,
        cfg,
        feats.a_tr,
        prep.targets[tr],
        feats.a_held["val"],
        prep.targets[va],
        num_classes=n_cls,
        sample_weight=sample_weights(cfg, prep, tr),
        history=history,
        work=work,
    )
    timings["top_blocks_s"] = time.perf_counter() - t
    return {role: predict(top, xs, cfg.batch_size) for role, xs in feats.a_held.items()}


def _cached_features(model: Any, cfg: TrainConfig, prep: Prepared, timings: dict[str, float]) -> _Cached:
    """Fill the feature cache (and the activation cache of the top blocks' cut, in the same pass) for the plain view
    of every held-out image and ``views`` augmented views of every training image, then read what training needs."""
    import keras

    from derm.trainer.features import FeatureCache, activation_key, cache_key, image_digests
    from derm.trainer.model import feature_extractor

    fe = feature_extractor(model)
    key = cache_key(fe, cfg.input_size, cfg.seed)  # the backbone's weights only, not the random head
    cache_path = feature_cache_path(cfg, key)
    if not cfg.feature_cache:
        adopt_legacy_cache(cache_path, key)
    digests = image_digests(prep.dataset.paths)
    t = time.perf_counter()
    with contextlib.ExitStack() as stack:
        caches = [stack.enter_context(FeatureCache(cache_path, key))]
        if cfg.unfreeze_top:  # the output of the block below the trained ones, from the same pass
            from derm.trainer.topblocks import cut_block

            cut = model.get_layer(cut_block(cfg.unfreeze_top)).output
            akey = activation_key(key, cut_block(cfg.unfreeze_top), tuple(cut.shape[1:]))
            caches.append(stack.enter_context(FeatureCache(activation_cache_path(cfg, akey), akey)))
            fe = keras.Model(fe.input, [fe.output, cut], name="feature_and_activation_cache")
        _extract_views(fe, caches, cfg, prep, digests)
        timings["features_s"] = time.perf_counter() - t
        return _read_cached(caches, cfg, prep, digests)


def _extract_views(fe: Any, caches: list[Any], cfg: TrainConfig, prep: Prepared, digests: list[str]) -> None:
    from derm.trainer.features import extract

    held = np.concatenate([prep.indices(Role.VAL), prep.indices(Role.TEST)])
    tr = prep.indices(Role.TRAIN)
    for idx, views, what in (
        (held, [0], "Features (plain views)"),
        (tr, list(range(1, cfg.views + 1)), "Features (augmented)"),
    ):
        paths, keys = [prep.dataset.paths[i] for i in idx], [digests[i] for i in idx]
        extract(fe, caches, paths, keys, views, batch_size=cfg.batch_size, description=what)


def _read_cached(caches: list[Any], cfg: TrainConfig, prep: Prepared, digests: list[str]) -> _Cached:
    from derm.trainer.model import feature_slice

    tr, va, te = prep.indices(Role.TRAIN), prep.indices(Role.VAL), prep.indices(Role.TEST)
    cols = feature_slice(cfg.pool_layers)
    views_tr = list(range(1, cfg.views + 1))
    cache = caches[0]
    rows = {
        "train": cache.get([digests[i] for i in tr], views_tr),
        "val": cache.get([digests[i] for i in va], [0]),
    }
    if len(te):
        rows["test"] = cache.get([digests[i] for i in te], [0])
    x_va = rows["val"][0][:, cols]
    out = _Cached(rows["train"][:, :, cols], x_va, rows["test"][0][:, cols] if len(te) else x_va[:0])
    if cfg.unfreeze_top:
        from derm.trainer.topblocks import below_cut, cached_inputs, cut_block

        below = below_cut(cut_block(cfg.unfreeze_top), cfg.pool_layers)
        out.a_tr = cached_inputs(caches[1], rows["train"], [digests[i] for i in tr], views_tr, below)
        out.a_held = {
            role: [x[0] for x in cached_inputs(caches[1], rows[role], [digests[i] for i in idx], [0], below)]
            for role, idx in (("val", va), ("test", te))
            if len(idx)
        }
    return out
