"""The Android app's side of the contract that can be checked without Android: it asks for no network, keeps no
list of labels of its own, and the exported file offers the signature (input and output names, shapes, types) that
the app binds by the manifest's names."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import numpy as np

from tests.conftest import REPO

APP = REPO / "android-demo"
ANDROID = "{http://schemas.android.com/apk/res/android}"


def _sources(*parts: str) -> list:
    return sorted(p for part in parts for p in (APP / part).rglob("*.kt"))


def test_the_app_has_no_network_permission():
    manifest = ET.parse(APP / "app" / "src" / "main" / "AndroidManifest.xml").getroot()
    asked = {e.get(f"{ANDROID}name") for e in manifest.iter("uses-permission")}
    assert asked == {"android.permission.CAMERA"}, asked
    assert not any("INTERNET" in p or "NETWORK" in p for p in asked)


def test_no_label_is_hard_coded_in_the_app():
    """Every label comes from the file: no node of the taxonomy appears as a string in the app's or core's code."""
    from derm.taxonomy import default_taxonomy

    labels = {n for n in default_taxonomy().nodes} | {"benign", "malignant", "non_neoplastic"}
    code = "\n".join(p.read_text(encoding="utf-8") for p in _sources("app/src/main", "core/src/main"))
    literals = set(re.findall(r'"([^"$\\]+)"', code))
    assert not labels & literals, sorted(labels & literals)
    assert len(literals) > 10  # the check reads real code


def test_the_exported_file_offers_the_signature_the_app_binds(small_tflite):
    from ai_edge_litert.interpreter import Interpreter

    from derm.manifest import read_manifest

    manifest = read_manifest(small_tflite)
    runner = Interpreter(model_path=str(small_tflite)).get_signature_runner()
    size = manifest["input"]["shape"][1]
    inputs = runner.get_input_details()
    assert list(inputs) == [manifest["input"]["name"]] == ["image"]
    assert list(inputs["image"]["shape"]) == [1, size, size, 3] and inputs["image"]["dtype"] == np.uint8
    outputs = runner.get_output_details()
    assert set(outputs) == {o["name"] for o in manifest["outputs"]}
    for o in manifest["outputs"]:
        assert (
            int(np.prod(outputs[o["name"]]["shape"])) == len(o["labels"]) and outputs[o["name"]]["dtype"] == np.float32
        )


def test_the_gradle_build_is_what_the_readme_says():
    """Kotlin 2.x, minSdk 24, Compose, LiteRT with its GPU delegate, and the task that copies the exported file."""
    catalog = (APP / "gradle" / "libs.versions.toml").read_text(encoding="utf-8")
    app = (APP / "app" / "build.gradle.kts").read_text(encoding="utf-8")
    assert re.search(r'^kotlin = "2\.', catalog, re.M) and "litert-gpu" in catalog and "camera-camera2" in catalog
    assert "minSdk = 24" in app and "compose = true" in app and "copyModel" in app and "model.tflite" in app
