"""Temperature scaling: fitted on validation, folded into the network, exact in every export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from training.evaluate.metrics import expected_calibration_error, fit_temperature, log_loss, roc_auc
from training.model.models import apply_temperature, predict_logits, predict_torch


def _overconfident(n: int, true_t: float, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(z), reported with margins true_t * z (over-confident for true_t > 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.int64)
    return y, true_t * z


@pytest.mark.parametrize("true_t", [0.5, 1.0, 4.0, 20.0])
def test_fit_temperature_recovers_the_over_confidence(true_t: float) -> None:
    y, margin = _overconfident(20_000, true_t)
    fitted = fit_temperature(y, margin)
    # 20 000 cases pin the maximum-likelihood T to a few per cent of the truth.
    assert fitted == pytest.approx(true_t, rel=0.05)


def test_scaling_keeps_the_ranking_and_improves_calibration() -> None:
    y, margin = _overconfident(5000, 8.0)
    before = 1 / (1 + np.exp(-margin))
    t = fit_temperature(y, margin)
    after = 1 / (1 + np.exp(-margin / t))
    # The scaled probabilities rank exactly as the margins do (the unscaled ones tie at 1.0 in
    # float64 for the largest margins, which moves their AUC by chance either way).
    assert roc_auc(y, after) == pytest.approx(roc_auc(y, margin), abs=1e-12)
    assert log_loss(y, after) < log_loss(y, before)
    assert expected_calibration_error(y, after) < 0.25 * expected_calibration_error(y, before)
    assert (after >= 0.999999).sum() < (before >= 0.999999).sum() // 10


def test_fit_temperature_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both classes"):
        fit_temperature([1, 1, 1], [0.5, 2.0, 3.0])


def test_apply_temperature_divides_the_logits_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    x = np.random.default_rng(1).normal(size=(5, 3, 16, 16)).astype(np.float32)
    logits = predict_logits(model, x)
    apply_temperature(model, 2.5)
    np.testing.assert_allclose(predict_logits(model, x), logits / 2.5, rtol=1e-5, atol=1e-6)
    expected = torch.softmax(torch.from_numpy(logits / 2.5), dim=1).numpy()
    np.testing.assert_allclose(predict_torch(model, x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        apply_temperature(model, 0.0)
