"""Run an exported classifier on the desktop: ``Classifier.load(path).predict(image)``. No TensorFlow.

The backend follows the file's suffix (:mod:`derm.runtimes`, shared with the exporter and derm-bench): ``.tflite``
with ai-edge-litert (tflite-runtime as a fallback), ``.onnx`` with onnxruntime, ``.mlpackage`` with coremltools
(macOS only). Everything else (labels, levels, tasks, input size,
operating points) comes from the manifest inside the file, so a file without one is refused.

A research and triage aid, not a diagnostic device.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import platform
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from derm.manifest import ModelFileError, model_kind, read_manifest, verify_weights
from derm.preprocess import ImageError, ImageSource, check_tta, preprocess, tta_views
from derm.runtimes import RUNTIMES


def int8_saturates() -> bool:
    """True on an x86-64 Linux CPU without VNNI (e.g. AVX2 only): there onnxruntime's u8 x s8 int8 kernels saturate
    their 16-bit intermediate sums, so an int8 ONNX file can answer far from its float model (measured in
    benchmarks/results/reference_bench/bench.md). TFLite's kernels are not affected.
    False where the CPU's flags cannot be read (other systems)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return bool(flags) and not any(v in flags.split() for v in ("avx512_vnni", "avx_vnni", "amx_int8"))


DEFAULT_OPERATING_POINT = "0.9"  # the manifest's threshold aiming at 90% sensitivity on the run's held-out images
# A conditional task (e.g. P(melanoma | melanocytic lesion)) applies to an image only where the probability of its
# condition (the sum of the training classes under its positive and negative nodes) is at least this. derm-export
# writes it into each task's manifest entry ("condition_threshold"), so the apps read it from the file.
CONDITION_THRESHOLD = 0.5
DEFAULT_DISCLAIMER = (
    "A research and triage aid, not a diagnostic device: it does not replace examination by a clinician."
)


@dataclass(frozen=True)
class Decision:
    """A binary task's call at an operating point."""

    task: str
    probability: float
    threshold: float
    positive: bool
    operating_point: str  # the manifest's key (target sensitivity, e.g. "0.9") or "user"
    sensitivity: float | None = None  # measured on the run's held-out images (None for a user threshold)
    specificity: float | None = None
    applies: bool = True  # False: the task's condition does not hold for this image; disregard ``positive``


@dataclass(frozen=True)
class Prediction:
    source: str
    levels: dict[str, dict[str, float]]  # level -> inference class -> probability (sums to 1)
    tasks: dict[str, float]  # task id -> P(positive | positive or negative)
    top_classes: list[tuple[str, float]]  # most likely training classes
    decisions: dict[str, Decision] = field(default_factory=dict)
    # task id -> P(the task's condition), e.g. P(melanocytic lesion) for melanoma_vs_nevus: the sum of the training
    # probabilities over its positive and negative classes (absent for files whose manifest lacks those classes)
    conditions: dict[str, float] = field(default_factory=dict)
    # task id -> whether the task applies to this image (its condition's probability >= the manifest's
    # condition_threshold); always True for files whose manifest does not say the task's condition
    applies: dict[str, bool] = field(default_factory=dict)

    def top(self, level: str = "three") -> tuple[str, float]:
        probs = self.levels[level]
        label = max(probs, key=probs.__getitem__)
        return label, probs[label]

    @property
    def malignant(self) -> float | None:
        """P(malignant) at the root level, the number a triage list is ordered by."""
        return self.levels.get("three", {}).get("malignant")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["top_classes"] = [list(x) for x in self.top_classes]
        return d


