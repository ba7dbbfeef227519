"""Fine-tune Inception-v3's top blocks on this CPU: train the blocks above a cut on cached activations.

Running the whole network forward and backward on every step is what makes fine-tuning unaffordable without a GPU.
Below the cut nothing changes, so its output for each (image, view) is computed once, stored (float16, in an
activation cache keyed like the feature cache: :func:`derm.trainer.features.activation_key`) and reused by every
epoch and every fold. Only the blocks above the cut run per step: ``unfreeze_top`` 1 trains mixed10 on mixed9's
8x8x2048 output, 2 trains mixed9 and mixed10 on mixed8's 8x8x1280, 3 trains mixed8..10 on mixed7's 17x17x768.

The trained part is not a copy: it is a Keras model over the full model's own layers (inputs: the cut's output and
the pooled blocks below it that the head reads), so training it trains the full model, which the run saves as usual.

- optimizer: the paper's RMSProp (lr ``cfg.lr``, rho 0.9, momentum 0.9, epsilon 0.1; lr / ``lr_drop_factor`` every
  ``lr_drop_every`` epochs), starting from the head trained on pooled features;
- BatchNormalization layers stay frozen (their statistics and offsets): batches are small and the views few;
- epoch ``e`` uses augmented view ``e mod views`` of every training image, in a seeded order, weighted as the head
  (class weights x source weights);
- after each epoch the validation images (plain view) are scored; the weights of the best validation mean per-class
  accuracy are kept (the head-trained model's own score is the first to beat) and training stops after ``patience``
  epochs without improvement;
- resumable: the weights, the optimizer's state and the history are saved in the unfinished run directory after
  every epoch, and a rerun of the same configuration continues after the last finished epoch.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from derm import metrics
from derm._progress import track
from derm._util import atomic_write
from derm.trainer.model import POOLABLE, compile_paper_rmsprop, feature_slice

log = logging.getLogger(__name__)

CUTS = {1: "mixed9", 2: "mixed8", 3: "mixed7"}  # unfreeze_top -> the block whose output is cached
STATE = "top_state.json"
LAST = "top_last.weights.h5"
BEST = "top_best.weights.h5"


def cut_block(unfreeze_top: int) -> str:
    return CUTS[unfreeze_top]


def below_cut(cut: str, pool_layers: Sequence[str]) -> list[str]:
    """The pooled blocks the head reads that lie below the cut (they are inputs of the trained part)."""
    return [p for p in POOLABLE if p in pool_layers and POOLABLE.index(p) < POOLABLE.index(cut)]


def top_model(model: Any, cut: str, pool_layers: Sequence[str]) -> Any:
    """The part of ``model`` above ``cut``, sharing its layers: inputs ``[cut output, pooled blocks below]``."""
    import keras

    inputs = [model.get_layer(cut).output] + [model.get_layer(f"pool_{p}").output for p in below_cut(cut, pool_layers)]
    return keras.Model(inputs, model.output, name=f"above_{cut}")


def set_trainable(model: Any, top: Any) -> int:
    """Freeze ``model`` but the layers of ``top`` (BatchNormalization aside); returns the trainable weight count."""
    import keras

    for layer in model.layers:
        layer.trainable = False
    for layer in top.layers:
        if not isinstance(layer, (keras.layers.InputLayer, keras.layers.BatchNormalization)):
            layer.trainable = True
    return int(sum(np.prod(w.shape) for w in top.trainable_weights))


def cached_inputs(
    act: Any, pooled: np.ndarray, digests: Sequence[str], views: Sequence[int], below: Sequence[str]
) -> list[Any]:
    """The trained part's inputs: activations (views, n, *shape) float16 from the activation cache, then one pooled
    block (views, n, k) for each of ``below`` (:func:`below_cut`), taken from ``pooled``, the same images' and views'
    whole feature-cache rows (views, n, FEATURE_DIM), already read for the head."""
    out = [act.get(digests, views, dtype=np.float16).reshape(len(views), len(digests), *act.key.shape)]
    out.extend(pooled[:, :, feature_slice([b])] for b in below)
    return out


def _batch(xs: list[np.ndarray], view: int | None, rows: np.ndarray) -> list[np.ndarray]:
    return [(x[view] if view is not None else x)[rows].astype(np.float32) for x in xs]


def predict(top: Any, xs: list[np.ndarray], batch_size: int = 64) -> np.ndarray:
    """Probabilities of ``top`` on cached inputs of one view (arrays without the view axis)."""
    n = len(xs[0])
    parts = [
        top.predict_on_batch(_batch(xs, None, np.arange(s, min(n, s + batch_size)))) for s in range(0, n, batch_size)
    ]
    return np.concatenate([np.asarray(p) for p in parts]) if parts else np.zeros((0, top.output_shape[-1]), np.float32)


def _state(work: Path, signature: dict[str, Any]) -> dict[str, Any] | None:
    try:
        state = json.loads((work / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if state.get("signature") != signature or not (work / LAST).is_file() or not (work / BEST).is_file():
        return None
    return state


def _compile(top: Any, cfg: Any, steps: int) -> Any:
    """Compile ``top`` with the paper's optimizer (as every-layer fine-tuning); returns the schedule."""
    schedule = compile_paper_rmsprop(top, cfg, steps)
    top.optimizer.build(top.trainable_variables)  # checkpoints then hold its moments, and a resume restores them
    return schedule


