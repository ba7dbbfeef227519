"""Training runs: data -> partition -> group-aware split -> model -> run directory.

Two modes (see docs/training.md):

- ``bottleneck``: the backbone stays frozen; the pooled features of ``views`` augmented views of every training
  image (and the plain view of every validation image) are computed once into the feature cache
  (:mod:`derm.trainer.features`) and the softmax head is trained on them. Optionally the top ``unfreeze_top``
  (1-3) Inception blocks are then fine-tuned with the head, with the paper's optimizer, on the cached output of the
  block below them (:mod:`derm.trainer.topblocks`): affordable on a CPU.
- ``finetune``: every layer trained on augmented images with the paper's recipe: RMSProp (lr 0.001, rho 0.9,
  momentum 0.9, epsilon 0.1), learning rate divided by 16 every 30 epochs.

A run is written into ``OUT.partial`` and renamed to ``OUT`` when complete (:mod:`derm.trainer.rundir`), so ``OUT``
is never half-written; a run interrupted during finetuning resumes from its last epoch
(``keras.callbacks.BackupAndRestore``, or the top blocks' own checkpoint) and feature extraction resumes from the
cache. The configuration is :mod:`derm.trainer.config`, the data side :mod:`derm.trainer.prepare`, cross-validation
:mod:`derm.trainer.cv`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from derm import metrics
from derm.evaluation import evaluate, format_summary
from derm.trainer.bottleneck import fit_bottleneck
from derm.trainer.config import Role, TrainConfig, TrainError
from derm.trainer.prepare import Prepared, class_weights_for, prepare, sample_weights
from derm.trainer.rundir import RUN_FORMAT, EpochLog, open_work_dir, publish, write_predictions, write_static

log = logging.getLogger(__name__)

EVAL_LEVELS: tuple[str, ...] = ("three", "nine", "labels")


def _strategy(name: str) -> Any:
    """tf.distribute under Keras' TensorFlow backend; other backends (JAX on a GPU machine) place the model
    themselves, so a strategy whose scope does nothing."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return _NoStrategy()
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if name == "mirrored" or (name == "auto" and len(gpus) > 1):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


