"""The data side of a run: read the labelled CSV, partition the taxonomy, and give every image a role (train, val,
test; groups and near-duplicates never straddle them) and its per-image weight."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from derm.datasets import Dataset, read_dataset
from derm.errors import TaxonomyError
from derm.evaluation import dataset_level
from derm.partition import Partition, partition
from derm.splits import group_components, image_fingerprints, kfold, train_val_split
from derm.taxonomy import Taxonomy, default_taxonomy, load_taxonomy
from derm.trainer.config import Role, TrainConfig, TrainError

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """The data side of a run: dataset, partition, per-image targets and roles."""

    dataset: Dataset
    taxonomy: Taxonomy
    partition: Partition
    targets: np.ndarray  # training class per image, -1 where the label lies above/outside the partition
    roles: np.ndarray  # a Role value per image
    components: np.ndarray  # group component per image (lesion/patient + near-duplicates)
    sharpness: np.ndarray | None = None

    def indices(self, role: Role) -> np.ndarray:
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
    roles = _split_roles(cfg, ds, comps)
    roles[targets < 0] = Role.EXCLUDED
    sharp = _drop_blurry(cfg, ds, roles) if cfg.blurry_quantile > 0 else None
    present = set(targets[roles == Role.TRAIN].tolist())
    if len(present) < 2:
        raise TrainError(f"The training split holds {len(present)} training class(es); a classifier needs 2+.")
    return Prepared(ds, tax, part, targets, roles.astype(str), comps, sharp)


def _split_roles(cfg: TrainConfig, ds: Dataset, comps: np.ndarray) -> np.ndarray:
    """Train, val and test roles (an object array), whole group components at a time: the test set is the holdout
    rows, or fold ``cfg.fold`` of ``cfg.folds``, or none; validation is drawn from the rest."""
    roles = np.full(len(ds), Role.TRAIN, dtype=object)
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
        roles[test] = Role.TEST
        rest = np.nonzero(~test & ~np.isin(comps, list(shared)))[0]
        roles[np.nonzero(~test & np.isin(comps, list(shared)))[0]] = Role.EXCLUDED
        val = train_val_split(labels[rest], comps[rest], cfg.val_fraction, seed=cfg.seed)
        roles[rest[val]] = Role.VAL
    elif cfg.folds is not None:
        folds = kfold(labels, comps, k=cfg.folds, seed=cfg.seed)
        roles[folds == cfg.fold] = Role.TEST
        rest = np.nonzero(folds != cfg.fold)[0]
        val = train_val_split(labels[rest], comps[rest], cfg.val_fraction, seed=cfg.seed)
        roles[rest[val]] = Role.VAL
    else:
        val = train_val_split(labels, comps, cfg.val_fraction, seed=cfg.seed)
        roles[val] = Role.VAL
    return roles


def _drop_blurry(cfg: TrainConfig, ds: Dataset, roles: np.ndarray) -> np.ndarray:
    """Mark the validation and test images below the ``cfg.blurry_quantile`` sharpness as ``blurry_val`` /
    ``blurry_test`` (in ``roles``, in place); returns the sharpness of every image."""
    from derm.quality import sharpness_many, sharpness_threshold

    sharp = sharpness_many(ds.paths)
    thr = sharpness_threshold(sharp, cfg.blurry_quantile)
    blurred = {Role.VAL: Role.BLURRY_VAL, Role.TEST: Role.BLURRY_TEST}
    blurry = np.isin(roles, list(blurred)) & (sharp < thr)
    roles[blurry] = [blurred[r] for r in roles[blurry]]
    log.info("Dropped %d blurry images (sharpness < %.1f) from validation/test.", int(blurry.sum()), thr)
    return sharp


def class_weights_for(targets: np.ndarray, num_classes: int, how: str) -> dict[int, float] | None:
    from derm.trainer.data import class_weights

    return class_weights(targets, num_classes) if how == "balanced" else None


def sample_weights(cfg: TrainConfig, prep: Prepared, idx: np.ndarray) -> np.ndarray | None:
    """Per-image weights of the images ``idx``: class weight x source weight, scaled to mean 1 (None: unweighted)."""
    y = prep.targets[idx]
    cw = class_weights_for(y, len(prep.partition.classes), cfg.class_weighting)
    w = np.ones(len(idx)) if cw is None else np.asarray([cw[int(c)] for c in y])
    if cfg.source_weights:
        col = prep.dataset.extras[cfg.source_column]  # checked by prepare
        w = w * np.asarray([cfg.source_weights.get(col[i], 1.0) for i in idx])
    elif cw is None:
        return None
    return (w / w.mean()).astype(np.float32)
