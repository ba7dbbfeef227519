import json
import time

import numpy as np
import pytest
from sklearn import metrics as sk

from derm import metrics as m


def _tied_data(seed: int, n: int = 400, decimals: int = 1, pos_rate: float = 0.4):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < pos_rate).astype(int)
    score = np.round(rng.normal(size=n) + 0.9 * y, decimals)  # rounding makes many ties
    return y, score


# ------------------------------------------------------------------------------------------------- vs sklearn


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("decimals", [0, 1, 3])
def test_roc_curve_matches_sklearn(seed, decimals):
    y, s = _tied_data(seed, decimals=decimals)
    fpr, tpr, thr = m.roc_curve(y, s)
    efpr, etpr, ethr = sk.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, efpr)
    np.testing.assert_allclose(tpr, etpr)
    np.testing.assert_array_equal(thr, ethr)
    assert thr[0] == np.inf and (np.diff(thr) < 0).all()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("decimals", [0, 1, 6])
def test_auc_matches_sklearn_and_trapezoid(seed, decimals):
    y, s = _tied_data(seed, decimals=decimals)
    a = m.auc(y, s)
    assert a == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, _ = m.roc_curve(y, s)
    assert a == pytest.approx(np.trapezoid(tpr, fpr), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_confusion_and_balanced_accuracy_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    k = 5
    y_true = rng.integers(-1, k, size=300)  # -1: excluded
    y_pred = rng.integers(0, k, size=300)
    keep = y_true >= 0
    cm = m.confusion_matrix(y_true, y_pred, k)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, sk.confusion_matrix(y_true[keep], y_pred[keep], labels=range(k)))
    mpca, recalls = m.mean_per_class_accuracy(y_true, y_pred, k)
    assert mpca == pytest.approx(sk.balanced_accuracy_score(y_true[keep], y_pred[keep]))
    np.testing.assert_allclose(recalls, sk.recall_score(y_true[keep], y_pred[keep], average=None, labels=range(k)))
    assert m.accuracy(y_true, y_pred) == pytest.approx(sk.accuracy_score(y_true[keep], y_pred[keep]))


def test_mean_per_class_accuracy_absent_class_is_nan_and_excluded():
    y_true = [0, 0, 1, 1, -1]
    y_pred = [0, 1, 1, 1, 2]
    mpca, recalls = m.mean_per_class_accuracy(y_true, y_pred, 3)
    assert mpca == pytest.approx((0.5 + 1.0) / 2)
    assert recalls[:2].tolist() == [0.5, 1.0] and np.isnan(recalls[2])
    assert np.isnan(m.mean_per_class_accuracy([-1, -1], [0, 1], 2)[0])
    assert np.isnan(m.accuracy([-1], [0]))


# --------------------------------------------------------------------------------------------- hand-computed


def test_small_hand_computed_roc_and_auc():
    y = [0, 0, 1, 1]
    s = [0.1, 0.4, 0.35, 0.8]
    fpr, tpr, thr = m.roc_curve(y, s)
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1]
    assert tpr.tolist() == [0, 0.5, 0.5, 1, 1]
    assert thr.tolist() == [np.inf, 0.8, 0.4, 0.35, 0.1]
    assert m.auc(y, s) == 0.75


def test_ties_count_half():
    assert m.auc([0, 1], [0.5, 0.5]) == 0.5
    assert m.auc([0, 0, 1, 1], [0.2, 0.5, 0.5, 0.9]) == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    fpr, tpr, thr = m.roc_curve([0, 1, 1, 0], [0.3, 0.3, 0.3, 0.3])
    assert fpr.tolist() == [0, 1] and tpr.tolist() == [0, 1] and thr.tolist() == [np.inf, 0.3]


