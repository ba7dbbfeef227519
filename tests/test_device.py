"""The lent-GPU path on this CPU: the shared data packed into parts that fit a device call, joined and checked on the
other side, every-layer fine-tuning under Keras' JAX backend in a process where TensorFlow cannot be imported (as on
the GPU machines), and the returned weights rebuilt into an ordinary run directory under TensorFlow whose
predictions match the machine's."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from derm.trainer.device import DeviceError, MiB, join, pack
from tests.conftest import read_rows
from tests.conftest import reference_weights as _weights

PER_CLASS = {"nv": 16, "mel": 16, "bkl": 8, "bcc": 8}


@pytest.fixture(scope="module")
def small_shared(ham_csv, tmp_path_factory) -> Path:
    """A shared folder of a few dozen real HAM10000 images (whole lesions) and the real backbone weights."""
    root = tmp_path_factory.mktemp("shared")
    base = root / "data" / "ham10000"
    (base / "images").mkdir(parents=True)
    rows, seen = [], dict.fromkeys(PER_CLASS, 0)
    for r in read_rows(ham_csv):
        if r["label"] in PER_CLASS and seen[r["label"]] < PER_CLASS[r["label"]]:
            seen[r["label"]] += 1
            rows.append(r)
            (base / r["image"]).write_bytes((ham_csv.parent / r["image"]).read_bytes())
    with open(base / "labels.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (root / "weights").mkdir()
    (root / "weights" / "inception_v3_2015_notop.weights.h5").symlink_to(_weights())
    return root


@pytest.fixture(scope="module")
def packed(small_shared, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("repo") / ".device"
    plan = pack(small_shared, out, ["ham10000"], part_bytes=30 * MiB, wheels=False)
    return out, plan


def test_parts_fit_their_limit_and_join_to_the_same_files(packed, small_shared, tmp_path):
    out, plan = packed
    sizes = {
        p["name"]: sum(f.stat().st_size for f in (out / p["name"]).rglob("*") if f.is_file()) for p in plan["parts"]
    }
    assert len(sizes) == 3  # 88 MB of weights and ~0.5 MB of images in parts of 30 MiB
    assert all(b <= 30 * MiB + 64 * 1024 for b in sizes.values()), sizes  # the plan.json beside the first part
    weights = plan["files"]["cache/inception_v3_2015_notop.weights.h5"]
    assert len(weights["chunks"]) == 3 and weights["size"] == _weights().stat().st_size
    shared, cache, _ = join(out, tmp_path / "joined")
    image = next(k for k in plan["files"] if k.endswith(".jpg"))
    assert (shared / image).read_bytes() == (small_shared / image).read_bytes()
    assert (cache / "inception_v3_2015_notop.weights.h5").read_bytes() == _weights().read_bytes()
    side = json.loads((cache / "inception_v3_2015_notop.json").read_text())
    assert side["weights"]["sha256"] == weights["sha256"]


def test_join_refuses_a_changed_or_missing_part(packed, tmp_path):
    out, plan = packed
    copy = tmp_path / ".device"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    chunk = copy / plan["files"]["cache/inception_v3_2015_notop.weights.h5"]["chunks"][1]
    data = bytearray(chunk.read_bytes())
    data[1000] ^= 1
    chunk.write_bytes(bytes(data))
    with pytest.raises(DeviceError, match=r"inception_v3_2015_notop\.weights\.h5 arrived changed"):
        join(copy, tmp_path / "j1")
    subprocess.run(["rm", "-r", str(copy / "p3")], check=True)
    with pytest.raises(DeviceError, match=r"Parts \['p3'\] did not arrive"):
        join(copy, tmp_path / "j2")


def _jax_python() -> str | None:
    """The interpreter of the ``[jax]`` environment (Keras on JAX, no TensorFlow): ``$DERM_JAX_PYTHON``, else the
    test command's ``.venv-jax``."""
    given = os.environ.get("DERM_JAX_PYTHON")
    local = Path(__file__).resolve().parents[1] / ".venv-jax" / "bin" / "python"
    return given or (str(local) if local.is_file() else None)


