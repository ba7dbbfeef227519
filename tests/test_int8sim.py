"""The int8 simulation (research.int8sim) against the real int8 file derm-export writes for the small run."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")


def _file(small_int8):
    import warnings

    from ai_edge_litert.interpreter import Interpreter

    with warnings.catch_warnings():  # keeping every tensor is a debugging option: here it is what is wanted
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
        interp = Interpreter(model_path=small_int8["result"].path, experimental_preserve_all_tensors=True)
    interp.allocate_tensors()
    return interp


def test_ranges_are_the_grids_the_converter_chose(small_int8):
    """Every int8 activation of the file (conv, pooling and concatenation outputs) lies on a grid whose step is one
    of the simulated ranges / 255: the converter calibrates min/max per tensor and gives a concatenation's inputs the
    outermost concatenation's range, as the simulation assumes."""
    from research import int8sim

    model, images = small_int8["prepared"], small_int8["images"].astype(np.float32)
    ranges = int8sim.activation_ranges(model, images)
    assert len(ranges) == 94  # one per ReLU of Inception-v3
    steps = np.array(sorted({(hi - lo) / int8sim.LEVELS for lo, hi in ranges.values()}))
    interp = _file(small_int8)
    details = {t["index"]: t for t in interp.get_tensor_details()}
    checked = 0
    for op in interp._get_ops_details():
        if op["op_name"] not in ("CONV_2D", "AVERAGE_POOL_2D", "MAX_POOL_2D", "CONCATENATION"):
            continue
        out = details[op["outputs"][0]]
        if out["dtype"] != np.int8:
            continue
        scale, zero = out["quantization"]
        assert zero == -128, (out["name"], zero)  # ReLU outputs: the range starts at 0
        nearest = steps[np.abs(steps - scale).argmin()]
        assert nearest == pytest.approx(scale, rel=1e-4), (out["name"], scale, nearest)
        checked += 1
    assert checked == 94 + 8 + 5 + 15  # convolutions, average and max pools, int8 concatenations


def test_simulation_reproduces_the_files_first_convolution_and_its_error_size(small_int8):
    from derm.runtimes import TFLiteRuntime
    from research import int8sim

    model, images = small_int8["prepared"], small_int8["images"]
    ranges = int8sim.activation_ranges(model, images.astype(np.float32))
    # float path: the node-by-node run is the Keras model
    (plain,) = int8sim.simulate(model, images, None)
    np.testing.assert_allclose(plain, model.predict(images.astype(np.float32), verbose=0), atol=2e-5)

    # the first convolution sees exact pixels in both: the simulated ReLU output is the file's, level for level
    import keras

    first = next(layer for layer in model.layers if layer.name in ranges)
    interp = _file(small_int8)
    interp.set_tensor(interp.get_input_details()[0]["index"], images[:1])
    interp.invoke()
    details = {t["index"]: t for t in interp.get_tensor_details()}
    conv = next(op for op in interp._get_ops_details() if op["op_name"] == "CONV_2D")
    out = details[conv["outputs"][0]]
    scale, zero = out["quantization"]
    file_levels = interp.get_tensor(out["index"]).astype(np.int32) - zero
    probe = keras.Model(model.input, first.output)
    sim = int8sim.fake_quant(probe(images[:1].astype(np.float32)), *ranges[first.name])
    sim_levels = np.round(keras.ops.convert_to_numpy(sim) / scale).astype(np.int32)
    assert sim_levels.shape == file_levels.shape
    assert np.mean(sim_levels == file_levels) > 0.999 and np.abs(sim_levels - file_levels).max() <= 1

    # over the whole network the roundings diverge (a flip at a boundary spreads) but the error has the file's size
    (simulated,) = int8sim.simulate(model, images, ranges)
    reference = small_int8_reference(small_int8)
    file_probs = TFLiteRuntime(small_int8["result"].path)(images)["training_probs"]
    sim_err, file_err = np.abs(simulated - reference).mean(), np.abs(file_probs - reference).mean()
    assert 0.5 < sim_err / file_err < 2.0, (sim_err, file_err)
    # and the activations' rounding is a real part of it (``plain`` has the GPTQ weights, float activations)
    assert np.abs(simulated - plain).mean() > 0.1 * sim_err


def small_int8_reference(small_int8):
    from derm.trainer.rundir import load_run

    model, *_ = load_run(small_int8["config"].run)
    return model.predict(small_int8["images"].astype(np.float32), verbose=0)


def test_blocks_and_partial_rounding(small_int8):
    from research import int8sim

    model, images = small_int8["prepared"], small_int8["images"][:8]
    block_of = int8sim.blocks(model)
    counts = {b: sum(v == b for v in block_of.values()) for b in set(block_of.values())}
    assert counts["stem"] == 5 and set(counts) == {"stem", *(f"mixed{i}" for i in range(11))}
    assert sum(counts.values()) == 94
    ranges = int8sim.activation_ranges(model, small_int8["images"].astype(np.float32))
    (plain,) = int8sim.simulate(model, images, None)
    (stem,) = int8sim.simulate(model, images, ranges, only=[n for n, b in block_of.items() if b == "stem"])
    (none,) = int8sim.simulate(model, images, ranges, only=[])
    np.testing.assert_allclose(none, plain, atol=1e-6)  # nothing selected: nothing rounded
    assert np.abs(stem - plain).mean() > 1e-5
    with pytest.raises(ValueError, match=r"No activation range for \['logits'\]"):
        int8sim.simulate(model, images, ranges, only=["logits"])
