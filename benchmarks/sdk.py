"""SDK benchmark: desktop inference on real HAM10000 images with an exported .tflite file.

- end-to-end images/s of ``Classifier.predict_many`` (decode and resize overlapping inference) against the raw
  interpreter ``invoke`` rate on pre-decoded inputs (issue #5 target: at least 0.9 of it);
- MediaPipe Tasks' ImageClassifier on the same file and the same (pre-resized) images: top-1 agreement per head and
  per-image time against the SDK's;
- ``derm triage`` over a folder of real images (default: all 10,015 HAM10000 images) in one process: images/s and
  peak RSS (bounded memory).

    python -m derm.benchmarks.sdk --model runs/bench/export/model-int8.tflite

writes ``benchmarks/results/sdk.json`` and ``sdk.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from derm.benchmarks._results import write_results

RESULTS = Path(__file__).resolve().parent / "results"


def _rss_mb() -> float:
    from derm.benchmarks.bench import peak_rss_mb

    return peak_rss_mb()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/bench/export/model-int8.tflite")
    ap.add_argument(
        "--images", default=os.path.join(os.environ.get("DERM_SHARED", "../shared"), "data/ham10000/images")
    )
    ap.add_argument("--n", type=int, default=400, help="images for the throughput and MediaPipe comparisons")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--triage-limit", type=int, default=0, help="triage only the first N images (0: the whole folder)")
    ap.add_argument("--results", default=str(RESULTS))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    from derm.classifier import Classifier
    from derm.preprocess import preprocess

    paths = sorted(str(p) for p in Path(args.images).glob("*.jpg"))
    sample = paths[: args.n]
    clf = Classifier.load(args.model, threads=args.threads)
    report: dict[str, Any] = {"model": args.model, "threads": args.threads, "workers": args.workers, "n": len(sample)}
    arrays = np.stack([preprocess(p, clf.input_size) for p in sample])
    raw = _raw_invoke_rate(args.model, args.threads, arrays)
    # end to end: paths in, predictions out (decode overlapping inference)
    clf2 = Classifier.load(args.model, threads=args.threads)
    list(clf2.predict_many(sample[:3]))
    t0 = time.perf_counter()
    preds = list(clf2.predict_many(sample, workers=args.workers))
    e2e = len(preds) / (time.perf_counter() - t0)
    report["throughput"] = {"raw_invoke_img_s": raw, "end_to_end_img_s": e2e, "ratio": e2e / raw, "target": 0.9}
    report["mediapipe"] = _mediapipe(args.model, clf, arrays)
    report["triage"] = _triage(Path(args.images), paths, args.triage_limit, clf2, args.workers)
    write_results(args.results, "sdk", report, markdown(report))
    return 0


def _raw_invoke_rate(model: str, threads: int, arrays: np.ndarray) -> float:
    """Images per second of the bare interpreter's invoke on pre-decoded inputs."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=model, num_threads=threads)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    for a in arrays[:3]:
        interp.set_tensor(inp["index"], a[None])
        interp.invoke()
    t0 = time.perf_counter()
    for a in arrays:
        interp.set_tensor(inp["index"], a[None])
        interp.invoke()
    return len(arrays) / (time.perf_counter() - t0)


def _mediapipe(model: str, clf: Any, arrays: np.ndarray) -> dict[str, Any]:
    """MediaPipe Tasks' ImageClassifier on the same file and resized images: top-1 agreement and time per image."""
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions, vision

    options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=model), max_results=-1)
    mp_times, ours_times, agree = [], [], {}
    with vision.ImageClassifier.create_from_options(options) as mpc:
        for a in arrays:
            image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(a))
            t0 = time.perf_counter()
            res = mpc.classify(image)
            mp_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = clf.run(a[None])
            ours_times.append(time.perf_counter() - t0)
            for head in res.classifications:
                if not head.head_name.startswith("probs_"):
                    continue
                labels = clf.outputs[head.head_name]["labels"]
                mp_top = max(head.categories, key=lambda c: c.score).category_name
                ours = labels[int(np.argmax(out[head.head_name][0]))]
                agree.setdefault(head.head_name, []).append(mp_top == ours)
    return {
        "top1_agreement": {k: float(np.mean(v)) for k, v in agree.items()},
        "ms_per_image_mediapipe": 1e3 * statistics.median(mp_times),
        "ms_per_image_sdk": 1e3 * statistics.median(ours_times),
    }


def _triage(folder: Path, paths: list[str], limit: int, clf: Any, workers: int) -> dict[str, Any]:
    """``derm triage`` over the whole folder (or its first ``limit`` images) in this process: rate and peak memory."""
    from derm.triage import triage

    with tempfile.TemporaryDirectory() as tmp:
        if limit:
            folder = Path(tmp) / "images"
            folder.mkdir()
            for p in paths[:limit]:
                os.symlink(p, folder / Path(p).name)
        rss0 = _rss_mb()
        t0 = time.perf_counter()
        summary = triage(folder, clf, Path(tmp) / "out", workers=workers, progress=False)
        seconds = time.perf_counter() - t0
    return {
        "images": summary.images,
        "classified": summary.classified,
        "unreadable": summary.unreadable,
        "seconds": seconds,
        "img_s": summary.images / seconds,
        "peak_rss_mb_before": rss0,
        "peak_rss_mb_after": _rss_mb(),
    }


def markdown(r: dict[str, Any]) -> str:
    t, m, g = r["throughput"], r["mediapipe"], r["triage"]
    return "\n".join(
        [
            f"# SDK benchmark: {r['model']} ({r['threads']} threads, {r['workers']} decode workers)",
            "",
            f"On {r['n']} HAM10000 images:",
            "",
            "| measure | value | target |",
            "|---|---|---|",
            f"| raw interpreter invoke, pre-decoded | {t['raw_invoke_img_s']:.1f} img/s | |",
            f"| `predict_many`, from JPEG files | {t['end_to_end_img_s']:.1f} img/s | |",
            f"| ratio | {t['ratio']:.2f} | >= {t['target']} |",
            "| MediaPipe ImageClassifier, same file and images: top-1 agreement | "
            + ", ".join(f"{k} {v:.3f}" for k, v in m["top1_agreement"].items())
            + " | 1.000 |",
            f"| per-image time, MediaPipe / SDK (median) | {m['ms_per_image_mediapipe']:.1f} / "
            f"{m['ms_per_image_sdk']:.1f} ms | SDK no worse |",
            f"| `derm triage` of {g['images']:,} images | {g['img_s']:.1f} img/s, {g['seconds'] / 60:.1f} min | |",
            f"| peak RSS before / after triage | {g['peak_rss_mb_before']:.0f} / {g['peak_rss_mb_after']:.0f} MB | "
            "bounded |",
            "",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