def _resume_or_start(
    top: Any,
    cfg: Any,
    work: Path,
    signature: dict[str, Any],
    history: Any,
    val: tuple[list[np.ndarray], np.ndarray, int],
) -> tuple[int, float, int]:
    """``(first epoch, best validation mpca, epochs since the best)``: from the checkpoint of an interrupted run of the
    same configuration (its history rows restored), else from the head-trained model's own score."""
    state = _state(work, signature)
    if state is not None:
        top.load_weights(work / LAST)
        start, best, since = state["epoch"], state["best"], state["since_best"]
        history.rows.extend(state["history"])
        log.info("Resuming top-block training after epoch %d (best validation mpca %.3f).", start, best)
        return start, best, since
    # the head alone is the score to beat: if no epoch does, the run keeps the untouched blocks
    x_val, y_val, num_classes = val
    best = _mpca(predict(top, x_val, cfg.batch_size), y_val, num_classes)
    _save(top, work / BEST)
    log.info("Validation mpca before the top blocks train: %.3f.", best)
    return 0, best, 0


def _train_epoch(
    top: Any,
    cfg: Any,
    train: tuple[list[np.ndarray], np.ndarray, np.ndarray | None],
    epoch: int,
    order: np.ndarray,
    steps: int,
) -> float:
    """One epoch on view ``epoch mod views`` of every training image, in ``order``; returns the mean loss."""
    x_train, y_train, sample_weight = train
    view = epoch % len(x_train[0])
    losses = []
    for s in track(range(steps), f"Top blocks, epoch {epoch + 1}/{cfg.epochs}", total=steps):
        rows = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
        w = sample_weight[rows] if sample_weight is not None else None
        losses.append(float(top.train_on_batch(_batch(x_train, view, rows), y_train[rows], sample_weight=w)))
    return float(np.mean(losses))


def _score_epoch(
    top: Any,
    cfg: Any,
    val: tuple[list[np.ndarray], np.ndarray, int],
    history: Any,
    *,
    epoch: int,
    loss: float,
    lr: float,
) -> float:
    """Score ``top`` on the validation images and add the epoch's row to the history; returns the validation mean
    per-class accuracy."""
    x_val, y_val, num_classes = val
    p = predict(top, x_val, cfg.batch_size)
    mpca = _mpca(p, y_val, num_classes)
    history.add(stage="top", epoch=epoch, loss=loss, val_loss=metrics.log_loss(y_val, p), val_mpca=mpca, lr=lr)
    return mpca


def _checkpoint(top: Any, work: Path, state: dict[str, Any]) -> None:
    """The last weights and ``state`` (signature, epoch, best, history rows), saved so that a rerun resumes."""
    _save(top, work / LAST)
    with atomic_write(work / STATE) as f:
        json.dump(state, f)


def train_top(
    model: Any,
    cfg: Any,
    x_train: list[np.ndarray],
    y_train: np.ndarray,
    x_val: list[np.ndarray],
    y_val: np.ndarray,
    *,
    num_classes: int,
    sample_weight: np.ndarray | None,
    history: Any,
    work: Path,
) -> Any:
    """Train ``model``'s blocks above the cut (``cfg.unfreeze_top``) with its head, in place; returns the trained
    part (for predictions on cached activations). ``x_train`` arrays carry a leading view axis, ``x_val`` do not."""
    cut = cut_block(cfg.unfreeze_top)
    top = top_model(model, cut, cfg.pool_layers)
    n_weights = set_trainable(model, top)
    views = len(x_train[0])
    n = len(y_train)
    steps = min(cfg.steps_per_epoch or math.inf, math.ceil(n / cfg.batch_size))
    log.info(
        "Training the blocks above %s and the head (%.1fM weights) on cached activations: %d images x %d views, "
        "%d steps per epoch.",
        cut,
        n_weights / 1e6,
        n,
        views,
        steps,
    )
    schedule = _compile(top, cfg, steps)
    signature = {"cut": cut, "views": views, "n": n, "steps": steps, "config": cfg.to_dict()}
    rows_before = len(history.rows)  # the rows this stage adds are checkpointed with it
    start, best, since = _resume_or_start(top, cfg, work, signature, history, (x_val, y_val, num_classes))
    rng = np.random.default_rng([cfg.seed, 0x70B])
    orders = [rng.permutation(n) for _ in range(cfg.epochs)]  # drawn in full so a resumed run keeps the order
    for epoch in range(start, cfg.epochs):
        loss = _train_epoch(top, cfg, (x_train, y_train, sample_weight), epoch, orders[epoch], steps)
        lr = float(schedule(epoch * steps))
        mpca = _score_epoch(top, cfg, (x_val, y_val, num_classes), history, epoch=epoch + 1, loss=loss, lr=lr)
        since += 1
        if mpca > best:
            best, since = float(mpca), 0
            _save(top, work / BEST)
        rows = history.rows[rows_before:]
        _checkpoint(
            top, work, {"signature": signature, "epoch": epoch + 1, "best": best, "since_best": since, "history": rows}
        )
        if cfg.patience and since >= cfg.patience:
            log.info("No better validation mpca in %d epochs: stopping after epoch %d.", since, epoch + 1)
            break
    top.load_weights(work / BEST)
    for name in (STATE, LAST, BEST):
        (work / name).unlink(missing_ok=True)
    return top


def _mpca(probs: np.ndarray, y: np.ndarray, num_classes: int) -> float:
    return float(metrics.mean_per_class_accuracy(y, probs.argmax(1), num_classes)[0])


def _save(top: Any, path: Path) -> None:
    tmp = path.with_name(".tmp." + path.name)
    top.save_weights(tmp, overwrite=True)
    os.replace(tmp, path)


__all__ = ["CUTS", "below_cut", "cached_inputs", "cut_block", "predict", "top_model", "train_top"]
