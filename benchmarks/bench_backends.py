"""The bundled model on the official Kermany test split: FP32, ONNX Runtime INT8 and LiteRT INT8.

What a hospital system sees is measured: each INT8 backend is run through
``edge-runtime process`` over all 624 test images and scored from the
**published result messages** (their ``findings[0].probability`` and the
decision at the manifest's operating point). FP32 (the run's
``model.fp32.onnx``, not shipped) is scored in this process on tensors built
by the same decoder and preprocessing. All three in one run, on this CPU:

* AUC with a bootstrap 95 % CI; accuracy, sensitivity, specificity at the
  operating point (Wilson CIs); sensitivity at specificity >= 90 %; ECE (10 bins);
* decision agreement and max |dp| between each pair;
* inference p50/p95 per backend (``timings_ms.infer`` of the messages; FP32 timed here);
* the issue's targets with PASS/MISS, for both INT8 backends and their parity;
* a reliability diagram (``--plot``).

The 624 test images were never used for training, calibration or choosing
the threshold.

Usage (from the repository root):
    python -m benchmarks.bench_backends --fp32 runs/k128/model.fp32.onnx [--plot reliability.png]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edge_runtime.bundle import default_bundle_path, load_bundle
from edge_runtime.cpu import cpu_summary
from edge_runtime.decode import decode_file
from edge_runtime.preprocess import preprocess
from training.evaluate.metrics import (
    binary_metrics,
    bootstrap_auc_ci,
    compare_predictions,
    expected_calibration_error,
    reliability_bins,
    sensitivity_at_specificity,
    wilson_interval,
)

REPO = Path(__file__).resolve().parents[1]
KERMANY_TEST = Path("cxr/kermany_pneumonia_224/test")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=REPO.parent / "shared" / "data", help="shared data folder"
    )
    parser.add_argument("--bundle", type=Path, default=default_bundle_path(), help="model bundle")
    parser.add_argument("--fp32", type=Path, default=None, help="FP32 ONNX model of the bundle's run")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another bundle (e.g. the previous release) whose backends' inference time is measured on "
        "the same images in this run, for the cost ratio",
    )
    parser.add_argument("--plot", type=Path, default=None, help="write a reliability diagram PNG here")
    parser.add_argument("--json", type=Path, default=None, help="write every number as JSON here")
    parser.add_argument("--bootstrap", type=int, default=2000)
    return parser.parse_args()


def run_process(bundle: Path, backend: str, files: list[Path]) -> list[dict]:
    """``edge-runtime process FILES`` with ``backend``: one published result message per file."""
    env = dict(os.environ)
    env.update(
        {
            "EDGE_RUNTIME__MODEL__BACKEND": backend,
            "EDGE_RUNTIME__MODEL__BUNDLE_PATH": str(bundle),
            "EDGE_RUNTIME__MODEL__THREADS": "1",
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "edge_runtime.cli", "process", *map(str, files)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    messages = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or len(messages) != len(files):
        raise SystemExit(f"edge-runtime process ({backend}) failed: {done.stderr[-3000:]}")
    return messages


def fp32_predictions(model: Path, files: list[Path], bundle_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    bundle = load_bundle(bundle_dir)
    spec = bundle.preprocessing
    positive = bundle.labels.index(bundle.positive_label)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    p, times = [], []
    for path in files:
        x = preprocess(decode_file(path).pixels, spec)[None]
        t0 = time.perf_counter()
        out = session.run(None, {name: x})[0]
        times.append((time.perf_counter() - t0) * 1000)
        p.append(float(out[0, positive]))
    return np.asarray(p), np.asarray(times[5:])


def describe(name: str, y: np.ndarray, p: np.ndarray, threshold: float, n_boot: int) -> dict:
    m = binary_metrics(y, p, threshold)
    lo, hi = bootstrap_auc_ci(y, p, n_boot=n_boot, seed=0)
    sens90, spec90 = sensitivity_at_specificity(y, p, 0.90)
    return {
        "model": name,
        **{k: m[k] for k in ("auc", "accuracy", "sensitivity", "specificity", "tp", "tn", "fp", "fn")},
        "auc_ci95": [lo, hi],
        "accuracy_ci95": list(wilson_interval(int(m["tp"] + m["tn"]), len(y))),
        "sensitivity_at_spec90": sens90,
        "spec_at_that_point": spec90,
        "ece_10": expected_calibration_error(y, p, 10),
        "outputs_at_least_0.999999": int((p >= 0.999999).sum()),
        "distinct_values": int(np.unique(p).size),
    }


def plot(path: Path, y: np.ndarray, models: dict[str, np.ndarray], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for name, p in models.items():
        bins = reliability_bins(y, p, 10)
        filled = bins["count"] > 0
        ece = expected_calibration_error(y, p, 10)
        ax.plot(
            bins["mean_predicted"][filled],
            bins["observed_rate"][filled],
            marker="o",
            label=f"{name} (ECE {ece:.3f})",
        )
    ax.set_xlabel("predicted P(pneumonia), 10 bins")
    ax.set_ylabel("observed fraction with pneumonia")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    args = parse_args()
    test_dir = args.data / KERMANY_TEST
    if not test_dir.is_dir():
        print(f"Kermany test split not found at {test_dir}; pass --data", file=sys.stderr)
        return 2
    bundle = load_bundle(args.bundle)
    threshold = bundle.threshold
    files: list[Path] = []
    labels: list[int] = []
    for name in ("NORMAL", "PNEUMONIA"):
        found = sorted((test_dir / name).glob("*.jpeg"))
        files += found
        labels += [int(name == bundle.positive_label)] * len(found)
    y = np.asarray(labels)
    cpu = cpu_summary()
    print(
        f"CPU: {cpu['model']} ({cpu['machine']}); INT8 features: {', '.join(cpu['int8_features'])}; "
        f"u8 x s8 dot: {cpu['int8_dot']}"
    )
    print(
        f"model {bundle.name} {bundle.version}; operating point {threshold:.6f}; test n={len(y)} "
        f"({int((y == 0).sum())} NORMAL, {int(y.sum())} PNEUMONIA)"
    )

    predictions: dict[str, np.ndarray] = {}
    latency: dict[str, np.ndarray] = {}
    decisions: dict[str, np.ndarray] = {}
    if args.fp32 is not None:
        predictions["FP32"], latency["FP32"] = fp32_predictions(args.fp32, files, args.bundle)
        decisions["FP32"] = predictions["FP32"] >= threshold
    backends = bundle.backends
    for backend in backends:
        t0 = time.monotonic()
        messages = run_process(args.bundle, backend, files)
        label = {"onnxruntime": "ORT INT8", "litert": "LiteRT INT8"}.get(backend, backend)
        predictions[label] = np.asarray([m["findings"][0]["probability"] for m in messages])
        # A scan outside the intended use gets no decision (issue 26): the model's answer at the
        # operating point is still what its probability says, and is what is compared here.
        decisions[label] = predictions[label] >= threshold
        published = [m["decision"]["positive"] for m in messages if m["decision"] is not None]
        assert published == list(decisions[label][[m["decision"] is not None for m in messages]])
        latency[label] = np.asarray([m["timings_ms"]["infer"] for m in messages][5:])
        print(
            f"  {label}: {len(messages)} messages from edge-runtime process in {time.monotonic() - t0:.0f} s"
        )

    if args.baseline is not None:
        old = load_bundle(args.baseline)
        for backend in old.backends:
            messages = run_process(args.baseline, backend, files)
            latency[f"{old.version} {backend}"] = np.asarray([m["timings_ms"]["infer"] for m in messages][5:])
    rows = {name: describe(name, y, p, threshold, args.bootstrap) for name, p in predictions.items()}
    print(
        f"\n{'model':12s} {'AUC [95% CI]':24s} {'acc':>6s} {'sens':>6s} {'spec':>6s} "
        f"{'sens@spec90':>11s} {'ECE10':>6s} {'>=.999999':>9s} {'infer p50/p95 ms':>16s}"
    )
    for name, r in rows.items():
        lat = latency[name]
        print(
            f"{name:12s} {r['auc']:.4f} [{r['auc_ci95'][0]:.3f}, {r['auc_ci95'][1]:.3f}]   "
            f"{r['accuracy']:6.2%} {r['sensitivity']:6.2%} {r['specificity']:6.2%} "
            f"{r['sensitivity_at_spec90']:11.2%} {r['ece_10']:6.3f} {r['outputs_at_least_0.999999']:9d} "
            f"{np.percentile(lat, 50):7.2f}/{np.percentile(lat, 95):.2f}"
        )
    for name, lat in latency.items():
        if name not in rows:  # a baseline bundle: only its cost is compared
            ours = latency.get("ORT INT8" if "onnx" in name else "LiteRT INT8")
            ratio = (
                f", {np.percentile(lat, 50) / np.percentile(ours, 50):.1f}x this bundle's"
                if ours is not None
                else ""
            )
            p50, p95 = np.percentile(lat, 50), np.percentile(lat, 95)
            print(f"{name:12s} infer p50/p95 {p50:.2f}/{p95:.2f} ms{ratio}")
    names = list(predictions)
    pairs = {}
    print("\npair                       decision agreement   max |dp|   mean |dp|")
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            c = compare_predictions(predictions[a], predictions[b], threshold)
            pairs[f"{a} vs {b}"] = c
            print(
                f"{a + ' vs ' + b:26s} {c['decision_agreement']:18.2%}   {c['max_abs_diff']:8.4f}   "
                f"{c['mean_abs_diff']:.5f}"
            )
    for name in names:
        if name in decisions and not np.array_equal(decisions[name], predictions[name] >= threshold):
            print(f"warning: {name}: published decisions differ from probability >= threshold")

    print("\ntargets (official Kermany test split, published results):")
    checks: list[tuple[str, bool, str]] = []
    for name in ("ORT INT8", "LiteRT INT8"):
        if name not in rows:
            continue
        r = rows[name]
        checks += [
            (f"{name}: AUC >= 0.975", r["auc"] >= 0.975, f"{r['auc']:.4f}"),
            (
                f"{name}: accuracy >= 93.5 % at the operating point",
                r["accuracy"] >= 0.935,
                f"{r['accuracy']:.2%}",
            ),
            (
                f"{name}: sensitivity >= 95 % at specificity >= 90 %",
                r["sensitivity_at_spec90"] >= 0.95,
                f"{r['sensitivity_at_spec90']:.2%} at {r['spec_at_that_point']:.2%}",
            ),
        ]
    if "ORT INT8 vs LiteRT INT8" in pairs:
        agree = pairs["ORT INT8 vs LiteRT INT8"]["decision_agreement"]
        gap = abs(rows["ORT INT8"]["auc"] - rows["LiteRT INT8"]["auc"])
        checks += [
            ("backend parity: same decision on >= 99.5 % of test images", agree >= 0.995, f"{agree:.2%}"),
            ("backend parity: |AUC difference| <= 0.005", gap <= 0.005, f"{gap:.4f}"),
        ]
    for text, ok, value in checks:
        print(f"  {'PASS' if ok else 'MISS'}  {text}: {value}")
    if args.plot:
        plot(args.plot, y, predictions, f"{bundle.name} {bundle.version}, Kermany test (n={len(y)})")
        print(f"reliability diagram: {args.plot}")
    if args.json:
        latency_stats = {
            k: {"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95))}
            for k, v in latency.items()
        }
        args.json.write_text(
            json.dumps({"cpu": cpu, "models": rows, "pairs": pairs, "latency_ms": latency_stats}, indent=2)
            + "\n",
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
