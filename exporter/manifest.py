"""The manifest every exported file carries: what its input wants, what each output means, and where it came from.

One JSON object, the same for every target (TFLite: an associated file ``manifest.json`` inside the standard
metadata; ONNX: ``metadata_props["derm_manifest"]``; Core ML: ``user_defined_metadata["derm_manifest"]``), so an app
or the SDK reads the labels, the levels, the preprocessing and the recommended operating points from the file itself.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from derm._util import sha256_file
from derm.aggregation import task_matrix
from derm.classifier import CONDITION_THRESHOLD
from derm.exporter.graph import ExportError, OutputSpec
from derm.manifest import MANIFEST_FORMAT, MANIFEST_KEY  # the schema version the SDK checks; the metadata key
from derm.partition import Partition

LABELS_KEY = "derm_labels_{}"  # ONNX metadata_props / Core ML user_defined_metadata: one JSON list per output

DISCLAIMER = (
    "A research and triage aid, not a diagnostic device: it does not replace examination by a clinician, and its "
    "numbers hold only for images like the ones it was trained and evaluated on."
)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def operating_points(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Recommended thresholds per binary task from a run's evaluation: the test split when it has one, else val."""
    for role in ("test", "val"):
        tasks = (metrics.get(role) or {}).get("tasks") or {}
        if tasks:
            return {
                task_id: {
                    "source": f"{role} split of the training run (Keras float model)",
                    "n_positive": t.get("n_positive"),
                    "n_negative": t.get("n_negative"),
                    "auc": t.get("auc"),
                    "auc_ci": t.get("auc_ci"),
                    # keyed by the sensitivity aimed at: threshold with its measured sensitivity and specificity
                    "by_sensitivity": t.get("operating_points", {}),
                }
                for task_id, t in tasks.items()
            }
    return {}


def _names(tax: Any, node_ids: Sequence[str]) -> str:
    """Node names as words in a sentence: "malignant melanoma", "a, b or c" (an initial capital lowered unless the
    name starts with an acronym)."""
    words = []
    for nid in node_ids:
        name = tax.nodes[nid].name
        words.append(name[:1].lower() + name[1:] if name[1:2].islower() else name)
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _sides(tax: Any, task: Any) -> tuple[str, str]:
    """Short words for a task's two sides: the halves of its name when it reads "X vs Y" ("Melanoma vs nevus" ->
    "melanoma", "nevus"), else the names of its positive and negative nodes."""
    halves = task.name.split(" vs ")
    if len(halves) == 2 and all(h.strip() for h in halves):
        return tuple(h.strip()[:1].lower() + h.strip()[1:] if h.strip()[1:2].islower() else h.strip() for h in halves)
    return _names(tax, task.positive), _names(tax, task.negative)


