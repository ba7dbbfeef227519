"""``derm-eval``: the paper's evaluation of a trained run on a labelled dataset, with plots and an HTML report.

Outputs in ``--out``: ``metrics.json`` (see :func:`derm.evaluation.evaluate`), ``predictions.csv``, PNG plots (ROC
curves with optional reader points, confusion matrices, t-SNE of the 2048-d embedding, saliency maps) and a
self-contained ``report.html``.
"""

from __future__ import annotations

import csv
import inspect
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from derm._cli import setup_logging, user_errors
from derm._util import atomic_write, unwritable
from derm.datasets import Dataset, read_dataset
from derm.errors import DermError
from derm.evaluation import evaluate, format_summary
from derm.trainer.config import Role
from derm.trainer.evaluate_sections import level_sections, task_sections
from derm.trainer.rundir import load_run

log = logging.getLogger(__name__)


class EvalError(DermError, ValueError):
    """A run cannot be evaluated as asked."""


def predict(
    model: Any, paths: Sequence[str | Path], size: int, batch_size: int = 32, tta: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Training-class probabilities and 2048-d embeddings of images (plain preprocessing), averaged over the first
    ``tta`` test-time views (the SDK's: ``derm.preprocess.TTA_VIEWS``, flips and quarter turns)."""

    from derm.preprocess import TTA_VIEWS, check_tta
    from derm.trainer.data import image_dataset
    from derm.trainer.model import with_embedding

    both = with_embedding(model)
    data = image_dataset(list(paths), size, batch_size=batch_size)
    views = [
        both.predict(data.map(lambda x, k=turns, f=flip: view(x, k, f)), verbose=0)
        for turns, flip in TTA_VIEWS[: check_tta(tta)]
    ]
    return np.mean([p for p, _ in views], axis=0), np.mean([e for _, e in views], axis=0)


def backbone_trained(cfg: dict[str, Any]) -> bool:
    """Whether a run changed the backbone's ImageNet weights (finetune mode, or top blocks unfrozen)."""
    return cfg.get("mode") == "finetune" or bool(cfg.get("unfreeze_top"))


def frozen_embedding(cfg: dict[str, Any], paths: Sequence[str | Path], size: int, batch_size: int = 32) -> np.ndarray:
    """The 2048-d embedding (pooled mixed10) of the run's starting weights, before any fine-tuning."""
    import keras

    from derm.trainer.data import image_dataset
    from derm.trainer.model import build_backbone

    inputs, _, backbone = build_backbone(size, cfg.get("weights", "inception-2015"))
    pooled = keras.layers.GlobalAveragePooling2D(name="frozen_embedding")(backbone.output)
    return keras.Model(inputs, pooled).predict(image_dataset(list(paths), size, batch_size=batch_size), verbose=0)


def knn_mpca(embedding: np.ndarray, y: np.ndarray, n_classes: int, k: int = 5) -> float:
    """Mean per-class accuracy of a leave-one-out k-nearest-neighbour vote (cosine similarity) among the rows with a
    class (``y >= 0``): how well an embedding separates the classes, one number."""
    from derm import metrics

    keep = np.asarray(y) >= 0
    x, yk = np.asarray(embedding, dtype=np.float64)[keep], np.asarray(y)[keep]
    if len(x) <= k:
        return float("nan")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    near = np.argsort(-sim, axis=1)[:, :k]
    votes = np.stack([np.bincount(yk[row], minlength=n_classes) for row in near])
    return float(metrics.mean_per_class_accuracy(yk, votes.argmax(1), n_classes)[0])


def view(batch: Any, turns: int, flip: bool) -> Any:
    """One test-time view of an image batch, as ``derm.preprocess.tta_views`` makes it of one image."""
    import tensorflow as tf

    x = tf.image.rot90(batch, k=turns) if turns else batch
    return tf.reverse(x, axis=[1]) if flip else x


#: Noisy copies per image for the report's SmoothGrad maps.
SMOOTHGRAD_SAMPLES = 16


def saliency(
    model: Any,
    images: np.ndarray,
    class_index: np.ndarray | None = None,
    *,
    samples: int = 0,
    noise: float = 0.15,
    seed: int = 0,
) -> np.ndarray:
    """Saliency maps: L1 norm over RGB of the gradient of the (predicted or given) class probability with respect
    to the input pixels. ``images`` (n, s, s, 3) in 0..255; returns (n, s, s).

    ``samples`` > 0: SmoothGrad (Smilkov et al. 2017), the gradient averaged over that many copies of each image with
    Gaussian noise of ``noise`` times the pixel range (255) added, which removes the speckle a raw gradient of a deep
    network shows; the class is the clean image's prediction."""
    import tensorflow as tf

    clean = np.asarray(images, dtype=np.float32)
    if class_index is None:
        class_index = np.asarray(model(clean, training=False)).argmax(axis=1)
    idx = tf.constant(np.asarray(class_index), dtype=tf.int64)
    rng = np.random.default_rng(seed)
    total = np.zeros_like(clean)
    for _ in range(max(1, samples)):
        noisy = clean + (rng.normal(0.0, noise * 255.0, clean.shape).astype(np.float32) if samples else 0.0)
        x = tf.convert_to_tensor(noisy)
        with tf.GradientTape() as tape:
            tape.watch(x)
            chosen = tf.gather(model(x, training=False), idx, axis=1, batch_dims=1)
        total += tape.gradient(chosen, x).numpy()
    return np.abs(total / max(1, samples)).sum(axis=-1)


def _select_rows(ds: Dataset, run_dir: Path, role: Role | str | None) -> np.ndarray:
    if role is None:
        return np.arange(len(ds))
    split = run_dir / "split.csv"
    with open(split, newline="", encoding="utf-8") as f:
        roles = {r["image"]: r["role"] for r in csv.DictReader(f)}
    idx = np.asarray([i for i, p in enumerate(ds.paths) if roles.get(str(p)) == role], dtype=np.int64)
    if len(idx) == 0:
        known = sorted(set(roles.values()))
        raise EvalError(f"No image of the dataset has role {role!r} in {str(split)!r} (roles there: {known}).")
    return idx


def _sample_per_class(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    classes = [c for c in np.unique(y) if c >= 0]
    picks: list[int] = []
    while len(picks) < k and classes:
        for c in classes:
            pool = np.setdiff1d(np.nonzero(y == c)[0], picks)
            if len(pool) and len(picks) < k:
                picks.append(int(rng.choice(pool)))
        if all(len(np.setdiff1d(np.nonzero(y == c)[0], picks)) == 0 for c in classes):
            break
    return np.asarray(picks, dtype=np.int64)


def _load_data(
    run_dir: Path, data: str | Path, tax: Any, cfg: dict[str, Any], role: Role | str | None, skip_bad: bool
) -> Dataset:
    """The labelled dataset read with the run's columns, narrowed to ``role`` in the run's split when one is given."""
    ds = read_dataset(
        data,
        tax,
        image_column=cfg.get("image_column", "image"),
        label_column=cfg.get("label_column", "label"),
        group_column=cfg.get("group_column", "auto"),
        on_error="skip" if skip_bad else "raise",
        check_images="decode" if skip_bad else "header",
    )
    return ds.subset(_select_rows(ds, run_dir, role))


def _write_predictions(path: Path, ds: Dataset, part: Any, probs: np.ndarray) -> None:
    """``predictions.csv``: image, label, node and the probability of each training class."""
    with atomic_write(path, newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "node", *part.labels])
        for i, row in enumerate(probs):
            w.writerow([str(ds.paths[i]), ds.labels[i], ds.nodes[i], *(f"{p:.6g}" for p in row)])


@dataclass(frozen=True)
class _Evaluated:
    """What the optional sections of an evaluation share: the run's model and partition, the data and its size."""

    model: Any
    tax: Any
    part: Any
    cfg: Any
    ds: Dataset
    data: str | Path
    size: int


def _tsne_section(
    result: dict[str, Any],
    ctx: _Evaluated,
    emb: np.ndarray,
    plots: Path,
    tsne: int,
    batch_size: int,
    seed: int,
) -> dict[str, Any]:
    """The t-SNE plot of the embedding (beside the frozen backbone's when the run trained it) and the 5-NN mean
    per-class accuracy of each, which is recorded in ``result["embedding_knn5_mpca"]``."""
    from derm.aggregation import inference_targets
    from derm.datasets import readable_images
    from derm.evaluation import resolve_level
    from derm.trainer import report

    ds, tax, part, cfg = ctx.ds, ctx.tax, ctx.part, ctx.cfg
    nodes = resolve_level(part, "nine", ds.nodes) if "nine" in result["levels"] else tax.roots
    y = inference_targets(tax, ds.nodes, list(nodes))
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(ds), size=min(tsne, len(ds)), replace=False))
    embeddings = {"this model": emb[pick]}
    if backbone_trained(cfg):  # the paper's Fig. 4 point: what fine-tuning did to the embedding
        with readable_images(ctx.data):
            embeddings["frozen ImageNet backbone"] = frozen_embedding(
                cfg, [ds.paths[i] for i in pick], ctx.size, batch_size
            )
    pngs, knn = [], {}
    for name, e in embeddings.items():
        png = plots / ("tsne.png" if name == "this model" else "tsne_frozen.png")
        report.plot_tsne(e, y[pick], [tax[u].name for u in nodes], png, seed=seed, title=name)
        pngs.append(png)
        knn[name] = knn_mpca(e, y[pick], len(nodes))
    result["embedding_knn5_mpca"] = knn
    return {
        "title": "t-SNE of the 2048-d embedding" + (" (fine-tuned beside frozen)" if len(pngs) > 1 else ""),
        "text": f"{len(pick)} images, coloured by class. How well the embedding separates the classes: "
        "mean per-class accuracy of a leave-one-out 5-nearest-neighbour vote (cosine) "
        + ", ".join(f"{k} {v:.3f}" for k, v in knn.items())
        + ".",
        "images": pngs,
    }


