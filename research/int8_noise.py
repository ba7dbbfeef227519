"""Where the int8 file's difference from the float model comes from: weights or activations, and which blocks.

For a derm-train run (default: the HAM10000 fold-0 model of the trainer benchmark), the int8 preparation of
``derm-export`` (input scaling folded, ReLU channels equalized, weights GPTQ-rounded; :mod:`derm.exporter.export`)
is simulated in Keras with :mod:`research.int8sim` on held-out images, rounding one thing at a time:

- the weights alone (the GPTQ integers, float activations), the activations alone (float weights), both;
- the activations of one part of Inception-v3 alone (the stem's first convolution, the rest of the stem, the 35x35,
  17x17 and 8x8 blocks), float everywhere else.

Each row gives the mean absolute difference of the 3-way and 9-way probabilities and the root mean square of the
9-way difference, whose square roughly adds up over independent sources (its "share" column); with ``--file``
the exported int8 file's own difference on the same images is measured beside them.

    python -m research.int8_noise --file runs/bench/export/model-int8.tflite

writes ``benchmarks/results/int8_noise.json`` and ``int8_noise.md``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from derm._cli import setup_logging
from derm.benchmarks._results import write_results
from derm.exporter.config import DEFAULT_CALIBRATION, DEFAULT_ROUNDING_IMAGES
from derm.exporter.equalize import DEFAULT_ALPHA

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
log = logging.getLogger("research.int8_noise")

# parts of Inception-v3, by the block each ReLU belongs to (research.int8sim.blocks)
PARTS = {
    "stem: first convolution": None,  # filled in: the first ReLU alone
    "stem: the other four convolutions": ["stem"],
    "35x35 blocks (mixed0-2)": ["mixed0", "mixed1", "mixed2"],
    "17x17 blocks (mixed3-7)": ["mixed3", "mixed4", "mixed5", "mixed6", "mixed7"],
    "8x8 blocks (mixed8-10)": ["mixed8", "mixed9", "mixed10"],
}


def differences(ref: np.ndarray, got: np.ndarray, matrices: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean absolute difference and top-1 agreement of each level's probabilities, and the 9-way rms difference."""
    out: dict[str, float] = {}
    for level, m in matrices.items():
        a, b = ref @ m, got @ m
        out[f"mean_abs_{level}"] = float(np.abs(a - b).mean())
        out[f"top1_{level}"] = float((a.argmax(1) == b.argmax(1)).mean())
        out[f"rms_{level}"] = float(np.sqrt(((a - b) ** 2).mean()))
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/bench/ham_cv/fold_0", help="derm-train run directory")
    ap.add_argument("--images", type=int, default=500, help="held-out images (test fold), derm-export's seeded sample")
    ap.add_argument("--calibration-size", type=int, default=DEFAULT_CALIBRATION)
    ap.add_argument("--rounding-images", type=int, default=DEFAULT_ROUNDING_IMAGES)
    ap.add_argument("--file", default=None, help="the exported int8 .tflite of the same run, measured beside")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=str(RESULTS))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(logging.INFO, timestamps=True)

    from derm.exporter.export import ExportConfig, calibration_rows, load_images, validation_rows
    from derm.exporter.graph import output_specs
    from derm.trainer.rundir import load_run

    t0 = time.perf_counter()
    run = Path(args.run)
    model, tax, part, cfg = load_run(run)
    size = int(model.input_shape[1])
    matrices = {s.name.removeprefix("probs_"): s.matrix for s in output_specs(part) if s.kind == "level"}
    cal_rows, _ = calibration_rows(ExportConfig(run=str(run), calibration_size=args.calibration_size))
    cal = load_images([r["image"] for r in cal_rows], size, "calibration").astype(np.float32)
    # the held-out images derm-export itself would compare on with --validation-size IMAGES (its seeded sample)
    paths, _, source = validation_rows(ExportConfig(run=str(run), validation_size=args.images, seed=args.seed), tax)
    images = load_images(paths, size, "held-out")
    ref = model.predict(images.astype(np.float32), batch_size=16, verbose=0)
    rows = _simulated(run, cal, args.rounding_images, images, ref, matrices)
    if args.file:
        from derm.runtimes import TFLiteRuntime

        got = TFLiteRuntime(args.file)(images)["training_probs"]
        rows.append(
            {"rounded": f"the exported file {Path(args.file).name} (ai-edge-litert)", **differences(ref, got, matrices)}
        )
    whole = next(r for r in rows if r["rounded"].startswith("activations only"))["rms_nine"]
    for r in rows:
        r["share_of_activation_rms2"] = (r["rms_nine"] / whole) ** 2 if whole else None
    report = {
        "command": "python -m research.int8_noise " + " ".join(argv if argv is not None else sys.argv[1:]),
        "run": str(run),
        "weights": cfg.get("weights"),
        "input_size": size,
        "images": len(images),
        "source": source,
        "calibration_images": len(cal),
        "rounding_images": args.rounding_images,
        "seconds": time.perf_counter() - t0,
        "rows": rows,
    }
    out = Path(args.results)
    write_results(out, "int8_noise", report, markdown(report))
    return 0


