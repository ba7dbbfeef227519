"""Golden vectors and the apps' side of the contract: `derm golden` writes what the SDK makes and the file outputs;
the Android app's pure-Kotlin core (android-demo/core) must reproduce every input tensor to the byte and every
prediction, compiled and run here on the JVM."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO


def test_golden_vectors_are_the_sdks_and_the_files(golden):
    """Each input tensor is the SDK's preprocessing of the image; each output is what the file computes on it in
    ai-edge-litert; each prediction is the SDK's on those outputs; the names and sizes are the manifest's."""
    from derm.classifier import Classifier
    from derm.preprocess import preprocess

    doc = json.loads((golden / "golden.json").read_text())
    clf = Classifier.load(golden / doc["model"]["file"])
    size = doc["input_size"]
    assert doc["format"] == "derm-golden/1" and size == clf.input_size and len(doc["cases"]) == 7
    assert {c["decoded"]["orientation"] for c in doc["cases"]} == {1, 3, 6, 8}
    assert json.loads((golden / "manifest.json").read_text()) == clf.manifest
    assert any(max(c["decoded"]["width"], c["decoded"]["height"]) > 4 * size for c in doc["cases"])  # reduce path
    for case in doc["cases"]:
        tensor = np.frombuffer((golden / case["input"]).read_bytes(), np.uint8).reshape(size, size, 3)
        assert np.array_equal(tensor, preprocess(golden / case["image"], size))
        raw = clf.run(tensor[None])
        assert set(raw) == set(case["outputs"]) == {o["name"] for o in clf.manifest["outputs"]}
        for name, values in case["outputs"].items():
            assert len(values) == len(clf.outputs[name]["labels"])
            np.testing.assert_allclose(values, raw[name][0].reshape(-1), rtol=0, atol=1e-7)
        again = json.loads(json.dumps(clf.predict(golden / case["image"]).to_dict()))
        assert case["prediction"] == {**again, "source": case["name"]}


def test_the_written_folder_refuses_to_be_overwritten_unasked(golden, small_tflite):
    from derm.golden import GoldenError, write_golden

    with pytest.raises(GoldenError, match="exists; pass --overwrite"):
        write_golden(golden.parent / "model.tflite", [REPO / "samples" / "images" / "ISIC_0001852.jpg"])
    assert not golden.with_name("golden.partial").exists()


def test_android_core_reproduces_the_golden_vectors_on_the_jvm(golden):
    """android-demo/core compiled with kotlinc (npm) and run with JUnit 4 and Android's org.json (Debian)."""
    if shutil.which("java") is None or not Path("/usr/share/java/com.android.json.jar").is_file():
        pytest.skip(
            "needs Java 17 and Debian's junit4 + libandroid-json-java (the README's test command installs them)"
        )
    if shutil.which("npm") is None and not (REPO / "android-demo/core/.tools/node_modules/kotlin-compiler").is_dir():
        pytest.skip("needs npm to install kotlinc (the npm package kotlin-compiler)")
    res = subprocess.run(
        ["bash", str(REPO / "android-demo" / "core" / "test.sh"), str(golden)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "9 passed, 0 failed, 0 skipped" in out, out  # every test ran: none skipped