def test_operating_points_hand_computed():
    # sorted by score: 0.9 P, 0.8 N, 0.7 P, 0.6 P, 0.5 N, 0.4 N, 0.3 P, 0.2 N
    y = [1, 0, 1, 1, 0, 0, 1, 0]
    s = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    assert m.sensitivity_at_specificity(y, s, 0.75) == (0.75, 0.6)
    assert m.sensitivity_at_specificity(y, s, 1.0) == (0.25, 0.9)
    assert m.sensitivity_at_specificity(y, s, 0.0) == (1.0, 0.3)  # highest threshold with sensitivity 1
    assert m.specificity_at_sensitivity(y, s, 0.5) == (0.75, 0.7)
    assert m.specificity_at_sensitivity(y, s, 0.8) == (0.25, 0.3)
    assert m.operating_point(y, s, 0.6) == {"threshold": 0.6, "sensitivity": 0.75, "specificity": 0.75}
    op = m.operating_point(y, s, 0.0)
    assert op["threshold"] == np.inf and op["sensitivity"] == 0.0 and op["specificity"] == 1.0
    # the rule: positive when score >= threshold
    pred = np.asarray(s) >= 0.6
    assert pred[np.asarray(y) == 1].mean() == 0.75


@pytest.mark.parametrize("seed", range(3))
def test_operating_point_rule_holds_on_random_data(seed):
    y, s = _tied_data(seed)
    for want in (0.5, 0.8, 0.9, 0.95, 1.0):
        op = m.operating_point(y, s, want)
        pred = s >= op["threshold"]
        assert pred[y == 1].mean() == pytest.approx(op["sensitivity"]) and op["sensitivity"] >= want
        assert (~pred[y == 0]).mean() == pytest.approx(op["specificity"])
        # no higher threshold reaches the wanted sensitivity
        higher = np.unique(s[s > op["threshold"]])
        assert all((s[y == 1] >= t).mean() < want for t in higher)
        spec, thr = m.specificity_at_sensitivity(y, s, want)
        assert (spec, thr) == (op["specificity"], op["threshold"])


@pytest.mark.parametrize("seed", range(3))
def test_sens_at_spec_is_best_on_curve(seed):
    y, s = _tied_data(seed)
    fpr, tpr, _ = sk.roc_curve(y, s, drop_intermediate=False)
    for spec in (0.5, 0.8, 0.9, 0.95):
        sens, thr = m.sensitivity_at_specificity(y, s, spec)
        assert sens == pytest.approx(tpr[1 - fpr >= spec - 1e-12].max())
        pred = s >= thr
        assert (~pred[y == 0]).mean() >= spec and pred[y == 1].mean() == pytest.approx(sens)


def test_calibration_hand_computed():
    y = [0, 1, 1, 1, 0]
    p = [0.05, 0.15, 0.95, 1.0, 0.9]
    cal = m.calibration(y, p, n_bins=10)
    assert len(cal["bins"]) == 10
    b0, b1, b9 = cal["bins"][0], cal["bins"][1], cal["bins"][9]
    assert (b0["count"], b0["mean_prob"], b0["frac_pos"]) == (1, 0.05, 0.0)
    assert (b1["count"], b1["frac_pos"]) == (1, 1.0)
    assert b9["count"] == 3 and b9["mean_prob"] == pytest.approx(2.85 / 3) and b9["frac_pos"] == pytest.approx(2 / 3)
    assert cal["bins"][5]["count"] == 0 and cal["bins"][5]["mean_prob"] is None
    expected = (0.05 + 0.85 + 3 * abs(2.85 / 3 - 2 / 3)) / 5
    assert cal["ece"] == pytest.approx(expected)
    assert m.calibration([0, 1], [0.0, 1.0])["ece"] == 0.0


# ------------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_contains_auc_narrows_and_is_deterministic():
    y_small, s_small = _tied_data(1, n=200, decimals=2)
    y_big, s_big = _tied_data(1, n=5000, decimals=2)
    a, lo, hi = m.bootstrap_auc(y_small, s_small, n_boot=500, seed=3)
    assert a == m.auc(y_small, s_small)
    assert lo < a < hi
    a2, lo2, hi2 = m.bootstrap_auc(y_big, s_big, n_boot=500, seed=3)
    assert lo2 < a2 < hi2
    assert hi2 - lo2 < 0.5 * (hi - lo)
    assert m.bootstrap_auc(y_small, s_small, n_boot=500, seed=3) == (a, lo, hi)
    assert m.bootstrap_auc(y_small, s_small, n_boot=500, seed=4) != (a, lo, hi)
    # a narrower interval at a larger alpha
    _, lo90, hi90 = m.bootstrap_auc(y_small, s_small, n_boot=500, seed=3, alpha=0.1)
    assert lo <= lo90 and hi90 <= hi


