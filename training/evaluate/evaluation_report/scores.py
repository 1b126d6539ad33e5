"""Scoring the cases through :mod:`training.evaluate.scoring` and every number per model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..metrics import (
    average_precision,
    binary_metrics,
    bootstrap_auc_ci,
    confusion_matrix,
    expected_calibration_error,
    predictive_values,
    reliability_bins,
    subgroup_metrics,
    wilson_interval,
)
from .cases import Case

if TYPE_CHECKING:
    from edge_runtime.bundle import ModelBundle


def predict_cases(
    model_path: str | Path,
    cases: Sequence[Case],
    bundle: ModelBundle,
    threads: int = 2,
    batch_size: int = 32,
) -> np.ndarray:
    """P(positive) for every case, through the edge's decode, preprocess and ONNX Runtime backend.

    ``bundle`` supplies the preprocessing spec, input name, output activation
    and positive label, so an FP32 file is run exactly like the bundle's INT8
    one (:mod:`training.evaluate.scoring`). The bundle's own model is loaded as the
    service loads it; a model whose input does not match the manifest is
    refused (:class:`~edge_runtime.errors.ModelBundleError`) rather than fed wrong tensors.
    """
    from edge_runtime.decode import decode_file
    from edge_runtime.preprocess import preprocess

    from ..scoring import OutputHead, bundle_scorer, file_scorer

    spec = bundle.preprocessing
    if Path(model_path).resolve() == bundle.artifact("onnxruntime").path.resolve():
        scorer = bundle_scorer(bundle, threads=threads)
    else:
        head = OutputHead.from_bundle(bundle)
        scorer = file_scorer(model_path, spec, head, threads, input_name=bundle.input_name, output_name=None)
    batch = np.empty((batch_size, *spec.sample_shape), dtype=np.float32)
    probs = np.empty(len(cases), dtype=np.float64)
    with scorer:
        for start in range(0, len(cases), batch_size):
            chunk = cases[start : start + batch_size]
            for i, case in enumerate(chunk):
                pixels = case.image if case.image is not None else decode_file(case.path).pixels
                preprocess(pixels, spec, out=batch[i])
            probs[start : start + len(chunk)] = scorer(batch[: len(chunk)], batch_size)
    return probs


@dataclass
class ModelResult:
    """One scored model: its identity, its probabilities and (after :func:`summarize`) metrics."""

    name: str
    file: Path
    sha256: str
    note: str
    p: np.ndarray
    summary: dict[str, Any] = field(default_factory=dict)


def summarize(
    y: np.ndarray,
    p: np.ndarray,
    groups: Sequence[str],
    threshold: float,
    n_boot: int = 2000,
    seed: int = 0,
    n_bins: int = 15,
) -> dict[str, Any]:
    """Every number the report prints for one model, from :mod:`training.evaluate.metrics` only.

    ``threshold`` must be the manifest's; 0.5 is added for reference. Kept
    separate from rendering so that tests can compare the Markdown with
    these values.
    """
    lo, hi = bootstrap_auc_ci(y, p, n_boot=n_boot, seed=seed)
    at = {}
    for key, t in (("threshold", threshold), ("0.5", 0.5)):
        at[key] = {**binary_metrics(y, p, t), **predictive_values(y, p, t)}
        at[key]["confusion_matrix"] = confusion_matrix(y, p, t).tolist()
    subgroups = subgroup_metrics(y, p, groups, threshold)
    for g in subgroups.values():
        correct, n = (g["tp"], g["n_positive"]) if g["n_positive"] else (g["tn"], g["n_negative"])
        g["rate_ci95"] = list(wilson_interval(int(correct), int(n)))
    bins = reliability_bins(y, p, n_bins)
    return {
        "auc": at["threshold"]["auc"],
        "auc_ci95": [lo, hi],
        "bootstrap_resamples": n_boot,
        "bootstrap_seed": seed,
        "average_precision": average_precision(y, p),
        "ece": expected_calibration_error(y, p, n_bins),
        "n_bins": n_bins,
        "reliability": {k: v.tolist() for k, v in bins.items()},
        "at_threshold": at["threshold"],
        "at_0.5": at["0.5"],
        "subgroups": subgroups,
        # A float32 softmax saturates: these cases are tied and no threshold can separate them.
        "n_p_equal_1": {
            "negative": int(np.sum((p >= 1.0) & (y == 0))),
            "positive": int(np.sum((p >= 1.0) & (y == 1))),
        },
    }
