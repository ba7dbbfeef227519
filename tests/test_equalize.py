"""Activation equalization (derm.exporter.equalize) on the small run's real Inception-v3 and real images: the model
computes the same function, small channels grow by the documented gain, and only channel-wise paths are touched."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")


def _fresh_model(small_export):
    from derm.trainer.rundir import load_run

    model, *_ = load_run(small_export["run"])
    return model


def test_equalize_keeps_the_outputs_and_lifts_small_channels(small_export):
    import keras

    from derm.exporter.equalize import ReluGraph, _channel_peaks, equalize
    from derm.trainer.kgraph import parent_layers

    model = _fresh_model(small_export)
    images = small_export["images"].astype(np.float32)
    before = model.predict(images, verbose=0)
    # a concatenation (one int8 scale for all its inputs) and the first branch output feeding it
    layers = [model.get_layer("mixed7"), parent_layers(model.get_layer("mixed7"))[0]]
    branch = layers[1].name
    assert ReluGraph(model).quantization_group(layers[1]).name == "mixed7"
    peaks_before = _channel_peaks(model, layers, images[:12], 4)

    info = equalize(model, images[:12], alpha=0.5, max_gain=16.0)
    relus = [x for x in model.layers if isinstance(x, keras.layers.Activation) and x.name.startswith("activation")]
    assert info.tensors == len(relus) == 94 and info.images == 12 and info.channels > 10_000
    assert 1.0 < info.gain_median < info.gain_max <= 16.0

    after = model.predict(images, verbose=0)
    np.testing.assert_allclose(after, before, atol=2e-5)  # the same function, to float rounding
    assert not np.array_equal(after, before)  # and the weights did change

    peaks_after = _channel_peaks(model, layers, images[:12], 4)
    top = peaks_before["mixed7"].max()
    np.testing.assert_allclose(peaks_after["mixed7"].max(), top, rtol=1e-4)  # the tensor's range is kept
    m = peaks_before[branch]
    want = m * np.minimum(np.where(m > 0, (top / np.maximum(m, 1e-12)) ** 0.5, 1.0), 16.0)
    np.testing.assert_allclose(peaks_after[branch], want, rtol=1e-3, atol=1e-5)
    ratio = lambda p: np.median(p["mixed7"] / p["mixed7"].max())  # noqa: E731
    assert ratio(peaks_after) > 1.3 * ratio(peaks_before)


def test_equalize_leaves_relus_with_a_non_channel_wise_use_alone(small_export):
    """A ReLU that also feeds an Add (or is a model output) cannot move a per-channel gain through: it keeps gain 1
    and the model stays exact."""
    import keras

    from derm.exporter.equalize import equalize

    x = keras.Input((96, 96, 3))
    a = keras.layers.Conv2D(8, 3, use_bias=False, name="c1")(keras.layers.Rescaling(1 / 127.5, -1)(x))
    a = keras.layers.Activation("relu", name="r1")(keras.layers.BatchNormalization(scale=False, name="b1")(a))
    b = keras.layers.Activation("relu", name="r2")(keras.layers.Conv2D(8, 3, padding="same", name="c2")(a))
    c = keras.layers.Conv2D(8, 1, name="c3")(b)
    out = keras.layers.GlobalAveragePooling2D()(keras.layers.Add(name="add")([a, c]))
    model = keras.Model(x, keras.layers.Dense(3, name="d")(out))
    for v in model.get_layer("b1").non_trainable_weights:  # batch statistics of a real feature map, not 0 / 1
        v.assign(np.linspace(0.5, 2.0, 8).astype(np.float32))
    images = small_export["images"][:8].astype(np.float32)
    before = model.predict(images, verbose=0)
    kernels = {n: model.get_layer(n).get_weights()[0].copy() for n in ("c1", "c2", "c3")}

    info = equalize(model, images)
    assert info.tensors == 1  # r2 (used by c3 only); r1 also feeds the Add
    np.testing.assert_array_equal(model.get_layer("c1").get_weights()[0], kernels["c1"])
    assert not np.array_equal(model.get_layer("c2").get_weights()[0], kernels["c2"])
    np.testing.assert_allclose(model.predict(images, verbose=0), before, rtol=1e-4, atol=1e-5)


def test_fold_input_scaling_makes_the_pixels_the_first_convolutions_input(small_export):
    import keras

    from derm.exporter.equalize import fold_input_scaling

    model = _fresh_model(small_export)
    images = small_export["images"].astype(np.float32)
    before = model.predict(images, verbose=0)
    assert fold_input_scaling(model)
    scale = model.get_layer("scale")
    assert (scale.scale, scale.offset) == (1.0, 0.0)
    np.testing.assert_allclose(model.predict(images, verbose=0), before, atol=2e-5)
    conv = next(x for x in model.layers if isinstance(x, keras.layers.Conv2D))
    first = keras.Model(model.input, conv.input)(images[:2])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(first), images[:2])  # raw integer pixels

    # a same-padded first convolution would see the shifted input's zero padding: not a constant, so not folded
    x = keras.Input((96, 96, 3))
    y = keras.layers.Conv2D(4, 3, padding="same")(keras.layers.Rescaling(1 / 127.5, -1, name="scale")(x))
    same = keras.Model(x, keras.layers.GlobalAveragePooling2D()(y))
    assert not fold_input_scaling(same)
    assert same.get_layer("scale").offset == -1


def test_equalize_rejects_bad_settings(small_export):
    from derm.exporter.equalize import equalize

    model, images = small_export["model"], small_export["images"]
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], received 1.5"):
        equalize(model, images, alpha=1.5)
    with pytest.raises(ValueError, match=r"max_gain must be at least 1, received 0\.5"):
        equalize(model, images, max_gain=0.5)
    with pytest.raises(ValueError, match="needs calibration images"):
        equalize(model, images[:0])


def test_export_refuses_a_bad_equalize_alpha_before_any_work(small_run, tmp_path):
    from typer.testing import CliRunner

    from derm.exporter.cli import app

    _, run = small_run
    out = tmp_path / "m.tflite"
    res = CliRunner().invoke(app, [str(run), "--out", str(out), "--equalize-alpha", "0"])
    assert res.exit_code == 2 and "equalize_alpha must be in (0, 1], received 0.0" in res.output
    assert not out.exists() and not list(tmp_path.iterdir())
