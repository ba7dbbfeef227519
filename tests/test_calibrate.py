"""Temperature scaling (derm.trainer.calibrate): it recovers a known over-confidence, changes no ranking, lowers the
calibration error, and folded into a real Keras logits layer gives what it computes from probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from derm.trainer.calibrate import apply_temperature, calibrate, fit_temperature, nll, top_label_ece


def _overconfident(t_true: float, n: int = 20000, k: int = 5, seed: int = 0):
    """Logits z whose labels are drawn from softmax(z / t_true): a model reporting softmax(z) is too sure by t_true."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, size=(n, k))
    p_true = np.exp(z / t_true) / np.exp(z / t_true).sum(1, keepdims=True)
    y = (rng.random((n, 1)) > p_true.cumsum(1)).sum(1)
    reported = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return z, reported.astype(np.float32), y


@pytest.mark.parametrize("t_true", [0.7, 2.5])
def test_the_fitted_temperature_is_the_true_one_and_calibrates(t_true):
    _, p, y = _overconfident(t_true)
    t = fit_temperature(p, y)
    assert t == pytest.approx(t_true, rel=0.06)
    after = apply_temperature(p, t)
    assert nll(after, y) < nll(p, y)
    assert top_label_ece(after, y) < top_label_ece(p, y) and top_label_ece(after, y) < 0.02
    assert np.array_equal(after.argmax(1), p.argmax(1))  # the calls do not change, only the confidence


def test_applying_a_temperature_to_probabilities_is_dividing_the_logits():
    z, p, _ = _overconfident(2.0, n=50)
    want = np.exp(z / 3.0) / np.exp(z / 3.0).sum(1, keepdims=True)
    np.testing.assert_allclose(apply_temperature(p, 3.0), want, rtol=0, atol=1e-6)


def test_calibrate_reports_every_role_and_refuses_nothing_silently():
    _, p, y = _overconfident(2.0, n=4000)
    t, report = calibrate({"val": p[:2000], "test": p[2000:]}, {"val": y[:2000], "test": y[2000:]})
    assert report["temperature"] == pytest.approx(t, abs=1e-4) and not report["at_bound"]
    for role in ("val", "test"):
        r = report[role]
        assert r["n"] == 2000 and r["ece_after"] < r["ece_before"] and r["nll_after"] < r["nll_before"]


def test_too_few_validation_images_are_not_fitted():
    _, p, y = _overconfident(2.0, n=40)
    t, report = calibrate({"val": p}, {"val": y})
    assert t is None and "only 40 validation images" in report["skipped"]


def test_folding_into_a_keras_logits_layer_gives_the_same_probabilities():
    keras = pytest.importorskip("keras")
    from derm.trainer.calibrate import fold_temperature

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    logits = keras.layers.Dense(4, name="logits")(inputs)
    model = keras.Model(inputs, keras.layers.Softmax(name="probs")(logits))
    x = np.random.default_rng(1).normal(size=(16, 8)).astype(np.float32) * 5
    before = model.predict(x, verbose=0)
    fold_temperature(model, 1.7)
    np.testing.assert_allclose(model.predict(x, verbose=0), apply_temperature(before, 1.7), rtol=0, atol=1e-5)
