"""The bad-input and interruption catalogue: every command, run as a real child process on real files this test makes
(truncated, corrupted, renamed, not UTF-8, below a file, a folder of the user's own files, signals), must end with its
documented exit status and one message naming the bad thing, print no traceback, and leave the file system as it was
(or, where the command finishes with a warning, complete). Exit statuses: docs/guarantees.md."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, read_rows

SAMPLES = REPO / "samples" / "images"


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # {w}: the world folder; {model}, {run}, ...: see _fill
    code: int
    says: str  # a regex the output must contain (it names the bad thing)
    needs: str = ""  # "model" or "run": a fixture built from ../shared, skipped without it
    writes: tuple[str, ...] = ()  # files (under {w}) that the command completes instead of leaving nothing


CASES = [
    # ------------------------------------------------------------------ derm: images, model files, folders, CSVs
    Case("classify/truncated-jpeg", ("derm", "classify", "{w}/imgs/trunc.jpg", "-m", "{model}"), 2,
         r"Cannot read image .*trunc\.jpg", "model"),
    Case("classify/text-named-jpg", ("derm", "classify", "{w}/notimage.jpg", "-m", "{model}"), 2,
         r"Cannot read image .*notimage\.jpg", "model"),
    Case("classify/flipped-weights", ("derm", "classify", "{w}/imgs/a.jpg", "-m", "{w}/flipped.tflite"), 2,
         r"flipped\.tflite.*damaged or was altered", "model"),
    Case("classify/truncated-model", ("derm", "classify", "{w}/imgs/a.jpg", "-m", "{w}/truncated.tflite"), 2,
         r"truncated or damaged", "model"),
    Case("classify/onnx-renamed-tflite", ("derm", "classify", "{w}/imgs/a.jpg", "-m", "{w}/renamed.tflite"), 2,
         r"not a TFLite model.*ONNX"),
    Case("classify/missing-model", ("derm", "classify", "{w}/imgs/a.jpg", "-m", "{w}/none.tflite"), 2,
         r"none\.tflite"),
    Case("triage/unreadable-entries", ("derm", "triage", "{w}/mixed", "-m", "{model}", "--out", "{w}/t"), 3,
         r"3 file\(s\) could not be read", "model", ("t/results.csv", "t/report.html", "t/triage.json")),
    Case("triage/out-below-a-file", ("derm", "triage", "{w}/mixed", "-m", "{model}", "--out", "{w}/blocker/t"), 2,
         r"blocker/t.*not a directory", "model"),
    Case("triage/folder-is-a-file", ("derm", "triage", "{w}/blocker", "-m", "{model}", "--out", "{w}/t"), 2,
         r"blocker' is not a folder of images", "model"),
    Case("web/truncated-model", ("derm", "web", "-m", "{w}/truncated.tflite", "--out", "{w}/site"), 2,
         r"truncated or damaged", "model"),
    Case("web/out-below-a-file", ("derm", "web", "-m", "{model}", "--out", "{w}/blocker/site"), 2,
         r"blocker/site.*is a file, not a folder", "model"),
    Case("data-check/not-utf8", ("derm", "data", "check", "{w}/latin.csv"), 2, r"latin\.csv' is not UTF-8"),
    Case("data-check/truncated-jpeg", ("derm", "data", "check", "{w}/bad.csv", "--decode"), 1,
         r"trunc\.jpg: unreadable image"),
    Case("data-split/truncated-jpeg", ("derm", "data", "split", "{w}/bad.csv", "--out", "{w}/s.csv"), 2,
         r"trunc\.jpg.*derm data check .*bad\.csv --decode"),
    Case("data-split/out-below-a-file", ("derm", "data", "split", "{w}/data.csv", "--out", "{w}/blocker/s.csv"), 2,
         r"blocker' is a file, not a folder"),
    Case("taxonomy/csv-as-taxonomy", ("derm", "taxonomy", "validate", "{w}/latin.csv"), 2, r"expected \.yaml"),
    Case("taxonomy/not-utf8", ("derm", "taxonomy", "validate", "{w}/latin.yaml"), 2, r"latin\.yaml' is not UTF-8"),
    Case("taxonomy-partition/not-utf8", ("derm", "taxonomy", "partition", "--data", "{w}/latin.csv", "-m", "99"), 2,
         r"latin\.csv' is not UTF-8"),
    # ------------------------------------------------------------------ derm-train
    Case("train/truncated-jpeg", ("derm-train", "train", "--data", "{w}/bad.csv", "--out", "{w}/r"), 2,
         r"trunc\.jpg.*derm data check .*bad\.csv --decode"),
    Case("train/too-few-groups", ("derm-train", "train", "--data", "{w}/few.csv", "--out", "{w}/r"), 2,
         r"Only 6 independent groups .* validation fraction of 0\.1 needs at least 10"),
    Case("train/not-utf8", ("derm-train", "train", "--data", "{w}/latin.csv", "--out", "{w}/r"), 2,
         r"latin\.csv' is not UTF-8"),
    Case("train/out-is-a-file", ("derm-train", "train", "--data", "{w}/data.csv", "--out", "{w}/blocker"), 2,
         r"blocker' is a file, not a folder"),
    Case("train/out-below-a-file", ("derm-train", "train", "--data", "{w}/data.csv", "--out", "{w}/blocker/r"), 2,
         r"blocker' is a file, not a folder"),
    Case("train/overwrite-users-folder",
         ("derm-train", "train", "--data", "{w}/data.csv", "--out", "{w}/photos", "--overwrite"), 2,
         r"photos' is not a run directory.*nothing was deleted"),
    Case("train/config-wrong-type", ("derm-train", "train", "-c", "{w}/pool.json", "--data", "{w}/data.csv"), 2,
         r"pool_layers must be a list of strings; received 5"),
    Case("train/config-truthy-string", ("derm-train", "train", "-c", "{w}/over.json", "--data", "{w}/data.csv"), 2,
         r"overwrite must be true or false; received 'yes'"),
    Case("train/config-not-utf8", ("derm-train", "train", "-c", "{w}/latin.yaml", "--data", "{w}/data.csv"), 2,
         r"latin\.yaml' is not UTF-8"),
    Case("train/missing-column",
         ("derm-train", "train", "--data", "{w}/data.csv", "--out", "{w}/r", "--source-weight", "pad=4"), 2,
         r"needs a 'source' column .*columns are \['image', 'label'\]"),
    Case("cv/out-is-a-file", ("derm-train", "cv", "--data", "{w}/data.csv", "--out", "{w}/blocker"), 2,
         r"blocker' is a file, not a folder"),
    Case("weights/cache-is-a-file", ("derm-train", "weights", "fetch", "--cache", "{w}/blocker"), 2,
         r"--cache .*blocker' is a file"),
    Case("reference/overwrite-users-folder",
         ("derm-train", "reference", "build", "--out", "{w}/photos", "--overwrite"), 2, r"nothing was deleted"),
    # ------------------------------------------------------------------ derm-eval, derm-export, derm-bench
    Case("eval/truncated-jpeg", ("derm-eval", "{run}", "--data", "{w}/bad.csv", "--out", "{w}/e"), 2,
         r"trunc\.jpg.*derm data check", "run"),
    Case("eval/out-below-a-file", ("derm-eval", "{run}", "--data", "{w}/data.csv", "--out", "{w}/blocker/e"), 2,
         r"blocker' is a file, not a folder", "run"),
    Case("export/changed-model", ("derm-export", "{w}/changed_run", "--out", "{w}/m.tflite"), 2,
         r"model\.keras.*does not match the sha256", "run"),
    Case("export/not-a-run", ("derm-export", "{w}/photos"), 2, r"photos' is not a finished derm-train run"),
    Case("export/out-below-a-file", ("derm-export", "{run}", "--out", "{w}/blocker/m.tflite"), 2,
         r"blocker' is a file, not a folder", "run"),
    Case("export/report-below-a-file",
         ("derm-export", "{run}", "--out", "{w}/m.tflite", "--report", "{w}/blocker/r.json"), 2,
         r"--report .*blocker' is a file", "run"),
    Case("export/out-exists", ("derm-export", "{run}", "--out", "{w}/blocker.tflite"), 2,
         r"blocker\.tflite' exists; pass --overwrite", "run"),
    Case("export/calibration-not-utf8",
         ("derm-export", "{run}", "--calibration", "{w}/latin.csv", "--out", "{w}/m.tflite"), 2,
         r"latin\.csv' is not UTF-8", "run"),
    Case("export/calibration-truncated-jpeg",
         ("derm-export", "{run}", "--calibration", "{w}/bad.csv", "--out", "{w}/m.tflite"), 2,
         r"trunc\.jpg", "run"),
    Case("bench/damaged-file", ("derm-bench", "--run", "{run}", "--targets", "", "--files", "{w}/flipped.tflite",
                                "--out", "{w}/b"), 2, r"flipped\.tflite.*damaged or was altered", "run"),
    Case("bench/not-a-model", ("derm-bench", "--run", "{run}", "--targets", "", "--files", "{w}/notimage.jpg",
                               "--out", "{w}/b"), 2, r"notimage\.jpg': unknown model file type", "run"),
    Case("bench/out-below-a-file", ("derm-bench", "--run", "{run}", "--out", "{w}/blocker/b"), 2,
         r"blocker' is a file, not a folder", "run"),
]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Real files of every kind a user gets wrong: sample images (committed) and damaged copies of them."""
    w = tmp_path_factory.mktemp("world")
    rows = read_rows(SAMPLES / "labels.csv")
    (w / "imgs").mkdir()
    for i, r in enumerate(rows):
        shutil.copyfile(SAMPLES / r["image"], w / "imgs" / ("a.jpg" if i == 0 else r["image"]))
        r["image"] = "a.jpg" if i == 0 else r["image"]
    good = (w / "imgs" / "a.jpg").read_bytes()
    (w / "imgs" / "trunc.jpg").write_bytes(good[: len(good) // 3])
    lines = ["image,label"] + [f"imgs/{r['image']},{r['label']}" for r in rows]
    (w / "data.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (w / "few.csv").write_text("\n".join(lines[:7]) + "\n", encoding="utf-8")
    (w / "bad.csv").write_text("\n".join([*lines, "imgs/trunc.jpg,melanoma"]) + "\n", encoding="utf-8")
    (w / "latin.csv").write_bytes("image,label\nimgs/café.jpg,mélanome\n".encode("latin-1"))
    (w / "latin.yaml").write_bytes("name: dermatologie \xe9\n".encode("latin-1"))
    (w / "pool.json").write_text(json.dumps({"pool_layers": 5, "out": str(w / "r")}))
    (w / "over.json").write_text(json.dumps({"overwrite": "yes", "out": str(w / "r")}))
    (w / "notimage.jpg").write_text("not a picture")
    (w / "blocker").write_text("a file where a folder is expected")
    (w / "blocker.tflite").write_text("a file the user already has")
    (w / "photos").mkdir()
    (w / "photos" / "notes.txt").write_text("the user's own notes")
    shutil.copyfile(w / "imgs" / "a.jpg", w / "photos" / "holiday.jpg")
    mixed = w / "mixed"  # a triage folder: 2 images, and 3 entries that look like images but cannot be read
    mixed.mkdir()
    for name in ("a.jpg", rows[5]["image"]):
        shutil.copyfile(w / "imgs" / name, mixed / name)
    shutil.copyfile(w / "imgs" / "trunc.jpg", mixed / "trunc.jpg")
    (mixed / "notes.jpg").write_text("text named like an image")
    (mixed / "gone.jpg").symlink_to(w / "nothing-here.jpg")
    _renamed_onnx(w / "renamed.tflite")
    return w


def _renamed_onnx(path: Path) -> None:
    """A real (tiny) ONNX model saved under a .tflite name."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), str(path))


@pytest.fixture(scope="module")
def model(world, small_tflite) -> Path:
    """The small run's exported .tflite, with a copy whose weights have one flipped bit and a truncated copy."""
    from ai_edge_litert import schema_py_generated as schema

    raw = Path(small_tflite).read_bytes()
    m = schema.Model.GetRootAs(raw, 0)
    big = max(range(m.BuffersLength()), key=lambda i: m.Buffers(i).DataLength())
    payload = m.Buffers(big).DataAsNumpy().tobytes()
    at = raw.find(payload[:64]) + len(payload) // 2
    flipped = bytearray(raw)
    flipped[at] ^= 0x01
    (world / "flipped.tflite").write_bytes(bytes(flipped))
    (world / "truncated.tflite").write_bytes(raw[:-5000])
    return Path(small_tflite)


@pytest.fixture(scope="module")
def run(world, small_run, model) -> Path:
    """The small run, and a copy whose model.keras no longer matches the sha256 in its run.json."""
    _, path = small_run
    changed = world / "changed_run"
    shutil.copytree(path, changed, ignore=shutil.ignore_patterns("export"))
    with open(changed / "model.keras", "ab") as f:
        f.write(b"\0")
    return path


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry under root (hidden ones and dangling links included): size and modification time."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size if not p.is_dir() else 0, st.st_mtime_ns)
    return out


def _exe(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _env(world: Path) -> dict[str, str]:
    # a cache inside the world: anything a failing command wrote there would show in the snapshot
    return {**os.environ, "DERM_CACHE": str(world / "cache"), "COLUMNS": "200"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_named_and_changes_nothing(case, world, request):
    values = {"w": str(world)}
    if case.needs:
        values["model"] = str(request.getfixturevalue("model"))
    if case.needs == "run":
        values["run"] = str(request.getfixturevalue("run"))
    argv = [_exe(case.argv[0]), *(a.format(**values) for a in case.argv[1:])]
    before = _snapshot(world)
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=_env(world), cwd=world)
    output = res.stdout + res.stderr
    try:
        assert res.returncode == case.code, output
        assert "Traceback" not in output, output
        assert re.search(case.says, " ".join(output.split())), output
        after = _snapshot(world)
        new = sorted(set(after) - set(before))
        assert new == sorted([*case.writes, *{str(Path(p).parent) for p in case.writes}]), new
        assert {k: v for k, v in after.items() if k in before} == before, "a file that was there changed"
    finally:
        for p in case.writes:
            shutil.rmtree(world / Path(p).parent, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- signals


def _start(argv: list[str], world: Path) -> subprocess.Popen:
    """The command as started from a terminal: SIGINT not ignored, even where pytest runs as a script's background
    job (which starts with SIGINT ignored, and its children with it)."""
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(world),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for(proc: subprocess.Popen, ready, what: str, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    assert proc.poll() is None, f"the command ended before {what}: " + "".join(proc.communicate())


def _stopped(proc: subprocess.Popen, sig: signal.Signals) -> str:
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stdout + stderr
    assert "Interrupted" in stderr and "Traceback" not in stdout + stderr, stdout + stderr
    return stdout + stderr


def test_sigterm_during_export_leaves_no_file_behind(world, run, tmp_path):
    """derm-export stopped while its file is being written and checked: no output and no temporary file."""
    out = tmp_path / "m.tflite"
    proc = _start([_exe("derm-export"), str(run), "--quantize", "fp32", "--out", str(out)], world)
    _wait_for(proc, lambda: list(tmp_path.glob(".partial-*")), "its temporary file appeared")
    _stopped(proc, signal.SIGTERM)
    assert sorted(tmp_path.iterdir()) == []


def _rows_in(cache: Path) -> int:
    """Rows committed to a feature cache another process is writing (0 while it cannot be read yet)."""
    if not cache.is_file():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{cache}?mode=ro", uri=True, timeout=0.1)) as db:
            return int(db.execute("SELECT COUNT(*) FROM features").fetchone()[0])
    except sqlite3.Error:
        return 0


def test_sigint_during_training_keeps_the_finished_features_and_no_run(world, tmp_path):
    """derm-train stopped while it extracts features: no run directory (only its resumable OUT.partial), and the
    feature cache it was filling is a sound SQLite file holding the batches finished (every committed row can be
    reused). The signal lands while TensorFlow runs a batch: it waits for the batch's end (derm._signals' safe
    points), so TensorFlow never turns it into an error of its own (a SystemError and a traceback, as it once did)."""
    from tests.conftest import reference_weights

    cache, out = tmp_path / "features.sqlite", tmp_path / "run"
    argv = [_exe("derm-train"), "train", "--data", str(world / "data.csv"), "--out", str(out), "--within", "labels"]
    argv += ["--input-size", "96", "--weights", str(reference_weights()), "--views", "8", "--feature-cache", str(cache)]
    proc = _start(argv, world)
    _wait_for(proc, lambda: _rows_in(cache) > 0, "its first batch of features was stored")
    _stopped(proc, signal.SIGINT)
    assert not out.exists() and (tmp_path / "run.partial" / "config.json").is_file()
    with sqlite3.connect(cache) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT COUNT(*) FROM features").fetchone()[0] > 0
    left = {p.name for p in tmp_path.iterdir()} - {"features.sqlite", "run.partial"}
    assert left <= {"features.sqlite-journal", "features.sqlite-wal", "features.sqlite-shm"}, left


def test_sigint_during_triage_keeps_every_finished_result_and_resumes(world, model, tmp_path):
    """derm triage stopped part-way: the CSV holds each image finished so far, complete; the rerun does the rest."""
    folder = tmp_path / "in"
    folder.mkdir()
    images = sorted((world / "imgs").glob("*.jpg"))
    images = [p for p in images if p.name != "trunc.jpg"]
    for i in range(300):  # distinct paths, real images
        os.link(images[i % len(images)], folder / f"{i:03d}.jpg")
    out = tmp_path / "out"
    argv = [_exe("derm"), "triage", str(folder), "-m", str(model), "--out", str(out), "--threads", "1"]
    proc = _start(argv, world)
    _wait_for(proc, lambda: (out / "results.csv").is_file(), "it saved its first results")
    text = _stopped(proc, signal.SIGINT)
    done = read_rows(out / "results.csv")
    assert 0 < len(done) < 300 and all(r["status"] == "ok" for r in done), text
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=_env(world))
    assert res.returncode == 0 and f"{len(done)} from the previous run" in res.stdout + res.stderr
    assert len(read_rows(out / "results.csv")) == 300
