"""The out-of-distribution check's fit: training-split statistics, validation threshold (torch-free).

Run after ``quantize``: every image of the run's *training* split (no augmentation, the split
the model trained on) goes through the edge's ONNX Runtime backend on the INT8 file, and its
``features`` output (the pooled stage ends, ``manifest.output.features``) is what a box will
compute. Per stage, a Ledoit-Wolf shrinkage covariance (``sklearn.covariance.LedoitWolf``)
and the mean are fitted on those rows; :meth:`edge_runtime.ood.OodModel.fit` inverts them and
standardises the log distances on the same rows. The threshold is the 0.975 quantile of the
validation split's scores: at least 95 % of in-distribution validation images pass, with room
for the shift of a new site (rule fixed in issue #26 before any outside image was scored).

Writes ``ood.npz`` (:func:`edge_runtime.ood.save`; ``package`` copies it into the bundle) and
``ood_summary.json`` (threshold, rates, what it was fitted on) into the run folder, and the
validation scores into ``ood_validation.npz`` (the drift reference is built from them).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from edge_runtime.ood import OodModel, save
from edge_runtime.preprocess import PreprocessSpec

from ..data.datasets import items_from_split, read_split, run_spec
from ..data.images import CXRDataset, Item
from ..run_files import EXPORT_SUMMARY, INT8_NAME
from .scoring import features_file_backend, run_features

__all__ = [
    "OOD_NAME",
    "OOD_QUANTILE",
    "OOD_SUMMARY",
    "OOD_VALIDATION",
    "fit_backend_ood",
    "fit_ood",
    "item_features",
    "ood_threshold",
    "run_ood",
]

OOD_NAME = "ood.npz"
OOD_SUMMARY = "ood_summary.json"
OOD_VALIDATION = "ood_validation.npz"
#: Share of validation scores at or below the threshold (issue #26).
OOD_QUANTILE = 0.975
METHOD = "stage-mahalanobis"


def fit_ood(train: np.ndarray, dims: Sequence[int]) -> OodModel:
    """Per stage (``dims``: widths in column order), the mean and Ledoit-Wolf covariance of ``train``."""
    from sklearn.covariance import LedoitWolf

    rows = np.asarray(train, dtype=np.float64)
    if rows.shape[1] != sum(dims):
        raise ValueError(f"features have {rows.shape[1]} columns; the stages' widths sum to {sum(dims)}")
    layers: list[tuple[np.ndarray, np.ndarray]] = []
    start = 0
    for dim in dims:
        block = rows[:, start : start + dim]
        estimate = LedoitWolf().fit(block)
        layers.append((block.mean(axis=0), np.asarray(estimate.covariance_, dtype=np.float64)))
        start += dim
    return OodModel.fit(layers, rows)


def ood_threshold(validation_scores: np.ndarray, quantile: float = OOD_QUANTILE) -> float:
    """The ``quantile`` of the validation scores (numpy's default linear interpolation)."""
    return float(np.quantile(np.asarray(validation_scores, dtype=np.float64), quantile))


def item_features(
    model_path: str | Path,
    items: Sequence[Item],
    spec: PreprocessSpec,
    width: int,
    threads: int = 2,
    batch_size: int = 64,
    desc: str = "features",
) -> tuple[np.ndarray, np.ndarray]:
    """``(raw scores, features)`` of image files through the edge decode, preprocess and backend."""
    dataset = CXRDataset(list(items), spec)
    scores: list[np.ndarray] = []
    features: list[np.ndarray] = []
    engine = features_file_backend(model_path, spec, width, threads)
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc=desc, unit="batch", leave=False):
            batch = np.stack([dataset.sample(i) for i in range(start, min(len(dataset), start + batch_size))])
            s, f = run_features(engine, batch, batch_size)
            scores.append(s)
            features.append(f)
    finally:
        engine.close()
    return np.concatenate(scores), np.concatenate(features)


