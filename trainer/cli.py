"""``derm-train``: train the classifier (``train``), cross-validate it (``cv``), obtain pretrained weights
(``weights``). Every option is also a :class:`derm.trainer.config.TrainConfig` field and a config-file key."""

from __future__ import annotations

import dataclasses
import enum
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from derm._cli import cli_app, fail, setup_logging, user_errors
from derm.errors import DermError
from derm.trainer.config import ClassWeighting, Mode, Strategy, TrainConfig
from derm.trainer.reference_cli import reference_app
from derm.trainer.weights_cli import weights_app

app = cli_app(
    "derm-train",
    "Train the skin-lesion classifier (Esteva et al. 2017 recipe). A research aid, not a diagnostic device.",
)
app.add_typer(weights_app, name="weights")
app.add_typer(reference_app, name="reference")


@app.callback()
def _main() -> None:
    setup_logging(logging.INFO)


def _markup(help: str) -> str:
    """Help text with its "[default]" markers kept: the help renderer reads "[word]" as a style and drops it."""
    return help.replace("[", "\\[")


_DEFAULTS = dataclasses.asdict(TrainConfig(data="", out=""))  # every field's default, factories included


def _default(name: str) -> str:
    """The config dataclass's default of option ``name``, as the help shows it (one source for both)."""
    value = _DEFAULTS[name]
    return ",".join(value) if isinstance(value, list) else str(value)


def _opt(help: str, *names: str, default_of: str | None = None) -> Any:
    """An option whose help ends with its default, read from :class:`TrainConfig` when ``default_of`` names a field."""
    if default_of is not None:
        help = f"{help.rstrip('.')} [{_default(default_of)}]."
    return typer.Option(*names, help=_markup(help), show_default=False)


def _config(config: Path | None, given: dict[str, Any]) -> Any:
    from derm.trainer.config import read_config_file

    data = read_config_file(config) if config else {}
    data.update({k: (v.value if isinstance(v, enum.Enum) else v) for k, v in given.items() if v is not None})
    if "pool_layers" in data and isinstance(data["pool_layers"], str):
        data["pool_layers"] = [p.strip() for p in data["pool_layers"].split(",") if p.strip()]
    if "within" in data and isinstance(data["within"], str) and "," in data["within"]:
        data["within"] = [p.strip() for p in data["within"].split(",") if p.strip()]
    return TrainConfig.from_dict(data, source=str(config) if config else "the options")


