"""The two training routes side by side: the PyTorch bundle and the Keras bundle on the same test split.

Issue 29's parity measurement. Both bundles (``edge_runtime/models/pneumonia-cxr``, trained with
PyTorch, and ``edge_runtime/models/pneumonia-cxr-keras``, trained with TensorFlow/Keras, same data,
split, seed, size and options) are run through ``edge-runtime process`` over all 624 images of the
official Kermany test split, on each backend they ship (ONNX Runtime and LiteRT), and scored from
the **published result messages** at each manifest's own operating point (the same rule: the highest
threshold with validation sensitivity >= 0.95). All in one run, on this CPU:

* AUC with a bootstrap 95 % CI, accuracy, sensitivity, specificity, ECE (10 bins), per bundle and
  backend, on all 624 images from the published probabilities (a scan outside the intended use is
  published without a decision; its share is reported, and the decision its probability implies is
  checked against every published one);
* the Keras minus PyTorch AUC difference per backend with a paired bootstrap 95 % CI (same images
  resampled for both) against the issue's goal (within 0.01);
* decision agreement between the routes at their operating points;
* ``--time-epochs``: one short training run per framework on this machine (same data, size, cut and
  views; 2 stage-2 epochs) and its seconds per stage-2 epoch, so both are timed on the same CPU.

The test images were never used for training, calibration or choosing either threshold.

Usage (from the repository root):
    python -m benchmarks.bench_routes [--time-epochs] [--json routes.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_backends import KERMANY_TEST, describe, run_process
from edge_runtime.bundle import default_bundle_path, load_bundle
from edge_runtime.cpu import cpu_summary
from training.evaluate.metrics import compare_predictions, roc_auc

REPO = Path(__file__).resolve().parents[1]
KERAS_BUNDLE = REPO / "edge_runtime" / "models" / "pneumonia-cxr-keras"
WEIGHTS = REPO.parent / "shared" / "data" / "weights" / "efficientnet-lite0-57934424.pth"
GOAL_AUC_GAP = 0.01


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=REPO.parent / "shared" / "data", help="shared data folder"
    )
    parser.add_argument("--pytorch", type=Path, default=default_bundle_path(), help="PyTorch-route bundle")
    parser.add_argument("--keras", type=Path, default=KERAS_BUNDLE, help="Keras-route bundle")
    parser.add_argument(
        "--time-epochs",
        action="store_true",
        help="also train each framework for 2 stage-2 epochs here (about 5 min) and report s/epoch",
    )
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--json", type=Path, default=None, help="write every number as JSON here")
    return parser.parse_args()


def paired_auc_gap(y: np.ndarray, a: np.ndarray, b: np.ndarray, n_boot: int) -> tuple[float, float, float]:
    """AUC(a) - AUC(b) on the same images, with a paired bootstrap 95 % CI."""
    rng = np.random.default_rng(0)
    gaps = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(y[idx])) < 2:
            continue
        gaps.append(roc_auc(y[idx], a[idx]) - roc_auc(y[idx], b[idx]))
    lo, hi = np.quantile(gaps, [0.025, 0.975])
    return roc_auc(y, a) - roc_auc(y, b), float(lo), float(hi)


def time_epochs(data: Path) -> dict[str, Any]:
    """Seconds per stage-2 epoch of each framework on this machine (2 epochs, the bundles' options)."""
    common = [
        *("--data", str(data / "cxr" / "kermany_pneumonia_224"), "--size", "128", "--cut", "4"),
        *("--aug-views", "2", "--epochs", "2", "--patience", "2", "--head-epochs", "2", "--threads", "2"),
        *("--weights", str(WEIGHTS)),
    ]
    out: dict[str, Any] = {}
    for framework in ("torch", "keras"):
        with tempfile.TemporaryDirectory(prefix=f"routes-{framework}-") as tmp:
            t0 = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-m", "training", "train", "--framework", framework, "--out", tmp, *common],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise SystemExit(f"training with {framework} failed: {done.stderr[-3000:]}")
            summary = json.loads((Path(tmp) / "train_summary.json").read_text(encoding="utf-8"))
            seconds = [h["seconds"] for h in summary["stage2"]["history"]]
            out[framework] = {
                "stage2_epoch_seconds": seconds,
                "wall_seconds": time.monotonic() - t0,
                "threads": 2,
            }
    return out


def main() -> int:
    args = parse_args()
    test_root = args.data / KERMANY_TEST
    if not test_root.is_dir():
        print(f"skipped: {test_root} not found (the shared data folder)", file=sys.stderr)
        return 2
    if not (args.keras / "manifest.json").is_file():
        print(f"skipped: no Keras bundle at {args.keras}", file=sys.stderr)
        return 2
    files = sorted(p for p in test_root.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    y = np.array([1 if p.parent.name == "PNEUMONIA" else 0 for p in files])
    cpu = cpu_summary()
    print(f"CPU: {cpu['model']}; INT8 features: {', '.join(cpu['int8_features'])}; {len(files)} test images")
    results: dict[str, Any] = {"cpu": cpu, "images": len(files), "bundles": {}}
    probabilities: dict[tuple[str, str], np.ndarray] = {}
    decisions: dict[tuple[str, str], np.ndarray] = {}
    rows = []
    for route, path in (("pytorch", args.pytorch), ("keras", args.keras)):
        bundle = load_bundle(path)
        results["bundles"][route] = {"name": bundle.name, "version": bundle.version, "backends": {}}
        for backend in bundle.backends:
            t0 = time.monotonic()
            messages = run_process(path, backend, files)
            p = np.array([m["findings"][0]["probability"] for m in messages])
            positive = p >= bundle.threshold  # the answer; published only within the intended use
            outside = np.array([not m["intended_use"]["within"] for m in messages])
            given = [m["decision"] is not None for m in messages]
            if given != list(~outside) or any(
                m["decision"]["positive"] != bool(pos)
                for m, pos in zip(messages, positive, strict=True)
                if m["decision"]
            ):
                raise SystemExit(f"{route} {backend}: published decisions do not follow the threshold")
            metrics = describe(f"{route} {backend}", y, p, bundle.threshold, args.bootstrap)
            metrics["seconds"] = time.monotonic() - t0
            metrics["infer_ms_p50"] = float(np.median([m["timings_ms"]["infer"] for m in messages]))
            metrics["outside_intended_use"] = float(outside.mean())
            results["bundles"][route]["backends"][backend] = metrics
            probabilities[(route, backend)] = p
            decisions[(route, backend)] = positive
            rows.append((route, backend, bundle, metrics))
    print()
    print(
        "| route | backend | bundle | threshold | AUC [95 % CI] | accuracy | sens. | spec. | ECE | outside |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for route, backend, bundle, m in rows:
        print(
            f"| {route} | {backend} | {bundle.name} {bundle.version} | {bundle.threshold:.4f} | "
            f"{m['auc']:.4f} [{m['auc_ci95'][0]:.4f}, {m['auc_ci95'][1]:.4f}] | {m['accuracy']:.2%} | "
            f"{m['sensitivity']:.2%} | {m['specificity']:.2%} | {m['ece_10']:.4f} | "
            f"{m['outside_intended_use']:.1%} |"
        )
    print()
    results["parity"] = {}
    for backend in ("onnxruntime", "litert"):
        if ("pytorch", backend) not in probabilities or ("keras", backend) not in probabilities:
            continue
        gap, lo, hi = paired_auc_gap(
            y, probabilities[("keras", backend)], probabilities[("pytorch", backend)], args.bootstrap
        )
        agree = float((decisions[("keras", backend)] == decisions[("pytorch", backend)]).mean())
        within = abs(gap) <= GOAL_AUC_GAP
        results["parity"][backend] = {
            "auc_keras_minus_pytorch": gap,
            "ci95": [lo, hi],
            "decision_agreement": agree,
            "p_agreement": compare_predictions(
                probabilities[("pytorch", backend)], probabilities[("keras", backend)], 0.5
            ),
            "goal_within": GOAL_AUC_GAP,
            "met": within,
        }
        print(
            f"{backend}: AUC Keras - PyTorch {gap:+.4f} (paired 95 % CI {lo:+.4f} to {hi:+.4f}); goal "
            f"|gap| <= {GOAL_AUC_GAP}: {'MET' if within else 'MISSED'}; same decision at each route's "
            f"operating point on {agree:.2%} of images"
        )
    if args.time_epochs:
        print("\ntiming one short training run per framework on this machine ...", flush=True)
        timing = time_epochs(args.data)
        results["epochs"] = timing
        for framework, t in timing.items():
            per = ", ".join(f"{s:.1f}" for s in t["stage2_epoch_seconds"])
            print(f"{framework}: stage-2 epochs {per} s (2 threads); whole run {t['wall_seconds']:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=float) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
