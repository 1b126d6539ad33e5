"""Metrics and the operating threshold (training/evaluate.py) on hand-computed toy cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.evaluate import binary_metrics, bootstrap_auc_ci, choose_threshold, confusion, roc_auc

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
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    for _ in range(20):
        y = np.r_[0, 1, rng.integers(0, 2, 50)]
        p = rng.integers(0, 6, y.size) / 5  # many ties
        assert roc_auc(y, p) == pytest.approx(metrics.roc_auc_score(y, p))
