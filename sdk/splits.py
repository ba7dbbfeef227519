"""Group-aware splits: near-identical images never straddle train and validation.

Images that share a group id (a lesion, a patient) or that are near-duplicates (resized or re-encoded copies: a
perceptual hash within ``max_distance`` bits, confirmed by a colour thumbnail) are joined into connected
components.
Folds are built from whole components, stratified by class as far as the components allow.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from derm._progress import track
from derm.errors import DatasetError
from derm.preprocess import ImageError

log = logging.getLogger(__name__)

HASH_SIZE = 8  # 8x8 low-frequency DCT coefficients -> 64-bit hash
_DCT_SIZE = 32
THUMB_SIZE = 12  # 12x12 RGB thumbnail confirms a hash match
#: Defaults chosen on HAM10000 by benchmarks/near_duplicates.py (see its results): every resized and re-encoded
#: copy is found, and hardly any pair of different lesions is joined.
DEFAULT_MAX_DISTANCE = 10  # pHash bits (out of 64)
DEFAULT_MIN_SIMILARITY = 0.99  # cosine of the mean-centred thumbnails


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT = _dct_matrix(_DCT_SIZE)


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def perceptual_hash(image: Image.Image | str | os.PathLike[str]) -> int:
    """64-bit DCT perceptual hash (pHash): robust to resizing, re-encoding and small colour changes.

    Grey levels at 32x32, 2-D DCT, the 8x8 lowest frequencies, one bit per coefficient above their median.
    """
    if not isinstance(image, Image.Image):
        with Image.open(image) as im:
            return perceptual_hash(im)
    gray = np.asarray(_rgb(image).convert("L").resize((_DCT_SIZE, _DCT_SIZE), Image.Resampling.LANCZOS), np.float64)
    low = (_DCT @ gray @ _DCT.T)[:HASH_SIZE, :HASH_SIZE].ravel()
    bits = low > np.median(low)
    return int(np.packbits(bits).view(">u8")[0])


def thumbnail_vector(image: Image.Image) -> np.ndarray:
    """Mean-centred, unit-norm 12x12 RGB thumbnail: colour layout, which grey-level pHash ignores."""
    t = np.asarray(_rgb(image).resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BOX), np.float64).ravel()
    t = t - t.mean()
    return (t / max(float(np.linalg.norm(t)), 1e-9)).astype(np.float32)


@dataclass(frozen=True)
class Fingerprints:
    """Per-image near-duplicate fingerprints: 64-bit pHashes and thumbnail vectors."""

    hashes: np.ndarray  # (n,) uint64
    thumbs: np.ndarray  # (n, 432) float32, unit norm

    def __len__(self) -> int:
        return len(self.hashes)


def image_fingerprints(paths: Sequence[str | os.PathLike[str]], workers: int | None = None) -> Fingerprints:
    """Fingerprints of many images, decoded on a small thread pool with a progress bar."""
    workers = workers or min(8, (os.cpu_count() or 2) * 2)

    def one(p: str | os.PathLike[str]) -> tuple[int, np.ndarray]:
        try:
            with Image.open(p) as im:
                im.draft("RGB", (_DCT_SIZE * 4, _DCT_SIZE * 4))  # JPEG: decode at a reduced scale, much faster
                im = ImageOps.exif_transpose(_rgb(im))
                return perceptual_hash(im), thumbnail_vector(im)
        except Exception as exc:
            raise ImageError(f"Cannot read image {str(p)!r} ({type(exc).__name__}: {exc}).") from None

    with ThreadPoolExecutor(workers) as pool:
        out = list(track(pool.map(one, paths), "Fingerprinting images", total=len(paths)))
    hashes = np.asarray([h for h, _ in out], dtype=np.uint64)
    thumbs = np.stack([t for _, t in out]) if out else np.zeros((0, 3 * THUMB_SIZE**2), np.float32)
    return Fingerprints(hashes, thumbs)


def near_duplicate_pairs(
    fingerprints: Fingerprints,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
    block: int = 2048,
) -> np.ndarray:
    """Pairs ``(i, j)``, ``i < j``: pHashes within ``max_distance`` bits *and* thumbnails of cosine at least
    ``min_similarity``. Shape (pairs, 2).

    The hash alone joins many different lesions (dermoscopy images share a centred dark blob); the thumbnail
    check removes those while keeping resized and re-encoded copies.
    """
    if not 0 <= max_distance <= 64:
        raise ValueError(f"max_distance must be between 0 and 64 bits, received {max_distance!r}.")
    if not -1.0 <= min_similarity <= 1.0:
        raise ValueError(f"min_similarity must be a cosine between -1 and 1, received {min_similarity!r}.")
    h = np.asarray(fingerprints.hashes, dtype=np.uint64)
    t = fingerprints.thumbs
    out = [np.zeros((0, 2), dtype=np.int64)]
    for start in range(0, len(h), block):
        dist = np.bitwise_count(h[start : start + block, None] ^ h[None, :])
        i, j = np.nonzero(dist <= max_distance)
        i = i + start
        keep = i < j
        i, j = i[keep], j[keep]
        sim = np.einsum("ij,ij->i", t[i], t[j])
        keep = sim >= min_similarity
        out.append(np.stack([i[keep], j[keep]], axis=1).astype(np.int64))
    return np.concatenate(out)


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def group_components(
    n: int,
    groups: Sequence[str | None] | None = None,
    fingerprints: Fingerprints | None = None,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
) -> np.ndarray:
    """Connected components of "same group or near-duplicate"; component ids numbered 0.. in order of first image.

    Args:
        n: number of images.
        groups: a group id per image (lesion, patient); ``None`` or empty entries are groups of one.
        fingerprints: per image (see :func:`image_fingerprints`); ``None`` skips near-duplicate detection.
        max_distance, min_similarity: see :func:`near_duplicate_pairs`.
    """
    uf = _UnionFind(n)
    if groups is not None:
        if len(groups) != n:
            raise ValueError(f"groups has {len(groups)} entries for {n} images.")
        first: dict[str, int] = {}
        for i, g in enumerate(groups):
            if g is None or g == "":
                continue
            if g in first:
                uf.union(first[g], i)
            else:
                first[g] = i
    if fingerprints is not None:
        if len(fingerprints) != n:
            raise ValueError(f"fingerprints has {len(fingerprints)} entries for {n} images.")
        pairs = near_duplicate_pairs(fingerprints, max_distance, min_similarity)
        for i, j in pairs:
            uf.union(int(i), int(j))
        log.info("near-duplicate pairs: %d", len(pairs))
    roots = [uf.find(i) for i in range(n)]
    remap: dict[int, int] = {}
    return np.asarray([remap.setdefault(r, len(remap)) for r in roots], dtype=np.int64)


def kfold(labels: Sequence[int | str], components: Sequence[int], k: int = 9, seed: int = 0) -> np.ndarray:
    """Fold index (0..k-1) per image: whole components per fold, class proportions balanced across folds.

    Greedy, after scikit-learn's StratifiedGroupKFold: components in order of decreasing size (ties broken by a
    seeded shuffle) each go to the fold that keeps the per-class spread across folds smallest, then the
    smallest fold. Deterministic for a given seed.
    """
    labels = np.asarray(labels)
    comps = np.asarray(components, dtype=np.int64)
    if len(labels) != len(comps):
        raise ValueError(f"{len(labels)} labels but {len(comps)} component ids.")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an integer of at least 2, received {k!r}.")
    n_comp = int(comps.max()) + 1 if len(comps) else 0
    if n_comp < k:
        raise DatasetError(
            f"Only {n_comp} independent groups of images (lesions, patients, near-duplicates joined): cannot make {k} "
            "folds. Use fewer folds or add images."
        )
    classes, y = np.unique(labels, return_inverse=True)
    counts = np.zeros((n_comp, len(classes)), dtype=np.int64)
    np.add.at(counts, (comps, y), 1)
    totals = np.maximum(counts.sum(axis=0), 1)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_comp)
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    fold_counts = np.zeros((k, len(classes)), dtype=np.int64)
    comp_fold = np.empty(n_comp, dtype=np.int64)
    eye = np.eye(k, dtype=np.int64)
    for c in order:
        # Candidate fold counts if component c went to each fold: shape (k folds tried, k folds, classes).
        trial = fold_counts[None, :, :] + eye[:, :, None] * counts[c][None, None, :]
        spread = (trial / totals).std(axis=1).mean(axis=1)
        size = fold_counts.sum(axis=1)
        best = np.lexsort((np.arange(k), size, np.round(spread, 12)))[0]
        comp_fold[c] = best
        fold_counts[best] += counts[c]
    return comp_fold[comps]


def train_val_split(
    labels: Sequence[int | str], components: Sequence[int], val_fraction: float = 0.1, seed: int = 0
) -> np.ndarray:
    """Boolean mask, True for validation: about ``val_fraction`` of the images, whole components only."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, received {val_fraction!r}.")
    k = max(2, round(1 / val_fraction))
    n_comp = len(np.unique(np.asarray(components)))
    if n_comp < k:
        raise DatasetError(
            f"Only {n_comp} independent groups of images (lesions, patients, near-duplicates joined): a validation "
            f"fraction of {val_fraction} needs at least {k}. Add images or raise --val-fraction (to {1 / n_comp:.2g} "
            "or more)."
        )
    return kfold(labels, components, k=k, seed=seed) == 0


def describe_folds(labels: Sequence[str], folds: np.ndarray) -> str:
    """A small text table: images per class per fold."""
    labels = np.asarray(labels)
    classes = sorted(set(labels.tolist()))
    k = int(folds.max()) + 1
    width = max(8, *(len(c) for c in classes))
    head = "fold".ljust(6) + "".join(c.rjust(width + 1) for c in classes) + "total".rjust(8)
    rows = [head]
    for f in range(k):
        sel = labels[folds == f]
        rows.append(
            str(f).ljust(6)
            + "".join(str(int((sel == c).sum())).rjust(width + 1) for c in classes)
            + str(len(sel)).rjust(8)
        )
    return "\n".join(rows)