CONFIG = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML/JSON file of options (CLI wins).", exists=True, dir_okay=False),
]
DATA = Annotated[str | None, _opt("Labelled CSV (image, label[, lesion_id/patient_id]).", "--data")]
OUT = Annotated[str | None, _opt("Run directory to create.", "--out")]
TAXONOMY = Annotated[str | None, _opt("Taxonomy YAML/JSON (default: the built-in tree).", "--taxonomy")]
MCS = Annotated[int | None, _opt("The paper's maxClassSize.", "--max-class-size", default_of="max_class_size")]
WITHIN = Annotated[
    str | None,
    _opt(
        "Inference level training classes must lie under: three, nine, labels (the CSV's own diagnoses) or node "
        "ids joined by commas.",
        "--within",
        default_of="within",
    ),
]
MODE = Annotated[
    Mode | None, _opt("A head on cached features (then --unfreeze-top), or every layer.", "--mode", default_of="mode")
]
WEIGHTS = Annotated[
    str | None, _opt("inception-2015, imagenet, none or a .weights.h5.", "--weights", default_of="weights")
]
SIZE = Annotated[int | None, _opt("Input side in pixels.", "--input-size", default_of="input_size")]
POOL = Annotated[
    str | None,
    _opt(
        "Pooled blocks feeding the head, e.g. mixed7,mixed8,mixed9,mixed10.", "--pool-layers", default_of="pool_layers"
    ),
]
VIEWS = Annotated[int | None, _opt("Augmented views per training image (bottleneck).", "--views", default_of="views")]
HEAD_EPOCHS = Annotated[int | None, _opt("Head epochs (bottleneck).", "--head-epochs", default_of="head_epochs")]
UNFREEZE = Annotated[
    int | None,
    _opt(
        "After the head, fine-tune the top 1-3 Inception blocks on cached activations of the block below.",
        "--unfreeze-top",
        default_of="unfreeze_top",
    ),
]
PATIENCE = Annotated[
    int | None,
    _opt(
        "Top blocks: stop after this many epochs without a better validation score.",
        "--patience",
        default_of="patience",
    ),
]
EPOCHS = Annotated[int | None, _opt("Fine-tuning epochs.", "--epochs", default_of="epochs")]
LR = Annotated[float | None, _opt("Fine-tuning learning rate.", "--lr", default_of="lr")]
BATCH = Annotated[int | None, _opt("Batch size.", "--batch-size", default_of="batch_size")]
STEPS = Annotated[int | None, _opt("Steps per fine-tuning epoch [one pass].", "--steps-per-epoch")]
BUDGET = Annotated[
    float | None,
    _opt("Finetune: stop after the first epoch ending this many seconds into training.", "--time-budget-s"),
]
CW = Annotated[
    ClassWeighting | None, _opt("Class weights in the loss.", "--class-weighting", default_of="class_weighting")
]
VAL = Annotated[float | None, _opt("Validation fraction, whole groups.", "--val-fraction", default_of="val_fraction")]
BLURRY = Annotated[
    float | None,
    _opt("Drop the blurriest fraction from validation/test.", "--blurry-quantile", default_of="blurry_quantile"),
]
CALIBRATE = Annotated[
    bool | None,
    typer.Option(
        "--calibrate/--no-calibrate",
        help=_markup(
            "Fit a temperature on the validation images and fold it into the model "
            f"[{'calibrate' if _DEFAULTS['calibrate'] else 'no-calibrate'}]."
        ),
        show_default=False,
    ),
]
SEED = Annotated[int | None, _opt("Random seed.", "--seed", default_of="seed")]
CACHE = Annotated[str | None, _opt("Feature cache file [$DERM_CACHE/features/...].", "--feature-cache")]
STRATEGY = Annotated[
    Strategy | None,
    _opt("tf.distribute strategy (auto: mirrored when several GPUs).", "--strategy", default_of="strategy"),
]
HOLDOUT = Annotated[
    str | None, _opt("Fixed test set: rows whose COLUMN equals VALUE (e.g. split=validation).", "--holdout")
]
SOURCE_WEIGHT = Annotated[
    list[str] | None,
    _opt(
        "VALUE=WEIGHT: weigh the training images whose --source-column is VALUE (repeat for several), e.g. "
        "pad_ufes20=8 for phone photos among dermoscopy.",
        "--source-weight",
    ),
]
SOURCE_COLUMN = Annotated[
    str | None, _opt("Column --source-weight reads.", "--source-column", default_of="source_column")
]
OVERWRITE = Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")]
SKIP_BAD = Annotated[
    bool,
    typer.Option(
        "--skip-bad", help="Leave out rows with unknown labels or missing / unreadable images (counted in the run)."
    ),
]


def parse_source_weights(items: list[str] | None) -> dict[str, float] | None:
    if not items:
        return None
    out = {}
    for item in items:
        value, sep, weight = item.rpartition("=")
        try:
            out[value] = float(weight)
        except ValueError:
            sep = ""
        if not sep or not value:
            from derm.trainer.config import TrainError

            raise TrainError(f"--source-weight takes VALUE=WEIGHT (e.g. pad_ufes20=8), received {item!r}.")
    return out


def _run(fn: Any, *args: Any) -> Any:
    with user_errors(DermError):
        return fn(*args)