def _saliency_section(
    ctx: _Evaluated, probs: np.ndarray, plots: Path, n_images: int, samples: int, seed: int
) -> dict[str, Any] | None:
    """SmoothGrad maps of up to ``n_images`` images, a few of each class; None when no image has a class."""
    from derm.preprocess import preprocess
    from derm.trainer import report

    ds, part, size = ctx.ds, ctx.part, ctx.size
    y = np.asarray([-1 if (c := part.class_of(n)) is None else c for n in ds.nodes])
    pick = _sample_per_class(y, n_images, seed)
    if not len(pick):
        return None
    imgs = np.stack([preprocess(ds.paths[i], size) for i in pick])
    sal = saliency(ctx.model, imgs, samples=samples, seed=seed)
    titles = [f"true {ds.labels[i]}\npred {part.labels[int(probs[i].argmax())]}" for i in pick]
    png = report.plot_saliency(list(imgs), list(sal), titles, plots / "saliency.png")
    return {
        "title": "Saliency maps",
        "text": f"SmoothGrad: the input gradient of the predicted class probability, averaged over "
        f"{samples} copies with noise (15% of the pixel range), L1 over RGB, overlaid on the "
        "image (99th percentile at full colour). Titles: true label, then the prediction.",
        "images": [png],
    }


