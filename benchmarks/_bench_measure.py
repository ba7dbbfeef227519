"""``derm-bench``'s measurements of one file: load time, latency and peak memory in a fresh process with the SDK alone
(:func:`measure`, run by :func:`measure_in_child`), and accuracy on labelled images (:func:`accuracy`)."""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike getrusage's maxrss it does not carry the parent's peak
    across fork and exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * (1024 if sys.platform == "darwin" else 1))


def measure(path: str, threads: int | None, runs: int, warmup: int) -> dict[str, Any]:
    """Load time, first inference, latency percentiles and peak RSS of one file, in this (fresh) process."""
    from derm.classifier import Classifier

    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    clf = Classifier.load(path, threads=threads)
    load_s = time.perf_counter() - t0
    s = clf.input_size
    image = np.random.default_rng(0).integers(0, 256, (1, s, s, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    clf.run(image)
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        clf.run(image)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        clf.run(image)
        times.append((time.perf_counter() - t0) * 1e3)
    q = np.percentile(times, [50, 90, 99])
    return {
        "backend": clf.backend.name,
        "load_s": load_s,
        "first_ms": first_ms,
        "mean_ms": statistics.fmean(times),
        "p50_ms": float(q[0]),
        "p90_ms": float(q[1]),
        "p99_ms": float(q[2]),
        "runs": runs,
        "threads": threads,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_load_mb": rss0,
        "tensorflow_loaded": "tensorflow" in sys.modules,  # the SDK alone: memory is the app's, not TensorFlow's
    }


def measure_in_child(path: str, threads: int | None, runs: int, warmup: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "derm.benchmarks.bench",
        "_measure",
        path,
        "--runs",
        str(runs),
        "--warmup",
        str(warmup),
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def accuracy(
    outputs: dict[str, np.ndarray], manifest: dict[str, Any], taxonomy: Any, nodes: list[str], n_boot: int, seed: int
) -> dict[str, Any]:
    from derm.aggregation import inference_targets, task_targets
    from derm.metrics import bootstrap_auc, multiclass_metrics

    out: dict[str, Any] = {}
    for o in manifest["outputs"]:
        if o["kind"] == "level":
            y = inference_targets(taxonomy, nodes, o["labels"])
            m = multiclass_metrics(y, outputs[o["name"]], o["labels"])
            out[o["name"]] = {"mean_per_class_accuracy": m["mean_per_class_accuracy"], "accuracy": m["accuracy"]}
        elif o["kind"] == "task":
            y = task_targets(taxonomy, nodes, o["task"]["id"])
            keep = y >= 0
            if keep.sum() and 0 < y[keep].sum() < keep.sum():
                a, lo, hi = bootstrap_auc(y[keep], outputs[o["name"]][keep, 0], n_boot=n_boot, seed=seed)
                out[o["name"]] = {"auc": a, "auc_ci": [lo, hi], "n_positive": int(y[keep].sum()), "n": int(keep.sum())}
    return out
