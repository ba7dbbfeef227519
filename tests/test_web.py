"""The web app (web/): its JavaScript core reproduces the golden vectors under Node, and the real page, served by
`derm web` and driven in Debian's headless Chromium, classifies the golden images through its file input with
MediaPipe Tasks to the Python SDK's results, refuses a file without a manifest, sends nothing off its origin
(MediaPipe's metrics blocked), and works again from its service worker with the server gone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO

WEB = REPO / "web"
CHROMIUM = Path("/usr/bin/chromium")
#: Measured in tests/test_web.py's browser run (MediaPipe 1.1.0's WASM vs ai-edge-litert on x86, same input
#: tensor): the float kernels sum in another order, so outputs agree to rounding, not to the bit.
OUTPUT_ATOL = 1e-4


@pytest.fixture(scope="module")
def node_modules() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("needs Node.js and npm (the README's test command installs the app's npm packages)")
    if not (WEB / "node_modules" / "@mediapipe" / "tasks-vision" / "vision_bundle.mjs").is_file():
        subprocess.run(["npm", "ci", "--prefix", str(WEB), "--no-audit", "--no-fund"], check=True, timeout=600)
    return WEB / "node_modules"


def without_manifest(model: Path, out: Path) -> Path:
    """The model's flatbuffer with the zip of associated files (labels, manifest) cut off: a real .tflite that
    MediaPipe could run, but that says nothing of its labels."""
    with zipfile.ZipFile(model) as z:
        start = min(info.header_offset for info in z.infolist())
    out.write_bytes(model.read_bytes()[:start])
    return out


def test_the_javascript_core_reproduces_the_golden_vectors_under_node(golden, node_modules):
    res = subprocess.run(
        ["node", "--test", str(WEB / "test" / "core.test.mjs")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "DERM_GOLDEN": str(golden)},
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "# fail 0" in out and "# skipped 0" in out, out


@pytest.fixture(scope="module")
def browser(golden, node_modules, tmp_path_factory) -> dict:
    if not CHROMIUM.is_file():
        pytest.skip(f"needs Debian's chromium at {CHROMIUM} (the README's test command installs it)")
    out = tmp_path_factory.mktemp("browser")
    derm = Path(shutil.which("derm") or REPO / ".venv" / "bin" / "derm")
    plain = without_manifest(golden.parent / "model.tflite", out / "plain.tflite")
    driver = [str(WEB / "test" / "browser.mjs"), "--derm", str(derm), "--golden", str(golden), "--out", str(out)]
    res = subprocess.run(
        ["node", *driver, "--no-manifest", str(plain)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((out / "browser.json").read_text())
    report["out"] = out
    return report


def test_the_page_classifies_the_golden_images_as_the_sdk_does(browser, golden):
    doc = json.loads((golden / "golden.json").read_text())
    load = browser["steps"]["load"]
    assert load["state"] == "ready" and load["model"]["verified"].startswith("weights verified")
    assert load["crossOriginIsolated"] is True and load["operatingPoint"] == doc["operating_point"]
    assert "not a diagnostic device" in load["disclaimer"]
    size = doc["input_size"]
    cases = {c["name"]: c for c in browser["steps"]["cases"]}
    assert list(cases) == [c["name"] for c in doc["cases"]]
    for want in doc["cases"]:
        got = cases[want["name"]]
        assert "error" not in got, got
        # Chromium decodes the JPEG (and applies its EXIF orientation); derm-core.js resizes as the SDK does.
        ref = np.fromfile(golden / want["input"], np.uint8)
        diff = np.abs(np.asarray(got["input"], np.int16) - ref)
        assert got["input"] and len(got["input"]) == size * size * 3
        assert diff.max() <= 0, f"{want['name']}: {np.count_nonzero(diff)} input levels differ, by up to {diff.max()}"
        for name, values in want["outputs"].items():
            np.testing.assert_allclose(got["outputs"][name], values, rtol=0, atol=OUTPUT_ATOL, err_msg=want["name"])
        pred, ref_pred = got["prediction"], want["prediction"]
        assert [c for c, _ in pred["top_classes"]] == [c for c, _ in ref_pred["top_classes"]]
        for task, d in ref_pred["decisions"].items():
            assert pred["decisions"][task]["positive"] == d["positive"] and pred["applies"] == ref_pred["applies"]
            assert pred["decisions"][task]["threshold"] == d["threshold"]
    assert (browser["out"] / "result.png").stat().st_size > 10_000  # the result screen, as an artifact


def test_a_file_without_a_manifest_is_refused_with_a_message(browser):
    step = browser["steps"]["noManifest"]
    assert "plain.tflite carries no derm manifest" in step["shown"], step
    assert step["state"] == "ready" and step["model"] == "model.tflite"  # the app keeps the model it had


def test_no_request_leaves_the_origin_and_the_metrics_are_blocked(browser):
    urls = [r["url"] for r in browser["requests"]]
    assert urls, "no request was recorded"
    hosts = {u.split("/")[2] for u in urls if u.startswith("http")}
    assert len(hosts) == 1 and next(iter(hosts)).startswith("127.0.0.1:"), hosts
    assert all(u.startswith(("http://127.0.0.1:", "blob:", "data:")) for u in urls), urls
    blocked = browser["steps"]["violations"]
    assert any("odml.pa.googleapis.com" in v["blocked"] and v["directive"] == "connect-src" for v in blocked), blocked


def test_the_app_works_offline_from_its_service_worker(browser):
    cached = set(browser["steps"]["cached"])
    assert {"/model.tflite", "/vendor/tasks-vision/wasm/vision_wasm_internal.wasm", "/app.js"} <= cached
    offline = browser["steps"]["offline"]
    assert offline["state"] == "ready", offline
    first = browser["steps"]["cases"][0]
    assert offline["case"]["prediction"] == first["prediction"]


def test_derm_web_writes_a_static_site_and_names_what_is_missing(golden, node_modules, tmp_path):
    from derm.web import WebError, write_site

    model = golden.parent / "model.tflite"
    site = write_site(model, tmp_path / "site")
    assert (site / "model.tflite").read_bytes() == model.read_bytes()
    assert (site / "vendor/tasks-vision/wasm/vision_wasm_internal.wasm").is_file()
    assert "connect-src 'self'" in (site / "_headers").read_text()
    assert json.loads((site / "build.json").read_text())["tasks_vision"] == "1.1.0"
    index = (site / "index.html").read_text()
    assert "connect-src 'self'" in index and "https://" not in index
    with pytest.raises(WebError, match="exists; pass --overwrite"):
        write_site(model, site)
    with pytest.raises(WebError, match=r"MediaPipe Tasks is not installed in .*npm ci --prefix"):
        empty = tmp_path / "app"
        empty.mkdir()
        (empty / "index.html").write_text("<!doctype html>")
        write_site(model, tmp_path / "other", app=empty)
    with pytest.raises(WebError, match=r"runs \.tflite files"):
        write_site(tmp_path / "model.onnx", tmp_path / "other")
    assert not (tmp_path / "other").exists() and not (tmp_path / "other.partial").exists()