def run_eval(
    run_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    role: Role | str | None = None,
    readers: str | Path | None = None,
    tsne: int = 1000,
    saliency_images: int = 8,
    batch_size: int = 32,
    n_boot: int = 1000,
    seed: int = 0,
    skip_bad: bool = False,
    tta: int = 1,
    saliency_samples: int = SMOOTHGRAD_SAMPLES,
) -> dict[str, Any]:
    """Evaluate a run on a labelled CSV and write metrics, predictions, plots and report.html into ``out``.
    ``skip_bad`` leaves out rows with unknown labels or missing / unreadable images (else the CSV is refused)."""
    from derm.datasets import readable_images
    from derm.trainer import report_html

    run_dir, out = Path(run_dir), Path(out)
    problem = unwritable(out / "metrics.json")
    if problem:
        raise EvalError(f"--out {str(out)!r}: {problem}; choose another --out.")
    if role is not None and role not in set(Role):
        raise EvalError(f"--role {role!r}: not a role of a run's split.csv; choose one of {', '.join(Role)}.")
    model, tax, part, cfg = load_run(run_dir)
    size = int(model.input_shape[1])
    ds = _load_data(run_dir, data, tax, cfg, role, skip_bad)
    with readable_images(data):
        probs, emb = predict(model, ds.paths, size, batch_size, tta)
    result = evaluate(probs, ds.nodes, part, levels=("three", "nine", "labels"), n_boot=n_boot, seed=seed)
    result["tta"] = tta
    result["run"] = str(run_dir)
    result["data"] = ds.describe()
    result["role"] = None if role is None else str(role)
    out.mkdir(parents=True, exist_ok=True)
    _write_predictions(out / "predictions.csv", ds, part, probs)
    plots = out / "plots"
    ctx = _Evaluated(model=model, tax=tax, part=part, cfg=cfg, ds=ds, data=data, size=size)
    sections: list[dict[str, Any]] = [{"title": "Summary", "text": format_summary(result)}]
    sections += task_sections(result, plots, readers)
    sections += level_sections(result, plots)
    if tsne and len(ds) >= 10:
        sections.append(_tsne_section(result, ctx, emb, plots, tsne, batch_size, seed))
    if saliency_images:
        section = _saliency_section(ctx, probs, plots, saliency_images, saliency_samples, seed)
        if section is not None:
            sections.append(section)
    with atomic_write(out / "metrics.json") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    report_html.write_html_report(out / "report.html", f"derm-eval: {run_dir.name} on {Path(data).name}", sections)
    return result


