"""The export graph (aggregation baked in) and its TFLite conversions, run with ai-edge-litert on real images."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def exported(small_export):
    e = small_export
    return e["model"], e["part"], e["specs"], e["export"], e["images"]


def test_graph_outputs_are_the_aggregated_probabilities(exported):
    """uint8 in; training probabilities equal the Keras model's; each level is probs @ its 0/1 matrix; each task is
    the paper's conditional probability."""
    from derm.aggregation import conditional_probability

    model, _, specs, export, images = exported
    assert export.input.dtype == "uint8"
    out = export.predict(images, verbose=0)
    ref = model.predict(images.astype(np.float32), verbose=0)
    assert np.abs(out["training_probs"] - ref).max() < 1e-5
    names = {s.name for s in specs}
    assert {"training_probs", "probs_three", "probs_nine", "task_melanoma_vs_nevus"} <= names
    for s in specs:
        if s.kind == "level":
            np.testing.assert_allclose(out[s.name], ref @ s.matrix, atol=1e-5)
            np.testing.assert_allclose(out[s.name].sum(1), 1.0, atol=1e-5)
        elif s.kind == "task":
            # From probabilities the ratio is only defined where the task's classes hold some probability: when both
            # sides underflow float32 (an image far outside the task's condition, where the task does not apply),
            # only the file's softmax over the logits still answers.
            held = (ref @ s.matrix).sum(1) > 1e-6
            assert held.mean() >= 0.75, held
            got, want = out[s.name][held, 0], conditional_probability(ref, s.matrix)[held]
            np.testing.assert_allclose(got, want, atol=1e-5)
    # the aggregation layers are frozen
    frozen = [layer for layer in export.layers if layer.__class__.__name__ == "Dense"]
    assert len(frozen) == len(specs) - 1 + sum(s.kind == "task" for s in specs)
    assert all(not layer.trainable for layer in frozen)


# float files: max abs difference; quantized files: mean abs difference (a few images may move more) + top-1 agreement.
# These only check that each conversion works; the parity thresholds users rely on live in the exporter's validation.
# The fp16 and int8 files are the session's derm-export files (int8: equalized and GPTQ-rounded, as users get it),
# read back rather than converted a second time; fp32 and dynamic are converted here.
@pytest.mark.parametrize(("quantize", "tol"), [("fp32", 1e-4), ("fp16", 2e-2), ("dynamic", 0.05), ("int8", 0.08)])
def test_tflite_conversions_match_keras(exported, quantize, tol, request):
    from pathlib import Path

    from derm.exporter.tflite import convert
    from derm.runtimes import TFLiteRuntime

    _, _, specs, export, images = exported
    if quantize == "fp16":
        buf = Path(request.getfixturevalue("small_tflite")).read_bytes()
    elif quantize == "int8":
        buf = Path(request.getfixturevalue("small_int8")["result"].path).read_bytes()
    else:
        buf = convert(export, quantize, calibration=images[:16])
    runner = TFLiteRuntime(buf)
    assert set(runner.outputs) == {s.name for s in specs}
    got = runner(images)
    ref = export.predict(images, verbose=0)
    for name in runner.outputs:
        assert got[name].shape == ref[name].shape
        diff = np.abs(got[name] - ref[name])
        err = diff.max() if quantize in ("fp32", "fp16") else diff.mean()
        assert err < tol, (name, err)
    agree = (got["probs_three"].argmax(1) == ref["probs_three"].argmax(1)).mean()
    assert agree >= (1.0 if quantize in ("fp32", "fp16") else 0.8)
    if quantize == "int8":
        inp = runner.interpreter.get_input_details()[0]
        assert inp["dtype"] == np.uint8


def test_int8_without_calibration_is_refused(exported):
    from derm.exporter.graph import ExportError
    from derm.exporter.tflite import convert

    export = exported[3]
    with pytest.raises(ExportError, match="calibration"):
        convert(export, "int8")
    with pytest.raises(ExportError, match="'int4'"):
        convert(export, "int4")
