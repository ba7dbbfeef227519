"""Shared fixtures. Real data comes from ../shared (or $DERM_SHARED); tests that need it skip with the reason."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The one setting for real data: $DERM_SHARED, else ../shared beside the repository."""
    return Path(os.environ.get("DERM_SHARED") or REPO.parent / "shared")


def _need(rel: str) -> Path:
    path = shared_dir() / rel
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set DERM_SHARED to the folder holding data/ and weights/)")
    return path


@pytest.fixture(scope="session")
def ham_csv() -> Path:
    return _need("data/ham10000/labels.csv")


@pytest.fixture(scope="session")
def isic2017_csv() -> Path:
    return _need("data/isic2017_trainval/labels.csv")


@pytest.fixture(scope="session")
def pad_csv() -> Path:
    return _need("data/pad_ufes20/labels.csv")


@pytest.fixture(scope="session")
def ham(ham_csv):
    import derm

    return derm.read_dataset(ham_csv)


@pytest.fixture(scope="session")
def default_tax():
    import derm

    return derm.default_taxonomy()


# A small real training run shared by the trainer, evaluation and exporter tests: a few dozen HAM10000 images of 4
# diagnoses at a small input size (CI speed; the product default is 299), with the real 2015 weights.
SMALL_SIZE = 96
PER_CLASS = {"mel": 12, "nv": 12, "bkl": 12, "bcc": 12}


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def reference_weights() -> Path:
    path = shared_dir() / "weights" / "inception_v3_2015_notop.weights.h5"
    if not path.is_file():
        pytest.skip(f"reference weights not found at {path} (set DERM_SHARED)")
    return path


@pytest.fixture(scope="session")
def small_csv(ham_csv, tmp_path_factory) -> Path:
    """A few dozen HAM10000 images of 4 diagnoses, whole lesions, with the lesion ids."""
    rows = read_rows(ham_csv)
    out, seen = [], dict.fromkeys(PER_CLASS, 0)
    for r in rows:
        if r["label"] in PER_CLASS and seen[r["label"]] < PER_CLASS[r["label"]]:
            seen[r["label"]] += 1
            out.append({"image": str(ham_csv.parent / r["image"]), "label": r["label"], "lesion_id": r["lesion_id"]})
    path = tmp_path_factory.mktemp("data") / "small.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["image", "label", "lesion_id"])
        w.writeheader()
        w.writerows(out)
    return path


@pytest.fixture(scope="session")
def small_run(small_csv, tmp_path_factory):
    from derm.trainer.config import TrainConfig
    from derm.trainer.train import train

    tmp = tmp_path_factory.mktemp("runs")
    cfg = TrainConfig(
        data=str(small_csv),
        out=str(tmp / "run"),
        within="labels",
        weights=str(reference_weights()),
        input_size=SMALL_SIZE,
        views=2,
        head_epochs=25,
        head_lr=3e-3,
        batch_size=16,
        val_fraction=0.25,
        seed=1,
        feature_cache=str(tmp / "features.sqlite"),
    )
    return cfg, train(cfg)


@pytest.fixture(scope="session")
def small_tflite(small_run, tmp_path_factory) -> str:
    """The small run exported by derm-export (TFLite float16, with its metadata and manifest)."""
    pytest.importorskip("mediapipe")
    from derm.exporter.export import ExportConfig, export

    _, run = small_run
    out = tmp_path_factory.mktemp("small_tflite") / "small.tflite"
    return export(ExportConfig(run=str(run), quantize="fp16", out=str(out), validation_size=8)).path