def build_manifest(
    run_dir: str | Path,
    partition: Partition,
    specs: Sequence[OutputSpec],
    *,
    target: str,
    quantize: str,
    input_size: int,
    calibration: Mapping[str, Any] | None = None,
    versions: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    run = Path(run_dir)
    tax = partition.taxonomy
    run_info = _read_json(run / "run.json")
    metrics = _read_json(run / "metrics.json")
    config = _read_json(run / "config.json")
    preprocess = _read_json(run / "preprocess.json")
    outputs = [_output_entry(s, partition) for s in specs]
    return {
        "format": MANIFEST_FORMAT,
        "name": "derm-classifier",
        "disclaimer": DISCLAIMER,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "input": _input_entry(input_size, preprocess),
        "outputs": outputs,
        "levels": [s.name.removeprefix("probs_") for s in specs if s.kind == "level"],
        "taxonomy": {"name": tax.name, "sha256": tax.sha256},
        "partition": {
            "sha256": partition.sha256,
            "max_class_size": partition.max_class_size,
            "classes": list(partition.labels),
        },
        "operating_points": operating_points(metrics),
        "training": _training_entry(run, run_info, metrics, config),
        "export": {"target": target, "quantize": quantize, "calibration": dict(calibration or {})},
        "versions": dict(versions or {}),
    }


def _output_entry(s: OutputSpec, partition: Partition) -> dict[str, Any]:
    """One output's manifest entry: its name, kind, labels and description, with the class names (training, level)
    or the task and its condition (task)."""
    tax = partition.taxonomy
    entry: dict[str, Any] = {"name": s.name, "kind": s.kind, "labels": list(s.labels)}
    if s.kind == "training":
        entry["description"] = "probability of each fine training class (softmax)"
        entry["names"] = [c.name for c in partition.classes]
        entry["node_ids"] = [c.node for c in partition.classes]
        entry["own_only"] = [c.own_only for c in partition.classes]
    elif s.kind == "level":
        entry["description"] = "probability of each inference class: the sum of its training classes' probabilities"
        entry["names"] = [tax.nodes[n].name for n in s.labels]
    else:
        task = tax.task(s.labels[0])
        entry["description"] = (
            f"{task.name}: P(positive | positive or negative), the paper's conditional probability; one column"
        )
        entry["task"] = _task_entry(s, partition, task)
    return entry


def _task_entry(s: OutputSpec, partition: Partition, task: Any) -> dict[str, Any]:
    """A task output's task: its sides as taxonomy nodes and as training classes, their names, the condition."""
    # the task's condition: the training classes under its positive / negative nodes (the columns of its
    # aggregation matrix); the SDK and the apps sum their probabilities and show the task only where that sum
    # reaches condition_threshold (a carcinoma photo gets no melanoma-vs-nevus number)
    sides = s.matrix if s.matrix is not None else task_matrix(partition, task.id)
    positive_name, negative_name = _sides(partition.taxonomy, task)
    return {
        "id": task.id,
        "name": task.name,
        "positive": list(task.positive),
        "negative": list(task.negative),
        "positive_classes": [c.label for c in partition.classes if sides[c.index, 1]],
        "negative_classes": [c.label for c in partition.classes if sides[c.index, 0]],
        "positive_name": positive_name,
        "condition": f"{positive_name} or {negative_name}",
        "condition_threshold": CONDITION_THRESHOLD,
    }


def _input_entry(input_size: int, preprocess: Mapping[str, Any]) -> dict[str, Any]:
    """The input: a uint8 RGB image of ``input_size`` pixels square, and what the app does before it."""
    return {
        "name": "image",
        "shape": [1, input_size, input_size, 3],
        "dtype": "uint8",
        "layout": "NHWC",
        "color": "RGB",
        "range": [0, 255],
        "preprocess": preprocess
        or {"size": input_size, "color": "RGB", "dtype": "uint8", "scaling_in_model": "x / 127.5 - 1"},
        "app_does": f"decode, apply EXIF orientation, convert to RGB, resize to {input_size}x{input_size}",
    }


def _training_entry(
    run: Path, run_info: Mapping[str, Any], metrics: Mapping[str, Any], config: Mapping[str, Any]
) -> dict[str, Any]:
    """Where the model came from: its data, mode, weights, the run's files and the folded temperature scaling."""
    return {
        "data": metrics.get("data") or {"source": config.get("data")},
        "mode": config.get("mode"),
        "weights": config.get("weights"),
        "run_created": run_info.get("created"),
        "run_json_sha256": sha256_file(run / "run.json") if (run / "run.json").is_file() else None,
        "model_sha256": (run_info.get("files") or {}).get("model.keras"),
        # temperature scaling folded into the weights by the trainer (None: a run made before it, or without)
        "calibration": metrics.get("calibration"),
    }


def manifest_json(manifest: Mapping[str, Any]) -> str:
    return json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False)


def metadata_problems(
    meta: Mapping[str, str], manifest: Mapping[str, Any], specs: Sequence[OutputSpec], where: str
) -> list[str]:
    """What is wrong with a file's key/value metadata (ONNX ``metadata_props``, Core ML ``user_defined_metadata``):
    the manifest must equal the one written and every output's label list must be there."""
    problems = []
    if MANIFEST_KEY not in meta:
        problems.append(f"{where} lacks {MANIFEST_KEY!r}")
    elif json.loads(meta[MANIFEST_KEY]) != json.loads(manifest_json(manifest)):
        problems.append("the embedded manifest differs from the one written")
    for s in specs:
        key = LABELS_KEY.format(s.name)
        if key not in meta or json.loads(meta[key]) != list(s.labels):
            problems.append(f"{where} {key!r} does not list the output's labels")
    return problems


def read_embedded(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest inside an exported file of any target: the SDK's reader (:func:`derm.manifest.read_manifest`,
    no TensorFlow), with its error raised as an :class:`ExportError`."""
    from derm.manifest import ModelFileError, read_manifest

    try:
        return read_manifest(path)
    except ModelFileError as exc:
        raise ExportError(str(exc)) from exc
