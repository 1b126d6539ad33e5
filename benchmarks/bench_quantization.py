"""Which INT8 recipe gives the same answer on every CPU? Every candidate, measured in one run.

For one training run (its ``model.fp32.onnx`` and ``split.json``), each recipe
of :data:`training.export.onnx_export.RECIPES` is quantized with the same calibration
images and then measured three ways:

* **INT8 vs FP32 on this CPU**, on the whole validation split: AUC, decision
  agreement at 0.5 and at the run's operating point (when ``evaluation.json``
  has one), max and mean |dp|;
* **this CPU vs an emulated AVX2-only CPU** (QEMU ``EPYC-Milan``: AMD Zen 3,
  no AVX-512, no VNNI; see :mod:`training.export.emulation`), the same INT8 model
  on the first ``--emulate`` validation images: max |dp| and decisions. On a
  VNNI machine this is the difference between the two kinds of box in the
  fleet;
* size and single-image latency p50 on this CPU.

The CPU's INT8 instruction-set flags are printed with the table.

Usage (from the repository root):
    python -m benchmarks.bench_quantization --run runs/k128 [--recipes u8s8-rr,s8s8] [--emulate 48]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_runtime.cpu import cpu_summary
from training.data.datasets import run_spec
from training.evaluate.metrics import compare_predictions, roc_auc
from training.export.emulation import AVX2_ONLY_CPU, emulator, predict_emulated
from training.export.onnx_export import (
    FP32_NAME,
    RECIPES,
    calibration_samples,
    ort_session,
    predict_onnx,
    quantize_int8,
    val_tensors,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="training run folder with model.fp32.onnx")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipes (default: all)")
    parser.add_argument("--calibration-images", type=int, default=200)
    parser.add_argument(
        "--emulate", type=int, default=48, help="validation images to run on the emulated AVX2 CPU (0: skip)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    return parser.parse_args()


def latency_ms(path: Path, sample: np.ndarray, repeats: int = 30) -> float:
    session = ort_session(path, threads=1)
    for _ in range(3):
        predict_onnx(session, sample)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predict_onnx(session, sample)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def main() -> int:
    args = parse_args()
    run = args.run
    spec = run_spec(run)
    threshold = None
    evaluation = run / "evaluation.json"
    if evaluation.is_file():
        threshold = json.loads(evaluation.read_text(encoding="utf-8")).get("threshold")
    cpu = cpu_summary()
    print(
        f"CPU: {cpu['model']} ({cpu['machine']}); INT8 features: {', '.join(cpu['int8_features'])}; "
        f"u8 x s8 dot: {cpu['int8_dot']}"
    )
    y, val_x = val_tensors(run, spec)
    calibration = calibration_samples(run, spec, args.calibration_images)
    fp32 = run / FP32_NAME
    p_fp32 = predict_onnx(ort_session(fp32, 2), val_x)[:, 1]
    can_emulate = args.emulate > 0 and emulator() is not None
    if args.emulate > 0 and not can_emulate:
        print("no qemu-x86_64 (apt-get install qemu-user) or not x86-64: cross-CPU columns skipped")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes.split(","):
            path = quantize_int8(fp32, Path(tmp) / f"{name}.onnx", calibration, name)
            p_int8 = predict_onnx(ort_session(path, 2), val_x)[:, 1]
            row: dict[str, object] = {
                "recipe": name,
                "size_mb": path.stat().st_size / 1e6,
                "val_auc_int8": roc_auc(y, p_int8),
                "vs_fp32_0.5": compare_predictions(p_fp32, p_int8, 0.5),
                "latency_ms_p50": latency_ms(path, val_x[:1]),
            }
            if threshold is not None:
                row["vs_fp32_op"] = compare_predictions(p_fp32, p_int8, float(threshold))
            if can_emulate:
                subset = val_x[: args.emulate]
                t0 = time.monotonic()
                p_emu = predict_emulated(path, subset)[:, 1]
                row["vs_emulated_avx2"] = compare_predictions(p_int8[: len(subset)], p_emu, 0.5)
                row["emulation_s"] = time.monotonic() - t0
            rows.append(row)
            print(f"  {name}: done", flush=True)
    print(
        f"\nrun {run}, validation n={y.size}, FP32 val AUC {roc_auc(y, p_fp32):.4f}"
        + (f", operating point {threshold:.4f}" if threshold is not None else "")
    )
    header = (
        f"{'recipe':9s} {'MB':>5s} {'val AUC':>8s} {'agree@0.5':>9s} {'agree@op':>8s} "
        f"{'max|dp| vs FP32':>15s} {'mean|dp|':>8s} {'max|dp| AVX2-emu':>16s} {'flips AVX2':>10s} "
        f"{'ms p50':>6s}"
    )
    print(header)
    for row in rows:
        v = row["vs_fp32_0.5"]
        op = row.get("vs_fp32_op")
        emu = row.get("vs_emulated_avx2")
        print(
            f"{row['recipe']:9s} {row['size_mb']:5.2f} {row['val_auc_int8']:8.4f} "
            f"{v['decision_agreement']:9.2%} "  # type: ignore[index]
            f"{(op['decision_agreement'] if op else float('nan')):8.2%} "  # type: ignore[index]
            f"{v['max_abs_diff']:15.4f} {v['mean_abs_diff']:8.4f} "  # type: ignore[index]
            f"{(emu['max_abs_diff'] if emu else float('nan')):16.2e} "  # type: ignore[index]
            f"{(emu['decisions_differing'] if emu else -1):10d} "  # type: ignore[index]
            f"{row['latency_ms_p50']:6.2f}"
        )
    if can_emulate:
        print(f"(AVX2-emu: the same INT8 model on QEMU {AVX2_ONLY_CPU}, first {args.emulate} val images)")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