# TensorFlow cannot be imported in the run below, as on the GPU machines (PyTorch and JAX, no TensorFlow); the [jax]
# environment does not hold it, and the finder makes sure.
_NO_TENSORFLOW = """
import importlib.abc, sys
class _NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ImportError("no TensorFlow on this machine")
sys.meta_path.insert(0, _NoTensorFlow())
from derm.trainer.device import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(_jax_python() is None, reason="no [jax] environment (.venv-jax or DERM_JAX_PYTHON)")
def test_finetune_under_jax_without_tensorflow_unpacks_to_the_same_predictions(
    packed, small_shared, tmp_path, monkeypatch
):
    out, _ = packed
    back, work = tmp_path / "back", tmp_path / "work"
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    sets = ["input_size=80", "epochs=3", "steps_per_epoch=2", "batch_size=8", "near_duplicates=false"]
    sets += ['source_weights={"histo": 3.0}', "source_column=dx_type"]  # per-image weights through the PyDataset
    cmd = [_jax_python(), "-c", _NO_TENSORFLOW, "run", "ham-fold", "--fold", "1", "--parts", str(out)]
    cmd += ["--out", str(back), "--work", str(work), "--set", "time_budget_s=0.5"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "spent after epoch 1" in proc.stderr, proc.stderr[-3000:]
    names = sorted(p.name for p in back.iterdir())
    assert names == ["run.tar.gz", "weights.npz.0", "weights.npz.1", "weights.npz.2"]
    assert all(p.stat().st_size <= 16 * MiB for p in back.iterdir())

    from derm.trainer.device import unpack
    from derm.trainer.model import load_model

    monkeypatch.setenv("DERM_CACHE", str(work / "cache"))  # the backbone the run began from, as here in ~/.cache
    report = unpack(back, tmp_path / "run", shared=small_shared)
    run = tmp_path / "run"
    from derm.trainer.rundir import open_run

    open_run(run, verify=True)  # run.json lists the rebuilt model and the added files with their sha256
    images = [r["image"] for r in read_rows(run / "predictions_test.csv")]
    assert all(i.startswith(str(small_shared.resolve()) + "/data/ham10000/") for i in images)  # moved from there
    device = json.loads((run / "device.json").read_text())
    assert device["backend"] == "jax" and device["job"] == "ham-fold" and device["fold"] == 1
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["source_weights"] == {"histo": 3.0}
    assert cfg["mode"] == "finetune" and cfg["folds"] == 5 and cfg["fold"] == 1 and cfg["within"] == "nine"
    assert [r["epoch"] for r in read_rows(run / "history.csv")] == ["1"]  # the time budget stopped it
    for role in ("val", "test"):
        r = report["roles"][role]
        assert r["n"] > 0 and r["argmax_agreement"] == 1.0
        assert r["max_abs_diff"] < 2e-4, r  # float16 changes of the backbone, JAX vs TensorFlow kernels
    model = load_model(run / "model.keras")
    assert model.input_shape == (None, 80, 80, 3)
    from derm.trainer.device import _starting_point

    _, start = _starting_point(cfg, model.output_shape[-1])
    moved = [float(np.abs(w - s).max()) for w, s in zip(model.get_weights(), start, strict=False)]
    assert max(moved) > 1e-3  # every layer trained, not the head alone
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["mode"] == "finetune" and metrics["test"]["source"] == "model on images"
    assert 0.0 <= metrics["test"]["training_classes"]["mean_per_class_accuracy"] <= 1.0

    from derm.exporter.config import ExportConfig
    from derm.exporter.export import export

    exported = export(
        ExportConfig(str(run), quantize="fp16", out=str(tmp_path / "m.tflite"), calibration_size=8, validation_size=8)
    )
    assert exported.ok and exported.manifest["training"]["mode"] == "finetune"  # derm-export takes it as it is


def test_unpack_refuses_a_folder_without_the_returned_files(tmp_path):
    from derm.trainer.device import unpack

    with pytest.raises(DeviceError, match=r"lacks run\.tar\.gz or weights\.npz\.N"):
        unpack(tmp_path, tmp_path / "run")


def test_jobs_are_the_cpu_benchmarks_configurations_in_every_layer_mode(tmp_path):
    """Each GPU job trains what the CPU benchmarks train (same data, split, partition, weighting), every layer."""
    from derm.trainer.device import job_config
    from derm.trainer.reference import REFERENCE_DIR, reference_config, shared_dir

    shared = shared_dir()
    if not (shared / "data" / "pad_ufes20" / "labels.csv").is_file():
        pytest.skip(f"the shared data sets are not at {shared} (set DERM_SHARED)")
    ham = job_config("ham-fold", shared, tmp_path / "h", fold=3)
    assert (ham.mode, ham.within, ham.max_class_size, ham.folds, ham.fold) == ("finetune", "nine", 100, 5, 3)
    isic = job_config("isic2017", shared, tmp_path / "i")
    assert (isic.holdout, isic.within, isic.unfreeze_top) == ("split=val", "labels", 0)
    ref = job_config("reference", shared, tmp_path / "r")
    committed = reference_config(Path(ref.data), tmp_path / "r", ref=REFERENCE_DIR)
    differ = {k for k, v in ref.to_dict().items() if committed.to_dict()[k] != v}
    assert differ == {"mode", "unfreeze_top"} and ref.source_weights == committed.source_weights
    with pytest.raises(DeviceError, match="Unknown job 'all'"):
        job_config("all", shared, tmp_path / "x")
