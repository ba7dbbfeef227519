"""Evaluation plots (ROC with readers, confusion matrices, t-SNE, saliency) and a self-contained HTML report.

The figures follow Esteva et al. (Nature 2017): ROC curves with the dermatologists as points (Fig. 3), confusion
matrices of the k-way tasks, a t-SNE of the last hidden layer (Fig. 4) and saliency maps (Extended Data Fig. 7).

Figures are drawn with matplotlib's object API on the Agg canvas (``matplotlib.figure.Figure`` +
``FigureCanvasAgg``): no display is needed, pyplot's global figure registry and the global backend are left alone,
and nothing stays open after a call. Every PNG and the HTML file are written atomically (a temporary file in the same
folder, then ``os.replace``); parent folders are created.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from derm._util import atomic_write

__all__ = [
    "plot_confusion",
    "plot_roc",
    "plot_saliency",
    "plot_tsne",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DISCLAIMER = "Research use only: not a diagnostic device."
_DPI = 110


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on an Agg canvas (headless; not registered with pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as PNG atomically to ``path`` and release it."""
    path = Path(path)
    try:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=_DPI, bbox_inches="tight")
    finally:
        fig.clear()
    return path


def _colors(k: int) -> list[Any]:
    from matplotlib import colormaps

    if k <= 10:
        return [colormaps["tab10"](i) for i in range(k)]
    if k <= 20:
        return [colormaps["tab20"](i) for i in range(k)]
    cmap = colormaps["turbo"]
    return [cmap(i / max(k - 1, 1)) for i in range(k)]


# ------------------------------------------------------------------------------------------------------------ ROC


def plot_roc(
    task_name: str,
    curves: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike[str],
    reader_points: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """ROC curves of one binary task: sensitivity (y) against 1 - specificity (x), with the chance diagonal.

    ``curves`` maps a series name (a model) to a :func:`derm.metrics.binary_task_metrics` dict: its ``fpr`` and
    ``tpr`` are drawn and its ``auc`` (with ``auc_ci`` when known) goes in the legend. ``reader_points`` (e.g. the
    dermatologists, from :func:`read_reader_points`) are dicts ``{name, sensitivity, specificity}`` in [0, 1],
    drawn as red markers, with their mean as a green marker.
    """
    if not curves:
        raise ValueError(f"plot_roc({task_name!r}): no curves to draw.")
    fig = _figure(5.2, 5.2)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    for (name, res), color in zip(curves.items(), _colors(len(curves)), strict=True):
        _draw_roc_curve(ax, name, res, color)
    if reader_points:
        _draw_reader_points(ax, reader_points)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(str(task_name))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _draw_roc_curve(ax: Any, name: str, res: Mapping[str, Any], color: Any) -> None:
    """One model's ROC curve, labelled with its AUC (and interval) when known."""
    if "fpr" not in res or "tpr" not in res:
        raise ValueError(f"plot_roc: curve {name!r} has no 'fpr'/'tpr' (keys: {sorted(res)}).")
    fpr, tpr = np.asarray(res["fpr"], dtype=float), np.asarray(res["tpr"], dtype=float)
    if fpr.ndim != 1 or fpr.shape != tpr.shape or len(fpr) < 2:
        raise ValueError(f"plot_roc: curve {name!r} has fpr shape {fpr.shape} and tpr shape {tpr.shape}.")
    label = str(name)
    if res.get("auc") is not None:
        label += f": AUC {res['auc']:.3f}"
        ci = res.get("auc_ci")
        if ci and ci[0] is not None and ci[1] is not None:
            label += f" ({ci[0]:.3f}-{ci[1]:.3f})"
    ax.plot(fpr, tpr, color=color, linewidth=2, label=label)


def _draw_reader_points(ax: Any, reader_points: Sequence[Mapping[str, Any]]) -> None:
    """The readers' operating points as red markers and their mean as a green one (checked to lie in [0, 1])."""
    pts = []
    for i, p in enumerate(reader_points):
        try:
            pts.append((float(p["sensitivity"]), float(p["specificity"])))
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"plot_roc: reader point {i} must have numeric 'sensitivity' and 'specificity', received {p!r}."
            ) from None
    sens, spec = np.asarray(pts).T
    if ((sens < 0) | (sens > 1) | (spec < 0) | (spec > 1)).any():
        raise ValueError("plot_roc: reader sensitivities and specificities must lie in [0, 1].")
    ax.scatter(1 - spec, sens, color="red", marker="o", s=28, zorder=3, label=f"readers (n={len(pts)})")
    ax.scatter(
        [1 - spec.mean()],
        [sens.mean()],
        color="green",
        marker="D",
        s=60,
        edgecolor="black",
        zorder=4,
        label=f"reader mean ({sens.mean():.2f} sens., {spec.mean():.2f} spec.)",
    )


# ------------------------------------------------------------------------------------------------------ confusion


