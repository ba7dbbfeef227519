"""Training runs: data -> partition -> group-aware split -> model -> run directory.

Two modes (see docs/training.md):

- ``bottleneck``: the backbone stays frozen; the pooled features of ``views`` augmented views of every training
  image (and the plain view of every validation image) are computed once into the feature cache
  (:mod:`derm.trainer.features`) and the softmax head is trained on them. Optionally the top ``unfreeze_top``
  (1-3) Inception blocks are then fine-tuned with the head, with the paper's optimizer, on the cached output of the
  block below them (:mod:`derm.trainer.topblocks`): affordable on a CPU.
- ``finetune``: every layer trained on augmented images with the paper's recipe: RMSProp (lr 0.001, rho 0.9,
  momentum 0.9, epsilon 0.1), learning rate divided by 16 every 30 epochs.

A run is written into ``OUT.partial`` and renamed to ``OUT`` when complete, so ``OUT`` is never half-written; a run
interrupted during finetuning resumes from its last epoch (``keras.callbacks.BackupAndRestore``, or the top blocks'
own checkpoint) and feature extraction resumes from the cache.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import shutil
import time
import types
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from derm import metrics
from derm._util import atomic_write, not_utf8, sha256_file, unwritable
from derm.datasets import Dataset, read_dataset
from derm.errors import DermError, TaxonomyError
from derm.evaluation import dataset_level, evaluate, format_summary, summary_row
from derm.partition import Partition, partition
from derm.preprocess import PreprocessSpec
from derm.splits import group_components, image_fingerprints, kfold, train_val_split
from derm.taxonomy import Taxonomy, default_taxonomy, load_taxonomy
from derm.trainer.weights import versions as weight_versions

log = logging.getLogger(__name__)

MODES = ("bottleneck", "finetune")
CLASS_WEIGHTING = ("balanced", "none")
STRATEGIES = ("auto", "default", "mirrored")
RUN_FORMAT = 1
EVAL_LEVELS: tuple[str, ...] = ("three", "nine", "labels")


class TrainError(DermError, ValueError):
    """A training run cannot start or continue as configured."""


@dataclass
class TrainConfig:
    """Every option of a run. ``derm-train`` options and config files (YAML or JSON) map onto these fields."""

    data: str  # labelled CSV (image, label[, group]) — see derm.read_dataset
    out: str  # run directory to create
    taxonomy: str | None = None  # YAML/JSON taxonomy; None: the default tree
    image_column: str = "image"
    label_column: str = "label"
    group_column: str | None = "auto"
    max_class_size: int = 1000  # the paper's maxClassSize
    within: str | list[str] = "nine"  # inference level each training class must lie under ("labels": the CSV's)
    mode: str = "bottleneck"
    weights: str = "inception-2015"  # inception-2015 | imagenet | none | PATH.weights.h5
    input_size: int = 299
    pool_layers: list[str] = field(default_factory=lambda: ["mixed10"])
    dropout: float = 0.0
    batch_size: int = 32
    class_weighting: str = "balanced"
    # per-image weight by the value of a column, multiplied into the class weights (bottleneck head only), e.g.
    # {"pad_ufes20": 8.0} with source_column "source" so that 360 phone photos are not drowned by 12,000 dermoscopy
    # images; values not listed weigh 1
    source_weights: dict[str, float] | None = None
    source_column: str = "source"
    seed: int = 0
    # bottleneck head
    views: int = 4  # augmented views per training image in the feature cache
    head_epochs: int = 40
    head_lr: float = 1e-3
    weight_decay: float = 1e-4
    feature_cache: str | None = None  # SQLite file; default $DERM_CACHE/features/<digest>.sqlite
    # finetune (and the top blocks after a bottleneck head)
    unfreeze_top: int = 0  # bottleneck only: top Inception blocks (1-3, from mixed10 down) fine-tuned after the head
    patience: int = 5  # top blocks: stop after this many epochs without a better validation mpca (0: never)
    epochs: int = 30
    lr: float = 1e-3
    lr_drop_every: int = 30  # epochs
    lr_drop_factor: float = 16.0
    steps_per_epoch: int | None = None  # None: one pass over the training images
    # split
    val_fraction: float = 0.1
    folds: int | None = None  # k-fold cross-validation: hold out fold `fold` as the test set
    fold: int | None = None
    holdout: str | None = None  # "COLUMN=VALUE": rows with that value are the test set (e.g. split=validation)
    near_duplicates: bool = True  # join near-identical images into one group before splitting
    blurry_quantile: float = 0.0  # drop images below this sharpness quantile from validation and test (not train)
    calibrate: bool = True  # fit a temperature on the validation images and fold it into the logits (calibrate.py)
    strategy: str = "auto"  # tf.distribute: auto (mirrored when several GPUs), default, mirrored
    overwrite: bool = False
    skip_bad: bool = False  # leave out rows with unknown labels or missing / unreadable images (else refuse the CSV)

    # ------------------------------------------------------------------ construction and checks
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TrainError(f"Unknown option(s) {unknown} in {source}. Known: {sorted(names)}.")
        missing = [n for n in ("data", "out") if n not in data]
        if missing:
            raise TrainError(f"{source} lacks required option(s) {missing}.")
        cfg = cls(**dict(data))
        cfg.check()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self) -> None:
        def bad(name: str, want: str) -> TrainError:
            return TrainError(f"{name} must be {want}; received {getattr(self, name)!r}.")

        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # paths may be given as Path objects from Python; runs store strings
            if isinstance(getattr(self, f.name), os.PathLike) and _has_type("", hints[f.name]):
                setattr(self, f.name, os.fspath(getattr(self, f.name)))
        for f in dataclasses.fields(self):
            if not _has_type(getattr(self, f.name), hints[f.name]):
                v = getattr(self, f.name)
                raise TrainError(
                    f"{f.name} must be {_type_words(hints[f.name])}; received {v!r} ({type(v).__name__}). Fix it in "
                    "the config file or the command line."
                )
        if self.mode not in MODES:
            raise bad("mode", f"one of {', '.join(MODES)}")
        if self.class_weighting not in CLASS_WEIGHTING:
            raise bad("class_weighting", f"one of {', '.join(CLASS_WEIGHTING)}")
        if self.strategy not in STRATEGIES:
            raise bad("strategy", f"one of {', '.join(STRATEGIES)}")
        for name in ("max_class_size", "input_size", "batch_size", "head_epochs", "epochs", "lr_drop_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, "a positive integer")
        for name in ("views", "unfreeze_top", "seed", "patience"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise bad(name, "a non-negative integer")
        if self.mode == "bottleneck" and self.views < 1:
            raise bad("views", "at least 1 in bottleneck mode")
        if not 0 < self.val_fraction < 0.5:
            raise bad("val_fraction", "between 0 and 0.5")
        if not 0 <= self.blurry_quantile < 0.5:
            raise bad("blurry_quantile", "in [0, 0.5)")
        for name in ("head_lr", "lr", "lr_drop_factor"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                raise bad(name, "a positive number")
        if self.unfreeze_top and self.mode != "bottleneck":
            raise TrainError("unfreeze_top applies to bottleneck mode (finetune mode trains every layer already).")
        if self.unfreeze_top > 3:
            raise bad(
                "unfreeze_top",
                "at most 3 (mixed8..mixed10 train on the cached output of mixed7; below it the cache outgrows a disk), "
                "or use mode finetune to train every layer (a GPU)",
            )
        if (self.folds is None) != (self.fold is None):
            raise TrainError(
                f"Give both folds and fold (held-out fold index), or neither; received {self.folds!r}, {self.fold!r}."
            )
        if self.folds is not None and not (
            isinstance(self.folds, int)
            and self.folds >= 2
            and isinstance(self.fold, int)
            and 0 <= self.fold < self.folds
        ):
            raise TrainError(
                f"folds must be >= 2 and 0 <= fold < folds; received folds={self.folds!r}, fold={self.fold!r}."
            )
        if self.holdout is not None and (not isinstance(self.holdout, str) or "=" not in self.holdout):
            raise bad("holdout", "of the form COLUMN=VALUE (e.g. split=validation)")
        if self.holdout is not None and self.folds is not None:
            raise TrainError("Give either holdout (a fixed test set) or folds/fold, not both.")
        if self.steps_per_epoch is not None and (not isinstance(self.steps_per_epoch, int) or self.steps_per_epoch < 1):
            raise bad("steps_per_epoch", "a positive integer or None")
        if self.source_weights is not None:
            if not isinstance(self.source_weights, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                for k, v in self.source_weights.items()
            ):
                raise bad("source_weights", f"a mapping of {self.source_column} values to positive weights")
            if self.mode != "bottleneck":
                raise TrainError(
                    "source_weights weigh the training images of the cached modes; they are not implemented for "
                    f"mode={self.mode!r}. Leave them out there."
                )


def _has_type(value: Any, hint: Any) -> bool:
    """``value`` is of the annotated type (JSON/YAML shapes: int is not bool, a float accepts an int)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_has_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _has_type(k, args[0]) and _has_type(v, args[1]) for k, v in value.items()
        )
    return isinstance(value, hint)


