"""Validation AUC and temperature fitting in numpy only, for ``.venv-keras`` (no scikit-learn there).

:mod:`training.evaluate.metrics` imports scikit-learn at module level, which ``.venv-keras`` does not
hold. These are the same quantities: :func:`roc_auc` is the Mann-Whitney statistic with tied scores
counted half (what ``sklearn.metrics.roc_auc_score`` computes), :func:`fit_temperature` is
``metrics.fit_temperature``'s golden-section search, step for step. ``tests/test_keras_training.py``
checks both against ``training.evaluate.metrics`` in the main environment.
"""

from __future__ import annotations

import numpy as np

__all__ = ["fit_temperature", "log_loss", "roc_auc"]


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve of scores ``p`` for labels ``y`` (0/1); NaN with one class only."""
    truth = np.asarray(y).astype(bool)
    scores = np.asarray(p, dtype=np.float64)
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(scores.size, dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # 1-based average rank of each tie
    return float((ranks[truth].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def log_loss(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of P(positive), ``p`` clipped to ``[eps, 1 - eps]``."""
    truth = np.asarray(y, dtype=np.float64)
    q = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return float(-np.mean(truth * np.log(q) + (1 - truth) * np.log(1 - q)))


def fit_temperature(y: np.ndarray, margin: np.ndarray) -> float:
    """``T`` minimising the log-loss of ``sigmoid(margin / T)``; ``margin = z_positive - z_negative``.

    Golden-section search on ``log T`` in ``[1/50, 50]`` (``training.evaluate.metrics.fit_temperature``).
    """
    truth = np.asarray(y, dtype=np.float64)
    margins = np.asarray(margin, dtype=np.float64)
    if truth.size == 0 or np.unique(truth).size < 2:
        raise ValueError("temperature scaling needs cases of both classes.")
    signed = np.where(truth == 1, margins, -margins)

    def loss(log_t: float) -> float:
        return float(np.mean(np.logaddexp(0.0, -signed / np.exp(log_t))))

    lo, hi = np.log(1 / 50), np.log(50.0)
    ratio = (np.sqrt(5.0) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return float(np.exp((lo + hi) / 2))