class _NoStrategy:
    def scope(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()


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


def _best_val_mpca(cfg: TrainConfig, prep: Prepared, history: EpochLog, lr_at: Any, steps: int, best_path: Path) -> Any:
    """A Keras callback that scores the validation images after each epoch, adds the epoch to ``history`` and saves
    the weights of the best validation mean per-class accuracy to ``best_path``."""
    import keras

    va = prep.indices(Role.VAL)
    y_val = prep.targets[va]
    n_cls = len(prep.partition.classes)

    class ValMPCA(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.best = -1.0

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            p = _predict_images(self.model, prep, va, cfg.input_size, cfg.batch_size)
            mpca, _ = metrics.mean_per_class_accuracy(y_val, p.argmax(1), n_cls)
            lr = float(lr_at(epoch * steps))
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

    return ValMPCA()


def _time_budget(seconds: float) -> Any:
    """A Keras callback that ends training after the first epoch that finishes ``seconds`` after training began
    (a lent GPU's budget); the best validation epoch so far is still the one kept."""
    import keras

    class TimeBudget(keras.callbacks.Callback):
        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            spent = time.perf_counter() - self.t0
            if spent >= seconds:
                log.info("Time budget %g s spent after epoch %d (%.0f s): training stops.", seconds, epoch + 1, spent)
                self.model.stop_training = True

    return TimeBudget()


def _finetune(
    model: Any, cfg: TrainConfig, prep: Prepared, work: Path, history: EpochLog, trainable_from: int | None
) -> None:
    """Train with the paper's optimizer and schedule on augmented images (all layers, or from a layer on)."""
    import keras

    from derm.trainer.data import image_dataset
    from derm.trainer.model import compile_paper_rmsprop

    tr = prep.indices(Role.TRAIN)
    for i, layer in enumerate(model.layers):
        layer.trainable = trainable_from is None or i >= trainable_from
    steps = cfg.steps_per_epoch or math.ceil(len(tr) / cfg.batch_size)
    schedule = compile_paper_rmsprop(model, cfg, steps)
    n_cls = len(prep.partition.classes)
    # Source weights (phone photos weighed up) are per image and already hold the class weights.
    weights = sample_weights(cfg, prep, tr) if cfg.source_weights else None
    train_ds = image_dataset(
        [prep.dataset.paths[i] for i in tr],
        cfg.input_size,
        targets=prep.targets[tr],
        sample_weights=weights,
        augment=True,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        shuffle=True,
        repeat=True,
        steps=steps,
    )
    best_path = work / "best.weights.h5"
    callbacks = [
        keras.callbacks.BackupAndRestore(str(work / "backup"), delete_checkpoint=True),
        _best_val_mpca(cfg, prep, history, schedule, steps, best_path),
    ]
    if cfg.time_budget_s:
        callbacks.append(_time_budget(cfg.time_budget_s))
    keras.utils.set_random_seed(cfg.seed)
    model.fit(
        train_ds,
        epochs=cfg.epochs,
        steps_per_epoch=steps,
        class_weight=None if weights is not None else class_weights_for(prep.targets[tr], n_cls, cfg.class_weighting),
        callbacks=callbacks,
        verbose=0,
        shuffle=False,  # the dataset shuffles itself, reproducibly per seed
    )
    if best_path.is_file():
        model.load_weights(best_path)
        best_path.unlink()


def train(cfg: TrainConfig | Mapping[str, Any]) -> Path:
    """Run one training as configured; returns the finished run directory."""
    from derm.datasets import readable_images

    if not isinstance(cfg, TrainConfig):
        cfg = TrainConfig.from_dict(cfg)
    cfg.check()
    with readable_images(cfg.data):
        return _train(cfg)


def _train(cfg: TrainConfig) -> Path:
    import keras

    from derm.trainer.model import build_model

    out = Path(cfg.out)
    work = open_work_dir(out, cfg)
    t0 = time.perf_counter()
    prep = prepare(cfg)
    write_static(work, cfg, prep)
    keras.utils.set_random_seed(cfg.seed)
    history = EpochLog()
    timings: dict[str, float] = {}
    with _strategy(cfg.strategy).scope():
        model = build_model(len(prep.partition.classes), cfg.input_size, cfg.weights, cfg.pool_layers, cfg.dropout)
    if cfg.mode == "bottleneck":
        cached_eval = fit_bottleneck(model, cfg, prep, work, history, timings)
    else:
        t = time.perf_counter()
        _finetune(model, cfg, prep, work, history, None)
        timings["finetune_s"] = time.perf_counter() - t
        cached_eval = {}
    for layer in model.layers:
        layer.trainable = True  # saved models load trainable; the exporter and users decide what to freeze
    result: dict[str, Any] = {"format": RUN_FORMAT, "mode": cfg.mode}
    _score(model, cfg, prep, work, cached_eval, result)
    timings["total_s"] = time.perf_counter() - t0
    result["timings"] = timings
    result["data"] = prep.dataset.describe()
    result["data"]["roles"] = {r: int((prep.roles == r).sum()) for r in np.unique(prep.roles)}
    publish(work, out, cfg, prep, model, history, result)
    log.info("Run written to %s (%.0f s).", out, timings["total_s"])
    return out


def _score(
    model: Any,
    cfg: TrainConfig,
    prep: Prepared,
    work: Path,
    cached_eval: dict[str, np.ndarray],
    result: dict[str, Any],
) -> None:
    """Probabilities of the held-out images (from the caches, else from the model on the images), calibrated, then
    evaluated into ``result`` and written as ``predictions_ROLE.csv``."""
    roles = {r.value: idx for r in (Role.VAL, Role.TEST) if len(idx := prep.indices(r))}
    by_role = {
        role: cached_eval[role]
        if role in cached_eval
        else _predict_images(model, prep, idx, cfg.input_size, cfg.batch_size)
        for role, idx in roles.items()
    }
    if cfg.calibrate and "val" in by_role:
        by_role = _calibrate(model, prep, roles, by_role, result)
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
        write_predictions(work / f"predictions_{role}.csv", prep, idx, probs)
        log.info("%s:\n%s", role, format_summary(result[role]))


def _calibrate(
    model: Any, prep: Prepared, roles: dict[str, np.ndarray], by_role: dict[str, np.ndarray], result: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Fit a temperature on the validation images and fold it into the model (so the saved model, and every export
    of it, gives the calibrated probabilities); the held-out probabilities with it applied."""
    from derm.trainer.calibrate import apply_temperature, calibrate, fold_temperature

    t, result["calibration"] = calibrate(by_role, {role: prep.targets[idx] for role, idx in roles.items()})
    if t is None:
        log.warning("Not calibrated: %s.", result["calibration"]["skipped"])
        return by_role
    fold_temperature(model, t)
    cal = result["calibration"]["val"]
    log.info("Temperature %.3f: validation ECE %.3f -> %.3f.", t, cal["ece_before"], cal["ece_after"])
    return {role: apply_temperature(p, t) for role, p in by_role.items()}


__all__ = ["TrainConfig", "TrainError", "prepare", "sample_weights", "train"]
