"""The trainer benchmark's report (``trainer.md``): one section per part that ran, then what limits the numbers."""

from __future__ import annotations

from typing import Any


def _fmt(e: dict[str, Any]) -> str:
    return f"{e['auc']:.3f} ({e['lo']:.3f}-{e['hi']:.3f})"


def markdown(res: dict[str, Any]) -> str:
    c = res["config"]
    lines = [
        "# Trainer benchmark (bottleneck mode, inception-2015 weights)",
        "",
        f"Run `{res['command']}` on {res['machine']}, {res['date']}. Input {c['input_size']}x{c['input_size']}, "
        f"head on pooled {', '.join(c['pool_layers'])}, {c['views']} augmented views per training image, "
        f"{c['head_epochs']} head epochs, class weighting {c['class_weighting']}, seed {c['seed']}.",
        "",
    ]
    if "ham" in res:
        lines += _ham_lines(res)
    if "isic2017" in res:
        lines += _isic_lines(res["isic2017"])
    if "pad" in res:
        lines += _pad_lines(res["pad"])
    if "throughput" in res:
        lines += _throughput_lines(res["throughput"])
    lines += ["## What limits these numbers", "", res.get("limits", ""), ""]
    return "\n".join(lines)


def _ham_lines(res: dict[str, Any]) -> list[str]:
    """HAM10000 cross-validation against the logistic regression baseline."""
    h = res["ham"]
    s = h["summary"]

    def ms(k: str) -> str:
        return f"{s[k]['mean']:.3f} ± {s[k]['sd']:.3f}" if k in s else "n/a"

    return [
        "## HAM10000, lesion-grouped 5-fold cross-validation",
        "",
        "| metric | this model (mean ± sd over folds) | logistic regression baseline |",
        "|---|---|---|",
        f"| 7-diagnosis mean per-class accuracy | {ms('train_classes_mpca')} | "
        f"{res.get('baseline', {}).get('labels_mpca_mean', float('nan')):.3f} |",
        f"| 3-way accuracy | {ms('three_accuracy')} | |",
        f"| 3-way mean per-class accuracy | {ms('three_mpca')} | |",
        f"| melanoma vs nevus AUC (per fold) | {ms('melanoma_vs_nevus_auc')} | |",
        f"| melanoma vs nevus AUC (pooled, 95% CI) | {_fmt(h['pooled_melanoma_vs_nevus'])} | "
        f"{_fmt(res['baseline']['pooled_melanoma_vs_nevus']) if 'baseline' in res else ''} |",
        "",
    ]


def _isic_lines(i: dict[str, Any]) -> list[str]:
    """ISIC 2017, train split to validation split."""
    return [
        "## ISIC 2017 (train split -> validation split)",
        "",
        f"- melanoma vs nevus AUC {_fmt(i['melanoma_vs_nevus'])}",
        f"- seborrheic keratosis vs rest AUC {_fmt(i['seborrheic_keratosis_vs_rest'])}",
        f"- 3-diagnosis mean per-class accuracy {i['labels_mpca']:.3f} ({i['n_test_images']} images)",
        "",
    ]


def _pad_lines(p: dict[str, Any]) -> list[str]:
    """PAD-UFES-20 phone photos, with and without them in training."""
    return [
        "## PAD-UFES-20 smartphone photos, patient-grouped 5-fold",
        "",
        f"- carcinoma vs seborrheic keratosis AUC, trained with dermoscopy + other PAD folds: "
        f"{_fmt(p['mixed_training'])}",
        f"- same, trained on dermoscopy only: {_fmt(p['dermoscopy_only'])}",
        "",
    ]


def _throughput_lines(t: dict[str, Any]) -> list[str]:
    """Feature-cache extraction rate against raw model.predict."""
    return [
        "## Throughput (feature cache vs raw model.predict)",
        "",
        f"- feature cache, plain views: {t['cache_plain_images_per_s']:.1f} images/s; augmented views: "
        f"{t['cache_augmented_images_per_s']:.1f} images/s (decode, resize, augmentation included)",
        f"- raw `model.predict` on pre-decoded arrays: {t['raw_predict_images_per_s']:.1f} images/s; "
        f"ratio {t['ratio_plain']:.2f} (plain), {t['ratio_augmented']:.2f} (augmented)",
        f"- single image: {t['single_image_ms_median']:.0f} ms; peak RSS {t['peak_rss_mib']:.0f} MiB",
        "",
    ]
