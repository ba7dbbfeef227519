"""derm.trainer.rundir, the one owner of run directories, on the session's real run (small_run): opening checks that
the run is finished and unchanged, and loads the Keras model only when asked."""

from __future__ import annotations

import json
import shutil

import pytest

from derm.trainer.rundir import RunError, load_partition, open_run


@pytest.mark.shared
def test_open_run_verifies_and_loads_the_model_lazily(small_run):
    _, path = small_run
    run = open_run(path)
    assert run.partition.labels == json.loads((path / "run.json").read_text())["classes"]
    assert "model" not in run.__dict__  # nothing loaded yet
    assert run.model.output_shape[-1] == len(run.partition.classes)
    assert run.model is run.model  # loaded once
    tax, part = load_partition(path)
    assert part.labels == run.partition.labels and tax.sha256 == run.taxonomy.sha256


@pytest.mark.shared
def test_a_changed_or_missing_file_is_named_and_the_run_refused(small_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(small_run[1], copy, ignore=shutil.ignore_patterns("export*", "eval*"))
    with open(copy / "partition.json", "a", encoding="utf-8") as f:
        f.write("\n")  # the same partition, another file: what run.json recorded is no longer there
    with pytest.raises(RunError, match=r"partition\.json' does not match the sha256 run\.json recorded"):
        open_run(copy)
    assert open_run(copy, verify=False).path == copy  # what a user asks for explicitly
    (copy / "model.keras").unlink()
    with pytest.raises(RunError, match=r"is not a finished derm-train run directory: missing \['model\.keras'\]"):
        open_run(copy)
