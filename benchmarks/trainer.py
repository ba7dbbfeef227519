"""Trainer benchmark on the real data in ../shared: bottleneck mode from the inception-2015 weights.

- HAM10000, lesion-grouped 5-fold cross-validation: 7-diagnosis mean per-class accuracy, 3-way accuracy,
  melanoma-vs-nevus AUC (per fold and pooled over folds, with bootstrap intervals), fold-to-fold spread.
- ISIC 2017: trained on its training split, measured on its validation split (melanoma vs nevus, seborrheic
  keratosis vs the rest).
- PAD-UFES-20 smartphone photos, patient-grouped 5-fold: carcinoma vs seborrheic keratosis AUC, trained with all the
  dermoscopy data in the mix, against the same model trained on dermoscopy only.
- Baseline: a plain logistic regression on frozen mixed10 features of the plain view (no augmentation, no class
  weights), on the same HAM folds.
- Throughput: feature-cache extraction rate (decode and augmentation included) against raw ``model.predict`` on
  pre-decoded arrays of the same images; peak memory.

    python -m derm.benchmarks.trainer --shared ../shared --runs runs/bench

writes ``benchmarks/results/trainer.json`` and ``trainer.md``. Slow on a laptop CPU (feature extraction of
~12,500 images per view at 299x299): the feature cache makes reruns cheap.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from derm import metrics
from derm._cli import setup_logging
from derm.benchmarks._trainer_markdown import markdown
from derm.trainer.config import Role

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("derm.benchmarks.trainer")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _task_scores(rows: list[dict[str, str]], run: Path, task_id: str) -> tuple[np.ndarray, np.ndarray]:
    import derm
    from derm.trainer.rundir import load_partition

    tax, part = load_partition(run)
    probs = np.asarray([[float(r[c]) for c in part.labels] for r in rows])
    y = derm.task_targets(tax, [r["node"] for r in rows], task_id)
    score = derm.conditional_probability(probs, derm.task_matrix(part, task_id, dtype=np.float64))
    keep = y >= 0
    return y[keep].astype(int), score[keep]


def _node_scores(rows: list[dict[str, str]], run: Path, node: str) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest: P(node) against images labelled under it."""
    from derm.trainer.rundir import load_partition

    tax, part = load_partition(run)
    cols = [c.label for c in part.classes if tax.is_under(c.node, node)]
    score = np.asarray([sum(float(r[c]) for c in cols) for r in rows])
    y = np.asarray([tax.is_under(r["node"], node) for r in rows], dtype=int)
    return y, score


def _auc_entry(y: np.ndarray, s: np.ndarray) -> dict[str, Any]:
    auc, lo, hi = metrics.bootstrap_auc(y, s, n_boot=1000, seed=0)
    return {"auc": auc, "lo": lo, "hi": hi, "n_positive": int(y.sum()), "n_negative": int((1 - y).sum())}


