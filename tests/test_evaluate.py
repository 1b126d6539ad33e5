"""Metrics and the operating threshold (training/evaluate/metrics.py) on hand-computed toy cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as sk_metrics
from sklearn.calibration import calibration_curve

from training.evaluate.metrics import (
    average_precision,
    binary_metrics,
    bootstrap_auc_ci,
    choose_threshold,
    confusion,
    confusion_matrix,
    expected_calibration_error,
    precision_recall_curve,
    predictive_values,
    reliability_bins,
    roc_auc,
    roc_curve,
    subgroup_metrics,
    wilson_interval,
)

# Four positives (0.9, 0.8, 0.7, 0.3) and four negatives (0.1, 0.35, 0.4, 0.6).
Y = np.array([0, 0, 0, 1, 1, 1, 0, 1])
P = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.3, 0.6, 0.9])


def test_auc_by_hand() -> None:
    # Pairs won by each positive: 0.9 -> 4, 0.8 -> 4, 0.7 -> 4, 0.3 -> 1 (only 0.1); 13 of 16.
    assert roc_auc(Y, P) == pytest.approx(13 / 16)


def test_auc_counts_ties_as_half() -> None:
    assert roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert roc_auc([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1]) == pytest.approx((2 + 1 + 0.5) / 4)


def test_auc_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 1], [0.2, 0.3])


def test_metrics_at_threshold_by_hand() -> None:
    # p >= 0.5 calls 0.9, 0.8, 0.7 (positives) and 0.6 (a negative) positive.
    m = binary_metrics(Y, P, 0.5)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 1, 3, 1)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["auc"] == pytest.approx(13 / 16)
    assert (m["n"], m["n_positive"], m["n_negative"]) == (8, 4, 4)


def test_threshold_is_inclusive() -> None:
    assert confusion([1, 0], [0.7, 0.7], 0.7) == {"tp": 1, "fp": 1, "tn": 0, "fn": 0}


def test_undefined_rates_are_nan() -> None:
    m = binary_metrics([1, 1], [0.9, 0.2], 0.5)
    assert math.isnan(m["specificity"]) and math.isnan(m["auc"])
    assert m["sensitivity"] == pytest.approx(0.5)


def test_choose_threshold_is_the_highest_meeting_the_sensitivity() -> None:
    # Positives sorted: 0.9, 0.8, 0.7, 0.3. Sensitivity >= 0.95 needs all four -> 0.3.
    assert choose_threshold(Y, P, 0.95) == pytest.approx(0.3)
    assert choose_threshold(Y, P, 0.75) == pytest.approx(0.7)  # three of four
    assert choose_threshold(Y, P, 0.5) == pytest.approx(0.8)
    t = choose_threshold(Y, P, 0.75)
    assert binary_metrics(Y, P, t)["sensitivity"] >= 0.75
    assert binary_metrics(Y, P, np.nextafter(t, 1.0))["sensitivity"] < 0.75


def test_choose_threshold_exact_fraction_is_not_lost_to_rounding() -> None:
    # 0.95 * 20 is 19.000000000000004 in floating point; 19 of 20 must suffice.
    y = np.ones(20, dtype=int)
    p = np.linspace(1.0, 0.05, 20)
    t = choose_threshold(y, p, 0.95)
    assert t == pytest.approx(p[18])
    assert binary_metrics(y, p, t)["sensitivity"] == pytest.approx(0.95)


def test_choose_threshold_needs_positives() -> None:
    with pytest.raises(ValueError, match="positive"):
        choose_threshold([0, 0], [0.1, 0.2])


def test_bootstrap_ci_brackets_the_estimate_and_is_reproducible() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.3 + rng.normal(0.35, 0.2, 300), 0, 1)
    lo, hi = bootstrap_auc_ci(y, p, n_boot=300, seed=1)
    assert lo < roc_auc(y, p) < hi
    assert (lo, hi) == bootstrap_auc_ci(y, p, n_boot=300, seed=1)


def test_auc_matches_scikit_learn_with_ties() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        y = np.r_[0, 1, rng.integers(0, 2, 50)]
        p = rng.integers(0, 6, y.size) / 5  # many ties
        assert roc_auc(y, p) == pytest.approx(sk_metrics.roc_auc_score(y, p))


# --- Curves, predictive values, calibration, subgroups (used by training/evaluate/evaluation_report/) ---
#
# Y/P above, sorted by descending score:  0.9(1) 0.8(1) 0.7(1) 0.6(0) 0.4(0) 0.35(0) 0.3(1) 0.1(0)
# cumulative TP after each score:          1      2      3      3      3      3       4      4
# cumulative FP after each score:          0      0      0      1      2      3       3      4


def test_confusion_matrix_layout_by_hand() -> None:
    # Rows = truth (NORMAL, PNEUMONIA), columns = call. At 0.5: TN 3, FP 1 (0.6), FN 1 (0.3), TP 3.
    assert confusion_matrix(Y, P, 0.5).tolist() == [[3, 1], [1, 3]]
    # At 0.65 the 0.6 negative is no longer called: TN 4, FP 0.
    assert confusion_matrix(Y, P, 0.65).tolist() == [[4, 0], [1, 3]]
    assert confusion_matrix(Y, P, 0.5).sum() == len(Y)


def test_predictive_values_by_hand() -> None:
    # 0.5: called positive 0.9 0.8 0.7 0.6 -> PPV 3/4; called negative 0.4 0.35 0.3 0.1 -> NPV 3/4.
    assert predictive_values(Y, P, 0.5) == pytest.approx({"ppv": 3 / 4, "npv": 3 / 4})
    # 0.65: called positive 0.9 0.8 0.7 -> PPV 3/3; negative: 4 true negatives + the 0.3 positive -> 4/5.
    assert predictive_values(Y, P, 0.65) == pytest.approx({"ppv": 1.0, "npv": 4 / 5})
    # Nothing called positive: PPV undefined, NPV = negatives / all = 4/8.
    pv = predictive_values(Y, P, 0.95)
    assert math.isnan(pv["ppv"]) and pv["npv"] == pytest.approx(0.5)


def test_roc_curve_by_hand_and_area_equals_auc() -> None:
    fpr, tpr, thr = roc_curve(Y, P)
    # FP/4 and TP/4 from the table above, after the (0, 0) start at threshold +inf.
    assert fpr.tolist() == pytest.approx([0, 0, 0, 0, 0.25, 0.5, 0.75, 0.75, 1])
    assert tpr.tolist() == pytest.approx([0, 0.25, 0.5, 0.75, 0.75, 0.75, 0.75, 1, 1])
    assert thr[0] == np.inf and thr[1:].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.4, 0.35, 0.3, 0.1])
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(roc_auc(Y, P)) == pytest.approx(13 / 16)
    # Every point is what confusion() gives at that threshold (so the drawn operating point is on it).
    for f, t, th in zip(fpr[1:], tpr[1:], thr[1:], strict=True):
        m = binary_metrics(Y, P, th)
        assert (1 - m["specificity"], m["sensitivity"]) == pytest.approx((f, t))


def test_roc_curve_ties_are_one_step() -> None:
    # Scores 0.9 (pos), 0.5 (pos and neg tied), 0.1 (neg): the tie moves TPR and FPR together.
    fpr, tpr, _ = roc_curve([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1])
    assert fpr.tolist() == pytest.approx([0, 0, 0.5, 1])
    assert tpr.tolist() == pytest.approx([0, 0.5, 1, 1])
    with pytest.raises(ValueError, match="both classes"):
        roc_curve([1, 1], [0.2, 0.3])


def test_precision_recall_curve_and_average_precision_by_hand() -> None:
    precision, recall, thr = precision_recall_curve(Y, P)
    # precision = TP / (TP + FP), recall = TP / 4, from the table above.
    assert precision.tolist() == pytest.approx([1, 1, 1, 3 / 4, 3 / 5, 3 / 6, 4 / 7, 4 / 8])
    assert recall.tolist() == pytest.approx([0.25, 0.5, 0.75, 0.75, 0.75, 0.75, 1, 1])
    assert thr.tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.4, 0.35, 0.3, 0.1])
    # AP = sum of recall steps x precision: 0.25*1 + 0.25*1 + 0.25*1 + 0.25*(4/7) = 3/4 + 1/7.
    assert average_precision(Y, P) == pytest.approx(3 / 4 + 1 / 7)
    with pytest.raises(ValueError, match="positive"):
        precision_recall_curve([0, 0], [0.1, 0.2])


def test_average_precision_matches_scikit_learn_with_ties() -> None:
    rng = np.random.default_rng(5)
    for _ in range(20):
        y = np.r_[0, 1, rng.integers(0, 2, 40)]
        p = rng.integers(0, 6, y.size) / 5
        assert average_precision(y, p) == pytest.approx(sk_metrics.average_precision_score(y, p))


# Six cases in three of the 15 bins (bin k = [k/15, (k+1)/15), the last one closed):
#   bin 0  [0, 0.0667):     p 0.02, 0.04   y 0, 0   mean p 0.03   observed 0/2 = 0.0  gap 0.03
#   bin 10 [0.6667, 0.7333): p 0.68, 0.72  y 1, 0   mean p 0.70   observed 1/2 = 0.5  gap 0.20
#   bin 14 [0.9333, 1]:     p 0.95, 1.00   y 1, 1   mean p 0.975  observed 2/2 = 1.0  gap 0.025
# ECE = (2*0.03 + 2*0.20 + 2*0.025) / 6 = 0.255 / 3 = 0.085.
Y6 = np.array([0, 0, 1, 0, 1, 1])
P6 = np.array([0.02, 0.04, 0.68, 0.72, 0.95, 1.0])


def test_reliability_bins_by_hand() -> None:
    bins = reliability_bins(Y6, P6, n_bins=15)
    assert bins["edges"].tolist() == pytest.approx(np.linspace(0, 1, 16).tolist())
    expected_count = [0] * 15
    expected_count[0] = expected_count[10] = expected_count[14] = 2
    assert bins["count"].tolist() == expected_count
    filled = [0, 10, 14]
    assert bins["mean_predicted"][filled].tolist() == pytest.approx([0.03, 0.70, 0.975])
    assert bins["observed_rate"][filled].tolist() == pytest.approx([0.0, 0.5, 1.0])
    empty = [k for k in range(15) if k not in filled]
    assert np.isnan(bins["mean_predicted"][empty]).all() and np.isnan(bins["observed_rate"][empty]).all()


def test_reliability_bin_edges_are_left_closed() -> None:
    # Four bins [0, .25) [.25, .5) [.5, .75) [.75, 1]: 0.25 opens bin 1, 0.0 is in bin 0, 1.0 in bin 3.
    bins = reliability_bins([0, 1, 0, 1], [0.0, 0.25, 0.5, 1.0], n_bins=4)
    assert bins["count"].tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reliability_bins([1], [1.5])


def test_ece_by_hand() -> None:
    assert expected_calibration_error(Y6, P6, n_bins=15) == pytest.approx(0.085)
    # One bin: |mean p - observed| over everything; sum p = 3.41, 3 positives -> |3.41 - 3| / 6.
    assert expected_calibration_error(Y6, P6, n_bins=1) == pytest.approx(0.41 / 6)
    # Perfectly calibrated within each bin -> 0.
    assert expected_calibration_error([0, 1, 1, 1], [0.5, 0.5, 1.0, 1.0], n_bins=2) == pytest.approx(0.0)


def test_wilson_interval_by_hand() -> None:
    # 8 of 10, z = 1.96: centre (0.8 + 1.9208/10) / 1.38416 = 0.71674,
    # half-width 1.96 * sqrt(0.016 + 0.009604) / 1.38416 = 0.22658 -> (0.4902, 0.9433).
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(10 / (10 + 1.959963984540054**2))
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_subgroup_metrics_by_hand() -> None:
    y = [1, 1, 1, 0, 0]
    p = [0.9, 0.2, 0.8, 0.1, 0.7]
    groups = ["bacteria", "virus", "bacteria", "normal", "normal"]
    out = subgroup_metrics(y, p, groups, 0.5)
    assert list(out) == ["bacteria", "normal", "virus"]
    assert (out["bacteria"]["n"], out["bacteria"]["tp"], out["bacteria"]["sensitivity"]) == (2, 2, 1.0)
    assert (out["virus"]["n"], out["virus"]["fn"], out["virus"]["sensitivity"]) == (1, 1, 0.0)
    assert (out["normal"]["tn"], out["normal"]["fp"], out["normal"]["specificity"]) == (1, 1, 0.5)
    assert math.isnan(out["normal"]["sensitivity"]) and math.isnan(out["virus"]["specificity"])


def test_sensitivity_at_specificity_reads_the_roc_curve() -> None:
    from training.evaluate.metrics import sensitivity_at_specificity

    # Negatives score .1 .2 .3 .6, positives .4 .7 .8 .9 (worked by hand):
    # threshold .4 -> TP 4, FP 1 (the .6): sensitivity 1, specificity .75;
    # threshold .7 -> TP 3, FP 0: sensitivity .75, specificity 1.
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    p = [0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9]
    assert sensitivity_at_specificity(y, p, 0.75) == (1.0, 0.75)
    assert sensitivity_at_specificity(y, p, 0.9) == (0.75, 1.0)
    assert sensitivity_at_specificity(y, p, 1.0) == (0.75, 1.0)


def test_reliability_bins_agree_with_scikit_learn_off_the_edges() -> None:
    # scikit-learn closes its bins on the right and drops empty ones; away from the edges the
    # filled bins must hold the same mean prediction and observed rate as ours.
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 300)
    p = rng.uniform(0.001, 0.999, 300)
    bins = reliability_bins(y, p, n_bins=10)
    filled = bins["count"] > 0
    observed, predicted = calibration_curve(y, p, n_bins=10, strategy="uniform")
    assert bins["observed_rate"][filled].tolist() == pytest.approx(observed.tolist())
    assert bins["mean_predicted"][filled].tolist() == pytest.approx(predicted.tolist())
