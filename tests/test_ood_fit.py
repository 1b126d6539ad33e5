"""Fitting the out-of-distribution check (``training/evaluate/ood.py``) and its manifest sections.

* the fit is deterministic (same features, same statistics, byte for byte once saved);
* the threshold rule holds: at least 97.5 % of the validation scores are at or below it;
* shifted rows score above it; the drift reference's histograms are valid manifest histograms;
* the bundled model's manifest carries the check, the age range and the drift reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")

from edge_runtime.bundle import load_bundle
from edge_runtime.manifest import Histogram
from edge_runtime.ood import load, save
from training.bundle.manifest import decile_histogram
from training.evaluate.ood import OOD_QUANTILE, fit_ood, ood_threshold

DIMS = (4, 6, 8)


def _rows(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    mixing = np.random.default_rng(7).normal(size=(sum(DIMS), sum(DIMS)))
    return (rng.normal(size=(n, sum(DIMS))) @ mixing) * 0.1 + shift


def test_the_fit_is_deterministic(tmp_path: Path) -> None:
    train = _rows(np.random.default_rng(1), 300)
    first = save(fit_ood(train, DIMS), tmp_path / "a.npz")
    second = save(fit_ood(train.copy(), DIMS), tmp_path / "b.npz")
    a, b = load(first, DIMS), load(second, DIMS)
    for x, y in zip(a.layers, b.layers, strict=True):
        assert np.array_equal(x.mean, y.mean) and np.array_equal(x.precision, y.precision)
        assert (x.log_mean, x.log_std) == (y.log_mean, y.log_std)
    # Training rows are standardised per stage: their summed scores centre on 0.
    assert abs(float(a.score(train).mean())) < 1e-9


def test_the_threshold_rule_holds_on_validation_and_shifted_rows_fall_outside() -> None:
    rng = np.random.default_rng(2)
    model = fit_ood(_rows(rng, 400), DIMS)
    validation = model.score(_rows(rng, 200))
    threshold = ood_threshold(validation)
    assert OOD_QUANTILE == 0.975
    assert (validation <= threshold).mean() >= OOD_QUANTILE
    assert (validation > threshold).mean() <= 1 - OOD_QUANTILE + 1 / validation.size
    shifted = model.score(_rows(rng, 100, shift=1.0))
    assert (shifted > threshold).mean() > 0.95


def test_a_layer_width_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="sum to 18"):
        fit_ood(np.zeros((10, 17)), DIMS)


@pytest.mark.parametrize(
    ("values", "low", "high"),
    [
        (np.random.default_rng(3).random(784) ** 8, 0.0, 1.0),  # probabilities piled near 0
        (np.r_[np.zeros(500), np.ones(284)], 0.0, 1.0),  # every decile tied at an end
        (np.random.default_rng(4).normal(size=784), -4.5, 4.5),  # OOD scores: min - 1, max + 1
    ],
)
def test_drift_reference_histograms_are_valid(values: np.ndarray, low: float, high: float) -> None:
    histogram = Histogram(**decile_histogram(values, low, high))
    assert histogram.edges[0] == low and histogram.edges[-1] == high
    assert all(b > a for a, b in zip(histogram.edges, histogram.edges[1:], strict=False))
    assert len(histogram.edges) <= 11


def test_the_bundled_model_carries_the_check_the_ages_and_the_reference(default_bundle: Path) -> None:
    manifest = load_bundle(default_bundle).manifest
    ood = manifest.intended_use.ood
    if ood is None:
        pytest.skip("the bundled model predates the out-of-distribution check")
    extra = ood.model_extra or {}
    assert extra["quantile"] == OOD_QUANTILE
    assert extra["validation_outside_share"] <= 1 - OOD_QUANTILE + 0.005
    assert manifest.intended_use.age_years == (0.0, 10.0)
    assert manifest.output.features is not None
    statistics = load(default_bundle / ood.file, manifest.output.features.dims)
    assert statistics.width == manifest.output.features.width
    assert manifest.monitoring is not None
    reference = manifest.monitoring.reference
    assert reference.images == manifest.training["split"]["validation"]["images"]
    assert reference.outside_share == pytest.approx(extra["validation_outside_share"], abs=1e-3)
    assert reference.ood_score is not None and reference.metadata == {}
