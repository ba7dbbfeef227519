import csv
import json
import re

import pytest
from typer.testing import CliRunner

from derm.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("derm ")


def test_taxonomy_show_with_counts(ham_csv):
    result = runner.invoke(app, ["taxonomy", "show", "--data", str(ham_csv), "--hide-empty"])
    assert result.exit_code == 0, result.output
    assert "10,015 images" in result.output
    assert "Benign [benign]  8,061" in result.output
    assert "Melanocytic nevus [melanocytic_nevus]  6,705" in result.output
    assert "Inflammatory" not in result.output


def test_taxonomy_show_depth():
    result = runner.invoke(app, ["taxonomy", "show", "--depth", "1"])
    assert result.exit_code == 0
    assert "Malignant melanoma [malignant_melanoma]" in result.output
    assert "Blue nevus" not in result.output


def test_taxonomy_partition(ham_csv, tmp_path):
    out = tmp_path / "p.json"
    result = runner.invoke(
        app,
        ["taxonomy", "partition", "--data", str(ham_csv), "--max-class-size", "1000", "--json", str(out), "--matrix"],
    )
    assert result.exit_code == 0, result.output
    assert "5 training classes from 10,015 images" in result.output
    assert "Aggregation to level 'three'" in result.output and "Aggregation to level 'nine'" in result.output
    assert "malignant_epidermal        841 images  <- classes [3]" in result.output
    payload = json.loads(out.read_text())
    assert [c["label"] for c in payload["partition"]["classes"]][:2] == ["benign_dermal", "benign_keratinocytic"]
    assert len(payload["aggregation"]["nine"]["matrix"]) == 5
    assert payload["dataset"]["images"] == 10015