@pytest.fixture(scope="session")
def sdk_files(small_run, small_tflite, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """For the SDK tests: the session's TFLite float16 file of the small run (not written to), an ONNX float32 file of
    it through derm-export's own pipeline, and six of the run's images."""
    from derm.exporter.export import ExportConfig, export

    _, run = small_run
    out = tmp_path_factory.mktemp("sdk_models")
    cfg = ExportConfig(run=str(run), target="onnx", quantize="fp32", out=str(out / "m.onnx"), validation_size=8)
    images = [r["image"] for r in read_rows(run / "split.csv")[:6]]
    return Path(small_tflite), Path(export(cfg).path), images


@pytest.fixture(scope="session")
def small_export(small_run) -> dict:
    """The small run's export graph, 24 of its real images (uint8, SMALL_SIZE) and the graph's outputs on them:
    built once for every exporter test."""
    import numpy as np

    from derm.exporter.graph import build_export_model, output_specs
    from derm.preprocess import preprocess
    from derm.trainer.rundir import load_run

    _, run = small_run
    model, _, part, _ = load_run(run)
    specs = output_specs(part)
    export = build_export_model(model, part, specs)
    images = np.stack([preprocess(r["image"], SMALL_SIZE) for r in read_rows(run / "split.csv")[:24]])
    reference = export.predict(images, verbose=0)
    return {
        "run": run,
        "model": model,
        "part": part,
        "specs": specs,
        "export": export,
        "images": images,
        "reference": reference,
    }


@pytest.fixture(scope="session")
def small_int8(small_run, tmp_path_factory) -> dict:
    """The small run exported by derm-export as TFLite int8 (defaults: equalized, GPTQ on 12 of 24 calibration
    images, float head; ``force``: parity is not what is tested), with the calibration images and the Keras model
    the export prepared and converted (fold, equalization on all 24 images, GPTQ on the first 12), kept as the
    export made it rather than prepared a second time (GPTQ twice cost CI ~40 s)."""
    pytest.importorskip("mediapipe")
    import dataclasses

    from derm.exporter import export as export_module
    from derm.exporter.export import ExportConfig, calibration_rows, export, load_images

    _, run = small_run
    cfg = ExportConfig(
        run=str(run),
        out=str(tmp_path_factory.mktemp("small_int8") / "m.tflite"),
        rounding_images=12,
        calibration_size=24,
        validation_size=8,
    )
    kept = []
    prepare = export_module.int8_ready_classifier

    def keep(*args, **kwargs):
        kept.append(prepare(*args, **kwargs))
        return kept[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export_module, "int8_ready_classifier", keep)
        result = export(dataclasses.replace(cfg, force=True))
    assert len(kept) == 1
    images = load_images([r["image"] for r in calibration_rows(cfg)[0]], SMALL_SIZE, "calibration")
    return {"result": result, "config": cfg, "images": images, "prepared": kept[0]}


@pytest.fixture(scope="session")
def golden(small_tflite, tmp_path_factory) -> Path:
    """Golden vectors (derm golden) of the small exported model (96 px) on committed sample images, plus real photos
    made larger than 4x the input side (the SDK's box reduction), stored with EXIF orientations 1, 3, 6 and 8, and
    a tall one.
    The Android core (tests/test_golden.py) and the web app (tests/test_web.py) reproduce them."""
    from PIL import Image

    from derm.golden import write_golden

    samples = REPO / "samples" / "images"
    src = tmp_path_factory.mktemp("golden_in")
    photo = Image.open(samples / "PAT_838_1585_282.jpg").convert("RGB")
    # a tall portrait (270x700): Pillow 13 resizes it vertically first, and the rounding differs from the other order
    for orientation, size in ((1, (703, 521)), (3, (400, 300)), (6, (709, 500)), (8, (385, 390)), (1, (270, 700))):
        exif = Image.Exif()
        exif[0x0112] = orientation
        name = f"o{orientation}.jpg" if size[1] < 2 * size[0] else "tall.jpg"
        photo.resize(size, Image.Resampling.BICUBIC).save(src / name, quality=92, exif=exif.tobytes())
    images = [samples / "ISIC_0001852.jpg", samples / "PAT_104_1756_151.jpg", *sorted(src.glob("*.jpg"))]
    model = tmp_path_factory.mktemp("golden_model") / "model.tflite"
    shutil.copyfile(small_tflite, model)
    return write_golden(model, images)