class Classifier:
    """An exported skin-lesion classifier and its manifest."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        threads: int | None = None,
        backend_options: Mapping[str, Any] | None = None,
        operating_point: str | float = DEFAULT_OPERATING_POINT,
        threshold: float | None = None,
        tta: int = 1,
    ):
        self.tta = check_tta(tta)  # test-time views averaged per image (1: none); see derm.preprocess.TTA_VIEWS
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.verified = verify_weights(self.path, self.manifest)  # raises ModelFileError when the weights changed
        self.notes: list[str] = []  # what the user must know about these results on this machine
        onnx_int8 = model_kind(self.path) == "onnx" and self.manifest.get("export", {}).get("quantize") == "int8"
        if onnx_int8 and int8_saturates():
            self.notes.append(
                "this CPU (x86 without VNNI) makes onnxruntime's int8 kernels saturate: results can differ markedly "
                "from the float model's; use the .tflite file or the ONNX fp32 export here"
            )
        kind = model_kind(self.path)
        self.backend = RUNTIMES[kind](self.path, threads, backend_options or {})
        self.input_size = int(self.manifest["input"]["shape"][1])
        self.outputs = {o["name"]: o for o in self.manifest["outputs"]}
        self.levels = [o["name"].removeprefix("probs_") for o in self.manifest["outputs"] if o["kind"] == "level"]
        self.tasks = [o["task"]["id"] for o in self.manifest["outputs"] if o["kind"] == "task"]
        self.task_info: dict[str, dict[str, Any]] = {
            o["task"]["id"]: o["task"] for o in self.manifest["outputs"] if o["kind"] == "task"
        }
        self._condition_columns = self._read_conditions()
        if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must be a probability in [0, 1], received {threshold!r}.")
        self.threshold = None if threshold is None else float(threshold)
        self.operating_point = _op_key(operating_point)
        if self.threshold is None:
            for task in self.tasks:
                points = self.manifest.get("operating_points", {}).get(task, {}).get("by_sensitivity", {})
                if points and self.operating_point not in points:
                    raise ValueError(
                        f"Operating point {operating_point!r} is not in the manifest for {task!r}; it has "
                        f"{', '.join(sorted(points))} (target sensitivities), or pass threshold=."
                    )

    def _read_conditions(self) -> dict[str, np.ndarray]:
        """Per task, the columns of ``training_probs`` forming its condition (its positive and negative classes);
        tasks of files exported before the manifest named them are left out (they always apply)."""
        training = self.outputs.get("training_probs")
        if training is None:
            return {}
        labels = list(training["labels"])
        columns = {}
        for task, info in self.task_info.items():
            if "positive_classes" not in info or "negative_classes" not in info:
                continue
            classes = [*info["positive_classes"], *info["negative_classes"]]
            missing = [c for c in classes if c not in labels]
            if missing:
                raise ModelFileError(
                    f"{str(self.path)!r}: the manifest's task {task!r} names training classes {missing} that its "
                    "training_probs output lacks; the file is inconsistent. Re-export it with derm-export."
                )
            columns[task] = np.array([labels.index(c) for c in classes], dtype=np.int64)
        return columns

    @property
    def disclaimer(self) -> str:
        """The file's own disclaimer, or a plain default."""
        return str(self.manifest.get("disclaimer") or DEFAULT_DISCLAIMER)

    def condition_threshold(self, task: str) -> float:
        """The least probability of a task's condition at which the task applies (the manifest's, else 0.5)."""
        return float(self.task_info[task].get("condition_threshold", CONDITION_THRESHOLD))

    def condition_name(self, task: str) -> str | None:
        """A task's condition in words, e.g. "malignant melanoma or benign melanocytic lesions"; None for files
        whose manifest does not say it."""
        return self.task_info[task].get("condition")

    @classmethod
    def load(cls, path: str | os.PathLike[str], **kwargs: Any) -> Classifier:
        """Open an exported file; see :class:`Classifier` for the keyword arguments."""
        return cls(path, **kwargs)

    def __repr__(self) -> str:
        return f"Classifier({str(self.path)!r}, backend={self.backend.name}, input {self.input_size}px)"

    # ---------------------------------------------------------------------------------------------------- running
    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Raw outputs for a uint8 batch ``(n, s, s, 3)`` already at the input size."""
        images = np.asarray(images)
        s = self.input_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3) or images.dtype != np.uint8:
            raise ValueError(f"run() wants uint8 (n, {s}, {s}, 3) images, received {images.dtype} {images.shape}.")
        return self.backend(np.ascontiguousarray(images))

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs for a batch of prepared images: :meth:`run`, or with ``tta`` views of each averaged (every output
        is averaged on its own, as a model's outputs for one image would be)."""
        if self.tta == 1:
            return self.run(images)
        out = self.run(np.concatenate([tta_views(image, self.tta) for image in images]))
        return {k: v.reshape(len(images), self.tta, *v.shape[1:]).mean(axis=1) for k, v in out.items()}

    def prepare(self, source: ImageSource) -> np.ndarray:
        """The project's one preprocessing (the trainer's): decode, EXIF orientation, RGB, resize."""
        return preprocess(source, self.input_size)

    def predict(self, source: ImageSource | Sequence[ImageSource], top_k: int = 3) -> Prediction | list[Prediction]:
        """One image (path, bytes, PIL image or array) -> :class:`Prediction`; a list of them -> a list."""
        if isinstance(source, (list, tuple)):
            return [p for _, p in self.predict_many(source, top_k=top_k, on_error="raise")]  # type: ignore[misc]
        return self._results([_name(source)], self.infer(self.prepare(source)[None]), top_k)[0]

    def predict_many(
        self,
        sources: Iterable[ImageSource],
        *,
        top_k: int = 3,
        workers: int = 2,
        batch_size: int = 8,
        on_error: str = "skip",
    ) -> Iterator[tuple[str, Prediction | ImageError]]:
        """Yield ``(name, Prediction)`` per image in order, decoding ``workers`` images ahead of inference.

        ``on_error="skip"`` yields the :class:`ImageError` of an unreadable file in its place and goes on;
        ``"raise"`` raises it. Memory stays bounded: at most ``workers * 2 + batch_size`` decoded images are held.
        """
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', received {on_error!r}.")
        with cf.ThreadPoolExecutor(max(1, workers)) as pool:
            pending: deque[tuple[str, cf.Future[np.ndarray]]] = deque()
            it = iter(sources)
            batch_names: list[str] = []
            batch: list[np.ndarray] = []

            def flush() -> Iterator[tuple[str, Prediction | ImageError]]:
                if batch:
                    out = self.infer(np.stack(batch))
                    yield from zip(batch_names, self._results(batch_names, out, top_k), strict=True)
                    batch.clear()
                    batch_names.clear()

            exhausted = False
            while True:
                while not exhausted and len(pending) < max(1, workers) * 2:
                    try:
                        src = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    pending.append((_name(src), pool.submit(self.prepare, src)))
                if not pending:
                    break
                name, fut = pending.popleft()
                try:
                    image = fut.result()
                except ImageError as exc:
                    if on_error == "raise":
                        raise
                    yield from flush()
                    yield name, exc
                    continue
                batch.append(image)
                batch_names.append(name)
                if len(batch) >= batch_size:
                    yield from flush()
            yield from flush()

    # ---------------------------------------------------------------------------------------------------- results
    def _results(self, names: Sequence[str], out: Mapping[str, np.ndarray], top_k: int) -> list[Prediction]:
        results = []
        training = self.outputs.get("training_probs")
        for i, name in enumerate(names):
            levels = {
                lvl: dict(zip(self.outputs[f"probs_{lvl}"]["labels"], map(float, out[f"probs_{lvl}"][i]), strict=True))
                for lvl in self.levels
            }
            tasks = {}
            for o in self.manifest["outputs"]:
                if o["kind"] == "task":
                    tasks[o["task"]["id"]] = float(np.asarray(out[o["name"]][i]).reshape(-1)[0])
            top: list[tuple[str, float]] = []
            conditions: dict[str, float] = {}
            if training is not None:
                p = np.asarray(out["training_probs"][i], dtype=np.float64)
                order = np.argsort(-p)[: max(0, top_k)]
                top = [(training["labels"][j], float(p[j])) for j in order]
                conditions = {t: float(p[cols].sum()) for t, cols in self._condition_columns.items() if t in tasks}
            applies = {t: t not in conditions or conditions[t] >= self.condition_threshold(t) for t in tasks}
            decisions = {t: self.decide(t, q, applies=applies[t]) for t, q in tasks.items()}
            results.append(Prediction(name, levels, tasks, top, decisions, conditions, applies))
        return results

    def decide(self, task: str, probability: float, *, applies: bool = True) -> Decision:
        """The call for one task's probability at this classifier's operating point (or user threshold).

        ``applies=False`` (the image's condition probability is below the task's condition threshold) is carried
        into the :class:`Decision`; the call is still computed, but means nothing for that image."""
        if self.threshold is not None:
            return Decision(task, probability, self.threshold, probability >= self.threshold, "user", applies=applies)
        point = (
            self.manifest.get("operating_points", {}).get(task, {}).get("by_sensitivity", {}).get(self.operating_point)
        )
        if point is None:  # the run had no held-out labels for this task: the plain 0.5 rule, said so
            return Decision(
                task, probability, 0.5, probability >= 0.5, "default 0.5 (no operating point in file)", applies=applies
            )
        t = float(point["threshold"])
        return Decision(
            task,
            probability,
            t,
            probability >= t,
            self.operating_point,
            point.get("sensitivity"),
            point.get("specificity"),
            applies,
        )

    def explain(
        self,
        task: str,
        probability: float,
        condition: float | None = None,
        *,
        applies: bool | None = None,
        positive: bool | None = None,
    ) -> str:
        """One line saying what a task's number means for an image, e.g. ``melanoma_vs_nevus: P(melanoma | melanoma
        or nevus) 0.83: POSITIVE at the 90%-sensitivity operating point (...)``, or ``melanoma_vs_nevus: not
        applicable: P(melanoma or nevus) 0.12`` where the task's condition does not hold.

        ``condition``: the probability of the task's condition (None where the file does not say it: the task
        applies); ``applies`` and ``positive``, when given, are taken as they are (e.g. read back from a CSV)
        instead of being worked out again from ``condition`` and ``probability``."""
        info = self.task_info[task]
        name = info.get("condition")
        if applies is None:
            applies = condition is None or condition >= self.condition_threshold(task)
        if not applies:
            p_condition = f" {condition:.2f}" if condition is not None else ""
            return f"{task}: not applicable: P({name or 'its condition'}){p_condition}"
        d = self.decide(task, probability)
        if positive is not None:
            d = replace(d, positive=positive)
        call = "POSITIVE" if d.positive else "negative"
        if d.operating_point == "user":
            at = f"at your threshold {d.threshold:.3f}"
        elif d.sensitivity is None or d.specificity is None:
            at = f"at the default threshold {d.threshold:.2f} (the file has no operating point for this task)"
        else:
            at = (
                f"at the {float(d.operating_point):.0%}-sensitivity operating point (threshold {d.threshold:.3f}, "
                f"sensitivity {d.sensitivity:.2f}, specificity {d.specificity:.2f} on held-out images)"
            )
        if name:
            what = f"P({info.get('positive_name') or 'positive'} | {name}) {probability:.2f}"
        else:  # a file exported before the manifest said the condition: the task is always shown, as before
            what = f"{info.get('name', task)}, conditional probability {probability:.2f}"
        return f"{task}: {what}: {call} {at}"


def _op_key(value: str | float) -> str:
    if isinstance(value, str):
        v = value.strip().lower().removeprefix("sens").removesuffix("%")
        try:
            f = float(v)
        except ValueError:
            raise ValueError(
                f"operating_point must be a target sensitivity such as '0.9', received {value!r}."
            ) from None
    else:
        f = float(value)
    if f > 1:
        f /= 100.0
    return format(f, "g")


def _name(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{type(source).__name__}>"
