"""Accuracy and throughput of the bundled model on the official Kermany test split.

Everything runs through the edge's own code, one image at a time as the
service does: ``load_bundle`` (hash-verified) -> ``decode_file`` ->
``preprocess`` with the manifest's spec -> the ``onnxruntime`` backend on
the INT8 model. Reports AUC with a percentile-bootstrap 95 % CI, and
accuracy, sensitivity and specificity at the manifest's threshold
(PNEUMONIA when p >= threshold) with Wilson 95 % CIs, plus images/s and
per-stage timings, then the issue's targets with PASS/MISS. With ``--fp32``
the FP32 ONNX model of the same run is scored on the same tensors in the
same run, for the INT8-vs-FP32 AUC drop.

The 624 test images were never used to train the model or choose its
threshold, so this is the number to quote.

P(positive) comes from :mod:`training.evaluate.scoring`, the scoring path of training
and its reports: the manifest's positive label and output activation, the
FP32 file loaded by the same ONNX Runtime backend.

Usage: python -m benchmarks.bench_model_accuracy [--data ../shared/data] [--bundle DIR]
       [--fp32 runs/<run>/model.fp32.onnx]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from edge_runtime.bundle import ModelBundle, default_bundle_path, load_bundle
from edge_runtime.decode import decode_file
from edge_runtime.preprocess import preprocess
from training.evaluate.metrics import (
    binary_metrics,
    bootstrap_auc_ci,
    roc_auc,
    sensitivity_at_specificity,
    wilson_interval,
)
from training.evaluate.scoring import OutputHead, bundle_scorer, file_scorer

REPO = Path(__file__).resolve().parents[1]

KERMANY_TEST = Path("cxr/kermany_pneumonia_224/test")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=REPO.parent / "shared" / "data",
        help="shared data folder holding cxr/kermany_pneumonia_224 (default: ../shared/data "
        "relative to the repo root)",
    )
    parser.add_argument(
        "--bundle", type=Path, default=default_bundle_path(), help="model bundle (default: bundled)"
    )
    parser.add_argument(
        "--fp32",
        type=Path,
        default=None,
        help="FP32 ONNX model of the same run (e.g. runs/default/model.fp32.onnx) to score on the "
        "same tensors for the INT8-vs-FP32 AUC drop; the bundle ships only INT8",
    )
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the CI")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    test_dir = args.data / KERMANY_TEST
    if not test_dir.is_dir():
        print(
            f"Kermany test split not found at {test_dir}. It lives in the shared data folder "
            "beside the repository (../shared/data); pass --data to point elsewhere.",
            file=sys.stderr,
        )
        return 2

    bundle = load_bundle(args.bundle)
    spec = bundle.preprocessing
    scorer = bundle_scorer(bundle, threads=args.threads)

    files: list[tuple[Path, int]] = []
    for name in ("NORMAL", "PNEUMONIA"):
        label = 1 if name == bundle.positive_label else 0
        files += [(p, label) for p in sorted((test_dir / name).glob("*.jpeg"))]
    # Warm-up: first-run allocations are not part of steady-state throughput.
    scorer(preprocess(decode_file(files[0][0]).pixels, spec)[None])

    y = np.empty(len(files), dtype=np.int64)
    p = np.empty(len(files), dtype=np.float64)
    samples = []
    t_decode = t_pre = t_infer = 0.0
    start = time.perf_counter()
    for i, (path, label) in enumerate(files):
        t0 = time.perf_counter()
        pixels = decode_file(path).pixels
        t1 = time.perf_counter()
        sample = preprocess(pixels, spec)
        t2 = time.perf_counter()
        samples.append(sample)
        p_positive = scorer(sample[None])[0]
        t3 = time.perf_counter()
        y[i], p[i] = label, p_positive
        t_decode, t_pre, t_infer = t_decode + t1 - t0, t_pre + t2 - t1, t_infer + t3 - t2
    elapsed = time.perf_counter() - start
    scorer.close()

    m = binary_metrics(y, p, bundle.threshold)
    lo, hi = bootstrap_auc_ci(y, p, n_boot=args.bootstrap, seed=0)
    n = len(files)
    print(f"model      {bundle.name} {bundle.version}  ({bundle.artifact('onnxruntime').file})")
    print(f"test set   {test_dir}  n={n} ({m['n_negative']} NORMAL, {m['n_positive']} PNEUMONIA)")
    print(f"AUC        {m['auc']:.4f}  (95% bootstrap CI {lo:.4f}-{hi:.4f}, {args.bootstrap} resamples)")
    print(f"threshold  {bundle.threshold:.4f}  (manifest operating point)")
    n_correct = m["tp"] + m["tn"]
    print(f"accuracy   {m['accuracy']:.4f}  ({_ci(n_correct, n)})")
    tp, tn, n_pos, n_neg = m["tp"], m["tn"], m["n_positive"], m["n_negative"]
    print(f"sensitivity {m['sensitivity']:.4f}  ({tp}/{n_pos}, {_ci(tp, n_pos)})")
    print(f"specificity {m['specificity']:.4f}  ({tn}/{n_neg}, {_ci(tn, n_neg)})")
    print(
        f"throughput {n / elapsed:.1f} images/s end to end, batch 1, {args.threads} thread(s) "
        f"(decode {1000 * t_decode / n:.2f} ms, preprocess {1000 * t_pre / n:.2f} ms, "
        f"infer {1000 * t_infer / n:.2f} ms per image)"
    )
    _targets(args, bundle, y, p, m, np.stack(samples))
    return 0


def _ci(k: int, n: int) -> str:
    lo, hi = wilson_interval(int(k), int(n))
    return f"95% CI {lo:.4f}-{hi:.4f}"


def _targets(
    args: argparse.Namespace, bundle: ModelBundle, y: np.ndarray, p: np.ndarray, m: dict, x: np.ndarray
) -> None:
    """Print the training issue's targets for the INT8 model the edge runs, PASS or MISS."""
    sens_at_90, spec_at = sensitivity_at_specificity(y, p, 0.90)
    size_mb = bundle.artifact("onnxruntime").path.stat().st_size / 1e6
    rows = [
        ("AUC >= 0.975", m["auc"] >= 0.975, f"{m['auc']:.4f}"),
        ("accuracy >= 0.935 at the manifest threshold", m["accuracy"] >= 0.935, f"{m['accuracy']:.4f}"),
        (
            "sensitivity >= 0.95 at specificity >= 0.90 (best ROC point)",
            sens_at_90 >= 0.95,
            f"{sens_at_90:.4f} at specificity {spec_at:.4f}",
        ),
        ("INT8 ONNX <= 5 MB", size_mb <= 5.0, f"{size_mb:.2f} MB"),
    ]
    if args.fp32 is not None:
        # The FP32 twin has no bundle: the same backend loads it with the bundle's input name,
        # preprocessing and head, so only the weights differ.
        head = OutputHead.from_bundle(bundle)
        spec = bundle.preprocessing
        with file_scorer(
            args.fp32, spec, head, args.threads, input_name=bundle.input_name, output_name=None
        ) as scorer:
            p_fp32 = scorer(x)
        auc_fp32 = roc_auc(y, p_fp32)
        drop = auc_fp32 - m["auc"]
        print(f"FP32 AUC   {auc_fp32:.4f}  ({args.fp32}, same tensors); INT8 - FP32 = {-drop:+.4f}")
        rows.append(("INT8 vs FP32 AUC drop <= 0.005", drop <= 0.005, f"{drop:+.4f}"))
    else:
        rows.append(("INT8 vs FP32 AUC drop <= 0.005", None, "not measured (pass --fp32)"))
    print("targets (official Kermany test split):")
    for text, ok, value in rows:
        verdict = "n/a " if ok is None else ("PASS" if ok else "MISS")
        print(f"  {verdict}  {text}: {value}")


if __name__ == "__main__":
    raise SystemExit(main())