def test_partition_rejects_bad_max_class_size(ham_csv):
    result = runner.invoke(
        app, ["taxonomy", "partition", "--data", str(ham_csv), "--max-class-size", "0"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 2
    assert "max_class_size must be a positive integer, received 0" in result.output


def test_validate(tmp_path):
    good = runner.invoke(app, ["taxonomy", "validate", "sdk/data/default_taxonomy.yaml"])
    assert good.exit_code == 0 and good.output.startswith("OK: esteva2017-dermatology")
    bad = tmp_path / "t.yaml"
    bad.write_text("nodes:\n  - {id: a, name: A, parent: ghost}\n")
    result = runner.invoke(app, ["taxonomy", "validate", str(bad)])
    assert result.exit_code == 2
    assert "node 'a': parent 'ghost' does not exist" in result.output


def test_data_check(ham_csv, tmp_path):
    ok = runner.invoke(app, ["data", "check", str(ham_csv)])
    assert ok.exit_code == 0, ok.output
    assert "OK: 10,015 images, 7470 groups" in ok.output
    assert "akiec" in ok.output and "-> malignant_epidermal" in ok.output
    bad = tmp_path / "bad.csv"
    bad.write_text("image,label\nmissing.jpg,wat\n")
    result = runner.invoke(app, ["data", "check", str(bad)])
    assert result.exit_code == 1
    assert "unknown label 'wat'" in result.output and "file not found" in result.output


def test_data_split(pad_csv, tmp_path):
    out = tmp_path / "folds.csv"
    result = runner.invoke(app, ["data", "split", str(pad_csv), "--out", str(out), "--folds", "3"])
    assert result.exit_code == 0, result.output
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 360
    folds_by_patient = {}
    for r in rows:
        folds_by_patient.setdefault(r["patient_id"], set()).add(r["fold"])
    assert all(len(f) == 1 for f in folds_by_patient.values())
    assert (tmp_path / rows[0]["image"]).is_file() or rows[0]["image"].startswith("/")
    again = runner.invoke(app, ["data", "split", str(pad_csv), "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_progress_off_a_terminal_is_logged_with_rate_and_time_left(caplog, monkeypatch):
    """Long work under nohup or CI still says how far it is (a log line per interval), unless DERM_PROGRESS=0."""
    import time

    from derm._progress import log_progress, track

    def slow(n):
        for i in range(n):
            time.sleep(0.02)
            yield i

    with caplog.at_level("INFO", logger="derm.progress"):
        assert list(log_progress(slow(10), "Features", total=10, every=0.05)) == list(range(10))
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all(re.fullmatch(r"Features: \d+/10 \(\d+\.\d\d/s, \d+m\d\ds left\)", m) for m in lines), lines
    caplog.clear()
    monkeypatch.setenv("DERM_PROGRESS", "0")
    with caplog.at_level("INFO", logger="derm.progress"):
        assert list(track(range(3), "x", total=3)) == [0, 1, 2]
    assert not caplog.records


@pytest.fixture
def sigint_default():
    """SIGINT as a process started from a terminal has it (a CI job's pytest may have started ignoring it)."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_signal_in_a_tracked_loop_is_raised_between_items_and_a_second_one_at_once(monkeypatch, sigint_default):
    """Ctrl-C during an item of long work lets the item finish (no signal inside a library's C code), then stops the
    loop; a second Ctrl-C while the first waits stops at once; outside a loop a signal stops at once."""
    import os
    import signal

    import pytest

    from derm import _signals
    from derm._progress import track

    monkeypatch.setattr(_signals, "received", [])
    done = []
    with _signals.handled(), pytest.raises(_signals.Interrupted, match="SIGINT"):
        for i in track(range(5), "items"):
            if i == 1:
                os.kill(os.getpid(), signal.SIGINT)  # the handler runs here and holds the signal
            done.append(i)
    assert done == [0, 1] and _signals.received == ["SIGINT"]
    done.clear()
    with _signals.handled(), pytest.raises(_signals.Interrupted, match="SIGTERM"):
        for i in track(range(5), "items"):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            done.append(i)
    assert done == []
    with _signals.handled(), pytest.raises(_signals.Interrupted, match="SIGINT"):
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back


def test_a_signal_a_finalizer_swallows_stops_the_command_at_the_next_safe_point(monkeypatch, sigint_default, capsys):
    """A signal outside a loop that lands in a finalizer (TensorFlow frees its functions there: "Exception ignored",
    and a training once ran to its end after Ctrl-C) is held, not dropped: the next tracked loop stops before its
    first item, and nothing is printed for the finalizer."""
    import gc
    import os
    import signal

    from derm import _signals
    from derm._progress import track

    class Freed:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # the handler raises here, inside the finalizer

    monkeypatch.setattr(_signals, "received", [])
    done = []
    with _signals.handled(), pytest.raises(_signals.Interrupted, match="SIGINT"):
        Freed()
        gc.collect()
        assert _signals.received == ["SIGINT"]  # the finalizer ran and the command goes on, to the next safe point
        for i in track(range(3), "items"):
            done.append(i)
    assert done == [] and "Exception ignored" not in capsys.readouterr().err
    assert _signals._held == []


def test_a_signal_the_process_was_started_ignoring_stays_ignored():
    """A background job of a script starts with SIGINT ignored (so that Ctrl-C in the terminal spares it): the
    command keeps it so, as Python itself does; SIGTERM still stops it."""
    import signal

    from derm import _signals

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _signals.handled():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is _signals.on_signal
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_train_help_shows_the_configs_defaults_and_choices():
    """Each option's help ends with TrainConfig's default, kept through the help renderer (which reads "[word]" as a
    style); the choices are Enums, listed by the renderer."""
    from derm.trainer.cli import app as train_app
    from derm.trainer.config import TrainConfig

    res = CliRunner().invoke(train_app, ["train", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.replace("│", " ").split())
    d = TrainConfig(data="", out="")
    for phrase in (
        "<bottleneck|finetune>",
        "<balanced|none>",
        "<auto|default|mirrored>",
        f"every layer [{d.mode}]",
        f"commas [{d.within}]",
        f"maxClassSize [{d.max_class_size}]",
        f"Fine-tuning learning rate [{d.lr}]",
        f"[{','.join(d.pool_layers)}]",
        "into the model [calibrate]",
    ):
        assert phrase in text, phrase


def test_one_derm_command_runs_every_tool_and_stays_light_until_asked():
    """`derm train | cv | weights | reference | eval | export | bench` are the derm-* tools (kept as aliases); `derm
    --help` lists them without importing TensorFlow, and each forwards its arguments to the tool's own parser."""
    import subprocess
    import sys

    probe = (
        "import sys; from typer.testing import CliRunner; from derm.cli import app; "
        "r = CliRunner().invoke(app, ['--help'], env={'COLUMNS': '200'}); "
        "print(r.output); print('TF', 'tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    for name in ("train", "cv", "weights", "reference", "eval", "export", "bench", "classify", "triage", "taxonomy"):
        assert re.search(rf"│ {name} ", out), name
    assert "The same as `derm-export`" in out
    assert out.rstrip().endswith("TF False False")

    own = CliRunner().invoke(__import__("derm.trainer.cli", fromlist=["app"]).app, ["cv", "--help"])
    via = runner.invoke(app, ["cv", "--help"])
    assert via.exit_code == 0 and own.exit_code == 0
    assert "Usage: derm cv [OPTIONS]" in via.output
    options = [set(re.findall(r"--[a-z][a-z-]+", r.output)) for r in (via, own)]
    assert options[0] == options[1] and {"--data", "--folds", "--out"} <= options[0]
    bad = runner.invoke(app, ["export", "--target", "nokia"])  # the tool's own parser answers, exit status 2
    said = " ".join(bad.output.replace("│", " ").split())
    assert bad.exit_code == 2 and "'nokia' is not one of 'tflite', 'onnx', 'coreml'" in said, bad.output


def test_derm_front_door_keeps_a_tools_progress_lines_unless_told_otherwise():
    """`derm train` logs as `derm-train train` does (the front door's level is a default the tool replaces), while
    `derm -v` / `-vv` is the user's choice and stays. A fresh interpreter: logging is set up once per process."""
    import subprocess
    import sys

    code = (
        "import logging; from derm._cli import setup_logging; "
        "setup_logging(verbose={v}); setup_logging(logging.{tool}); print(logging.getLogger().level)"
    )
    for v, tool, want in [(0, "INFO", 20), (0, "WARNING", 30), (1, "WARNING", 20), (2, "INFO", 10)]:
        out = subprocess.run([sys.executable, "-c", code.format(v=v, tool=tool)], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip() == str(want), (v, tool, out.stdout, out.stderr)