def test_bootstrap_resample_aucs_are_exact():
    # One resample at a time equals sklearn's AUC of the same stratified resample.
    y, s = _tied_data(2, n=60, decimals=1)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    rng = np.random.default_rng(11)
    ip, ineg = pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))]
    idx = np.r_[ip, ineg]
    expected = sk.roc_auc_score(y[idx], s[idx])
    # the same resample through bootstrap_auc with n_boot=1: percentiles of one value are that value
    _, lo, hi = m.bootstrap_auc(y, s, n_boot=1, seed=11)
    assert lo == hi == pytest.approx(expected, abs=1e-12)


def test_bootstrap_is_fast():
    y, s = _tied_data(0, n=2000, decimals=3)
    t0 = time.perf_counter()
    m.bootstrap_auc(y, s, n_boot=1000, seed=0)
    assert time.perf_counter() - t0 < 1.0


# ----------------------------------------------------------------------------------------------- aggregates


def test_binary_task_metrics_json_and_consistent():
    y, s = _tied_data(5, n=3000, decimals=4)
    prob = 1 / (1 + np.exp(-s))
    y = y.copy()
    y[:25] = -1  # not in this task
    res = m.binary_task_metrics(y, prob, n_boot=200, seed=1)
    json.loads(json.dumps(res, allow_nan=False))
    keep = y >= 0
    assert set(res) >= {
        "n",
        "n_positive",
        "n_negative",
        "auc",
        "auc_ci",
        "sens_at_spec",
        "spec_at_sens",
        "operating_points",
        "ece",
        "fpr",
        "tpr",
    }
    assert res["n"] == keep.sum() and res["n_excluded"] == 25
    assert res["n_positive"] == (y == 1).sum() and res["n_negative"] == (y == 0).sum()
    assert res["auc"] == pytest.approx(sk.roc_auc_score(y[keep], prob[keep]))
    lo, hi = res["auc_ci"]
    assert lo < res["auc"] < hi
    assert set(res["sens_at_spec"]) == {"0.8", "0.9", "0.95"}
    assert res["sens_at_spec"]["0.9"]["sensitivity"] == m.sensitivity_at_specificity(y[keep], prob[keep], 0.9)[0]
    assert res["operating_points"]["0.9"]["sensitivity"] >= 0.9
    assert res["ece"] == pytest.approx(m.calibration(y[keep], prob[keep])["ece"])
    assert 2 <= len(res["fpr"]) == len(res["tpr"]) <= 500
    assert res["fpr"][0] == res["tpr"][0] == 0 and res["fpr"][-1] == res["tpr"][-1] == 1
    # thinning keeps the area close
    assert np.trapezoid(res["tpr"], res["fpr"]) == pytest.approx(res["auc"], abs=2e-3)


def test_binary_task_metrics_scores_not_probabilities_and_infinite_thresholds():
    y = [0, 1, 0, 1]
    res = m.binary_task_metrics(y, [-2.0, 3.0, 1.0, 0.5], specificities=(1.0,), sensitivities=(0.0,), n_boot=0)
    json.loads(json.dumps(res, allow_nan=False))
    assert res["ece"] is None and res["auc_ci"] == [None, None]
    assert res["operating_points"]["0"]["threshold"] is None  # +inf
    assert res["sens_at_spec"]["1"] == {"sensitivity": 0.5, "threshold": 3.0}


def test_multiclass_metrics():
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    y = [0, 1, 1, -1, 0]
    res = m.multiclass_metrics(y, probs, ["a", "b", "c"])
    json.loads(json.dumps(res, allow_nan=False))
    assert res["n"] == 4 and res["n_excluded"] == 1
    assert res["accuracy"] == 0.5
    assert res["mean_per_class_accuracy"] == 0.5
    assert res["per_class"] == {
        "a": {"recall": 0.5, "support": 2},
        "b": {"recall": 0.5, "support": 2},
        "c": {"recall": None, "support": 0},
    }
    assert res["confusion"] == [[1, 0, 1], [0, 1, 1], [0, 0, 0]]
    assert res["labels"] == ["a", "b", "c"]


