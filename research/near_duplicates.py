"""How well the near-duplicate detector separates copies from different lesions, on real images.

    python -m research.near_duplicates --data ../shared/data/ham10000/labels.csv --out benchmarks/results

For every pair of HAM10000 images it counts the pairs the detector joins, split into same-lesion and
different-lesion pairs, for a grid of thresholds; and on a random sample it makes synthetic near-duplicates
(downscaled to 75% and re-encoded as JPEG quality 70, optionally with a 2% border crop) and measures the share
found. Writes ``near_duplicates.json`` and ``near_duplicates.md``.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image

import derm
from derm._util import atomic_write
from derm.splits import (
    DEFAULT_MAX_DISTANCE,
    DEFAULT_MIN_SIMILARITY,
    Fingerprints,
    image_fingerprints,
    perceptual_hash,
    thumbnail_vector,
)

DISTANCES = (4, 6, 8, 10, 12)
SIMILARITIES = (0.98, 0.985, 0.99, 0.995)


def _copy(im: Image.Image, crop: float) -> Image.Image:
    w, h = im.size
    c = int(crop * w)
    im = im.crop((c, c, w - c, h - c)).resize((w * 3 // 4, h * 3 // 4), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=70)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _fp(ims: list[Image.Image]) -> Fingerprints:
    return Fingerprints(
        np.array([perceptual_hash(i) for i in ims], dtype=np.uint64), np.stack([thumbnail_vector(i) for i in ims])
    )


def run(data: Path, sample: int, seed: int) -> dict:
    ds = derm.read_dataset(data)
    groups = np.array(ds.groups if ds.groups is not None else [str(i) for i in range(len(ds))])
    t0 = time.perf_counter()
    fps = image_fingerprints(ds.paths)
    seconds = time.perf_counter() - t0

    # All pairs within the widest distance, then every (distance, similarity) cell from them.
    h = fps.hashes
    cand_i, cand_j, cand_d = [], [], []
    for start in range(0, len(h), 2048):
        d = np.bitwise_count(h[start : start + 2048, None] ^ h[None, :])
        i, j = np.nonzero(d <= max(DISTANCES))
        keep = i + start < j
        cand_i.append(i[keep] + start)
        cand_j.append(j[keep])
        cand_d.append(d[i[keep], j[keep]])
    i, j, d = np.concatenate(cand_i), np.concatenate(cand_j), np.concatenate(cand_d)
    sim = np.einsum("ij,ij->i", fps.thumbs[i], fps.thumbs[j])
    same = groups[i] == groups[j]

    rng = np.random.default_rng(seed)
    picks = rng.choice(len(ds), min(sample, len(ds)), replace=False)
    originals = [Image.open(ds.paths[k]).convert("RGB") for k in picks]
    orig_fp = _fp(originals)
    copies = {crop: _fp([_copy(im, crop) for im in originals]) for crop in (0.0, 0.02)}

    grid = []
    for md in DISTANCES:
        for ms in SIMILARITIES:
            joined = (d <= md) & (sim >= ms)
            row = {
                "max_distance": md,
                "min_similarity": ms,
                "pairs_same_group": int((joined & same).sum()),
                "pairs_different_group": int((joined & ~same).sum()),
            }
            for crop, cfp in copies.items():
                cd = np.bitwise_count(orig_fp.hashes ^ cfp.hashes)
                cs = np.einsum("ij,ij->i", orig_fp.thumbs, cfp.thumbs)
                row[f"copies_found_crop{crop:g}"] = float(np.mean((cd <= md) & (cs >= ms)))
            grid.append(row)
    default = next(
        r for r in grid if r["max_distance"] == DEFAULT_MAX_DISTANCE and r["min_similarity"] == DEFAULT_MIN_SIMILARITY
    )
    return {
        "benchmark": "near_duplicates",
        "command": f"python -m research.near_duplicates --data {data} --sample {sample} --seed {seed}",
        "dataset": ds.describe(),
        "images": len(ds),
        "all_pairs": len(ds) * (len(ds) - 1) // 2,
        "fingerprint_seconds": round(seconds, 2),
        "images_per_second": round(len(ds) / seconds, 1),
        "sample": len(picks),
        "defaults": default,
        "grid": grid,
        "machine": {"python": platform.python_version(), "cpu_count": __import__("os").cpu_count()},
        "derm_version": derm.__version__,
    }


def to_markdown(res: dict) -> str:
    lines = [
        "# Near-duplicate detection on real images",
        "",
        f"`{res['command']}`",
        "",
        f"{res['images']:,} images ({res['all_pairs']:,} pairs), fingerprinted in {res['fingerprint_seconds']} s "
        f"({res['images_per_second']} images/s, {res['machine']['cpu_count']} cores). Synthetic copies: "
        f"{res['sample']} random images downscaled to 75% and re-encoded (JPEG q70), with and without a 2% crop.",
        "",
        "| max bits | min cosine | pairs joined, same group | pairs joined, different groups | copies found | "
        "copies found (2% crop) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res["grid"]:
        mark = " **(default)**" if r == res["defaults"] else ""
        lines.append(
            f"| {r['max_distance']} | {r['min_similarity']}{mark} | {r['pairs_same_group']} | "
            f"{r['pairs_different_group']} | {r['copies_found_crop0']:.1%} | {r['copies_found_crop0.02']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="dataset CSV with a group column")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--sample", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    res = run(args.data, args.sample, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out / "near_duplicates.json") as f:
        json.dump(res, f, indent=2)
    with atomic_write(args.out / "near_duplicates.md") as f:
        f.write(to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
