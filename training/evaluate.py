"""Binary classification metrics and the operating threshold, in plain numpy.

Pure numpy on purpose: the benchmark that runs beside the edge code imports
this module and must not need torch or scikit-learn. Convention everywhere:
``y`` is 1 for the positive class (PNEUMONIA), ``p`` is the model's
probability of the positive class, and a case is called positive when
``p >= threshold``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "binary_metrics",
    "bootstrap_auc_ci",
    "choose_threshold",
    "confusion",
    "roc_auc",
]


def _as_arrays(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray]:
    y_arr = np.asarray(y).astype(np.int64).ravel()
    p_arr = np.asarray(p, dtype=np.float64).ravel()
    if y_arr.shape != p_arr.shape:
        raise ValueError(f"y and p differ in length: {y_arr.size} vs {p_arr.size}.")
    if not np.isin(y_arr, (0, 1)).all():
        raise ValueError("y must contain only 0 and 1.")
    return y_arr, p_arr


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank (as in Mann-Whitney U)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Start index of each run of equal values, and the run each position belongs to.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], values.size]
    run_rank = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    run_of_position = np.repeat(np.arange(starts.size), ends - starts)
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = run_rank[run_of_position]
    return ranks


def roc_auc(y: Any, p: Any) -> float:
    """Area under the ROC curve (probability a positive outranks a negative; ties count 1/2).

    Raises:
        ValueError: when only one class is present (AUC is undefined).
    """
    y_arr, p_arr = _as_arrays(y, p)
    n_pos = int(y_arr.sum())
    n_neg = int(y_arr.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both classes; got only one.")
    ranks = _average_ranks(p_arr)
    u = ranks[y_arr == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def confusion(y: Any, p: Any, threshold: float) -> dict[str, int]:
    """TP/FP/TN/FN counts when ``p >= threshold`` is called positive."""
    y_arr, p_arr = _as_arrays(y, p)
    pred = p_arr >= threshold
    pos = y_arr == 1
    return {
        "tp": int(np.sum(pred & pos)),
        "fp": int(np.sum(pred & ~pos)),
        "tn": int(np.sum(~pred & ~pos)),
        "fn": int(np.sum(~pred & pos)),
    }


def binary_metrics(y: Any, p: Any, threshold: float) -> dict[str, float | int]:
    """AUC, accuracy, sensitivity and specificity at ``threshold``, plus the counts.

    Sensitivity (recall of PNEUMONIA) and specificity (recall of NORMAL) are
    reported instead of precision because the deployment question is "how
    many sick children are missed" vs "how many healthy ones are flagged",
    independent of the test set's prevalence. Undefined rates are NaN.
    """
    y_arr, p_arr = _as_arrays(y, p)
    counts = confusion(y_arr, p_arr, threshold)
    n_pos = counts["tp"] + counts["fn"]
    n_neg = counts["tn"] + counts["fp"]
    n = n_pos + n_neg
    try:
        auc = roc_auc(y_arr, p_arr)
    except ValueError:
        auc = math.nan
    return {
        "auc": auc,
        "accuracy": (counts["tp"] + counts["tn"]) / n if n else math.nan,
        "sensitivity": counts["tp"] / n_pos if n_pos else math.nan,
        "specificity": counts["tn"] / n_neg if n_neg else math.nan,
        "threshold": float(threshold),
        "n": n,
        "n_positive": n_pos,
        "n_negative": n_neg,
        **counts,
    }


def choose_threshold(y_val: Any, p_val: Any, min_sensitivity: float = 0.95) -> float:
    """The highest threshold whose validation sensitivity is at least ``min_sensitivity``.

    A screening aid should miss few sick children, so sensitivity is fixed
    first and specificity is whatever the model then achieves; taking the
    *highest* such threshold gives the best specificity at that sensitivity.
    The result is one of the positive cases' scores: with the positives'
    scores sorted in descending order it is the ``ceil(min_sensitivity * n)``-th.

    Args:
        y_val: Validation labels (never the test set's).
        p_val: Validation probabilities of the positive class, from the model
            that will be deployed (the INT8 one), not a proxy.
        min_sensitivity: Required sensitivity in (0, 1].

    Raises:
        ValueError: no positive cases, or ``min_sensitivity`` out of range.
    """
    if not 0.0 < min_sensitivity <= 1.0:
        raise ValueError(f"min_sensitivity must be in (0, 1], got {min_sensitivity}.")
    y_arr, p_arr = _as_arrays(y_val, p_val)
    positives = np.sort(p_arr[y_arr == 1])[::-1]
    if positives.size == 0:
        raise ValueError("choose_threshold needs at least one positive case.")
    # Tolerance: 0.95 * 20 is 19.000000000000004 in floating point, and 19 suffices.
    needed = max(1, math.ceil(min_sensitivity * positives.size - 1e-9))
    return float(positives[needed - 1])


def bootstrap_auc_ci(
    y: Any,
    p: Any,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap ``(1 - alpha)`` confidence interval of the AUC.

    Cases are resampled with replacement; resamples holding a single class
    are skipped. Reported next to the point estimate because two models'
    AUCs on a few hundred images often differ by less than the noise.
    """
    y_arr, p_arr = _as_arrays(y, p)
    rng = np.random.default_rng(seed)
    values = []
    n = y_arr.size
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        ys = y_arr[idx]
        if ys.min() == ys.max():
            continue
        values.append(roc_auc(ys, p_arr[idx]))
    if not values:
        raise ValueError("No bootstrap resample held both classes.")
    lo, hi = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)
