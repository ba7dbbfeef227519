"""GPTQ weight rounding (derm.exporter.rounding) on the small run's real model and images, and what the converted
int8 file keeps of it."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")


def _conv_input(model, index: int, images: np.ndarray):
    """The model's ``index``-th convolution in creation order (Keras numbers layer names per process, so names are
    not stable across test orders) and its input on ``images``."""
    import keras

    from derm.trainer.kgraph import creation_order

    convs = [n for n in creation_order(model) if isinstance(model.get_layer(n), keras.layers.Conv2D)]
    layer = model.get_layer(convs[index])
    return layer, keras.Model(model.input, layer.input)(images.astype(np.float32), training=False)


def test_gptq_keeps_a_real_layers_output_closer_than_nearest_rounding(small_export):
    from derm.exporter.rounding import QMAX, _hessian, gptq, grid, output_error

    layer, inputs = _conv_input(small_export["model"], 2, small_export["images"])  # stem 3x3, 32 -> 64
    h = _hessian(layer, inputs)
    kernel = layer.get_weights()[0]
    w = kernel.reshape(-1, kernel.shape[-1]).T
    q = gptq(w, h)
    scale, nearest = grid(kernel)
    assert q.shape == w.shape and np.array_equal(q, np.round(q)) and np.abs(q).max() <= QMAX
    # every channel keeps its largest weight at exactly 127 steps, so converters recompute this very scale
    assert (np.abs(q).max(1) == QMAX).all()
    np.testing.assert_allclose(np.abs(w).max(1) / QMAX, scale)
    err_gptq = output_error(w, q * scale[:, None], h)
    err_nearest = output_error(w, nearest.T * scale[:, None], h)
    assert err_gptq < 0.5 * err_nearest, (err_gptq, err_nearest)
    # and it is a different rounding, not the nearest one relabelled
    assert (q != nearest.T).mean() > 0.01


def test_round_weights_rejects_unknown_methods_and_empty_images(small_export):
    from derm.exporter.rounding import round_weights

    with pytest.raises(ValueError, match=r"'stochastic'.*gptq, nearest"):
        round_weights(small_export["model"], small_export["images"], "stochastic")
    with pytest.raises(ValueError, match="needs calibration images"):
        round_weights(small_export["model"], small_export["images"][:0])


def test_export_int8_keeps_the_gptq_weights_and_a_float_head(small_int8):
    """derm-export int8 (defaults: equalized, GPTQ, float head): every convolution of the file holds exactly the
    integers GPTQ chose (the converter's own rounding changes nothing), the head runs in float32, and the manifest
    says so."""
    from ai_edge_litert.interpreter import Interpreter

    from derm.exporter.rounding import grid

    result = small_int8["result"]
    info = result.manifest["export"]
    assert info["quantize"] == "int8" and info["float_head"] is True
    assert info["weight_rounding"]["method"] == "gptq" and info["weight_rounding"]["images"] == 12
    assert 0 < info["weight_rounding"]["error_ratio_median"] < 1
    assert info["equalization"]["tensors"] == 94 and info["equalization"]["images"] == 24  # all calibration images
    assert info["equalization"]["input_scaling_folded"] is True

    # the same equalization (all 24 images of the seeded calibration draw) and rounding (its first 12) again
    model = small_int8["prepared"]
    interp = Interpreter(model_path=result.path)
    interp.allocate_tensors()
    filters: dict[tuple[int, ...], list[np.ndarray]] = {}
    for t in interp.get_tensor_details():
        if t["dtype"] == np.int8 and len(t["shape"]) == 4 and t["shape"][0] > 1:
            filters.setdefault(tuple(t["shape"]), []).append(interp.get_tensor(t["index"]))
    convs = [layer for layer in model.layers if type(layer).__name__ == "Conv2D"]
    assert len(convs) == sum(len(v) for v in filters.values())
    for layer in convs:
        scale, q = grid(layer.get_weights()[0])
        np.testing.assert_allclose(q * scale, layer.get_weights()[0].reshape(q.shape), rtol=1e-5, atol=1e-7)
        want = q.T.reshape(-1, *layer.kernel_size, layer.get_weights()[0].shape[2]).astype(np.int8)
        same = [np.mean(f == want) for f in filters[want.shape]]
        assert max(same) > 0.999, (layer.name, max(same))  # float noise may move a rare tie

    # convolutions int8, head float32
    dtypes = {t["index"]: t["dtype"] for t in interp.get_tensor_details()}
    ops = interp._get_ops_details()
    assert all(dtypes[op["outputs"][0]] == np.int8 for op in ops if op["op_name"] == "CONV_2D")
    head = [op for op in ops if op["op_name"] in ("MEAN", "FULLY_CONNECTED", "SOFTMAX")]
    assert head and all(dtypes[op["outputs"][0]] == np.float32 for op in head)


def test_export_refuses_an_unknown_weight_rounding_before_any_work(small_run, tmp_path):
    from derm.exporter.export import ExportConfig, export
    from derm.exporter.graph import ExportError

    _, run = small_run
    out = tmp_path / "m.tflite"
    with pytest.raises(ExportError, match=r"'stochastic'.*gptq, nearest"):
        export(ExportConfig(run=str(run), out=str(out), weight_rounding="stochastic"))
    with pytest.raises(ExportError, match="rounding_images must be at least 1, received 0"):
        export(ExportConfig(run=str(run), out=str(out), rounding_images=0))
    assert not out.exists() and not list(tmp_path.iterdir())
