"""Binary classification metrics and the operating threshold.

Curves and areas (ROC, AUC, precision-recall, average precision) come from
scikit-learn, so the numbers we publish are the ones anyone can recompute
with the standard library of the field; what scikit-learn has no equivalent
for (the threshold rule, bootstrap and Wilson intervals, sensitivity at a
specificity, reliability bins with counts, ECE, temperature scaling) stays
here, in numpy. No torch: the benchmarks that run beside the edge code
import this module; scikit-learn is imported by the functions that use it, so the numpy ones
(temperature scaling, log-loss) also serve the Keras route's environment, which has none.
Convention everywhere: ``y`` is 1 for the positive class (PNEUMONIA), ``p`` is the model's
probability of the positive class, and a case is called positive when
``p >= threshold``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "average_precision",
    "binary_metrics",
    "bootstrap_auc_ci",
    "calibration_effect",
    "choose_threshold",
    "compare_predictions",
    "confusion",
    "confusion_matrix",
    "expected_calibration_error",
    "fit_temperature",
    "log_loss",
    "precision_recall_curve",
    "predictive_values",
    "reliability_bins",
    "roc_auc",
    "roc_curve",
    "subgroup_metrics",
    "wilson_interval",
]


def _sklearn() -> Any:
    """``sklearn.metrics``, imported when a curve or an area is first asked for."""
    from sklearn import metrics

    return metrics


def _as_arrays(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray]:
    y_arr = np.asarray(y).astype(np.int64).ravel()
    p_arr = np.asarray(p, dtype=np.float64).ravel()
    if y_arr.shape != p_arr.shape:
        raise ValueError(f"y and p differ in length: {y_arr.size} vs {p_arr.size}.")
    if not np.isin(y_arr, (0, 1)).all():
        raise ValueError("y must contain only 0 and 1.")
    return y_arr, p_arr


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
    return float(_sklearn().roc_auc_score(y_arr, p_arr))


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


def confusion_matrix(y: Any, p: Any, threshold: float) -> np.ndarray:
    """The 2x2 confusion matrix ``[[TN, FP], [FN, TP]]`` at ``threshold``.

    Rows are the true class and columns the call, both in label-id order
    (0 = NORMAL, 1 = PNEUMONIA), the layout of the report's table and heatmap,
    so that a row sums to that class's count. Same counts as :func:`confusion`.
    """
    c = confusion(y, p, threshold)
    return np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]], dtype=np.int64)


def predictive_values(y: Any, p: Any, threshold: float) -> dict[str, float]:
    """PPV = TP / (TP + FP) and NPV = TN / (TN + FN) at ``threshold``; NaN when nothing is called.

    Unlike sensitivity and specificity these depend on the prevalence of the
    evaluated set, so they answer "how often is a call right *on this set*";
    the Kermany test split is 62.5 % pneumonia, far from any clinical
    prevalence, which is why the report prints them with that caveat.
    """
    c = confusion(y, p, threshold)
    called_pos = c["tp"] + c["fp"]
    called_neg = c["tn"] + c["fn"]
    return {
        "ppv": c["tp"] / called_pos if called_pos else math.nan,
        "npv": c["tn"] / called_neg if called_neg else math.nan,
    }


def roc_curve(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` of the ROC curve, one point per distinct score.

    Points are in order of decreasing threshold, starting at ``(0, 0)`` with
    threshold ``+inf`` (nothing called positive) and ending at ``(1, 1)``.
    Each point is exactly what :func:`confusion` gives at that threshold, so
    the operating point drawn on the curve lies on it; the trapezoidal area
    under these points equals :func:`roc_auc` (ties count 1/2).

    Raises:
        ValueError: when only one class is present.
    """
    y_arr, p_arr = _as_arrays(y, p)
    if y_arr.all() or not y_arr.any():
        raise ValueError("A ROC curve needs both classes; got only one.")
    # drop_intermediate=False keeps one point per distinct score (the default drops collinear
    # ones), so every threshold the model can be run at is on the curve.
    fpr, tpr, thresholds = _sklearn().roc_curve(y_arr, p_arr, drop_intermediate=False)
    return fpr.astype(np.float64), tpr.astype(np.float64), thresholds.astype(np.float64)


