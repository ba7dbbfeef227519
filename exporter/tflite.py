"""TFLite conversion of the export graph: float32, float16 weights, dynamic range, full-integer int8.

Full-integer int8 quantizes every op with ranges from a representative set of real calibration images; the input
stays uint8 (the image as the app has it) and the float outputs stay float32 so probabilities keep their meaning.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from derm.exporter.graph import ExportError

QUANTIZATIONS = ("fp32", "fp16", "dynamic", "int8")


def convert(export_model: Any, quantize: str = "fp32", calibration: np.ndarray | None = None) -> bytes:
    """Convert a :func:`derm.exporter.graph.build_export_model` model; ``calibration`` (n, s, s, 3) uint8 for int8."""
    import tensorflow as tf

    if quantize not in QUANTIZATIONS:
        raise ExportError(f"Unknown TFLite quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}.")
    conv = tf.lite.TFLiteConverter.from_keras_model(export_model)
    if quantize == "fp16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif quantize == "dynamic":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    elif quantize == "int8":
        if calibration is None or len(calibration) == 0:
            raise ExportError("int8 quantization needs calibration images (--calibration CSV).")
        cal = np.asarray(calibration, dtype=np.uint8)

        def representative():
            for i in range(len(cal)):
                yield {"image": cal[i : i + 1]}

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # the graph's input is uint8 already and its outputs float32: no input/output type override needed
    with warnings.catch_warnings():
        # int8: the uint8 image input feeds a Cast, so the converter finds no input statistics to record and says so;
        # raw pixels need none (they are exact integers), so that one message is noise.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        # int8 calibration runs TensorFlow's own (deprecated) tf.lite.Interpreter inside the converter
        warnings.filterwarnings("ignore", message=r"\s*Warning: tf.lite.Interpreter is deprecated")
        return conv.convert()


class TFLiteRunner:
    """Runs a .tflite file with ai-edge-litert (the successor of tflite-runtime) through its signature."""

    def __init__(self, model: bytes | str, threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        kwargs: dict[str, Any] = {"num_threads": threads} if threads else {}
        if isinstance(model, bytes):
            self.interpreter = Interpreter(model_content=model, **kwargs)
        else:
            self.interpreter = Interpreter(model_path=str(model), **kwargs)
        self.runner = self.interpreter.get_signature_runner()
        self.outputs: Sequence[str] = self.interpreter.get_signature_list()["serving_default"]["outputs"]

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Batch of uint8 images -> each named output (rows one per image)."""
        images = np.asarray(images, dtype=np.uint8)
        rows = [self.runner(image=images[i : i + 1]) for i in range(len(images))]
        return {k: np.concatenate([r[k] for r in rows]) for k in self.outputs}