def _type_words(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        words = " or ".join(_type_words(a) for a in args if a is not type(None))
        return f"{words}, or null" if type(None) in args else words
    if origin in (list, tuple):
        return f"a list of {_type_words(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return f"a mapping of {_type_words(args[0])} to {_type_words(args[1])}"
    words = {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}
    return words.get(hint, getattr(hint, "__name__", str(hint)))


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML or JSON mapping of :class:`TrainConfig` fields."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise TrainError(f"Config file not found: {str(path)!r}.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TrainError(f"Config file {not_utf8(path, exc)}.") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise TrainError(f"Cannot parse config file {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise TrainError(f"Config file {str(path)!r} must hold a mapping of options, found {type(data).__name__}.")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


# ----------------------------------------------------------------------------------------------- data


@dataclass
class Prepared:
    """The data side of a run: dataset, partition, per-image targets and roles."""

    dataset: Dataset
    taxonomy: Taxonomy
    partition: Partition
    targets: np.ndarray  # training class per image, -1 where the label lies above/outside the partition
    roles: np.ndarray  # "train" | "val" | "test" | "excluded" | "blurry_val" | "blurry_test"
    components: np.ndarray  # group component per image (lesion/patient + near-duplicates)
    sharpness: np.ndarray | None = None

    def indices(self, role: str) -> np.ndarray:
        return np.nonzero(self.roles == role)[0]


def _within(tax: Taxonomy, ds: Dataset, within: str | Sequence[str]) -> str | tuple[str, ...]:
    if isinstance(within, str) and within == "labels":
        try:
            return tax.level(dataset_level(tax, ds.nodes))
        except TaxonomyError as exc:
            raise TrainError(
                f"within='labels' needs labels that do not contain each other; in this dataset {exc}. Use "
                "within='nine' with a --max-class-size small enough to give every label its own training class (the "
                "partition then splits the parent's own images into a ':self' class)."
            ) from None
    return within if isinstance(within, str) else tuple(within)


def _check_columns(cfg: TrainConfig, ds: Dataset) -> None:
    """The columns that holdout and source_weights name exist, before minutes of fingerprinting and features."""
    from derm.datasets import csv_header

    needs = []
    if cfg.holdout is not None:
        needs.append(("holdout", cfg.holdout.split("=", 1)[0], "--holdout COLUMN=VALUE"))
    if cfg.source_weights:
        needs.append(("source_weights", cfg.source_column, "--source-column"))
    for what, col, fix in needs:
        if col not in ds.extras:
            raise TrainError(
                f"{what} needs a {col!r} column in {cfg.data!r}; its columns are {csv_header(cfg.data)}. Name "
                f"another column with {fix}."
            )
    if cfg.source_weights:
        values = set(ds.extras[cfg.source_column])
        unknown = sorted(set(cfg.source_weights) - values)
        if unknown:
            raise TrainError(
                f"source_weights name {unknown}, which no row's {cfg.source_column!r} holds; values: {sorted(values)}."
            )


def prepare(cfg: TrainConfig) -> Prepared:
    """Read the data, partition the taxonomy and assign every image a role (group-aware)."""
    tax = load_taxonomy(cfg.taxonomy) if cfg.taxonomy else default_taxonomy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped rows are logged with their list by read_dataset
        ds = read_dataset(
            cfg.data,
            tax,
            image_column=cfg.image_column,
            label_column=cfg.label_column,
            group_column=cfg.group_column,
            on_error="skip" if cfg.skip_bad else "raise",
            check_images="decode" if cfg.skip_bad else "header",  # skipping promises that what is left decodes
        )
    _check_columns(cfg, ds)
    within = _within(tax, ds, cfg.within)
    part = partition(tax, ds.counts(), cfg.max_class_size, within=within)
    targets = np.asarray([-1 if (c := part.class_of(n)) is None else c for n in ds.nodes], dtype=np.int64)
    if (targets < 0).any():
        log.warning(
            "%d images are labelled above or outside the inference level %r and are not used for training.",
            int((targets < 0).sum()),
            cfg.within,
        )
    fp = image_fingerprints(ds.paths) if cfg.near_duplicates else None
    comps = group_components(len(ds), ds.groups, fp)
    roles = np.full(len(ds), "train", dtype=object)
    labels = np.asarray(ds.nodes)
    if cfg.holdout is not None:
        col, value = cfg.holdout.split("=", 1)
        test = np.asarray([v == value for v in ds.extras[col]])
        if not test.any():
            raise TrainError(f"No row of {cfg.data!r} has {col} = {value!r} (values: {sorted(set(ds.extras[col]))}).")
        shared = set(comps[test].tolist()) & set(comps[~test].tolist())
        if shared:
            log.warning(
                "%d groups of images straddle the holdout and the rest; those rows leave the training set.", len(shared)
            )
        roles[test] = "test"
        rest = np.nonzero(~test & ~np.isin(comps, list(shared)))[0]
        roles[np.nonzero(~test & np.isin(comps, list(shared)))[0]] = "excluded"
        val = train_val_split(labels[rest], comps[rest], cfg.val_fraction, seed=cfg.seed)
        roles[rest[val]] = "val"
    elif cfg.folds is not None:
        folds = kfold(labels, comps, k=cfg.folds, seed=cfg.seed)
        roles[folds == cfg.fold] = "test"
        rest = np.nonzero(folds != cfg.fold)[0]
        val = train_val_split(labels[rest], comps[rest], cfg.val_fraction, seed=cfg.seed)
        roles[rest[val]] = "val"
    else:
        val = train_val_split(labels, comps, cfg.val_fraction, seed=cfg.seed)
        roles[val] = "val"
    roles[targets < 0] = "excluded"
    sharp = None
    if cfg.blurry_quantile > 0:
        from derm.quality import sharpness_many, sharpness_threshold

        sharp = sharpness_many(ds.paths)
        thr = sharpness_threshold(sharp, cfg.blurry_quantile)
        held_out = np.isin(roles, ["val", "test"])
        blurry = held_out & (sharp < thr)
        roles[blurry] = np.char.add("blurry_", roles[blurry].astype(str))  # blurry_val, blurry_test
        log.info("Dropped %d blurry images (sharpness < %.1f) from validation/test.", int(blurry.sum()), thr)
    for role in ("train", "val"):
        present = set(targets[roles == role].tolist())
        if role == "train" and len(present) < 2:
            raise TrainError(f"The training split holds {len(present)} training class(es); a classifier needs 2+.")
    return Prepared(ds, tax, part, targets, roles.astype(str), comps, sharp)


# ------------------------------------------------------------------------------------------ helpers


def _strategy(name: str) -> Any:
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if name == "mirrored" or (name == "auto" and len(gpus) > 1):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _class_weights(targets: np.ndarray, num_classes: int, how: str) -> dict[int, float] | None:
    from derm.trainer.data import class_weights

    return class_weights(targets, num_classes) if how == "balanced" else None


def sample_weights(cfg: TrainConfig, prep: Prepared, idx: np.ndarray) -> np.ndarray | None:
    """Per-image weights of the images ``idx``: class weight x source weight, scaled to mean 1 (None: unweighted)."""
    y = prep.targets[idx]
    cw = _class_weights(y, len(prep.partition.classes), cfg.class_weighting)
    w = np.ones(len(idx)) if cw is None else np.asarray([cw[int(c)] for c in y])
    if cfg.source_weights:
        col = prep.dataset.extras[cfg.source_column]  # checked by prepare
        w = w * np.asarray([cfg.source_weights.get(col[i], 1.0) for i in idx])
    elif cw is None:
        return None
    return (w / w.mean()).astype(np.float32)


def _json(path: Path, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_np_default)
        f.write("\n")


def _np_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


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


# -------------------------------------------------------------------------------------- head training


@dataclass
class EpochLog:
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, **row: Any) -> None:
        self.rows.append(row)
        log.info("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))


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


# ---------------------------------------------------------------------------------------------- run


def _write_static(work: Path, cfg: TrainConfig, prep: Prepared) -> None:
    work.mkdir(parents=True, exist_ok=True)
    _json(work / "config.json", cfg.to_dict())
    _json(work / "taxonomy.json", prep.taxonomy.to_dict())
    _json(work / "partition.json", prep.partition.to_dict())
    _json(work / "preprocess.json", PreprocessSpec(size=cfg.input_size).to_dict())
    _json(work / "versions.json", weight_versions())
    ds = prep.dataset
    with atomic_write(work / "split.csv", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "node", "group", "component", "role", "target"])
        for i in range(len(ds)):
            w.writerow(
                [
                    str(ds.paths[i]),
                    ds.labels[i],
                    ds.nodes[i],
                    ds.groups[i] if ds.groups else "",
                    int(prep.components[i]),
                    prep.roles[i],
                    int(prep.targets[i]),
                ]
            )


def _predictions_csv(path: Path, prep: Prepared, idx: np.ndarray, probs: np.ndarray) -> None:
    labels = prep.partition.labels
    with atomic_write(path, newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "node", "role", *labels])
        for row, i in zip(probs, idx, strict=True):
            w.writerow(
                [
                    str(prep.dataset.paths[i]),
                    prep.dataset.labels[i],
                    prep.dataset.nodes[i],
                    prep.roles[i],
                    *(f"{p:.6g}" for p in row),
                ]
            )