def sensitivity_at_specificity(y: Any, p: Any, min_specificity: float) -> tuple[float, float]:
    """The best sensitivity among thresholds whose specificity is at least ``min_specificity``.

    This reads the ROC curve (it says whether *some* operating point meets a
    sensitivity/specificity pair), unlike :func:`binary_metrics`, which
    scores one given threshold.

    Returns:
        ``(sensitivity, specificity)`` of that point.
    """
    fpr, tpr, _ = roc_curve(y, p)
    ok = (1.0 - fpr) >= min_specificity - 1e-12
    best = int(np.flatnonzero(ok)[np.argmax(tpr[ok])])
    return float(tpr[best]), float(1.0 - fpr[best])


def precision_recall_curve(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(precision, recall, thresholds)``, one point per distinct score, highest threshold first.

    Recall rises along the arrays. No artificial ``(recall 0, precision 1)``
    point is added: every point is a threshold the model can actually be run
    at. Precision, like PPV, depends on the set's prevalence.

    Raises:
        ValueError: when there is no positive case (recall undefined).
    """
    y_arr, p_arr = _as_arrays(y, p)
    if not y_arr.any():
        raise ValueError("A precision-recall curve needs at least one positive case.")
    precision, recall, thresholds = _sklearn().precision_recall_curve(y_arr, p_arr)
    # scikit-learn orders by rising threshold and appends (precision 1, recall 0) with no
    # threshold; drop that point and reverse, so index k is the k-th highest threshold.
    return precision[:-1][::-1].copy(), recall[:-1][::-1].copy(), thresholds[::-1].copy()


def average_precision(y: Any, p: Any) -> float:
    """Area under the step-wise PR curve: ``sum_k (R_k - R_{k-1}) * P_k`` with ``R_0 = 0``.

    This is scikit-learn's ``average_precision_score`` (no interpolation), so
    the number can be compared with published ones.

    Raises:
        ValueError: when there is no positive case (recall undefined).
    """
    y_arr, p_arr = _as_arrays(y, p)
    if not y_arr.any():
        raise ValueError("Average precision needs at least one positive case.")
    return float(_sklearn().average_precision_score(y_arr, p_arr))


def reliability_bins(y: Any, p: Any, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per-bin calibration of P(positive): ``n_bins`` equal-width bins on [0, 1].

    Bins are ``[k/n, (k+1)/n)`` with the last one closed (``p == 1`` falls in
    it), as in ``numpy.histogram``. The calibration looked at is that of the
    positive-class probability (mean predicted P(pneumonia) vs the observed
    fraction of pneumonia), not of the top-label confidence: the edge
    publishes P(pneumonia), and this is what a reader of that number needs.

    Ours rather than ``sklearn.calibration.calibration_curve``: that one
    returns only the filled bins, without their counts (which the report
    prints and ECE weighs by), and closes its bins on the right.

    Returns:
        ``edges`` (``n_bins + 1``), and per bin ``count``, ``mean_predicted``
        and ``observed_rate`` (NaN for empty bins).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}.")
    y_arr, p_arr = _as_arrays(y, p)
    if p_arr.size and (p_arr.min() < 0.0 or p_arr.max() > 1.0):
        raise ValueError("p must be probabilities in [0, 1].")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, p_arr, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.bincount(index, weights=p_arr, minlength=n_bins) / count
        observed_rate = np.bincount(index, weights=y_arr, minlength=n_bins) / count
    return {
        "edges": edges,
        "count": count.astype(np.int64),
        "mean_predicted": mean_predicted,
        "observed_rate": observed_rate,
    }


def expected_calibration_error(y: Any, p: Any, n_bins: int = 15) -> float:
    """ECE: the count-weighted mean of ``|observed_rate - mean_predicted|`` over the bins.

    Uses :func:`reliability_bins` (positive-class probability, equal-width
    bins, 15 by default as in Guo et al. 2017); empty bins weigh nothing. A
    well-ranked model (high AUC) can still be badly calibrated, and the edge
    publishes the probability itself, so the report states how far it is
    from a frequency.
    """
    bins = reliability_bins(y, p, n_bins)
    count = bins["count"]
    if count.sum() == 0:
        raise ValueError("ECE needs at least one case.")
    filled = count > 0
    gaps = np.abs(bins["observed_rate"][filled] - bins["mean_predicted"][filled])
    return float(np.sum(count[filled] * gaps) / count.sum())


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a proportion (95 % for the default ``z``); NaNs when ``n == 0``.

    Used for the per-subtype rates, where counts are small (148 viral cases)
    and a rate near 1 would get a normal-approximation interval reaching past 1.
    """
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n], got {successes} of {n}.")
    phat = successes / n
    denom = 1.0 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * math.sqrt(phat * (1.0 - phat) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def subgroup_metrics(y: Any, p: Any, groups: Any, threshold: float) -> dict[str, dict[str, float | int]]:
    """Counts, sensitivity and specificity at ``threshold`` within each group, in sorted group order.

    A pooled sensitivity can hide a subtype the model misses (viral
    pneumonia looks subtler than bacterial on a radiograph), so the report
    breaks it down. Rates undefined in a group (no positives / negatives) are NaN.

    Args:
        y: Labels (1 = positive).
        p: P(positive).
        groups: One group name per case, e.g. ``bacteria``/``virus``/``normal``.
        threshold: The operating threshold.
    """
    y_arr, p_arr = _as_arrays(y, p)
    g_arr = np.asarray(groups).astype(str).ravel()
    if g_arr.shape != y_arr.shape:
        raise ValueError(f"groups and y differ in length: {g_arr.size} vs {y_arr.size}.")
    out: dict[str, dict[str, float | int]] = {}
    for name in sorted(set(g_arr.tolist())):
        mask = g_arr == name
        c = confusion(y_arr[mask], p_arr[mask], threshold)
        n_pos, n_neg = c["tp"] + c["fn"], c["tn"] + c["fp"]
        out[name] = {
            "n": int(mask.sum()),
            "n_positive": n_pos,
            "n_negative": n_neg,
            **c,
            "sensitivity": c["tp"] / n_pos if n_pos else math.nan,
            "specificity": c["tn"] / n_neg if n_neg else math.nan,
        }
    return out


def compare_predictions(reference: np.ndarray, other: np.ndarray, threshold: float) -> dict[str, float | int]:
    """How far an export's P(positive) is from the reference model's, and whether it decides alike.

    Used for every export route (FP32/INT8 ONNX, TFLite): max and mean absolute
    difference, decision agreement at ``threshold`` and the positives each side calls.
    """
    diff = np.abs(reference - other)
    same = (reference >= threshold) == (other >= threshold)
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "decision_agreement": float(same.mean()),
        "decisions_differing": int((~same).sum()),
        "positives_reference": int((reference >= threshold).sum()),
        "positives_other": int((other >= threshold).sum()),
        "threshold": float(threshold),
    }


