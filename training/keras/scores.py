"""The validation scores of the Keras route, for ``.venv-keras`` (no scikit-learn there).

Temperature scaling and log-loss are :mod:`training.evaluate.metrics`'s own (numpy; that module
imports scikit-learn only for its curves). Only the AUC is computed here: :func:`roc_auc` is the
Mann-Whitney statistic with tied scores counted half, what ``sklearn.metrics.roc_auc_score``
computes; ``tests/test_keras_training.py`` checks it against ``training.evaluate.metrics`` in the
main environment.
"""

from __future__ import annotations

import numpy as np

from ..evaluate.metrics import fit_temperature, log_loss

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
