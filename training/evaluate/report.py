"""The operating point and the held-out test metrics of the deployed (INT8) model.

Order matters: the threshold is chosen on the patient-disjoint validation
split from the INT8 model's own probabilities (the model the edge runs), and
only then is the run's test split (the official Kermany test split for the
default model; see :mod:`training.data.datasets` for the others) scored, once, at
that fixed threshold. Nothing computed from the test split flows back into a choice.

Test images go through the edge path exactly: ``decode_file`` ->
``preprocess`` -> the edge's ONNX Runtime backend (:mod:`training.evaluate.scoring`), as in
``benchmarks/bench_model_accuracy.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from edge_runtime.preprocess import PreprocessSpec

from ..data.datasets import Dataset, items_from_split, read_split, run_spec
from ..data.images import CXRDataset, Item, label_counts
from ..run_files import (
    EVALUATION_NAME,
    FP32_NAME,
    INT8_NAME,
    TEST_PREDICTIONS,
    VAL_PREDICTIONS,
    framework_column,
)
from .metrics import binary_metrics, bootstrap_auc_ci, choose_threshold, compare_predictions
from .scoring import OutputHead, file_scorer, run_head

__all__ = ["EVALUATION_NAME", "predict_items", "run_evaluation"]


def predict_items(
    model_path: str | Path,
    items: Sequence[Item],
    spec: PreprocessSpec,
    threads: int = 2,
    batch_size: int = 32,
    desc: str = "predict",
    head: OutputHead | None = None,
) -> np.ndarray:
    """P(positive) of an ONNX model for image files, through the edge decode, preprocess and backend.

    ``head`` says how to read the output (the run's :func:`~training.evaluate.scoring.run_head`);
    it defaults to the first pipeline's (``NORMAL``/``PNEUMONIA``).
    """
    dataset = CXRDataset(items, spec)
    probs = []
    with file_scorer(model_path, spec, head or run_head(None), threads) as scorer:
        for start in tqdm(range(0, len(dataset), batch_size), desc=desc, unit="batch", leave=False):
            idx = range(start, min(len(dataset), start + batch_size))
            probs.append(scorer(np.stack([dataset.sample(i) for i in idx]), batch_size))
    return np.concatenate(probs)


def _test_split_name(dataset: Dataset) -> str:
    """``official Kermany test`` for the default data (the name earlier runs recorded), else the method."""
    if dataset.kind == "folders" and dataset.classes == ("NORMAL", "PNEUMONIA"):
        return "official Kermany test"
    return f"{dataset.name}: {dataset.test_method}"


def _rounded(metrics: dict[str, Any], digits: int = 4) -> dict[str, Any]:
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in metrics.items()}


def _test_ood(run: Path, items: Sequence[Item], spec: PreprocessSpec, threads: int) -> dict[str, Any] | None:
    """Share of the test split the out-of-distribution check (``ood`` stage) calls outside, if fitted.

    Reported only: the check's threshold was set on validation before this is computed.
    """
    from edge_runtime.ood import load

    from .ood import OOD_NAME, OOD_SUMMARY, item_features

    if not (run / OOD_NAME).is_file() or not (run / OOD_SUMMARY).is_file():
        return None
    summary = json.loads((run / OOD_SUMMARY).read_text(encoding="utf-8"))
    model = load(run / OOD_NAME, summary["dims"])
    _, features = item_features(run / INT8_NAME, items, spec, model.width, threads, desc="test features")
    scores = model.score(features)
    np.savez(run / "test_ood.npz", scores=scores)
    return {
        "threshold": summary["threshold"],
        "outside_share": round(float((scores > summary["threshold"]).mean()), 4),
        "n": len(items),
    }


def run_evaluation(
    run_dir: str | Path,
    data_root: str | Path | None = None,
    spec: PreprocessSpec | None = None,
    min_sensitivity: float = 0.95,
    threads: int = 2,
) -> dict[str, Any]:
    """Choose the threshold on validation (INT8), then score the official test split.

    The test items are the ones the run's ``split.json`` records (for a
    first-format split, the official ``test/`` folder); ``data_root`` only
    says where the data are if they moved. ``spec`` defaults to the run's.

    Writes ``evaluation.json`` and ``test_predictions.npz`` into ``run_dir``.
    """
    t_start = time.monotonic()
    run = Path(run_dir)
    spec = spec or run_spec(run)
    split = read_split(run)
    dataset = items_from_split(split, root=data_root)
    head = run_head(split)
    val = np.load(run / VAL_PREDICTIONS)
    y_val = val["y"]
    threshold = choose_threshold(y_val, val["int8"], min_sensitivity)
    source = framework_column(val.files)  # the training framework's own FP32 model: torch or keras
    validation = {
        name: _rounded(binary_metrics(y_val, val[name], threshold)) for name in ("int8", "fp32", source)
    }
    agreement = {
        "int8_vs_fp32": compare_predictions(val["fp32"], val["int8"], threshold),
        f"int8_vs_{source}": compare_predictions(val[source], val["int8"], threshold),
    }

    test_items = list(dataset.test)
    if not test_items:
        raise ValueError(f"The run's data {dataset.root} have no test split to evaluate on.")
    y_test = np.array([item.label for item in test_items])
    p_int8 = predict_items(run / INT8_NAME, test_items, spec, threads, desc="test INT8", head=head)
    p_fp32 = predict_items(run / FP32_NAME, test_items, spec, threads, desc="test FP32", head=head)
    np.savez(run / TEST_PREDICTIONS, y=y_test, int8=p_int8, fp32=p_fp32)
    test_int8 = binary_metrics(y_test, p_int8, threshold)
    lo, hi = bootstrap_auc_ci(y_test, p_int8, n_boot=2000, seed=0)
    test_int8["auc_ci95"] = [round(lo, 4), round(hi, 4)]
    # For reference only: the common 0.5 cut-off and FP32. Never used to choose anything.
    reference = {
        "int8_at_0.5": _rounded(binary_metrics(y_test, p_int8, 0.5)),
        "fp32_at_threshold": _rounded(binary_metrics(y_test, p_fp32, threshold)),
    }
    ood = _test_ood(run, test_items, spec, threads)
    result = {
        "threshold": threshold,
        "min_sensitivity": min_sensitivity,
        "validation": validation,
        "validation_agreement": agreement,
        "test": {
            "split": _test_split_name(dataset),
            "counts": label_counts(test_items, dataset.classes),
            "int8": _rounded(test_int8),
            "reference": reference,
            "ood": ood,
        },
        "seconds": time.monotonic() - t_start,
    }
    (run / EVALUATION_NAME).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    v, t = validation["int8"], result["test"]["int8"]
    tqdm.write(
        f"threshold {threshold:.4f} (highest with val sensitivity >= {min_sensitivity}):\n"
        f"  validation INT8: AUC {v['auc']:.4f}  sens {v['sensitivity']:.4f}  "
        f"spec {v['specificity']:.4f}  (n={v['n']})\n"
        f"  test INT8:       AUC {t['auc']:.4f} [{lo:.4f}, {hi:.4f}]  acc {t['accuracy']:.4f}  "
        f"sens {t['sensitivity']:.4f}  spec {t['specificity']:.4f}  (n={t['n']})\n"
        f"  INT8 vs FP32 decisions at threshold on validation: "
        f"{agreement['int8_vs_fp32']['decision_agreement']:.2%} agree"
        + (f"\n  out-of-distribution check: test outside {ood['outside_share']:.2%}" if ood else "")
    )
    return result