# ----------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("fn", [m.roc_curve, m.auc, m.bootstrap_auc])
def test_one_class_raises_with_counts(fn):
    with pytest.raises(ValueError, match="found 3 positive and 0 negative"):
        fn([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="found 0 positive and 2 negative"):
        fn([0, 0], [0.1, 0.2])


def test_binary_task_metrics_one_class_after_exclusion():
    with pytest.raises(ValueError, match="found 2 positive and 0 negative"):
        m.binary_task_metrics([1, 1, -1], [0.1, 0.2, 0.3])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: m.roc_curve([0, 1, 2], [0.1, 0.2, 0.3]), r"only 0 \(negative\) and 1 \(positive\), received \[2\]"),
        (lambda: m.auc([0, 1], [0.1, 0.2, 0.3]), "differ in length: 2 vs 3"),
        (lambda: m.auc([0, 1], [0.1, np.nan]), "non-finite"),
        (lambda: m.auc([[0, 1]], [[0.1, 0.2]]), r"shape \(1, 2\)"),
        (lambda: m.confusion_matrix([0, 1], [0, 3], 2), r"outside \[0, 2\): \[3\]"),
        (lambda: m.confusion_matrix([0, 5], [0, 1], 2), "y_true holds class indices >= n_classes=2"),
        (lambda: m.confusion_matrix([0, 1], [0], 2), "differ in length"),
        (lambda: m.confusion_matrix([0, 1], [0, 1], 0), "n_classes must be a positive integer, received 0"),
        (lambda: m.confusion_matrix([0.5, 1], [0, 1], 2), r"integer class indices, received \[0.5\]"),
        (lambda: m.sensitivity_at_specificity([0, 1], [0, 1], 1.5), "specificity must be in"),
        (lambda: m.operating_point([0, 1], [0, 1], -0.1), "sensitivity must be in"),
        (lambda: m.calibration([0, 1], [0.2, 1.3]), "prob must lie in"),
        (lambda: m.calibration([0, 1], [0.2, 0.3], n_bins=0), "n_bins must be a positive integer, received 0"),
        (lambda: m.bootstrap_auc([0, 1], [0, 1], n_boot=0), "n_boot must be a positive integer, received 0"),
        (lambda: m.bootstrap_auc([0, 1], [0, 1], alpha=1.0), "alpha must be strictly between"),
        (lambda: m.multiclass_metrics([0, 1], np.ones((2, 3)), ["a", "b"]), r"\(n, 2\) for 2 labels.*\(2, 3\)"),
        (lambda: m.multiclass_metrics([0, 1, 1], np.ones((2, 2)), ["a", "b"]), "differ in length: 3 vs 2"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_no_heavy_imports():
    import subprocess
    import sys

    code = "import sys, derm.metrics; sys.exit(any(k.split('.')[0] in ('sklearn', 'tensorflow') for k in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


@pytest.mark.parametrize(("k", "n"), [(490, 500), (1990, 2003), (0, 12), (12, 12), (1, 3)])
def test_proportion_interval_matches_scipys_wilson(k, n):
    from scipy.stats import binomtest

    want = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = m.proportion_interval(k, n)
    assert lo == pytest.approx(want.low, abs=1e-12) and hi == pytest.approx(want.high, abs=1e-12)
    assert lo <= k / n <= hi


def test_proportion_interval_narrows_with_more_images_and_rejects_bad_counts():
    lo500, hi500 = m.proportion_interval(490, 500)
    lo2000, hi2000 = m.proportion_interval(1960, 2000)
    assert hi2000 - lo2000 < 0.6 * (hi500 - lo500)
    assert m.proportion_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes=5, n=4"):
        m.proportion_interval(5, 4)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        m.proportion_interval(1, 4, confidence=1.0)


def test_log_loss_is_the_mean_negative_log_of_the_true_class():
    probs = np.array([[0.5, 0.5], [0.9, 0.1], [0.0, 1.0]])
    assert m.log_loss([0, 1, 0], probs) == pytest.approx(-(np.log(0.5) + np.log(0.1) + np.log(1e-12)) / 3)
    with pytest.raises(ValueError, match=r"probs must have shape \(2, classes\)"):
        m.log_loss([0, 1], probs)
