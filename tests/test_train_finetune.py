"""Fine-tuning on a few dozen real HAM10000 images at a small input size, with the real pretrained weights: finetune
mode with the paper's optimizer, and the top Inception blocks trained on cached activations after the head."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SMALL_SIZE as SIZE
from tests.conftest import read_rows as _rows
from tests.conftest import reference_weights as _weights

pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def bottleneck_run(small_run):
    return small_run


def test_finetune_mode_uses_the_paper_optimizer(small_csv, tmp_path):
    from derm.trainer.model import load_model
    from derm.trainer.train import TrainConfig, train

    cfg = TrainConfig(
        data=str(small_csv),
        out=str(tmp_path / "ft"),
        within="labels",
        mode="finetune",
        weights=str(_weights()),
        input_size=80,
        epochs=2,
        steps_per_epoch=2,
        batch_size=8,
        lr_drop_every=1,
        val_fraction=0.25,
        near_duplicates=False,
    )
    run = train(cfg)
    rows = [r for r in _rows(run / "history.csv") if r["stage"] == "finetune"]
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(1e-3) and lrs[1] == pytest.approx(1e-3 / 16)  # divided by 16 per drop
    model = load_model(run / "model.keras")
    assert model.input_shape == (None, 80, 80, 3)


def _top_config(small_csv, tmp_path, feature_cache):
    """A bottleneck run that trains mixed10 (``unfreeze_top=1``) after a weak head, sharing the module's cache."""
    from derm.trainer.train import TrainConfig

    return TrainConfig(
        data=str(small_csv),
        out=str(tmp_path / "top"),
        within="labels",
        weights=str(_weights()),
        input_size=SIZE,
        views=2,
        head_epochs=2,
        head_lr=1e-5,  # a head barely trained, so that the top block's epochs have a validation score to beat
        unfreeze_top=1,
        epochs=2,
        patience=0,
        steps_per_epoch=2,
        batch_size=8,
        lr=1e-3,
        val_fraction=0.25,
        seed=1,
        feature_cache=feature_cache,
    )


def _train_interrupted_then_resumed(cfg, tmp_path, monkeypatch, caplog):
    """Train ``cfg``, interrupted after the first top epoch (its checkpoint is there), then again: it resumes."""
    from derm.trainer import topblocks
    from derm.trainer.train import train

    scored = topblocks.predict

    def interrupt_after_first_epoch(top, xs, batch_size=64):
        if (tmp_path / "top.partial" / topblocks.STATE).is_file():
            raise KeyboardInterrupt
        return scored(top, xs, batch_size)

    monkeypatch.setattr(topblocks, "predict", interrupt_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    state = json.loads((tmp_path / "top.partial" / topblocks.STATE).read_text())
    assert state["epoch"] == 1 and not (tmp_path / "top").exists()
    monkeypatch.setattr(topblocks, "predict", scored)
    with caplog.at_level("INFO", logger="derm.trainer.topblocks"):
        run = train(cfg)
    assert "Resuming top-block training after epoch 1" in caplog.text
    return run


def _check_activation_cache(feature_cache, run):
    """mixed9's output of every view was cached beside the features (float16; 1x1x2048 at this input size)."""
    from derm.trainer.features import FeatureCache

    act = Path(feature_cache).with_name(Path(feature_cache).stem + ".mixed9.sqlite")
    key = FeatureCache.stored_key(act)
    assert key.activation == "mixed9" and key.shape == (1, 1, 2048) and key.seed == 1
    with FeatureCache(act, key) as cache:
        assert len(cache) == len(_rows(run / "split.csv")) + sum(r["role"] == "train" for r in _rows(run / "split.csv"))


def _check_only_the_top_block_changed(run, before, after):
    """The top block's convolutions changed, the stem did not (layers compared by position: Keras numbers names);
    the run keeps the best validation score: the blocks as trained when a top epoch beat the head, else untouched."""
    names = [lay.name for lay in after.layers]
    stem = names.index("scale") + 1
    top = next(i for i in range(names.index("mixed9") + 1, len(names)) if names[i].startswith("conv2d"))
    assert np.array_equal(after.layers[stem].get_weights()[0], before.layers[stem].get_weights()[0])
    scores = {
        stage: max(float(r["val_mpca"]) for r in _rows(run / "history.csv") if r["stage"] == stage)
        for stage in ("head", "top")
    }
    changed = not np.array_equal(after.layers[top].get_weights()[0], before.layers[top].get_weights()[0])
    assert changed == (scores["top"] > scores["head"])
    assert changed, scores  # this configuration's top epochs do beat its weak head: the path is exercised


def _check_eval_sets_the_frozen_embedding_beside(run, small_csv, tmp_path, before, after):
    """derm-eval sets the fine-tuned embedding beside the frozen one (t-SNE and a 5-NN score for each); the frozen one
    is the backbone's starting weights: the bottleneck run's embedding, whose backbone never changed."""
    from derm.trainer.evaluate import frozen_embedding, predict, run_eval

    res = run_eval(run, small_csv, tmp_path / "eval", tsne=30, saliency_images=0, n_boot=20)
    assert set(res["embedding_knn5_mpca"]) == {"this model", "frozen ImageNet backbone"}
    assert all(0 <= v <= 1 for v in res["embedding_knn5_mpca"].values())
    assert (tmp_path / "eval" / "plots" / "tsne_frozen.png").stat().st_size > 10_000
    paths = [r["image"] for r in _rows(small_csv)[:4]]
    frozen = frozen_embedding(json.loads((run / "config.json").read_text()), paths, SIZE)
    np.testing.assert_allclose(frozen, predict(before, paths, SIZE)[1], rtol=1e-4, atol=1e-4)
    assert not np.allclose(frozen, predict(after, paths, SIZE)[1], atol=1e-3)


def test_unfreeze_top_blocks_after_the_head(small_csv, tmp_path, bottleneck_run, monkeypatch, caplog):
    """The top block trains on cached mixed9 activations, resumes after an interruption, and leaves the stem alone."""
    from derm.trainer.model import load_model

    cfg0, _ = bottleneck_run
    cfg = _top_config(small_csv, tmp_path, cfg0.feature_cache)
    before = load_model(bottleneck_run[1] / "model.keras")
    run = _train_interrupted_then_resumed(cfg, tmp_path, monkeypatch, caplog)
    stages = [(r["stage"], r["epoch"]) for r in _rows(run / "history.csv")]
    assert stages == [("head", "1"), ("head", "2"), ("top", "1"), ("top", "2")]
    assert not any(p.name.startswith("top_") for p in run.iterdir())  # the checkpoints are gone
    _check_activation_cache(cfg0.feature_cache, run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val"]["source"] == "activation cache (plain view)"
    after = load_model(run / "model.keras")
    _check_only_the_top_block_changed(run, before, after)
    _check_eval_sets_the_frozen_embedding_beside(run, small_csv, tmp_path, before, after)