def run_ood(run_dir: str | Path, threads: int = 2, quantile: float = OOD_QUANTILE) -> dict[str, Any]:
    """``ood`` stage: fit on the training split's INT8 features, threshold on validation."""
    t_start = time.monotonic()
    run = Path(run_dir)
    if not (run / EXPORT_SUMMARY).is_file() or not (run / INT8_NAME).is_file():
        raise FileNotFoundError(
            f"{run / INT8_NAME} or {run / EXPORT_SUMMARY} is missing; run 'python -m training export "
            f"--out {run}' and 'quantize' first."
        )
    export = json.loads((run / EXPORT_SUMMARY).read_text(encoding="utf-8"))
    features = export.get("features")
    if not features:
        raise ValueError(f"{run / INT8_NAME} has no features output; re-run the export stage.")
    dims = [int(d) for d in features["dims"]]
    spec = run_spec(run)
    dataset = items_from_split(read_split(run))
    width = sum(dims)
    _, train = item_features(run / INT8_NAME, dataset.train, spec, width, threads, desc="features train")
    _, val = item_features(run / INT8_NAME, dataset.val, spec, width, threads, desc="features val")
    model = fit_ood(train, dims)
    save(model, run / OOD_NAME)
    val_scores = model.score(val)
    train_scores = model.score(train)
    threshold = ood_threshold(val_scores, quantile)
    np.savez(run / OOD_VALIDATION, scores=val_scores, y=np.array([item.label for item in dataset.val]))
    summary: dict[str, Any] = {
        "method": METHOD,
        "file": OOD_NAME,
        "threshold": threshold,
        "quantile": quantile,
        "validation_outside_share": round(float((val_scores > threshold).mean()), 4),
        "training_outside_share": round(float((train_scores > threshold).mean()), 4),
        "fitted_on": f"training split, INT8 features, {len(train)} images",
        "layers": list(features["layers"]),
        "dims": dims,
        "covariance": "Ledoit-Wolf shrinkage (sklearn.covariance.LedoitWolf), per stage",
        "threshold_rule": f"the {quantile} quantile of the validation split's scores",
        "validation_images": len(val),
        "seconds": round(time.monotonic() - t_start, 1),
    }
    (run / OOD_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    tqdm.write(
        f"ood: fitted on {len(train)} training images ({len(dims)} stages, {width} features); threshold "
        f"{threshold:.4f} (validation quantile {quantile}); outside: validation "
        f"{summary['validation_outside_share']:.2%}, training {summary['training_outside_share']:.2%}"
    )
    return summary


def _bundle_item_features(
    bundle: Any, backend: str, items: Sequence[Item], batch_size: int = 64, desc: str = "features"
) -> np.ndarray:
    """Pooled features of image files from ``backend``'s file in ``bundle``, opened as a box opens it."""
    from edge_runtime.conformance import open_engine

    from .scoring import run_features

    dataset = CXRDataset(list(items), bundle.preprocessing)
    engine = open_engine(bundle, backend, threads=2)
    features: list[np.ndarray] = []
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc=desc, unit="batch", leave=False):
            batch = np.stack([dataset.sample(i) for i in range(start, min(len(dataset), start + batch_size))])
            features.append(run_features(engine, batch, batch_size)[1])
    finally:
        engine.close()
    return np.concatenate(features)


def fit_backend_ood(run: Path, bundle: Any, backend: str, quantile: float = OOD_QUANTILE) -> dict[str, Any]:
    """Fit the check on ``backend``'s own features (same rule), write ``ood.<backend>.npz`` into the bundle.

    Each backend quantizes with its own scales: LiteRT's pooled features differ from ONNX
    Runtime's by a few per cent, systematically, which the Mahalanobis distance (tight in some
    directions) turns into large scores. So a backend other than the one the ``ood`` stage
    fitted gets its own statistics and threshold, fitted on the same training split and set on
    the same validation split (``intended_use.ood.by_backend``).
    """
    features = bundle.manifest.output.features
    dataset = items_from_split(read_split(run))
    train = _bundle_item_features(bundle, backend, dataset.train, desc=f"{backend} features train")
    val = _bundle_item_features(bundle, backend, dataset.val, desc=f"{backend} features val")
    model = fit_ood(train, features.dims)
    name = f"ood.{backend}.npz"
    save(model, Path(bundle.path) / name)
    scores = model.score(val)
    threshold = ood_threshold(scores, quantile)
    summary = {
        "file": name,
        "threshold": threshold,
        "validation_outside_share": round(float((scores > threshold).mean()), 4),
        "fitted_on": f"training split, {backend} INT8 features, {len(train)} images",
    }
    share = summary["validation_outside_share"]
    tqdm.write(f"ood ({backend}): threshold {threshold:.4f}, validation outside {share:.2%}")
    return {**summary, "validation_scores": scores}