def ham_cv(base: Any, ham: Path, runs: Path, folds: int) -> dict[str, Any]:
    from derm.trainer.cv import cross_validate

    # within nine with maxClassSize 100: the partition gives each of HAM10000's 7 diagnoses its own training class
    # ("akiec" is the own images of malignant_epidermal, above "bcc"), so training-class accuracy is 7-diagnosis.
    cfg = dataclasses.replace(base, data=str(ham), out=str(runs / "ham_cv"), within="nine", max_class_size=100)
    out = cross_validate(cfg, folds)
    cv = json.loads((out / "cv.json").read_text())
    part = json.loads((out / "fold_0" / "partition.json").read_text())
    import derm

    nodes = sorted({derm.default_taxonomy().resolve(lab) for lab in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")})
    assert sorted(c["node"] for c in part["classes"]) == nodes, part["classes"]  # one class per diagnosis
    fold_dirs = [out / f"fold_{k}" for k in range(folds)]
    rows = [r for d in fold_dirs for r in _rows(d / "predictions_test.csv")]
    y, s = _task_scores(rows, fold_dirs[0], "melanoma_vs_nevus")
    return {
        "folds": cv["folds"],
        "summary": cv["summary"],
        "pooled_melanoma_vs_nevus": _auc_entry(y, s),
        "n_test_images": len(rows),
    }


def isic2017(base: Any, isic: Path, runs: Path) -> dict[str, Any]:
    from derm.trainer.train import train

    cfg = dataclasses.replace(base, data=str(isic), out=str(runs / "isic2017"), within="labels", holdout="split=val")
    run = Path(cfg.out) if (Path(cfg.out) / "run.json").is_file() else train(cfg)
    rows = _rows(run / "predictions_test.csv")
    y, s = _task_scores(rows, run, "melanoma_vs_nevus")
    ys, ss = _node_scores(rows, run, "seborrheic_keratosis")
    full = json.loads((run / "metrics.json").read_text())
    m = full["test"]
    return {
        "timings_s": full.get("timings", {}),
        "n_test_images": len(rows),
        "melanoma_vs_nevus": _auc_entry(y, s),
        "seborrheic_keratosis_vs_rest": _auc_entry(ys, ss),
        "labels_mpca": m["levels"]["labels"]["mean_per_class_accuracy"],
    }


def combined_csv(shared: Path, out: Path, folds: int, seed: int) -> Path:
    """HAM10000 + ISIC 2017 (all) + PAD-UFES-20 in one CSV; PAD rows get a patient-grouped fold, others -1."""
    import derm

    pad = _rows(shared / "data/pad_ufes20/labels.csv")
    comps = derm.group_components(len(pad), [r["patient_id"] for r in pad])
    pad_folds = derm.kfold([r["label"] for r in pad], comps, k=folds, seed=seed)
    rows = []
    for name, group_col in (("ham10000", "lesion_id"), ("isic2017_trainval", None)):
        base = shared / "data" / name
        for r in _rows(base / "labels.csv"):
            g = f"{name}:{r[group_col]}" if group_col else ""
            rows.append(
                {
                    "image": str((base / r["image"]).resolve()),
                    "label": r["label"],
                    "group": g,
                    "source": name,
                    "bench_fold": "-1",
                }
            )
    base = shared / "data/pad_ufes20"
    for r, f in zip(pad, pad_folds, strict=True):
        rows.append(
            {
                "image": str((base / r["image"]).resolve()),
                "label": r["label"],
                "group": f"pad:{r['patient_id']}",
                "source": "pad_ufes20",
                "bench_fold": str(int(f)),
            }
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "label", "group", "source", "bench_fold"])
        w.writeheader()
        w.writerows(rows)
    return out


def pad_fold_run(base: Any, combined: Path, out: Path, k: int) -> Path:
    """The run of PAD-UFES-20 fold ``k``: trained on every row of ``combined`` but that fold's patients (reused if
    ``out`` already holds a finished run)."""
    from derm.trainer.train import train

    if (out / "run.json").is_file():
        return out
    kw = {"within": "nine", "max_class_size": 100, "holdout": f"bench_fold={k}"}
    return train(dataclasses.replace(base, data=str(combined), out=str(out), **kw))


def pad_phone(base: Any, shared: Path, runs: Path, folds: int) -> dict[str, Any]:
    from derm.trainer.train import train

    combined = combined_csv(shared, runs / "combined.csv", folds, base.seed)
    fold_dirs = [pad_fold_run(base, combined, runs / f"pad_fold_{k}", k) for k in range(folds)]
    rows = [r for d in fold_dirs for r in _rows(d / "predictions_test.csv")]
    y, s = _task_scores(rows, fold_dirs[0], "carcinoma_vs_seborrheic_keratosis")
    # the same model family trained on dermoscopy only, tested on every PAD photo
    cfg = dataclasses.replace(
        base,
        data=str(combined),
        out=str(runs / "pad_dermoscopy_only"),
        within="nine",
        max_class_size=100,
        holdout="source=pad_ufes20",
    )
    run = Path(cfg.out) if (Path(cfg.out) / "run.json").is_file() else train(cfg)
    y0, s0 = _task_scores(_rows(run / "predictions_test.csv"), run, "carcinoma_vs_seborrheic_keratosis")
    return {"mixed_training": _auc_entry(y, s), "dermoscopy_only": _auc_entry(y0, s0), "n_pad_images": len(rows)}


def logistic_baseline(ham_cv_dir: Path, cache_path: Path) -> dict[str, Any]:
    """Plain logistic regression (no class weights) on frozen mixed10 features of the plain view, same folds."""
    from sklearn.linear_model import LogisticRegression

    from derm.trainer.features import FeatureCache, image_digests
    from derm.trainer.model import feature_slice

    rows_all = _rows(ham_cv_dir / "fold_0" / "split.csv")
    paths = [r["image"] for r in rows_all]
    digests = image_digests(paths)
    with FeatureCache(cache_path, FeatureCache.stored_key(cache_path)) as cache:
        x = cache.get(digests, [0])[0][:, feature_slice(["mixed10"])]
    labels = np.asarray([r["label"] for r in rows_all])
    out = {"folds": []}
    ys, ss = [], []
    k = 0
    while (ham_cv_dir / f"fold_{k}").is_dir():
        roles = np.asarray([r["role"] for r in _rows(ham_cv_dir / f"fold_{k}" / "split.csv")])
        tr, te = roles != Role.TEST, roles == Role.TEST
        clf = LogisticRegression(max_iter=2000).fit(x[tr], labels[tr])
        p = clf.predict_proba(x[te])
        classes = list(clf.classes_)
        yt = labels[te]
        mpca, _ = metrics.mean_per_class_accuracy(np.asarray([classes.index(v) for v in yt]), p.argmax(1), len(classes))
        sel = np.isin(yt, ["mel", "nv"])
        score = p[:, classes.index("mel")] / (p[:, classes.index("mel")] + p[:, classes.index("nv")])
        ys.append((yt[sel] == "mel").astype(int))
        ss.append(score[sel])
        out["folds"].append(
            {"fold": k, "labels_mpca": float(mpca), "melanoma_vs_nevus_auc": metrics.auc(ys[-1], ss[-1])}
        )
        k += 1
    out["pooled_melanoma_vs_nevus"] = _auc_entry(np.concatenate(ys), np.concatenate(ss))
    out["labels_mpca_mean"] = float(np.mean([f["labels_mpca"] for f in out["folds"]]))
    return out


def throughput(base: Any, shared: Path, n: int = 256) -> dict[str, Any]:
    """Feature-cache extraction (decode + resize in tf.data, overlapped) vs model.predict on decoded arrays."""
    import tempfile

    import derm
    from derm.preprocess import preprocess
    from derm.trainer.features import FeatureCache, cache_key, extract, image_digests
    from derm.trainer.model import build_model, feature_extractor

    ds = derm.read_dataset(shared / "data/ham10000/labels.csv")
    paths = ds.paths[:n]
    model = build_model(2, base.input_size, base.weights, ("mixed10",))
    fe = feature_extractor(model)
    digests = image_digests(paths)
    with (
        tempfile.TemporaryDirectory() as tmp,
        FeatureCache(Path(tmp) / "c.sqlite", cache_key(fe, base.input_size, 0)) as cache,
    ):
        extract(fe, cache, paths[:32], digests[:32], [0], batch_size=32)  # warm-up (tracing)
        st = extract(fe, cache, paths[32:], digests[32:], [0], batch_size=32)
        st_aug = extract(fe, cache, paths[32:], digests[32:], [1], batch_size=32)
    x = np.stack([preprocess(p, base.input_size) for p in paths[32:]]).astype(np.float32)
    fe.predict(x[:32], batch_size=32, verbose=0)
    t = time.perf_counter()
    fe.predict(x, batch_size=32, verbose=0)
    raw = len(x) / (time.perf_counter() - t)
    single = []
    for i in range(5):
        t = time.perf_counter()
        fe.predict(x[i : i + 1], verbose=0)
        single.append(time.perf_counter() - t)
    return {
        "images": len(x),
        "cache_plain_images_per_s": st.images_per_second,
        "cache_augmented_images_per_s": st_aug.images_per_second,
        "raw_predict_images_per_s": raw,
        "ratio_plain": st.images_per_second / raw,
        "ratio_augmented": st_aug.images_per_second / raw,
        "single_image_ms_median": 1000 * float(np.median(single)),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=Path("../shared"))
    ap.add_argument("--runs", type=Path, default=Path("runs/bench"))
    ap.add_argument("--feature-cache", type=Path, default=None)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--head-epochs", type=int, default=40)
    ap.add_argument("--pool-layers", default="mixed7,mixed8,mixed9,mixed10")
    ap.add_argument("--unfreeze-top", type=int, default=0, help="then train the top 1-3 blocks on cached activations")
    ap.add_argument("--epochs", type=int, default=30, help="top-block epochs (with --unfreeze-top)")
    ap.add_argument("--patience", type=int, default=5, help="top-block early stopping (with --unfreeze-top)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--only", default="ham,baseline,isic,pad,throughput")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tag", default="trainer")
    return ap


def _base_config(args: argparse.Namespace) -> Any:
    """The training configuration every part starts from (each sets its own data, out and holdout)."""
    from derm.trainer.config import TrainConfig

    return TrainConfig(
        data="",
        out="",
        views=args.views,
        head_epochs=args.head_epochs,
        pool_layers=args.pool_layers.split(","),
        unfreeze_top=args.unfreeze_top,
        epochs=args.epochs,
        patience=args.patience,
        feature_cache=str(args.feature_cache) if args.feature_cache else None,
    )


def _header(argv: list[str] | None, base: Any) -> dict[str, Any]:
    """The command, machine, date, configuration and limits at the top of the results."""
    return {
        "command": "python -m derm.benchmarks.trainer " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "date": time.strftime("%Y-%m-%d"),
        "config": dataclasses.asdict(base),
        "limits": "The images here are small: HAM10000 200x150 (originals 600x450), ISIC 2017 256x256 (resized by a "
        "third party), PAD-UFES-20 300x300 and only 360 of its 2,298 photos; all are upsampled to 299x299, so fine "
        "texture is gone. The backbone is frozen (bottleneck mode): fine-tuning all layers on 10,000 images at "
        "299x299 is out of reach of this 2-core CPU, so the head sees ImageNet features only. The augmented views "
        "per image are few (see above) for the same reason.",
    }


def _baseline_cache(runs: Path, base: Any) -> Path | None:
    """The feature cache of the HAM cross-validation runs: the one given, or the one their first fold used."""
    cache = Path(base.feature_cache) if base.feature_cache else None
    if cache is None:
        cfg0 = json.loads((runs / "ham_cv" / "fold_0" / "config.json").read_text())
        cache = Path(cfg0["feature_cache"]) if cfg0.get("feature_cache") else None
    return cache


def _run_parts(args: argparse.Namespace, base: Any, only: set[str]) -> dict[str, Any]:
    """Each part named in ``--only``, in order; their results by part."""
    res: dict[str, Any] = {}
    runs = args.runs
    if "ham" in only:
        res["ham"] = ham_cv(base, args.shared / "data/ham10000/labels.csv", runs, args.folds)
    if "baseline" in only and (runs / "ham_cv").is_dir():
        cache = _baseline_cache(runs, base)
        if cache is not None:
            res["baseline"] = logistic_baseline(runs / "ham_cv", cache)
    if "isic" in only:
        res["isic2017"] = isic2017(base, args.shared / "data/isic2017_trainval/labels.csv", runs)
    if "pad" in only:
        res["pad"] = pad_phone(base, args.shared, runs, args.folds)
    if "throughput" in only:
        res["throughput"] = throughput(base, args.shared)
    return res


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    setup_logging(logging.INFO)
    base = _base_config(args)
    only = set(args.only.split(","))
    res = _header(argv, base)
    t0 = time.perf_counter()
    res.update(_run_parts(args, base, only))
    res["seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.tag}.json").write_text(json.dumps(res, indent=2, default=float) + "\n")
    (args.out / f"{args.tag}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