@app.command("train")
def train_command(
    config: CONFIG = None,
    data: DATA = None,
    out: OUT = None,
    taxonomy: TAXONOMY = None,
    max_class_size: MCS = None,
    within: WITHIN = None,
    mode: MODE = None,
    weights: WEIGHTS = None,
    input_size: SIZE = None,
    pool_layers: POOL = None,
    views: VIEWS = None,
    head_epochs: HEAD_EPOCHS = None,
    unfreeze_top: UNFREEZE = None,
    patience: PATIENCE = None,
    epochs: EPOCHS = None,
    lr: LR = None,
    batch_size: BATCH = None,
    steps_per_epoch: STEPS = None,
    time_budget_s: BUDGET = None,
    class_weighting: CW = None,
    val_fraction: VAL = None,
    blurry_quantile: BLURRY = None,
    calibrate: CALIBRATE = None,
    seed: SEED = None,
    feature_cache: CACHE = None,
    strategy: STRATEGY = None,
    holdout: HOLDOUT = None,
    source_weight: SOURCE_WEIGHT = None,
    source_column: SOURCE_COLUMN = None,
    overwrite: OVERWRITE = False,
    skip_bad: SKIP_BAD = False,
) -> None:
    """Train one model into a run directory (model.keras, taxonomy, partition, preprocessing, config, metrics)."""
    given = {k: v for k, v in locals().items() if k not in ("config", "source_weight")}
    given["overwrite"] = overwrite or None
    given["skip_bad"] = skip_bad or None
    given["source_weights"] = _run(parse_source_weights, source_weight)
    from derm.evaluation import format_summary
    from derm.trainer.train import train

    cfg = _run(_config, config, given)
    out_dir = _run(train, cfg)
    import json

    metrics = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
    typer.echo(f"Run: {out_dir}")
    if "val" in metrics:
        typer.echo("Validation:\n" + format_summary(metrics["val"]))


@app.command("cv")
def cv_command(
    config: CONFIG = None,
    data: DATA = None,
    out: OUT = None,
    taxonomy: TAXONOMY = None,
    max_class_size: MCS = None,
    within: WITHIN = None,
    mode: MODE = None,
    weights: WEIGHTS = None,
    input_size: SIZE = None,
    pool_layers: POOL = None,
    views: VIEWS = None,
    head_epochs: HEAD_EPOCHS = None,
    unfreeze_top: UNFREEZE = None,
    patience: PATIENCE = None,
    epochs: EPOCHS = None,
    lr: LR = None,
    batch_size: BATCH = None,
    steps_per_epoch: STEPS = None,
    time_budget_s: BUDGET = None,
    class_weighting: CW = None,
    val_fraction: VAL = None,
    blurry_quantile: BLURRY = None,
    calibrate: CALIBRATE = None,
    seed: SEED = None,
    feature_cache: CACHE = None,
    strategy: STRATEGY = None,
    holdout: HOLDOUT = None,
    source_weight: SOURCE_WEIGHT = None,
    source_column: SOURCE_COLUMN = None,
    overwrite: OVERWRITE = False,
    skip_bad: SKIP_BAD = False,
    folds: Annotated[int, typer.Option("--folds", help="Number of group-aware folds (the paper: 9).")] = 9,
) -> None:
    """k-fold cross-validation: OUT/fold_K runs (each tested on its held-out fold) and OUT/cv.md."""
    given = {k: v for k, v in locals().items() if k not in ("config", "folds", "source_weight")}
    given["overwrite"] = overwrite or None
    given["skip_bad"] = skip_bad or None
    given["source_weights"] = _run(parse_source_weights, source_weight)
    from derm.trainer.cv import cross_validate

    if folds < 2:
        fail(f"--folds must be at least 2, received {folds}.")
    cfg = _run(_config, config, given)
    out_dir = _run(cross_validate, cfg, folds)
    typer.echo((out_dir / "cv.md").read_text(encoding="utf-8"))


def main() -> None:
    from derm._cli import run_app

    run_app(app)


if __name__ == "__main__":
    main()
