"""The exported graph, the same for every target.

    image (uint8, N x s x s x 3, RGB) -> float32 -> the trained classifier (scaling inside) -> "training_probs"
      -> non-trainable matmul with each aggregation matrix       -> "probs_<level>" (e.g. probs_three, probs_nine)
      -> non-trainable matmul with each binary task's matrix     -> "task_<id>" = P(positive | positive or negative)

The app resizes to s x s; everything else happens inside the file, so no app can get normalisation or the
aggregation wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from derm.aggregation import aggregation_matrix, task_matrix
from derm.errors import DermError, PartitionError
from derm.partition import Partition

DEFAULT_LEVELS = ("three", "nine")
T = TypeVar("T")


class ExportError(DermError, ValueError):
    """A model cannot be exported as asked."""


@dataclass(frozen=True)
class OutputSpec:
    name: str  # tensor / signature output name
    kind: str  # "training" | "level" | "task"
    labels: tuple[str, ...]  # one per column (a task has one column: the positive side)
    matrix: np.ndarray | None = None  # (training classes, columns) for levels and tasks


def output_specs(
    partition: Partition, levels: Sequence[str] = DEFAULT_LEVELS, tasks: Sequence[str] | None = None
) -> list[OutputSpec]:
    """Every output of the exported graph, in order, with its labels and aggregation matrix."""
    tax = partition.taxonomy
    specs = [OutputSpec("training_probs", "training", tuple(partition.labels))]
    for level in levels:
        try:
            m = aggregation_matrix(partition, level)
        except (PartitionError, KeyError, ValueError) as exc:
            raise ExportError(f"Cannot export inference level {level!r}: {exc}") from exc
        specs.append(OutputSpec(f"probs_{_safe(level)}", "level", tuple(tax.level(level)), m))
    for task_id in tasks if tasks is not None else list(tax.tasks):
        try:
            m = task_matrix(partition, task_id)
        except PartitionError:
            continue  # the training data cannot express this task (e.g. no carcinoma class): no output
        specs.append(OutputSpec(f"task_{_safe(task_id)}", "task", (tax.task(task_id).id,), m))
    return specs


def downstream(
    ops: Iterable[T],
    start: Callable[[T], bool],
    inputs: Callable[[T], Iterable[Any]],
    outputs: Callable[[T], Iterable[Any]],
) -> list[T]:
    """The ops, in the given topological order (a TFLite subgraph's and an ONNX graph's own), that are a ``start`` op
    or read, directly or not, an output of one: e.g. a classifier's head from its global pooling onward."""
    reached: set[Any] = set()
    found: list[T] = []
    for op in ops:
        if start(op) or reached.intersection(inputs(op)):
            reached.update(outputs(op))
            found.append(op)
    return found


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def build_export_model(model: Any, partition: Partition, specs: Sequence[OutputSpec] | None = None) -> Any:
    """The deployable Keras model: uint8 image in, named probability outputs (a dict) out."""
    import keras

    specs = list(specs) if specs is not None else output_specs(partition)
    size = int(model.input_shape[1])
    if model.output_shape[-1] != len(partition.classes):
        raise ExportError(
            f"The model has {model.output_shape[-1]} outputs but the partition {len(partition.classes)} classes."
        )
    image = keras.Input(shape=(size, size, 3), dtype="uint8", name="image")
    x = keras.ops.cast(image, "float32")
    inner = keras.Model(model.input, [model.get_layer("probs").output, model.get_layer("logits").output])
    probs, logits = inner(x)
    outputs: dict[str, Any] = {}

    def frozen_matmul(inputs: Any, matrix: np.ndarray, name: str) -> Any:
        dense = keras.layers.Dense(matrix.shape[1], use_bias=False, trainable=False, name=name)
        out = dense(inputs)
        dense.set_weights([matrix.astype(np.float32)])
        return out

    for spec in specs:
        if spec.kind == "training":
            outputs[spec.name] = keras.layers.Identity(name=spec.name)(probs)
        elif spec.kind == "level":
            outputs[spec.name] = frozen_matmul(probs, spec.matrix, spec.name)
        else:
            # P(positive | positive or negative) = softmax over the task's training classes only, summed over the
            # positive ones: the same number as pos / (pos + neg), without a division (which int8 cannot do when
            # both sides are near zero).
            cols = np.nonzero(spec.matrix.sum(1))[0]
            select = np.zeros((len(spec.matrix), len(cols)), dtype=np.float32)
            select[cols, np.arange(len(cols))] = 1
            sub = keras.layers.Softmax(name=f"{spec.name}_softmax")(
                frozen_matmul(logits, select, f"{spec.name}_select_matmul")
            )
            outputs[spec.name] = frozen_matmul(sub, spec.matrix[cols, 1:2], spec.name)
    export = keras.Model(image, outputs, name="derm_export")
    return export
