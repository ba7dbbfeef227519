"""Quantization-aware training (``derm-export --quantize qat``): a short fine-tune with fake-quantized weights and
activations, then full-integer TFLite conversion, with the aggregation kept frozen.

tensorflow-model-optimization works only under tf-keras (``TF_USE_LEGACY_KERAS=1``) and on a flat model, while the
trainer saves Keras 3 models, and it pins an absl-py that mediapipe (the metadata writers) refuses. So QAT runs in its
own process and, usually, its own environment (the ``[qat]`` extra; ``DERM_QAT_PYTHON`` names its interpreter):

1. the parent prepares the model as for post-training int8 (input scaling folded into the first convolution, ReLU
   channels equalized, kernels GPTQ-rounded: see ``export.int8_ready_classifier``) and hands it over as a file;
2. the child rebuilds it layer by layer in tf-keras with each Conv2D -> BatchNormalization -> ReLU folded into one
   biased Conv2D with a ReLU activation, as the TFLite converter fuses them. The fusion is not cosmetic: given a
   separate ReLU layer, tfmot's ``LayerReluActivationQuantize`` transform gives the convolution a
   ``NoOpQuantizeConfig``, which switches off the fake quantization of its *kernel*, so the fine-tune saw float
   weights that the int8 file does not have;
3. ``quantize_apply`` inserts the fake-quant ops. The classifier's head from the global pooling on is not left to
   tfmot: the poolings and the feature concatenation are fake-quantized (otherwise the converter quantizes the
   pooling at the last block's range, far coarser than pooled features need; its QAT path has no node denylist, so
   post-training int8's float pooling is not available here), the logits and softmax stay float.
   Every range starts where the converter would put it (``init_ranges``): kernels at their per-channel extremes,
   activations at the float model's range on the calibration images, and every input of a concatenation at the
   concatenation's range (TFLite requires one scale there; with its own range a branch would be rounded twice);
4. a short fine-tune distils the float model's probabilities on the run's training images with the ranges held
   fixed (the graph runs in inference mode, so the file quantizes with exactly the ranges it was trained with);
5. the export graph is put around it: uint8 image in, the training probabilities, and every inference level and task
   through non-trainable matmuls added after training (so training cannot move them: checked) and left in float;
6. ``TFLiteConverter`` turns the fake-quant ranges into an int8 model; the bytes go back to the parent with a summary
   for the manifest, and the parent adds the metadata and checks parity like any other file.

Why steps 2-3 matter (benchmark model, training-class probabilities, mean abs difference from the float model;
exploratory comparison of the fake-quantized graph and the file layer by layer): before them the file was 0.018 from
the float model while the graph it came from was 0.0056 (200 test images), so the fine-tune optimised a graph the
file did not reproduce; with them the file is 0.0063 and the graph 0.0057 (500 test images), and every layer's
error in the file matches the graph's. Results: ``benchmarks/results/export_tflite_qat_*steps.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from derm.exporter.graph import ExportError, downstream

QAT_ENV = "DERM_QAT_PYTHON"
_DROP = ("_initializer", "_regularizer", "_constraint")


def quantization_aware(cfg: Any, run: Path, model: Any, calibration: np.ndarray) -> tuple[bytes, dict[str, Any]]:
    """Run QAT on ``model`` (the run's classifier prepared for int8) in a child process (see the module docstring);
    return the converted TFLite bytes and the child's summary for the manifest."""
    python = os.environ.get(QAT_ENV, sys.executable)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "qat.tflite"
        info = Path(tmp) / "qat.json"
        model_file = Path(tmp) / "prepared.keras"
        cal_file = Path(tmp) / "calibration.npy"
        model.save(model_file)
        np.save(cal_file, np.asarray(calibration, dtype=np.uint8))
        cmd = [
            python,
            "-m",
            "derm.exporter.qat",
            "--run",
            str(run),
            "--model",
            str(model_file),
            "--calibration",
            str(cal_file),
            "--out",
            str(out),
            "--info",
            str(info),
            "--epochs",
            str(cfg.qat_epochs),
            "--seed",
            str(cfg.seed),
        ]
        if cfg.qat_steps is not None:
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
        return out.read_bytes(), json.loads(info.read_text())


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
    """The Keras 3 classifier as a flat tf-keras model: same layer names and wiring, weights copied by name, each
    Conv2D -> BatchNormalization (-> ReLU) run folded into one Conv2D (see the module docstring, step 2), and an
    identity input scaling (after ``fold_input_scaling``) dropped."""
    import tf_keras as tfk

    from derm.trainer.kgraph import creation_order, parents_by_name, wire_inputs

    config = {layer["name"]: layer for layer in model.get_config()["layers"]}
    parents, _ = parents_by_name(model)
    consumers: dict[str, list[str]] = {}
    for name, feeding in parents.items():
        for parent in feeding:
            consumers.setdefault(parent, []).append(name)

    def only_user(name: str, class_name: str) -> str | None:
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and config[users[0]]["class_name"] == class_name else None

    bns: dict[str, str] = {}  # batch norm -> the Conv2D it is folded into
    relus: dict[str, str] = {}  # ReLU -> the Conv2D (with its batch norm) it is fused into
    for name, layer in config.items():
        if layer["class_name"] != "Conv2D" or layer["config"].get("activation") not in (None, "linear"):
            continue
        bn = only_user(name, "BatchNormalization")
        if bn is None:
            continue
        bns[bn] = name
        relu = only_user(bn, "Activation")
        if relu is not None and config[relu]["config"].get("activation") == "relu":
            relus[relu] = name
    folded = {**bns, **relus}
    tensors: dict[str, Any] = {}
    inputs = None
    for name in creation_order(model):
        layer = config[name]
        cfg = dict(layer["config"])
        if layer["class_name"] == "InputLayer":
            shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
            inputs = tensors[name] = tfk.Input(shape=tuple(shape[1:]), dtype="float32", name=name)
            continue
        (node,) = layer["inbound_nodes"]
        if name in folded:
            tensors[name] = tensors[folded[name]]
            continue
        if layer["class_name"] == "Rescaling" and cfg.get("scale") == 1.0 and cfg.get("offset") == 0.0:
            tensors[name] = wire_inputs(node["args"], tensors)[0]
            continue
        if name in folded.values():
            cfg["use_bias"] = True
            cfg["activation"] = "relu" if name in relus.values() else "linear"
        new = _tf_keras_layer(tfk, layer["class_name"], cfg)
        tensors[name] = new(*wire_inputs(node["args"], tensors), **wire_inputs(node["kwargs"], tensors))
    out = tfk.Model(inputs, tensors["probs"], name="derm_qat")
    conv_bn = {conv: bn for bn, conv in bns.items()}
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


def _parents(layer: Any) -> list[str]:
    """Names of the layers feeding ``layer`` (a flat tf-keras model's layers have one node each). tf-keras (Keras 2)
    has other internals than the Keras 3 that :mod:`derm.trainer.kgraph` reads, so its two helpers stay here."""
    return [
        p.name
        for node in layer.inbound_nodes
        for p in (node.inbound_layers if isinstance(node.inbound_layers, list) else [node.inbound_layers])
    ]


def _consumers(flat: Any) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for layer in flat.layers:
        for parent in _parents(layer):
            out.setdefault(parent, []).append(layer.name)
    return out


def head_layers(flat: Any) -> set[str]:
    """The global poolings and every layer downstream of them: the classifier's head (``model.layers`` is in
    topological order)."""
    import tf_keras as tfk

    found = downstream(
        flat.layers,
        start=lambda la: isinstance(la, tfk.layers.GlobalAveragePooling2D),
        inputs=_parents,
        outputs=lambda la: [la.name],
    )
    return {layer.name for layer in found}


def quantize_model(flat: Any) -> Any:
    """``quantize_apply`` with the head kept as the converter should see it (module docstring, step 3)."""
    import tensorflow_model_optimization as tfmot
    import tf_keras as tfk

    q = tfmot.quantization.keras
    head = head_layers(flat)

    def annotate(layer: Any) -> Any:
        if isinstance(layer, tfk.layers.InputLayer):
            return layer
        in_head = layer.name in head
        if in_head and not isinstance(layer, (tfk.layers.GlobalAveragePooling2D, tfk.layers.Concatenate)):
            return layer.__class__.from_config(layer.get_config())  # float: a fresh copy, weights copied below
        if isinstance(layer, tfk.layers.Rescaling):  # an input scaling that could not be folded stays float
            return layer.__class__.from_config(layer.get_config())
        return q.quantize_annotate_layer(layer)

    with q.quantize_scope():
        qat = q.quantize_apply(tfk.models.clone_model(flat, clone_function=annotate))
    for layer in flat.layers:
        if layer.weights and layer.name in head:
            qat.get_layer(layer.name).set_weights(layer.get_weights())
    for layer in qat.layers:  # the int8 file holds every backbone kernel in int8: training must see them so
        inner = getattr(layer, "layer", None)
        if isinstance(inner, tfk.layers.Conv2D) and not any("kernel_min" in w.name for w in layer.weights):
            raise ExportError(
                f"tfmot left the kernel of {inner.name!r} unquantized ({type(layer.quantize_config).__name__}); "
                f"the fine-tune would not see the int8 weights the file holds."
            )
    return qat


def _node(model: Any, layer: Any) -> Any:
    """``layer``'s node in ``model``'s own graph (cloning leaves layers with nodes in other graphs too)."""
    found = [i for i in range(len(layer.inbound_nodes)) if f"{layer.name}_ib-{i}" in model._network_nodes]
    return layer.inbound_nodes[found[0]]


def init_ranges(qat: Any, flat: Any, images: np.ndarray, batch_size: int = 8) -> dict[str, int]:
    """Start every quantizer where the converter will quantize (module docstring, step 3).

    tfmot starts activation ranges at [-6, 6] and kernel ranges at [-6, 6] per channel until a training step has
    run, so a fake-quantized graph that is only converted, or fine-tuned with the ranges held, would quantize with
    ranges far from the real ones. Returns how many kernel, activation and concatenation-shared ranges were set.
    """
    import tf_keras as tfk

    users = _consumers(flat)

    def concat_root(name: str) -> str:  # the outermost concatenation a tensor reaches through concatenations only
        while len(users.get(name, [])) == 1 and isinstance(flat.get_layer(users[name][0]), tfk.layers.Concatenate):
            name = users[name][0]
        return name

    counts = {"kernels": 0, "activations": 0, "shared_with_concat": 0}
    targets: list[tuple[Any, Any, str | None]] = []  # (min, max, flat layer whose output it covers; None: the image)
    for layer in qat.layers:
        weights = {w.name.split("/")[-1].split(":")[0]: w for w in layer.weights}
        if "kernel_min" in weights:
            kernel = weights["kernel"].numpy()
            peak = np.abs(kernel).max(axis=tuple(range(kernel.ndim - 1)))
            weights["kernel_min"].assign(-peak)
            weights["kernel_max"].assign(peak)
            counts["kernels"] += 1
        for lo, hi in (("post_activation_min", "post_activation_max"), ("output_min", "output_max")):
            if lo in weights:
                root = concat_root(layer.layer.name)
                counts["shared_with_concat"] += root != layer.layer.name
                targets.append((weights[lo], weights[hi], root))
        if "quantize_layer_min" in weights:  # the QuantizeLayer on the image (or an unfolded input scaling)
            source = _node(qat, layer).inbound_layers
            name = source.name if not isinstance(source, tfk.layers.InputLayer) else None
            targets.append((weights["quantize_layer_min"], weights["quantize_layer_max"], name))
    names = sorted({n for *_, n in targets if n is not None})
    probe = tfk.Model(flat.input, [flat.get_layer(n).output for n in names])
    lo = dict.fromkeys(names, np.inf)
    hi = dict.fromkeys(names, -np.inf)
    x = images.astype(np.float32)
    for i in range(0, len(x), batch_size):
        outs = probe(x[i : i + batch_size], training=False)
        for n, o in zip(names, outs if len(names) > 1 else [outs], strict=True):
            o = np.asarray(o)
            lo[n], hi[n] = min(lo[n], float(o.min())), max(hi[n], float(o.max()))
    for vmin, vmax, n in targets:
        a, b = (0.0, 255.0) if n is None else (lo[n], hi[n])  # the image is uint8: its range is exactly [0, 255]
        vmin.assign(min(a, 0.0))  # int8 ranges must contain 0
        vmax.assign(max(b, 0.0))
        counts["activations"] += 1
    return counts


def _training_images(run: Path, size: int, limit: int | None, seed: int) -> np.ndarray:
    import csv

    from derm.preprocess import preprocess

    with open(run / "split.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["role"] == "train"]
    rng = np.random.default_rng(seed)
    rows = [rows[i] for i in rng.permutation(len(rows))[: limit or len(rows)]]
    return np.stack([preprocess(r["image"], size) for r in rows]).astype(np.float32)


def distil(qat: Any, teacher: Any, x: np.ndarray, epochs: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """Fine-tune the fake-quantized model towards the float model's probabilities (KL divergence), in inference mode:
    the quantization ranges stay where ``init_ranges`` put them (tfmot would move them by a moving average, away from
    what the file will use) and dropout is off. Returns the mean loss of each epoch."""
    import tensorflow as tf
    import tf_keras as tfk

    targets = teacher.predict(x, batch_size=batch_size, verbose=0)
    opt = tfk.optimizers.Adam(lr)
    variables = qat.trainable_variables

    @tf.function
    def step(xb: Any, tb: Any) -> Any:
        with tf.GradientTape() as tape:
            p = qat(xb, training=False)
            loss = tf.reduce_mean(tf.reduce_sum(tb * (tf.math.log(tb + 1e-8) - tf.math.log(p + 1e-8)), axis=-1))
        grads = tape.gradient(loss, variables)
        opt.apply_gradients([(g, v) for g, v in zip(grads, variables, strict=True) if g is not None])
        return loss

    rng = np.random.default_rng(seed)
    losses = []
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        total, t0 = 0.0, time.perf_counter()
        for i in range(0, len(x), batch_size):
            idx = np.sort(order[i : i + batch_size])
            total += float(step(x[idx], targets[idx])) * len(idx)
        losses.append(total / len(x))
        print(f"epoch {epoch + 1}/{epochs}: KL {losses[-1]:.5f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return losses


def qat_convert(
    run: Path,
    model_file: Path,
    calibration: np.ndarray,
    epochs: int,
    steps: int | None,
    seed: int,
    batch_size: int = 16,
    lr: float = 1e-5,
) -> tuple[bytes, dict[str, Any]]:
    """Everything in the child process: rebuild, quantize, fine-tune, wrap in the export graph, convert."""
    import keras
    import tensorflow as tf
    import tf_keras as tfk

    from derm.exporter.graph import output_specs
    from derm.trainer.rundir import load_partition

    t0 = time.perf_counter()
    tf.keras.utils.set_random_seed(seed)
    k3 = keras.models.load_model(model_file, compile=False)
    _, part = load_partition(run)
    size = int(k3.input_shape[1])
    flat = rebuild_in_tf_keras(k3)
    probe = calibration[:8].astype(np.float32)
    drift = float(np.abs(flat.predict(probe, verbose=0) - k3.predict(probe, verbose=0)).max())
    if drift > 1e-3:
        raise ExportError(f"The tf-keras rebuild (batch norms and ReLUs folded) differs from the model by {drift:.2g}.")
    qat = quantize_model(flat)
    ranges = init_ranges(qat, flat, calibration)
    losses: list[float] = []
    n_train = 0
    if steps != 0 and epochs > 0:
        x = _training_images(run, size, steps * batch_size if steps else None, seed)
        n_train = len(x)
        losses = distil(qat, flat, x, epochs, batch_size, lr, seed)

    specs = output_specs(part)
    image = tfk.Input(shape=(size, size, 3), dtype="uint8", name="image")
    inner = tfk.Model(qat.input, [_node(qat, qat.get_layer(n)).outputs for n in ("probs", "logits")])
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
    buf = conv.convert()
    info = {
        "epochs": epochs if n_train else 0,
        "images": n_train,
        "batch_size": batch_size,
        "learning_rate": lr,
        "loss": "KL divergence to the float model's probabilities",
        "kl_per_epoch": [round(v, 6) for v in losses],
        "ranges": ranges,
        "calibration_images": len(calibration),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return buf, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Quantization-aware training child process of derm-export.")
    ap.add_argument("--run", required=True)
    ap.add_argument("--model", required=True, help="the classifier prepared for int8 (.keras)")
    ap.add_argument("--calibration", required=True, help="calibration images (.npy, uint8 N x s x s x 3)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--info", required=True, help="where to write the summary (JSON)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="steps per epoch (0: convert without fine-tuning)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        print("derm.exporter.qat needs TF_USE_LEGACY_KERAS=1 (set by derm-export).", file=sys.stderr)
        return 2
    buf, info = qat_convert(
        Path(args.run), Path(args.model), np.load(args.calibration), args.epochs, args.steps, args.seed
    )
    Path(args.out).write_bytes(buf)
    Path(args.info).write_text(json.dumps(info))
    print(json.dumps({"bytes": len(buf)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