app = typer.Typer(name="derm-eval", add_completion=False, pretty_exceptions_enable=False)


# the command's defaults are run_eval's: one source for the command line and the Python API
_D = {k: p.default for k, p in inspect.signature(run_eval).parameters.items() if p.default is not p.empty}


@app.command()
def eval_command(
    run: Annotated[Path, typer.Argument(help="derm-train run directory.")],
    data: Annotated[Path, typer.Option("--data", help="Labelled CSV to evaluate on.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for metrics.json, plots and report.html.")],
    role: Annotated[Role | None, typer.Option("--role", help="Only images with this role in the run's split.")] = None,
    readers: Annotated[
        Path | None, typer.Option("--readers", help="CSV of reader points: task,name,sensitivity,specificity.")
    ] = None,
    tsne: Annotated[int, typer.Option("--tsne", help="Images in the t-SNE plot (0: none).")] = _D["tsne"],
    saliency_images: Annotated[int, typer.Option("--saliency", help="Saliency maps to draw (0: none).")] = _D[
        "saliency_images"
    ],
    batch_size: Annotated[int, typer.Option("--batch-size")] = _D["batch_size"],
    seed: Annotated[int, typer.Option("--seed")] = _D["seed"],
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Leave out rows with unknown labels or missing / unreadable images.")
    ] = _D["skip_bad"],
    tta: Annotated[
        int, typer.Option("--tta", help="Average over 1, 2, 4 or 8 test-time views (flips, quarter turns).")
    ] = _D["tta"],
) -> None:
    """Evaluate a trained run the paper's way: 3-way and 9-way mean per-class accuracy, binary-task ROC/AUC."""
    setup_logging(logging.INFO)
    with user_errors(DermError, ValueError):
        result = run_eval(
            run,
            data,
            out,
            role=role,
            readers=readers,
            tsne=tsne,
            saliency_images=saliency_images,
            batch_size=batch_size,
            seed=seed,
            skip_bad=skip_bad,
            tta=tta,
        )
    typer.echo(format_summary(result))
    typer.echo(f"Report: {out / 'report.html'}")


def main() -> None:
    from derm._cli import run_app

    run_app(app)