def _evaluate_split(prep: Prepared, idx: np.ndarray, probs: np.ndarray, seed: int) -> dict[str, Any]:
    nodes = [prep.dataset.nodes[i] for i in idx]
    levels: list[str | Sequence[str]] = list(EVAL_LEVELS)
    return evaluate(probs, nodes, prep.partition, levels=levels, seed=seed)


def _predict_images(model: Any, prep: Prepared, idx: np.ndarray, size: int, batch: int) -> np.ndarray:
    from derm.trainer.data import image_dataset

    if len(idx) == 0:
        return np.zeros((0, len(prep.partition.classes)), np.float32)
    ds = image_dataset([prep.dataset.paths[i] for i in idx], size, batch_size=batch)
    return model.predict(ds, verbose=0)


def _finetune(
    model: Any, cfg: TrainConfig, prep: Prepared, work: Path, history: EpochLog, trainable_from: int | None
) -> None:
    """Train with the paper's optimizer and schedule on augmented images (all layers, or from a layer on)."""
    import keras

    from derm.trainer.data import image_dataset

    tr, va = prep.indices("train"), prep.indices("val")
    for i, layer in enumerate(model.layers):
        layer.trainable = trainable_from is None or i >= trainable_from
    steps = cfg.steps_per_epoch or math.ceil(len(tr) / cfg.batch_size)
    schedule = keras.optimizers.schedules.ExponentialDecay(
        cfg.lr, decay_steps=cfg.lr_drop_every * steps, decay_rate=1.0 / cfg.lr_drop_factor, staircase=True
    )
    opt = keras.optimizers.RMSprop(learning_rate=schedule, rho=0.9, momentum=0.9, epsilon=0.1)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    train_ds = image_dataset(
        [prep.dataset.paths[i] for i in tr],
        cfg.input_size,
        targets=prep.targets[tr],
        augment=True,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        shuffle=True,
        repeat=True,
    )
    y_val = prep.targets[va]
    n_cls = len(prep.partition.classes)
    best_path = work / "best.weights.h5"

    class ValMPCA(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.best = -1.0

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            p = _predict_images(self.model, prep, va, cfg.input_size, cfg.batch_size)
            mpca, _ = metrics.mean_per_class_accuracy(y_val, p.argmax(1), n_cls)
            lr = float(schedule(epoch * steps))
            history.add(
                stage="finetune",
                epoch=epoch + 1,
                loss=float((logs or {}).get("loss", float("nan"))),
                val_mpca=float(mpca),
                lr=lr,
            )
            if mpca > self.best:
                self.best = float(mpca)
                tmp = best_path.with_name(".best.tmp.weights.h5")
                self.model.save_weights(tmp, overwrite=True)
                os.replace(tmp, best_path)

    callbacks = [keras.callbacks.BackupAndRestore(str(work / "backup"), delete_checkpoint=True), ValMPCA()]
    keras.utils.set_random_seed(cfg.seed)
    model.fit(
        train_ds,
        epochs=cfg.epochs,
        steps_per_epoch=steps,
        class_weight=_class_weights(prep.targets[tr], n_cls, cfg.class_weighting),
        callbacks=callbacks,
        verbose=0,
        shuffle=False,  # the dataset shuffles itself, reproducibly per seed
    )
    if best_path.is_file():
        model.load_weights(best_path)
        best_path.unlink()


def is_run_directory(path: Path) -> bool:
    """A folder derm-train wrote: its run.json names the files it holds, and it holds nothing else but those and the
    files written beside them later (exports, evaluations)."""
    try:
        run = json.loads((path / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(run, dict) and run.get("format") == RUN_FORMAT and isinstance(run.get("files"), dict)


def check_out(out: Path, overwrite: bool) -> None:
    """``--out`` can be written: a new or empty folder, or (with ``overwrite``) a run directory; never a file or a
    folder of something else, which ``--overwrite`` would delete."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {str(out)!r} is a file, not a folder; choose a folder for the run directory.")
    problem = unwritable(out)
    if problem:
        raise TrainError(f"--out {str(out)!r}: {problem}; choose another --out.")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise TrainError(
            f"Run directory {str(out)!r} exists and is not empty. Choose another --out or pass --overwrite."
        )
    if not is_run_directory(out):
        held = sorted(p.name for p in out.iterdir())
        shown = ", ".join(held[:6]) + (f" and {len(held) - 6} more" if len(held) > 6 else "")
        raise TrainError(
            f"{str(out)!r} is not a run directory written by derm-train (no valid run.json; it holds {shown}). "
            "--overwrite replaces only run directories, so nothing was deleted: choose another --out."
        )


def train(cfg: TrainConfig | Mapping[str, Any]) -> Path:
    """Run one training as configured; returns the finished run directory."""
    from derm.datasets import readable_images

    if not isinstance(cfg, TrainConfig):
        cfg = TrainConfig.from_dict(cfg)
    cfg.check()
    with readable_images(cfg.data):
        return _train(cfg)


def _train(cfg: TrainConfig) -> Path:
    out = Path(cfg.out)
    check_out(out, cfg.overwrite)
    work = out.with_name(out.name + ".partial")
    if (work / "config.json").is_file():
        prev = json.loads((work / "config.json").read_text(encoding="utf-8"))
        if prev != json.loads(json.dumps(cfg.to_dict())):
            log.warning("Discarding the unfinished run in %s: it had another configuration.", work)
            shutil.rmtree(work)
        else:
            log.info("Resuming the unfinished run in %s.", work)
    t0 = time.perf_counter()
    prep = prepare(cfg)
    _write_static(work, cfg, prep)
    import keras

    from derm.trainer.model import build_model, copy_head, feature_slice

    n_cls = len(prep.partition.classes)
    keras.utils.set_random_seed(cfg.seed)
    history = EpochLog()
    timings: dict[str, float] = {}
    with _strategy(cfg.strategy).scope():
        model = build_model(n_cls, cfg.input_size, cfg.weights, cfg.pool_layers, cfg.dropout)
    tr, va, te = prep.indices("train"), prep.indices("val"), prep.indices("test")
    cached_eval: dict[str, np.ndarray] = {}
    if cfg.mode == "bottleneck":
        from derm.trainer.features import FeatureCache, activation_key, cache_key, extract, image_digests
        from derm.trainer.model import feature_extractor

        fe = feature_extractor(model)
        key = cache_key(fe, cfg.input_size, cfg.seed)  # the backbone's weights only, not the random head
        cache_path = feature_cache_path(cfg, key)
        if not cfg.feature_cache:
            adopt_legacy_cache(cache_path, key)
        digests = image_digests(prep.dataset.paths)
        t = time.perf_counter()
        with contextlib.ExitStack() as stack:
            cache = stack.enter_context(FeatureCache(cache_path, key))
            caches = [cache]
            if cfg.unfreeze_top:  # the output of the block below the trained ones, from the same pass
                from derm.trainer.topblocks import cut_block

                cut = model.get_layer(cut_block(cfg.unfreeze_top)).output
                akey = activation_key(key, cut_block(cfg.unfreeze_top), tuple(cut.shape[1:]))
                caches.append(stack.enter_context(FeatureCache(activation_cache_path(cfg, akey), akey)))
                fe = keras.Model(fe.input, [fe.output, cut], name="feature_and_activation_cache")
            held = np.concatenate([va, te])
            extract(
                fe,
                caches,
                [prep.dataset.paths[i] for i in held],
                [digests[i] for i in held],
                [0],
                batch_size=cfg.batch_size,
                description="Features (plain views)",
            )
            extract(
                fe,
                caches,
                [prep.dataset.paths[i] for i in tr],
                [digests[i] for i in tr],
                list(range(1, cfg.views + 1)),
                batch_size=cfg.batch_size,
                description="Features (augmented)",
            )
            timings["features_s"] = time.perf_counter() - t
            cols = feature_slice(cfg.pool_layers)
            views_tr = list(range(1, cfg.views + 1))
            rows = {
                "train": cache.get([digests[i] for i in tr], views_tr),
                "val": cache.get([digests[i] for i in va], [0]),
            }
            if len(te):
                rows["test"] = cache.get([digests[i] for i in te], [0])
            x_tr = rows["train"][:, :, cols]
            x_va = rows["val"][0][:, cols]
            x_te = rows["test"][0][:, cols] if len(te) else x_va[:0]
            if cfg.unfreeze_top:
                from derm.trainer.topblocks import below_cut, cached_inputs

                below = below_cut(cut_block(cfg.unfreeze_top), cfg.pool_layers)
                a_tr = cached_inputs(caches[1], rows["train"], [digests[i] for i in tr], views_tr, below)
                a_held = {
                    role: [x[0] for x in cached_inputs(caches[1], rows[role], [digests[i] for i in idx], [0], below)]
                    for role, idx in (("val", va), ("test", te))
                    if len(idx)
                }
            del rows
        t = time.perf_counter()
        head = train_head(
            x_tr,
            prep.targets[tr],
            x_va,
            prep.targets[va],
            n_cls,
            epochs=cfg.head_epochs,
            lr=cfg.head_lr,
            weight_decay=cfg.weight_decay,
            batch_size=cfg.batch_size,
            dropout=cfg.dropout,
            class_weight=_class_weights(prep.targets[tr], n_cls, cfg.class_weighting),
            seed=cfg.seed,
            history=history,
            sample_weight=sample_weights(cfg, prep, tr) if cfg.source_weights else None,
        )
        timings["head_s"] = time.perf_counter() - t
        copy_head(head, model)
        if cfg.unfreeze_top:
            from derm.trainer.topblocks import predict, train_top

            t = time.perf_counter()
            top = train_top(
                model,
                cfg,
                a_tr,
                prep.targets[tr],
                a_held["val"],
                prep.targets[va],
                num_classes=n_cls,
                sample_weight=sample_weights(cfg, prep, tr),
                history=history,
                work=work,
            )
            timings["top_blocks_s"] = time.perf_counter() - t
            cached_eval = {role: predict(top, xs, cfg.batch_size) for role, xs in a_held.items()}
            del a_tr
        else:
            cached_eval = {role: head.predict(x, verbose=0) for role, x in (("val", x_va), ("test", x_te)) if len(x)}
    else:
        t = time.perf_counter()
        _finetune(model, cfg, prep, work, history, None)
        timings["finetune_s"] = time.perf_counter() - t
    for layer in model.layers:
        layer.trainable = True  # saved models load trainable; the exporter and users decide what to freeze
    result: dict[str, Any] = {"format": RUN_FORMAT, "mode": cfg.mode}
    roles = {role: idx for role, idx in (("val", va), ("test", te)) if len(idx)}
    by_role: dict[str, np.ndarray] = {}
    for role, idx in roles.items():
        cached = cached_eval.get(role)
        by_role[role] = (
            cached if cached is not None else _predict_images(model, prep, idx, cfg.input_size, cfg.batch_size)
        )
    if cfg.calibrate and "val" in by_role:
        from derm.trainer.calibrate import apply_temperature, calibrate, fold_temperature

        t, result["calibration"] = calibrate(by_role, {role: prep.targets[idx] for role, idx in roles.items()})
        if t is None:
            log.warning("Not calibrated: %s.", result["calibration"]["skipped"])
        else:
            fold_temperature(model, t)  # the saved model, and every export of it, gives the calibrated probabilities
            by_role = {role: apply_temperature(p, t) for role, p in by_role.items()}
            cal = result["calibration"]["val"]
            log.info("Temperature %.3f: validation ECE %.3f -> %.3f.", t, cal["ece_before"], cal["ece_after"])
    for role, idx in roles.items():
        probs = by_role[role]
        result[role] = _evaluate_split(prep, idx, probs, cfg.seed)
        result[role]["source"] = (
            "model on images"
            if role not in cached_eval
            else "activation cache (plain view)"
            if cfg.unfreeze_top
            else "feature cache (plain view)"
        )
        _predictions_csv(work / f"predictions_{role}.csv", prep, idx, probs)
        log.info("%s:\n%s", role, format_summary(result[role]))
    timings["total_s"] = time.perf_counter() - t0
    result["timings"] = timings
    result["data"] = prep.dataset.describe()
    result["data"]["roles"] = {r: int((prep.roles == r).sum()) for r in np.unique(prep.roles)}
    _json(work / "metrics.json", result)
    with atomic_write(work / "history.csv", newline="") as f:
        keys = sorted(
            {k for r in history.rows for k in r}, key=["stage", "epoch", "loss", "val_loss", "val_mpca", "lr"].index
        )
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history.rows)
    tmp_model = work / ".model.tmp.keras"
    model.save(tmp_model)
    os.replace(tmp_model, work / "model.keras")
    run = {
        "format": RUN_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "taxonomy_sha256": prep.taxonomy.sha256,
        "partition_sha256": prep.partition.sha256,
        "classes": prep.partition.labels,
        "input_size": cfg.input_size,
        "files": {p.name: sha256_file(p) for p in sorted(work.iterdir()) if p.is_file() and p.name != "run.json"},
    }
    _json(work / "run.json", run)
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)
    log.info("Run written to %s (%.0f s).", out, timings["total_s"])
    return out


# ---------------------------------------------------------------------------------- cross-validation


def cross_validate(cfg: TrainConfig | Mapping[str, Any], folds: int = 9) -> Path:
    """k-fold cross-validation (group-aware): ``OUT/fold_K`` runs plus ``OUT/cv.json`` and ``OUT/cv.md``."""
    if not isinstance(cfg, TrainConfig):
        cfg = TrainConfig.from_dict(cfg)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {str(out)!r} is a file, not a folder; choose a folder for the fold runs.")
    problem = unwritable(out / "fold_0")
    if problem:
        raise TrainError(f"--out {str(out)!r}: {problem}; choose another --out.")
    rows = []
    for k in range(folds):
        sub = dataclasses.replace(cfg, out=str(out / f"fold_{k}"), folds=folds, fold=k)
        sub.check()
        run = sub.out
        if (Path(run) / "run.json").is_file() and not cfg.overwrite:
            log.info("Fold %d already done: %s", k, run)
        else:
            train(sub)
        res = json.loads((Path(run) / "metrics.json").read_text(encoding="utf-8"))
        rows.append({"fold": k, **summary_row(res["test"])})
    summary = summarize_folds(rows)
    _json(out / "cv.json", {"folds": rows, "summary": summary, "config": cfg.to_dict()})
    with atomic_write(out / "cv.md") as f:
        f.write(cv_markdown(rows, summary))
    return out


def summarize_folds(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    keys = [k for k in rows[0] if k not in ("fold", "n")]
    out = {}
    for k in keys:
        vals = np.asarray([r[k] for r in rows if r.get(k) is not None], dtype=np.float64)
        if len(vals):
            out[k] = {
                "mean": float(vals.mean()),
                "sd": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                "min": float(vals.min()),
                "max": float(vals.max()),
            }
    return out


def cv_markdown(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Mapping[str, float]]) -> str:
    keys = [k for k in summary if not k.endswith(("_lo", "_hi"))]
    lines = ["| fold | n | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for r in rows:
        lines.append(
            f"| {r['fold']} | {r['n']} | "
            + " | ".join(f"{r[k]:.3f}" if r.get(k) is not None else "" for k in keys)
            + " |"
        )
    lines.append(
        "| mean ± sd | | " + " | ".join(f"{summary[k]['mean']:.3f} ± {summary[k]['sd']:.3f}" for k in keys) + " |"
    )
    return "\n".join(lines) + "\n"


__all__ = ["TrainConfig", "TrainError", "cross_validate", "prepare", "read_config_file", "train"]
