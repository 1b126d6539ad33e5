"""Test metrics and training time of finished training runs, one row per run, measured now.

For each run folder (``python -m training pipeline --out RUN``) this scores
the run's INT8 ONNX model and its FP32 ONNX model on the run's own test split
(the split recorded in ``split.json``: the official Kermany test folder, the
PneumoniaMNIST test array, the official ``nih1000_64`` test folder), through
the edge's decode and preprocessing, in this process, at the threshold the
run chose on its validation split. It prints AUC with a bootstrap 95 % CI,
accuracy, sensitivity and specificity, the INT8-vs-FP32 AUC difference (both
measured here on the same tensors), and how long training took on the
machine that ran it (from ``train_summary.json``, with its CPU count).

Both models are scored by :mod:`training.evaluate.scoring` (the edge's ONNX Runtime
backend, P(positive) read with the head the run's manifest will carry).

Usage: python -m benchmarks.bench_training_runs runs/default runs/pmnist runs/nih64
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from training.data.datasets import items_from_split, read_split, run_spec
from training.data.images import CXRDataset
from training.evaluate.metrics import binary_metrics, bootstrap_auc_ci, roc_auc
from training.evaluate.scoring import run_head, score_file
from training.run_files import EVALUATION_NAME, FP32_NAME, INT8_NAME, SUMMARY_NAME


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders written by python -m training")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the AUC CI")
    return parser.parse_args()


def score(run: Path, threads: int, n_boot: int) -> dict[str, object]:
    """Measure one run: INT8 and FP32 on its test split at its validation threshold."""
    spec = run_spec(run)
    split = read_split(run)
    dataset = items_from_split(split)
    head = run_head(split)
    evaluation = json.loads((run / EVALUATION_NAME).read_text(encoding="utf-8"))
    summary = json.loads((run / SUMMARY_NAME).read_text(encoding="utf-8"))
    threshold = float(evaluation["threshold"])
    test = CXRDataset(list(dataset.test), spec)
    x = np.stack([test.sample(i) for i in range(len(test))])
    y = test.labels
    p_int8 = score_file(run / INT8_NAME, x, spec, head, threads)
    p_fp32 = score_file(run / FP32_NAME, x, spec, head, threads)
    m = binary_metrics(y, p_int8, threshold)
    lo, hi = bootstrap_auc_ci(y, p_int8, n_boot=n_boot, seed=0)
    seconds = summary["seconds"]["total"]
    return {
        "run": str(run),
        "data": f"{dataset.name} ({len(dataset.train)} train / {len(dataset.val)} val / {len(y)} test)",
        "model": f"{summary['model']} @ {spec.height}px",
        "auc": m["auc"],
        "ci": (lo, hi),
        "accuracy": m["accuracy"],
        "sensitivity": m["sensitivity"],
        "specificity": m["specificity"],
        "threshold": threshold,
        "fp32_auc": roc_auc(y, p_fp32),
        "val_auc": evaluation["validation"]["int8"]["auc"],
        "train_min": seconds / 60.0,
        "cpus": summary.get("environment", {}).get("cpu_count"),
        "threads": summary.get("environment", {}).get("threads"),
    }


def main() -> int:
    args = parse_args()
    missing = [str(r) for r in args.runs if not (r / EVALUATION_NAME).is_file()]
    if missing:
        print(
            f"not a finished run (no evaluation.json): {', '.join(missing)}; run "
            "'python -m training pipeline --out RUN' first",
            file=sys.stderr,
        )
        return 2
    for run in args.runs:
        r = score(run, args.threads, args.bootstrap)
        lo, hi = r["ci"]  # type: ignore[misc]
        print(f"{r['run']}: {r['model']} on {r['data']}")
        print(
            f"  test INT8  AUC {r['auc']:.4f} (95% CI {lo:.4f}-{hi:.4f})  accuracy {r['accuracy']:.4f}  "
            f"sensitivity {r['sensitivity']:.4f}  specificity {r['specificity']:.4f}  "
            f"at threshold {r['threshold']:.4f} (chosen on validation, val AUC {r['val_auc']:.4f})"
        )
        drop = r["fp32_auc"] - r["auc"]  # type: ignore[operator]
        print(f"  test FP32  AUC {r['fp32_auc']:.4f}  (INT8 - FP32 = {-drop:+.4f}, same tensors)")
        print(
            f"  training   {r['train_min']:.1f} min on {r['threads']} thread(s) of a "
            f"{r['cpus']}-CPU machine (train_summary.json)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