def plot_confusion(
    confusion: Any,
    labels: Sequence[str],
    path: str | os.PathLike[str],
    title: str,
    normalize: bool = True,
) -> Path:
    """Heat map of a confusion matrix (rows true, columns predicted), row-normalised by default, counts annotated.

    Rows without support stay at 0. Cells are annotated up to 30 classes.
    """
    cm = np.asarray(confusion)
    labels = [str(v) for v in labels]
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(labels):
        raise ValueError(f"confusion must be square with {len(labels)} rows (one per label), received {cm.shape}.")
    if not np.isfinite(cm).all() or (cm < 0).any():
        raise ValueError("confusion must hold finite non-negative counts.")
    k = len(labels)
    support = cm.sum(axis=1, keepdims=True).astype(float)
    if normalize:
        values = np.divide(cm, support, out=np.zeros(cm.shape, dtype=float), where=support > 0)
        vmax = 1.0
    else:
        values = cm.astype(float)
        vmax = max(float(values.max()), 1.0)
    size = max(4.0, 0.55 * k + 2.5)
    fig = _figure(size + 1.0, size)
    ax = fig.add_subplot()
    im = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class" if normalize else "count")
    ax.set_xticks(range(k), labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=8 if k > 10 else 9)
    ax.set_yticks(range(k), labels, fontsize=8 if k > 10 else 9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(str(title))
    if k <= 30:
        fontsize = 8 if k <= 10 else 6
        for i in range(k):
            for j in range(k):
                count = round(float(cm[i, j]))
                text = f"{values[i, j]:.2f}\n({count})" if normalize else str(count)
                color = "white" if values[i, j] > 0.5 * vmax else "black"
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize=fontsize)
    return _save(fig, path)


# -------------------------------------------------------------------------------------------------------- t-SNE


def plot_tsne(
    embedding: Any,
    class_ids: Any,
    labels: Sequence[str],
    path: str | os.PathLike[str],
    seed: int = 0,
    perplexity: float = 30,
    title: str | None = None,
) -> np.ndarray:
    """t-SNE of an embedding (n, d) coloured by class; writes the PNG and returns the (n, 2) coordinates.

    Deterministic for a ``seed`` (``TSNE(init="pca", random_state=seed)``). Embeddings wider than 50 dimensions are
    first reduced to 50 with PCA; ``perplexity`` is clipped to ``(n - 1) / 3`` for small ``n``. ``class_ids`` index
    ``labels``; entries below 0 are drawn in grey as "other".
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(embedding, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embedding must have shape (n, d), received {x.shape}.")
    n = len(x)
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 points, received {n}.")
    if not np.isfinite(x).all():
        raise ValueError(f"embedding holds {int((~np.isfinite(x)).sum())} non-finite values.")
    y = np.asarray(class_ids)
    if y.shape != (n,) or not (y.dtype == bool or np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"class_ids must be {n} integers (one per row of embedding), received shape {y.shape}.")
    labels = [str(v) for v in labels]
    if (y >= len(labels)).any():
        raise ValueError(f"class_ids hold {int(y.max())}, beyond the {len(labels)} labels {labels}.")
    if not perplexity > 0:
        raise ValueError(f"perplexity must be positive, received {perplexity!r}.")
    if x.shape[1] > 50:
        x = PCA(n_components=min(50, n), random_state=seed).fit_transform(x)
    perp = float(min(perplexity, (n - 1) / 3))
    coords = TSNE(n_components=2, perplexity=perp, init="pca", learning_rate="auto", random_state=seed).fit_transform(x)
    fig = _figure(6.5, 5.5)
    ax = fig.add_subplot()
    other = y < 0
    if other.any():
        ax.scatter(*coords[other].T, s=8, color="0.75", alpha=0.6, label=f"other ({int(other.sum())})")
    for c, color in enumerate(_colors(len(labels))):
        sel = y == c
        if sel.any():
            ax.scatter(*coords[sel].T, s=10, color=color, alpha=0.8, label=f"{labels[c]} ({int(sel.sum())})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title((f"{title}: " if title else "") + f"t-SNE ({n} points, perplexity {perp:.3g})")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, markerscale=2, frameon=False)
    _save(fig, path)
    return coords


# ----------------------------------------------------------------------------------------------------- saliency


def _display_image(img: Any, i: int) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"images[{i}] must have shape (h, w, 3), received {a.shape}.")
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"images[{i}] holds non-finite values.")
    if a.max() > 1.0:  # 0..255 floats
        a = a / 255.0
    return np.clip(a, 0.0, 1.0)


def plot_saliency(
    images: Sequence[Any],
    saliency: Sequence[Any],
    titles: Sequence[str],
    path: str | os.PathLike[str],
) -> Path:
    """A grid of images (h, w, 3) uint8, each with its saliency map (h, w) overlaid as a heat map: the map scaled so
    that its 99th percentile is full colour (a few extreme pixels would otherwise leave it nearly black), transparent
    where it is low. Titles are wrapped to the tile's width.

    Up to 4 images a row. Float images in [0, 1] or [0, 255] are accepted too.
    """
    import textwrap

    from matplotlib import colormaps

    if not (len(images) == len(saliency) == len(titles)):
        raise ValueError(
            f"images, saliency and titles differ in length: {len(images)}, {len(saliency)}, {len(titles)}."
        )
    if not images:
        raise ValueError("plot_saliency: no images.")
    imgs = [_display_image(im, i) for i, im in enumerate(images)]
    overlays = []
    for i, s in enumerate(saliency):
        m = np.asarray(s, dtype=np.float64)
        if m.ndim != 2:
            raise ValueError(f"saliency[{i}] must have shape (h, w), received {m.shape}.")
        if not np.isfinite(m).all():
            raise ValueError(f"saliency[{i}] holds non-finite values.")
        top = np.percentile(m, 99)
        m = np.clip(m / top, 0.0, 1.0) if top > 0 else np.zeros_like(m)
        rgba = colormaps["inferno"](m)
        rgba[..., 3] = 0.85 * m  # the image shows through where the map is low
        overlays.append(rgba)
    n = len(imgs)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = _figure(3.0 * cols, 3.4 * rows)
    for i in range(n):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(imgs[i])
        ax.imshow(overlays[i])
        ax.set_title("\n".join(textwrap.fill(line, 28) for line in str(titles[i]).splitlines()), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)
