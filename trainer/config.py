"""A training run's configuration: :class:`TrainConfig` (every option of ``derm-train``, and every key of a config
file), its checks, and config files."""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from derm._util import not_utf8
from derm.errors import DermError

log = logging.getLogger(__name__)


class Mode(enum.StrEnum):
    """What a run trains: a head on cached bottleneck features (then optionally the top blocks), or every layer."""

    BOTTLENECK = "bottleneck"
    FINETUNE = "finetune"


class Role(enum.StrEnum):
    """An image's role in a run (the ``role`` column of its ``split.csv``): trained on, validated on, tested on, left
    out (its label lies outside the partition, or its group straddles the holdout), or a held-out image dropped as
    blurry (``blurry_quantile``)."""

    TRAIN = "train"
    VAL = "val"
    TEST = "test"
    EXCLUDED = "excluded"
    BLURRY_VAL = "blurry_val"
    BLURRY_TEST = "blurry_test"


class ClassWeighting(enum.StrEnum):
    BALANCED = "balanced"
    NONE = "none"


class Strategy(enum.StrEnum):
    """tf.distribute: auto (mirrored when several GPUs), default, mirrored."""

    AUTO = "auto"
    DEFAULT = "default"
    MIRRORED = "mirrored"


MODES = tuple(Mode)
CLASS_WEIGHTING = tuple(ClassWeighting)
STRATEGIES = tuple(Strategy)


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
    mode: str = Mode.BOTTLENECK.value
    weights: str = "inception-2015"  # inception-2015 | imagenet | none | PATH.weights.h5
    input_size: int = 299
    pool_layers: list[str] = field(default_factory=lambda: ["mixed10"])
    dropout: float = 0.0
    batch_size: int = 32
    class_weighting: str = ClassWeighting.BALANCED.value
    # per-image weight by the value of a column, multiplied into the class weights (every mode), e.g.
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
    time_budget_s: float | None = None  # finetune: stop after the first epoch ending this long after training began
    # split
    val_fraction: float = 0.1
    folds: int | None = None  # k-fold cross-validation: hold out fold `fold` as the test set
    fold: int | None = None
    holdout: str | None = None  # "COLUMN=VALUE": rows with that value are the test set (e.g. split=validation)
    near_duplicates: bool = True  # join near-identical images into one group before splitting
    blurry_quantile: float = 0.0  # drop images below this sharpness quantile from validation and test (not train)
    calibrate: bool = True  # fit a temperature on the validation images and fold it into the logits (calibrate.py)
    strategy: str = Strategy.AUTO.value  # tf.distribute: auto (mirrored when several GPUs), default, mirrored
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
        """Refuse a configuration that cannot run, with the first problem found (types first, then each group)."""
        self._check_types()
        self._check_choices()
        self._check_numbers()
        self._check_top_blocks()
        self._check_split()
        if self.steps_per_epoch is not None and (not isinstance(self.steps_per_epoch, int) or self.steps_per_epoch < 1):
            raise self._bad("steps_per_epoch", "a positive integer or None")
        self._check_source_weights()
        if self.time_budget_s is not None:
            if not (isinstance(self.time_budget_s, (int, float)) and self.time_budget_s > 0):
                raise self._bad("time_budget_s", "a positive number of seconds or None")
            if self.mode != "finetune":
                raise TrainError(
                    "time_budget_s bounds every-layer fine-tuning (mode finetune); received it with "
                    f"mode={self.mode!r}."
                )

    def _bad(self, name: str, want: str) -> TrainError:
        return TrainError(f"{name} must be {want}; received {getattr(self, name)!r}.")

    def _check_types(self) -> None:
        """Every option of its annotated type (path objects turned into the strings runs store)."""
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

    def _check_choices(self) -> None:
        """The options that name one of a few choices."""
        if self.mode not in MODES:
            raise self._bad("mode", f"one of {', '.join(MODES)}")
        if self.class_weighting not in CLASS_WEIGHTING:
            raise self._bad("class_weighting", f"one of {', '.join(CLASS_WEIGHTING)}")
        if self.strategy not in STRATEGIES:
            raise self._bad("strategy", f"one of {', '.join(STRATEGIES)}")

    def _check_numbers(self) -> None:
        """Counts, fractions and learning rates in their ranges."""
        for name in ("max_class_size", "input_size", "batch_size", "head_epochs", "epochs", "lr_drop_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise self._bad(name, "a positive integer")
        for name in ("views", "unfreeze_top", "seed", "patience"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise self._bad(name, "a non-negative integer")
        if self.mode == "bottleneck" and self.views < 1:
            raise self._bad("views", "at least 1 in bottleneck mode")
        if not 0 < self.val_fraction < 0.5:
            raise self._bad("val_fraction", "between 0 and 0.5")
        if not 0 <= self.blurry_quantile < 0.5:
            raise self._bad("blurry_quantile", "in [0, 0.5)")
        for name in ("head_lr", "lr", "lr_drop_factor"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                raise self._bad(name, "a positive number")

    def _check_top_blocks(self) -> None:
        """``unfreeze_top``: bottleneck mode only, and at most the three blocks above mixed7."""
        if self.unfreeze_top and self.mode != "bottleneck":
            raise TrainError("unfreeze_top applies to bottleneck mode (finetune mode trains every layer already).")
        if self.unfreeze_top > 3:
            raise self._bad(
                "unfreeze_top",
                "at most 3 (mixed8..mixed10 train on the cached output of mixed7; below it the cache outgrows a disk), "
                "or use mode finetune to train every layer (a GPU)",
            )

    def _check_split(self) -> None:
        """The test set: folds and fold together and in range, or a holdout ``COLUMN=VALUE``, not both."""
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
            raise self._bad("holdout", "of the form COLUMN=VALUE (e.g. split=validation)")
        if self.holdout is not None and self.folds is not None:
            raise TrainError("Give either holdout (a fixed test set) or folds/fold, not both.")

    def _check_source_weights(self) -> None:
        """``source_weights``: positive weights (every mode: the head, the top blocks and every-layer fine-tuning)."""
        if self.source_weights is None:
            return
        if not isinstance(self.source_weights, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
            for k, v in self.source_weights.items()
        ):
            raise self._bad("source_weights", f"a mapping of {self.source_column} values to positive weights")


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