def fit_temperature(y: Any, margin: Any) -> float:
    """Temperature ``T`` that minimises the log-loss of ``sigmoid(margin / T)`` (Guo et al. 2017).

    ``margin`` is the logit difference ``z_positive - z_negative`` (for two
    softmax classes, ``softmax(z / T)[1] == sigmoid(margin / T)``). One
    scalar fitted on validation keeps the ranking (AUC) and the decision at
    any matched threshold, and turns over-confident outputs (a mass of
    ``p >= 0.999999``) into probabilities that mean a frequency. Golden-
    section search on ``log T`` in ``[1/50, 50]``: the loss is unimodal in
    ``T`` for a fixed margin.
    """
    y_arr, m_arr = _as_arrays(y, margin)
    if y_arr.size == 0 or np.unique(y_arr).size < 2:
        raise ValueError("temperature scaling needs cases of both classes.")
    signed = np.where(y_arr == 1, m_arr, -m_arr)

    def loss(log_t: float) -> float:
        # -log(sigmoid(s / T)) = log1p(exp(-s / T)), written stably.
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


def log_loss(y: Any, p: Any, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of P(positive), with ``p`` clipped to ``[eps, 1 - eps]``."""
    y_arr, p_arr = _as_arrays(y, p)
    q = np.clip(p_arr, eps, 1 - eps)
    return float(-np.mean(y_arr * np.log(q) + (1 - y_arr) * np.log(1 - q)))


def calibration_effect(y: Any, before: Any, after: Any) -> dict[str, Any]:
    """What temperature scaling did on ``y``'s split: log-loss, ECE (15 bins) and saturated outputs.

    ``calibration.json``'s ``validation`` record, written alike by both training routes' exports.
    """
    y, before = _as_arrays(y, before)
    after = np.asarray(after, dtype=np.float64)
    return {
        "n": int(y.size),
        "log_loss": {"before": log_loss(y, before), "after": log_loss(y, after)},
        "ece_15_bins": {
            "before": expected_calibration_error(y, before),
            "after": expected_calibration_error(y, after),
        },
        "outputs_at_least_0.999999": {
            "before": int((before >= 0.999999).sum()),
            "after": int((after >= 0.999999).sum()),
        },
    }
