"""Published probabilities keep the model's ranking: no mass of ties at 1.0."""

from __future__ import annotations

import itertools

import numpy as np
from helpers import make_analysis

from edge_runtime.results import scores_to_probabilities


def _published(p_normal: float) -> float:
    """P(PNEUMONIA) as a subscriber reads it, for a float32 softmax output (1 - p_normal, p_normal)."""
    raw = np.array([p_normal, 1.0 - p_normal], dtype=np.float32)  # 1 - 1e-9 is exactly 1.0 here
    probs = scores_to_probabilities(raw, "none")
    analysis = make_analysis(probs, kind="image")
    return analysis.finding.probability


def test_confident_outputs_stay_ranked() -> None:
    published = [_published(p) for p in (1e-4, 1e-6, 1e-7, 1e-8, 1e-9)]
    # float32 stores the positive class of the last three as exactly 1.0; the published values
    # still rank them (strictly increasing) and none is a tie at 1.0.
    assert all(b > a for a, b in itertools.pairwise(published)), published
    assert max(published) < 1.0
    assert published[0] == 0.9999


def test_softmax_and_sigmoid_activations() -> None:
    p = scores_to_probabilities(np.array([0.0, 30.0], dtype=np.float32), "softmax")
    assert p[1] < 1.0 and p[1] > 1 - 1e-12 and abs(p.sum() - 1.0) < 1e-12
    multi = scores_to_probabilities(np.array([0.0, 3.0], dtype=np.float32), "sigmoid")
    np.testing.assert_allclose(multi, [0.5, 1 / (1 + np.exp(-3.0))])  # independent labels: untouched
