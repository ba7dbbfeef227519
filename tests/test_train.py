"""End-to-end training on a few dozen real HAM10000 images at a small input size, with the real pretrained weights."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import PER_CLASS
from tests.conftest import SMALL_SIZE as SIZE
from tests.conftest import read_rows as _rows
from tests.conftest import reference_weights as _weights

pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def bottleneck_run(small_run):
    return small_run


def test_bottleneck_run_directory(bottleneck_run):
    _, run = bottleneck_run
    names = {p.name for p in run.iterdir()}
    assert {
        "model.keras",
        "config.json",
        "taxonomy.json",
        "partition.json",
        "preprocess.json",
        "versions.json",
        "metrics.json",
        "history.csv",
        "split.csv",
        "run.json",
        "predictions_val.csv",
    } <= names
    assert not Path(str(run) + ".partial").exists()
    part = json.loads((run / "partition.json").read_text())
    assert [c["node"] for c in part["classes"]] and len(part["classes"]) == 4  # one class per diagnosis
    assert json.loads((run / "preprocess.json").read_text())["size"] == SIZE
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val"]["n"] > 0 and "labels" in metrics["val"]["levels"]
    assert "melanoma_vs_nevus" in metrics["val"]["tasks"]
    # too few validation images to fit a temperature on: the run says so and keeps its model (calibrate.py)
    assert metrics["val"]["n"] < 50 and "a temperature needs at least 50" in metrics["calibration"]["skipped"]
    run_json = json.loads((run / "run.json").read_text())
    from derm._util import sha256_file

    assert run_json["files"]["model.keras"] == sha256_file(run / "model.keras")
    # no lesion in both train and val
    split = _rows(run / "split.csv")
    roles: dict[str, set[str]] = {}
    for r in split:
        roles.setdefault(r["group"], set()).add(r["role"])
    assert all(len(v) == 1 for v in roles.values())


def test_head_loss_falls(bottleneck_run):
    _, run = bottleneck_run
    rows = [r for r in _rows(run / "history.csv") if r["stage"] == "head"]
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) == 25
    assert losses[-1] < 0.7 * losses[0], losses


def test_run_reloads_and_matches_cached_predictions(bottleneck_run):
    """The saved model on images gives what the head on cached (float16) features gave."""
    from derm.preprocess import preprocess
    from derm.trainer.model import load_model

    _, run = bottleneck_run
    model = load_model(run / "model.keras")
    rows = _rows(run / "predictions_val.csv")[:6]
    labels = json.loads((run / "run.json").read_text())["classes"]
    x = np.stack([preprocess(r["image"], SIZE) for r in rows]).astype(np.float32)
    got = model.predict(x, verbose=0)
    want = np.asarray([[float(r[c]) for c in labels] for r in rows])
    assert np.abs(got - want).max() < 2e-2
    assert (got.argmax(1) == want.argmax(1)).mean() >= 5 / 6


def test_feature_cache_resumes_and_refuses_other_models(bottleneck_run, small_csv, tmp_path):
    import dataclasses

    from derm.trainer.features import FeatureCache, FeatureCacheError

    cfg, _ = bottleneck_run
    cache_path = Path(cfg.feature_cache)
    key = FeatureCache.stored_key(cache_path)
    with FeatureCache(cache_path, key) as cache:
        assert len(cache) > 0
    other = dataclasses.replace(key, weights_sha256="0" * 64)
    with pytest.raises(FeatureCacheError, match="another backbone"):
        FeatureCache(cache_path, other)


def test_second_run_reuses_the_cache(bottleneck_run, tmp_path):
    import dataclasses

    from derm.trainer.train import train

    cfg, _ = bottleneck_run
    cfg2 = dataclasses.replace(cfg, out=str(tmp_path / "run2"), head_epochs=2)
    run2 = train(cfg2)
    m = json.loads((run2 / "metrics.json").read_text())
    assert m["timings"]["features_s"] < 20  # nothing recomputed: every row comes from the cache


def test_existing_run_directory_is_refused(bottleneck_run):
    import dataclasses

    from derm.trainer.train import TrainError, train

    cfg, _ = bottleneck_run
    with pytest.raises(TrainError, match="exists and is not empty"):
        train(dataclasses.replace(cfg))


def test_overwrite_replaces_only_run_directories(bottleneck_run, tmp_path):
    """--overwrite on a folder that is not a run directory (a user's photos and notes) deletes nothing."""
    import dataclasses

    from derm.trainer.train import TrainError, train

    cfg, _ = bottleneck_run
    photos = tmp_path / "my photos"
    photos.mkdir()
    (photos / "lesion.jpg").write_bytes(b"precious")
    (photos / "notes.txt").write_text("appointments")
    with pytest.raises(TrainError, match=r"not a run directory .* holds lesion\.jpg, notes\.txt.*nothing was deleted"):
        train(dataclasses.replace(cfg, out=str(photos), overwrite=True))
    assert sorted(p.name for p in photos.iterdir()) == ["lesion.jpg", "notes.txt"]
    assert not (tmp_path / "my photos.partial").exists()
    a_file = tmp_path / "run.txt"
    a_file.write_text("x")
    with pytest.raises(TrainError, match="is a file, not a folder"):
        train(dataclasses.replace(cfg, out=str(a_file), overwrite=True))
    assert a_file.read_text() == "x"


def test_config_errors_echo_the_bad_value(small_csv, tmp_path):
    from derm.trainer.config import TrainConfig, TrainError

    with pytest.raises(TrainError, match=r"mode must be one of .* received 'fast'"):
        TrainConfig.from_dict({"data": str(small_csv), "out": str(tmp_path), "mode": "fast"})
    with pytest.raises(TrainError, match=r"Unknown option\(s\) \['epochz'\]"):
        TrainConfig.from_dict({"data": str(small_csv), "out": str(tmp_path), "epochz": 3})
    with pytest.raises(TrainError, match="unfreeze_top applies to bottleneck"):
        TrainConfig.from_dict({"data": "x", "out": "y", "mode": "finetune", "unfreeze_top": 2})
    # every field has the type it is annotated with; a path may be a Path from Python and is stored as a string
    for key, value, says in [
        ("pool_layers", 5, "a list of strings"),
        ("within", 3, "a string or a list of strings"),
        ("near_duplicates", "no", "true or false"),
        ("source_weights", {"pad": "8"}, "a mapping of a string to a number, or null"),
        ("feature_cache", 1.5, "a string, or null"),
    ]:
        with pytest.raises(TrainError, match=rf"{key} must be {re.escape(says)}; received {re.escape(repr(value))}"):
            TrainConfig.from_dict({"data": "x", "out": "y", key: value})
    cfg = TrainConfig.from_dict({"data": small_csv, "out": tmp_path / "o", "within": ("three",)})
    assert cfg.data == str(small_csv) and cfg.out == str(tmp_path / "o")


def test_cli_train_with_config_file(small_csv, tmp_path, bottleneck_run):
    from typer.testing import CliRunner

    from derm.trainer.cli import app

    cfg, _ = bottleneck_run
    conf = tmp_path / "train.yaml"
    conf.write_text(
        f"data: {small_csv}\nwithin: labels\nweights: {_weights()}\ninput-size: {SIZE}\nviews: 2\n"
        f"head_epochs: 3\nfeature_cache: {cfg.feature_cache}\nval_fraction: 0.25\nseed: 1\n"
    )
    res = CliRunner().invoke(app, ["train", "--config", str(conf), "--out", str(tmp_path / "cli_run")])
    assert res.exit_code == 0, res.output
    assert "Validation:" in res.output and (tmp_path / "cli_run" / "model.keras").is_file()
    res = CliRunner().invoke(app, ["train", "--config", str(conf), "--out", str(tmp_path / "x"), "--mode", "fast"])
    said = " ".join(res.output.replace("│", " ").split())
    assert res.exit_code == 2 and "'fast' is not one of 'bottleneck', 'finetune'" in said, res.output
    conf.write_text(conf.read_text() + "mode: fast\n")  # a config file is checked by TrainConfig itself
    res = CliRunner().invoke(app, ["train", "--config", str(conf), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "received 'fast'" in res.output and not (tmp_path / "x").exists()


def test_derm_eval_report(bottleneck_run, small_csv, tmp_path):
    """derm-eval on the run's validation images: metrics, predictions, ROC/confusion/t-SNE/saliency, report.html."""
    from derm.trainer.evaluate import run_eval

    _, run = bottleneck_run
    readers = tmp_path / "readers.csv"
    readers.write_text("task,name,sensitivity,specificity\nmelanoma_vs_nevus,reader 1,0.8,0.7\n")
    out = tmp_path / "eval"
    result = run_eval(
        run, small_csv, out, role="val", readers=readers, tsne=50, saliency_images=4, n_boot=100, saliency_samples=2
    )
    assert result["n"] == sum(r["role"] == "val" for r in _rows(run / "split.csv"))
    assert {"three", "nine", "labels"} <= set(result["levels"])
    mvn = result["tasks"]["melanoma_vs_nevus"]
    assert 0.0 <= mvn["auc"] <= 1.0 and mvn["auc_ci"][0] <= mvn["auc"] <= mvn["auc_ci"][1]
    # the same numbers as training's own evaluation of the validation split (model on images vs cached features)
    val = json.loads((run / "metrics.json").read_text())["val"]
    assert abs(val["tasks"]["melanoma_vs_nevus"]["auc"] - mvn["auc"]) < 0.05
    pngs = {p.name for p in (out / "plots").iterdir()}
    assert {
        "roc_melanoma_vs_nevus.png",
        "confusion_three.png",
        "confusion_nine.png",
        "tsne.png",
        "saliency.png",
    } <= pngs
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5 and "not a diagnostic device" in html
    assert len(_rows(out / "predictions.csv")) == result["n"]


def test_saliency_is_the_input_gradient(bottleneck_run):
    from derm.preprocess import preprocess
    from derm.trainer.evaluate import saliency
    from derm.trainer.model import load_model

    _, run = bottleneck_run
    model = load_model(run / "model.keras")
    img = preprocess(_rows(run / "split.csv")[0]["image"], SIZE)[None].astype(np.float32)
    sal = saliency(model, img)
    assert sal.shape == (1, SIZE, SIZE) and np.isfinite(sal).all() and sal.max() > 0
    # finite-difference check on the most salient pixel
    y, x = np.unravel_index(sal[0].argmax(), sal[0].shape)
    c = int(model.predict(img, verbose=0)[0].argmax())
    eps = 4.0
    grads = []
    for ch in range(3):
        hi, lo = img.copy(), img.copy()
        hi[0, y, x, ch] += eps
        lo[0, y, x, ch] -= eps
        grads.append((model.predict(hi, verbose=0)[0, c] - model.predict(lo, verbose=0)[0, c]) / (2 * eps))
    assert np.sum(np.abs(grads)) == pytest.approx(sal[0, y, x], rel=0.3)


def test_smoothgrad_is_the_gradient_averaged_over_noisy_copies(bottleneck_run):
    from derm.preprocess import preprocess
    from derm.trainer.evaluate import saliency
    from derm.trainer.model import load_model

    _, run = bottleneck_run
    model = load_model(run / "model.keras")
    img = preprocess(_rows(run / "split.csv")[0]["image"], SIZE)[None].astype(np.float32)
    raw = saliency(model, img)
    np.testing.assert_allclose(saliency(model, img, samples=2, noise=0.0), raw, rtol=1e-4, atol=1e-9)
    smooth = saliency(model, img, samples=2, seed=1)
    assert smooth.shape == raw.shape and np.isfinite(smooth).all() and smooth.max() > 0
    assert not np.allclose(smooth, raw) and np.array_equal(smooth, saliency(model, img, samples=2, seed=1))


def test_derm_eval_cli_errors(tmp_path, small_csv):
    from typer.testing import CliRunner

    from derm.trainer.evaluate import EvalError, app, run_eval

    res = CliRunner().invoke(app, [str(tmp_path / "nope"), "--data", str(small_csv), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "not a finished derm-train run directory" in res.output
    # --role takes the split's roles only, named in the refusal, on the command line and in the Python API
    argv = [str(tmp_path / "nope"), "--data", str(small_csv), "--out", str(tmp_path / "o"), "--role", "valid"]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2 and "'valid'" in res.output and "blurry_test" in res.output
    with pytest.raises(EvalError, match=r"--role 'valid'.*train, val, test, excluded, blurry_val, blurry_test"):
        run_eval(tmp_path / "nope", small_csv, tmp_path / "o", role="valid")


def test_cross_validation_and_blurry_filter(bottleneck_run, tmp_path):
    """2-fold CV from the shared cache: every image tested once, whole lesions per fold, blurry ones kept out of
    validation/test only, and a cv.md summary."""
    import dataclasses

    from derm.trainer.cv import cross_validate

    cfg, _ = bottleneck_run
    out = cross_validate(
        dataclasses.replace(cfg, out=str(tmp_path / "cv"), head_epochs=3, blurry_quantile=0.1), folds=2
    )
    tested: list[str] = []
    for k in range(2):
        split = _rows(out / f"fold_{k}" / "split.csv")
        tested += [r["image"] for r in split if r["role"] == "test"]
        assert any(r["role"].startswith("blurry_") for r in split)
        by_group: dict[str, set[str]] = {}
        for r in split:
            by_group.setdefault(r["group"], set()).add("test" if r["role"] in ("test", "blurry_test") else "rest")
        assert all(len(v) == 1 for v in by_group.values())  # a lesion never straddles test and the rest
    blurry = {
        r["image"] for k in range(2) for r in _rows(out / f"fold_{k}" / "split.csv") if r["role"] == "blurry_test"
    }
    assert len(tested) == len(set(tested)) and len(tested) + len(blurry) == sum(PER_CLASS.values())
    cv = json.loads((out / "cv.json").read_text())
    assert [f["fold"] for f in cv["folds"]] == [0, 1] and "labels_mpca" in cv["summary"]
    assert "mean ± sd" in (out / "cv.md").read_text()


def test_within_labels_refuses_nested_labels(ham_csv, tmp_path):
    """HAM10000's "akiec" maps to malignant_epidermal, which holds "bcc": not a level; the error says what to do."""
    from derm.trainer.config import TrainConfig, TrainError
    from derm.trainer.prepare import prepare

    rows = [r for r in _rows(ham_csv) if r["label"] == "akiec"][:3] + [
        r for r in _rows(ham_csv) if r["label"] == "bcc"
    ][:3]
    path = tmp_path / "nested.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["image", "label"])
        w.writeheader()
        w.writerows({"image": str(ham_csv.parent / r["image"]), "label": r["label"]} for r in rows)
    with pytest.raises(TrainError, match=r"'basal_cell_carcinoma' lies under 'malignant_epidermal'.*max-class-size"):
        prepare(TrainConfig(data=str(path), out=str(tmp_path / "o"), within="labels"))


def test_source_weights_weigh_a_source_within_the_class_weights(bottleneck_run, small_csv, tmp_path):
    """--source-weight: phone photos among dermoscopy get more weight per image, on top of the class balance; the
    head trains with them (from the cache), and bad values are refused with what was received."""
    import dataclasses

    from derm.trainer.config import TrainConfig, TrainError
    from derm.trainer.prepare import prepare, sample_weights
    from derm.trainer.train import train

    rows = _rows(small_csv)
    data = tmp_path / "sources.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0], "source"])
        w.writeheader()
        w.writerows({**r, "source": "phone" if i % 4 == 0 else "dermoscopy"} for i, r in enumerate(rows))
    cfg, _ = bottleneck_run
    cfg = dataclasses.replace(cfg, data=str(data), out=str(tmp_path / "w"), head_epochs=2, source_weights={"phone": 5})
    prep = prepare(cfg)
    tr = prep.indices("train")
    w = sample_weights(cfg, prep, tr)
    plain = sample_weights(dataclasses.replace(cfg, source_weights=None), prep, tr)
    assert w is not None and plain is not None and w.mean() == pytest.approx(1.0)
    phone = np.asarray([prep.dataset.extras["source"][i] == "phone" for i in tr])
    ratio = (w / plain)[phone] / (w / plain)[~phone].mean()
    np.testing.assert_allclose(ratio, 5.0, rtol=1e-5)  # same class, five times the weight
    run = train(cfg)
    assert json.loads((run / "config.json").read_text())["source_weights"] == {"phone": 5}
    with pytest.raises(TrainError, match=r"\['tablet'\], which no row's 'source' holds"):
        prepare(dataclasses.replace(cfg, source_weights={"tablet": 2.0}))  # before any feature is extracted
    with pytest.raises(TrainError, match=r"source_weights must be .* received \{'phone': -1\}"):
        TrainConfig.from_dict({"data": "x", "out": "y", "source_weights": {"phone": -1}})
    ft = TrainConfig.from_dict({"data": "x", "out": "y", "mode": "finetune", "source_weights": {"phone": 2}})
    assert ft.source_weights == {"phone": 2}  # every-layer fine-tuning weighs sources too (tests/test_device.py)
    with pytest.raises(TrainError, match=r"time_budget_s bounds every-layer fine-tuning .* mode='bottleneck'"):
        TrainConfig.from_dict({"data": "x", "out": "y", "time_budget_s": 60})
    with pytest.raises(TrainError, match=r"time_budget_s must be a positive number of seconds or None; received -1"):
        TrainConfig.from_dict({"data": "x", "out": "y", "mode": "finetune", "time_budget_s": -1})


def test_derm_eval_tta_uses_the_sdks_views_and_averages_them(bottleneck_run):
    """derm-eval --tta N: the same flips and quarter turns as the SDK's --tta, and the mean of the model's
    probabilities over them."""
    import tensorflow as tf

    from derm.preprocess import TTA_VIEWS, preprocess, tta_views
    from derm.trainer.evaluate import predict, view
    from derm.trainer.model import load_model

    x = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3)).astype(np.float32)
    for i, (turns, flip) in enumerate(TTA_VIEWS):
        want = np.stack([tta_views(image, 8)[i] for image in x])
        assert np.array_equal(view(tf.constant(x), turns, flip).numpy(), want), (turns, flip)
    _, run = bottleneck_run
    model = load_model(run / "model.keras")
    paths = [r["image"] for r in _rows(run / "predictions_val.csv")[:3]]
    got, _ = predict(model, paths, SIZE, tta=4)
    views = np.concatenate([tta_views(preprocess(p, SIZE), 4) for p in paths]).astype(np.float32)
    want = model.predict(views, verbose=0).reshape(3, 4, -1).mean(axis=1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_a_cache_named_the_old_way_is_adopted_only_when_it_holds_the_same_key(tmp_path, monkeypatch):
    """Caches from before the name covered the whole key (named by the weights digest) are renamed, not re-extracted;
    one made for another setting keeps its name."""
    import dataclasses

    from derm.trainer.bottleneck import adopt_legacy_cache, feature_cache_path
    from derm.trainer.config import TrainConfig
    from derm.trainer.features import CacheKey, FeatureCache

    monkeypatch.setenv("DERM_CACHE", str(tmp_path))
    key = CacheKey(weights_sha256="ab" * 32, input_size=299, seed=0, preprocess={"size": 299})
    old = tmp_path / "features" / f"{'ab' * 8}.sqlite"
    with FeatureCache(old, key) as cache:
        cache.put([("img", 0, np.ones(key.dim))])
    cfg = TrainConfig(data="x", out="y")
    other = dataclasses.replace(key, input_size=224)
    adopt_legacy_cache(feature_cache_path(cfg, other), other)
    assert old.is_file()  # another input size: not this cache
    new = feature_cache_path(cfg, key)
    adopt_legacy_cache(new, key)
    assert not old.exists() and new.is_file() and new != old
    with FeatureCache(new, key) as cache:
        assert cache.get(["img"], [0]).sum() == key.dim
