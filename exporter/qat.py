"""Quantization-aware training (``derm-export --quantize qat``): a short fine-tune with fake-quantized weights and
activations, then full-integer TFLite conversion, with the aggregation kept frozen.

tensorflow-model-optimization works only under tf-keras (``TF_USE_LEGACY_KERAS=1``) and on a flat model, while the
trainer saves Keras 3 models, and it pins an absl-py that mediapipe (the metadata writers) refuses. So QAT runs in its
own process and, usually, its own environment (the ``[qat]`` extra; ``DERM_QAT_PYTHON`` names its interpreter):

1. the Keras 3 classifier is rebuilt layer by layer in tf-keras (same names, same wiring, weights copied by name),
   with each Conv2D -> BatchNormalization pair folded into one biased Conv2D, as the TFLite converter folds them
   (without folding, the fake-quantized kernels were not the ones the int8 file holds: top-1 agreement 0.72 / 0.51
   with the float model after 60 steps, against 0.95 / 0.92 folded);
2. ``quantize_apply`` inserts the fake-quant ops, their activation ranges start from the float model's, and a short
   fine-tune (Adam, small learning rate) distils the float model's probabilities on the run's training images, so the
   int8 weights learn the float model's answers;
3. the export graph is put around it: uint8 image in, the training probabilities, and every inference level and task
   through non-trainable matmuls added after training (so training cannot move them: checked) and left in float;
4. ``TFLiteConverter`` turns the fake-quant ranges into an int8 model; the bytes go back to the parent, which adds
   the metadata and checks parity like any other file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from derm.exporter.graph import ExportError

QAT_ENV = "DERM_QAT_PYTHON"
_DROP = ("_initializer", "_regularizer", "_constraint")


def quantization_aware(cfg: Any, run: Path, partition: Any, specs: Sequence[Any], calibration: np.ndarray) -> bytes:
    """Run QAT in a child process (see the module docstring) and return the converted TFLite bytes."""
    python = os.environ.get(QAT_ENV, sys.executable)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "qat.tflite"
        cmd = [
            python,
            "-m",
            "derm.exporter.qat",
            "--run",
            str(run),
            "--out",
            str(out),
            "--levels",
            ",".join(s.name for s in specs),
            "--epochs",
            str(cfg.qat_epochs),
            "--seed",
            str(cfg.seed),
        ]
        if cfg.qat_steps:
            cmd += ["--steps", str(cfg.qat_steps)]
        env = {**os.environ, "TF_USE_LEGACY_KERAS": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            hint = ""
            if "tensorflow_model_optimization" in tail or "tf_keras" in tail:
                hint = (
                    f" Install the [qat] extra in a separate environment (tensorflow-model-optimization pins an "
                    f"absl-py that mediapipe refuses) and point {QAT_ENV} at its python."
                )
            raise ExportError(f"Quantization-aware training failed (exit {proc.returncode}).{hint}\n{tail}")
        return out.read_bytes()


def _tf_keras_layer(tfk: Any, class_name: str, config: dict[str, Any]) -> Any:
    config = {k: v for k, v in config.items() if not k.endswith(_DROP) and k not in ("dtype", "build_config")}
    cls = getattr(tfk.layers, class_name, None)
    if cls is None:
        raise ExportError(f"QAT cannot rebuild a {class_name!r} layer in tf-keras.")
    while True:  # drop the Keras-3-only options (quantization_config, lora_rank, ...) tf-keras does not know
        try:
            return cls.from_config(config)
        except TypeError as exc:
            found = re.search(r"not understood:'?,? '(\w+)'", str(exc))
            unknown = found.group(1) if found and found.group(1) in config else None
            if unknown is None or config.get(unknown) not in (None, 0, False):
                raise ExportError(f"QAT cannot rebuild layer {config.get('name')!r} in tf-keras: {exc}") from exc
            config.pop(unknown)


def rebuild_in_tf_keras(model: Any) -> Any:
    """The Keras 3 classifier as a flat tf-keras model: same layer names and wiring, weights copied by name."""
    import tf_keras as tfk

    from derm.trainer.weights import _graph_order, _history_names, wire_inputs

    config = {layer["name"]: layer for layer in model.get_config()["layers"]}
    tensors: dict[str, Any] = {}

    def wire(obj: Any) -> Any:
        return wire_inputs(obj, tensors)

    # Conv2D -> BatchNormalization pairs are folded into one Conv2D with a bias, as the TFLite converter folds them:
    # quantization-aware training must see (and fake-quantize) the folded weights the int8 file will hold.
    consumers: dict[str, list[str]] = {}
    for name, layer in config.items():
        for node in layer.get("inbound_nodes", []):
            for parent in _history_names(node):
                consumers.setdefault(parent, []).append(name)
    folded = {
        bn: conv
        for conv, users in consumers.items()
        if config[conv]["class_name"] == "Conv2D" and len(users) == 1
        for bn in users
        if config[bn]["class_name"] == "BatchNormalization"
    }
    inputs = None
    for name in _graph_order(model):
        layer = config[name]
        if layer["class_name"] == "InputLayer":
            shape = layer["config"].get("batch_shape") or layer["config"].get("batch_input_shape")
            inputs = tensors[name] = tfk.Input(shape=tuple(shape[1:]), dtype="float32", name=name)
            continue
        if name in folded:
            tensors[name] = tensors[folded[name]]
            continue
        (node,) = layer["inbound_nodes"]
        cfg = dict(layer["config"])
        if name in folded.values():
            cfg["use_bias"] = True
        new = _tf_keras_layer(tfk, layer["class_name"], cfg)
        tensors[name] = new(*wire(node["args"]), **wire(node["kwargs"]))
    out = tfk.Model(inputs, tensors["probs"], name="derm_qat")
    conv_bn = {conv: bn for bn, conv in folded.items()}
    for layer in model.layers:
        if not layer.weights or layer.name in folded:
            continue
        weights = [np.asarray(w) for w in layer.get_weights()]
        if layer.name in conv_bn:
            bn = model.get_layer(conv_bn[layer.name])
            gamma = np.asarray(bn.gamma) if bn.scale else 1.0
            scale = gamma / np.sqrt(np.asarray(bn.moving_variance) + bn.epsilon)
            beta = np.asarray(bn.beta) if bn.center else 0.0
            bias = beta - np.asarray(bn.moving_mean) * scale + (weights[1] * scale if len(weights) > 1 else 0.0)
            weights = [weights[0] * scale, bias.astype(np.float32)]
        out.get_layer(layer.name).set_weights(weights)
    return out


def init_ranges(qat: Any, flat: Any, images: np.ndarray, batch_size: int = 8) -> int:
    """Start every activation quantizer at the range the float model really produces on ``images``.

    tfmot starts them at [-6, 6] and moves them by a 0.999 moving average, so a short fine-tune would quantize with
    ranges far from the real ones (seen: top-1 agreement 0.2 after 2 steps). Returns how many ranges were set.
    """
    import tf_keras as tfk

    targets = []  # (min variable, max variable, float tensor whose range it should cover)
    for layer in qat.layers:
        mins = [v for v in layer.weights if v.name.endswith(("output_min:0", "quantize_layer_min:0"))]
        maxs = [v for v in layer.weights if v.name.endswith(("output_max:0", "quantize_layer_max:0"))]
        if len(mins) != 1 or len(maxs) != 1:
            continue
        if hasattr(layer, "layer"):  # QuantizeWrapper: the wrapped layer's output
            tensor = flat.get_layer(layer.layer.name).output
        else:  # the QuantizeLayer right after the input scaling
            tensor = flat.get_layer(layer.inbound_nodes[0].inbound_layers.name).output
        targets.append((mins[0], maxs[0], tensor))
    if not targets:
        return 0
    probe = tfk.Model(flat.input, [t for _, _, t in targets])
    lo = np.full(len(targets), np.inf)
    hi = np.full(len(targets), -np.inf)
    for i in range(0, len(images), batch_size):
        outs = probe(images[i : i + batch_size], training=False)
        for j, o in enumerate(outs):
            o = np.asarray(o)
            lo[j], hi[j] = min(lo[j], o.min()), max(hi[j], o.max())
    for (vmin, vmax, _), a, b in zip(targets, lo, hi, strict=True):
        vmin.assign(min(float(a), 0.0))  # int8 ranges must contain 0
        vmax.assign(max(float(b), 0.0))
    return len(targets)


def _training_images(run: Path, size: int, limit: int | None, seed: int) -> np.ndarray:
    import csv

    from derm.preprocess import preprocess

    with open(run / "split.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["role"] == "train"]
    rng = np.random.default_rng(seed)
    rows = [rows[i] for i in rng.permutation(len(rows))[: limit or len(rows)]]
    return np.stack([preprocess(r["image"], size) for r in rows]).astype(np.float32)


def qat_convert(run: Path, epochs: int, steps: int | None, seed: int, batch_size: int = 16, lr: float = 1e-5) -> bytes:
    """Everything in the child process: rebuild, quantize, fine-tune, wrap in the export graph, convert."""
    import keras
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras as tfk

    from derm.exporter.graph import output_specs
    from derm.trainer.evaluate import load_partition

    tf.keras.utils.set_random_seed(seed)
    k3 = keras.models.load_model(run / "model.keras", compile=False)
    _, part = load_partition(run)
    size = int(k3.input_shape[1])
    flat = rebuild_in_tf_keras(k3)
    q = tfmot.quantization.keras

    def annotate(layer: Any) -> Any:  # the input scaling stays float (tfmot has no int8 Rescaling); all else int8
        return (
            layer
            if isinstance(layer, (tfk.layers.InputLayer, tfk.layers.Rescaling))
            else q.quantize_annotate_layer(layer)
        )

    with q.quantize_scope():
        qat = q.quantize_apply(tfk.models.clone_model(flat, clone_function=annotate))
    x = _training_images(run, size, steps * batch_size if steps else None, seed)
    drift = float(np.abs(flat.predict(x[:8], verbose=0) - k3.predict(x[:8], verbose=0)).max())
    if drift > 1e-3:
        raise ExportError(f"The tf-keras rebuild (batch norms folded) differs from the model by {drift:.2g}.")
    init_ranges(qat, flat, x[:64])
    # Distil from the float model: the aim is the float model's answers in int8, not new ones from the labels.
    teacher = flat.predict(x, batch_size=batch_size, verbose=0)
    for layer in qat.layers:  # batch norms keep their statistics: a short fine-tune on small batches would spoil them
        inner = getattr(layer, "layer", layer)
        if isinstance(inner, tfk.layers.BatchNormalization):
            inner.trainable = False
    qat.compile(optimizer=tfk.optimizers.Adam(lr), loss="categorical_crossentropy")
    qat.fit(x, teacher, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=2)

    specs = output_specs(part)
    image = tfk.Input(shape=(size, size, 3), dtype="uint8", name="image")
    probs_layer = next(layer for layer in qat.layers if layer.name.endswith("probs"))
    logits_layer = next(layer for layer in qat.layers if layer.name.endswith("logits"))
    inner = tfk.Model(qat.input, [probs_layer.output, logits_layer.output])
    probs, logits = inner(tfk.layers.Lambda(lambda t: tf.cast(t, tf.float32), name="to_float")(image))
    outputs, frozen = {}, []

    def matmul(inputs: Any, matrix: np.ndarray, name: str) -> Any:
        dense = tfk.layers.Dense(matrix.shape[1], use_bias=False, trainable=False, name=name)
        out = dense(inputs)
        dense.set_weights([matrix.astype(np.float32)])
        frozen.append((dense, matrix))
        return out

    for s in specs:
        if s.kind == "training":
            outputs[s.name] = tfk.layers.Activation("linear", name=s.name)(probs)
        elif s.kind == "level":
            outputs[s.name] = matmul(probs, s.matrix, s.name)
        else:
            cols = np.nonzero(s.matrix.sum(1))[0]
            select = np.zeros((len(s.matrix), len(cols)), np.float32)
            select[cols, np.arange(len(cols))] = 1
            sub = tfk.layers.Softmax(name=f"{s.name}_softmax")(matmul(logits, select, f"{s.name}_select_matmul"))
            outputs[s.name] = matmul(sub, s.matrix[cols, 1:2], s.name)
    export = tfk.Model(image, outputs, name="derm_export_qat")
    for dense, matrix in frozen:  # the aggregation is exactly the partition's 0/1 matrices, and not trainable
        if dense.trainable or not np.array_equal(dense.get_weights()[0], matrix.astype(np.float32)):
            raise ExportError(f"The aggregation layer {dense.name!r} changed or became trainable during QAT.")
    conv = tf.lite.TFLiteConverter.from_keras_model(export)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    return conv.convert()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Quantization-aware training child process of derm-export.")
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--levels", default="")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        print("derm.exporter.qat needs TF_USE_LEGACY_KERAS=1 (set by derm-export).", file=sys.stderr)
        return 2
    buf = qat_convert(Path(args.run), args.epochs, args.steps, args.seed)
    Path(args.out).write_bytes(buf)
    print(json.dumps({"bytes": len(buf)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