def _simulated(
    run: Path,
    cal: np.ndarray,
    rounding_images: int,
    images: np.ndarray,
    ref: np.ndarray,
    matrices: dict[str, np.ndarray],
) -> list[dict[str, Any]]:
    """One row per rounding simulated in Keras: the weights, the activations, both, and each part's activations."""
    from derm.exporter.export import int8_ready_classifier
    from research import int8sim

    def prepared(rounds: bool) -> Any:  # derm-export's int8 preparation (fold, equalize, GPTQ when rounds)
        return int8_ready_classifier(run, cal, rounding_images, {"export": {}}, alpha=DEFAULT_ALPHA, rounds=rounds)

    rows: list[dict[str, Any]] = []

    def measure(name: str, m: Any, ranges: dict | None, only: list[str] | None = None) -> None:
        t = time.perf_counter()
        (got,) = int8sim.simulate(m, images, ranges, only)
        rows.append({"rounded": name, **differences(ref, got, matrices), "seconds": time.perf_counter() - t})
        log.info("%s: %s", name, rows[-1])

    rounded = prepared(rounds=True)
    measure("weights only (GPTQ integers, float activations)", rounded, None)
    measure("weights and activations (the int8 file, simulated)", rounded, int8sim.activation_ranges(rounded, cal))
    del rounded
    floats = prepared(rounds=False)
    ranges = int8sim.activation_ranges(floats, cal)
    measure("activations only (float weights)", floats, ranges)
    block_of = int8sim.blocks(floats)
    first = next(name for name in block_of if block_of[name] == "stem")
    for part_name, wanted in PARTS.items():
        relus = [first] if wanted is None else [n for n, b in block_of.items() if b in wanted and n != first]
        measure(f"activations of {part_name} only ({len(relus)} ReLUs)", floats, ranges, relus)
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Where int8's difference comes from: {report['run']} ({report['weights']}, "
        f"{report['input_size']}x{report['input_size']})",
        "",
        f"{report['images']} held-out images ({report['source']}, derm-export's seeded sample) against the float Keras "
        "model. The int8 "
        f"preparation is derm-export's (input scaling folded, equalized on {report['calibration_images']} calibration "
        f"images, GPTQ on {report['rounding_images']}); roundings simulated in Keras (research.int8sim), one "
        "source at a time. Share: the row's squared 9-way rms difference over that of all activations (independent "
        "sources add up roughly in squares).",
        "",
        "| rounded | mean abs 3 / 9 | top-1 3 / 9 | rms 9 | share |",
        "|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        share = r.get("share_of_activation_rms2")
        lines.append(
            f"| {r['rounded']} | {r['mean_abs_three']:.5f} / {r['mean_abs_nine']:.5f} | "
            f"{r['top1_three']:.3f} / {r['top1_nine']:.3f} | {r['rms_nine']:.5f} | "
            f"{'-' if share is None else format(share, '.2f')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
