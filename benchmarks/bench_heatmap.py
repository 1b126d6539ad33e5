"""What the heat-map costs: the bundled INT8 model with and without its ``cam`` output, in one run.

The issue asks for "the extra cost of the heat-map output on inference". The
map is a 1x1 convolution (the classifier's weights) on the last features
the pooling already reads, so it should cost little; this measures it on
this CPU. Both variants are the *same* INT8 graph: the shipped file, and a
copy with the ``cam`` output and the nodes only it needs pruned. Each is run
through the edge's ONNX Runtime backend (the device's session options),
batch 1, on real preprocessed Kermany test images, the two interleaved
round by round so a neighbour's load hits both alike. Then the part after
inference that the reports add per scan: :func:`positive_heat`, the
overlay at 1024 px and its PNG.

With ``--run RUN`` (a training run folder with ``model.fp32.onnx`` and the
calibration images' split) it also quantizes the map's convolution to INT8
(the alternative to keeping it FP32) and compares both maps with the FP32
model's on the bundle's conformance images (normalised as drawn).

Usage (from the repository root):
    python -m benchmarks.bench_heatmap [--rounds 400] [--threads 1] [--run runs/k96]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from edge_runtime.backends.onnx import OnnxRuntimeBackend
from edge_runtime.bundle import default_bundle_path, load_bundle
from edge_runtime.conformance import reference_inputs
from edge_runtime.cpu import cpu_summary
from edge_runtime.decode import decode_file
from edge_runtime.heat import heat_difference
from edge_runtime.preprocess import preprocess
from edge_runtime.reports.heatmap import overlay, png_bytes, positive_heat
from edge_runtime.results import positive_index

REPO = Path(__file__).resolve().parents[1]


def prune_heatmap(src: Path, dst: Path, output: str) -> Path:
    """A copy of ``src`` without ``output`` and the nodes that only it needs."""
    model = onnx.load(str(src))
    graph = model.graph
    keep = [o for o in graph.output if o.name != output]
    del graph.output[:]
    graph.output.extend(keep)
    needed = {o.name for o in keep}
    nodes = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            nodes.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(nodes))
    used = {i for n in graph.node for i in n.input}
    inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return dst


def _percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {
        "p50": round(float(np.percentile(a, 50)), 4),
        "p95": round(float(np.percentile(a, 95)), 4),
        "mean": round(float(a.mean()), 4),
    }


def _images(data: Path, n: int) -> list[Path]:
    root = data / "cxr/kermany_pneumonia_224/test"
    return sorted(root.glob("NORMAL/*.jpeg"))[: n // 2] + sorted(root.glob("PNEUMONIA/*.jpeg"))[: n - n // 2]


def _int8_cam_variant(run: Path, bundle_dir: Path, workdir: Path) -> dict[str, object]:
    """Quantize the map's convolution too; compare both INT8 maps with FP32 on the reference images."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    from training.data.datasets import run_spec
    from training.export.onnx_export import (
        _KEEP_FLOAT_OPS,
        RECIPES,
        _ArrayReader,
        calibration_samples,
        correct_biases,
    )
    from training.run_files import FP32_NAME

    bundle = load_bundle(bundle_dir)
    spec = run_spec(run)
    calibration = calibration_samples(run, spec, 200, 2018)
    graph = onnx.load(str(run / FP32_NAME))
    keep = [n.name for n in graph.graph.node if n.op_type in _KEEP_FLOAT_OPS]
    recipe = RECIPES["u8s8-rr"]
    int8_cam = workdir / "int8_cam.onnx"
    quantize_static(
        str(run / FP32_NAME),
        str(int8_cam),
        _ArrayReader(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=recipe.reduce_range,
        activation_type=recipe.activation,
        weight_type=recipe.weight,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=keep,
    )
    correct_biases(int8_cam, run / FP32_NAME, calibration)
    refs = reference_inputs(bundle)
    assert refs is not None and "cam_reference" in refs
    positive = positive_index(bundle.labels, bundle.positive_label)
    out: dict[str, object] = {}
    for label, path in (
        ("cam conv FP32 (shipped)", bundle.artifact("onnxruntime").path),
        ("cam conv INT8", int8_cam),
    ):
        engine = OnnxRuntimeBackend(threads=1)
        engine.load_model(path, input_name="input", sample_shape=spec.sample_shape, heatmap_name="cam")
        diffs, probs = [], []
        for image, ref in zip(refs["images"], refs["cam_reference"], strict=True):
            x = preprocess(image.astype(np.float32) / np.float32(255.0), spec)[None]
            result = engine.infer_outputs(x)
            assert result.heatmap is not None
            diffs.append(heat_difference(result.heatmap[0], ref, positive))
            probs.append(float(result.scores[0, positive]))
        engine.close()
        out[label] = {
            "heat_vs_fp32_max": round(max(diffs), 4),
            "heat_vs_fp32_mean": round(float(np.mean(diffs)), 4),
            "p_positive_vs_expected_max": round(
                float(np.abs(np.asarray(probs) - refs["expected_onnxruntime"]).max()), 8
            ),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=default_bundle_path())
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--rounds", type=int, default=400, help="timed runs per variant")
    parser.add_argument("--images", type=int, default=20, help="test images cycled through")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (the device default: 1)")
    parser.add_argument("--run", type=Path, default=None, help="training run: also measure an INT8 map")
    args = parser.parse_args()

    bundle = load_bundle(args.bundle)
    name = bundle.manifest.heatmap_output("onnxruntime")
    if name is None:
        raise SystemExit(f"{args.bundle} has no heat-map output for onnxruntime")
    spec = bundle.preprocessing
    artifact = bundle.artifact("onnxruntime")
    samples = [preprocess(decode_file(p).pixels, spec)[None] for p in _images(args.data, args.images)]
    with tempfile.TemporaryDirectory(prefix="bench-heatmap-") as tmp:
        pruned = prune_heatmap(artifact.path, Path(tmp) / "no_cam.onnx", name)
        with_cam = OnnxRuntimeBackend(threads=args.threads)
        with_cam.load_model(
            artifact.path, input_name=bundle.input_name, sample_shape=spec.sample_shape, heatmap_name=name
        )
        without = OnnxRuntimeBackend(threads=args.threads)
        without.load_model(pruned, input_name=bundle.input_name, sample_shape=spec.sample_shape)
        # Same probabilities from both graphs (the map is a side branch).
        for x in samples:
            a, b = with_cam.infer_outputs(x), without.infer_outputs(x)
            assert a.heatmap is not None and b.heatmap is None
            assert np.array_equal(a.scores, b.scores)
        for _ in range(30):  # warm-up
            for engine in (with_cam, without):
                engine.infer_outputs(samples[0])
        times: dict[str, list[float]] = {"with_cam": [], "without_cam": []}
        for i in range(args.rounds):
            x = samples[i % len(samples)]
            order = (("with_cam", with_cam), ("without_cam", without))
            for key, engine in order if i % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                engine.infer_outputs(x)
                times[key].append((time.perf_counter() - t0) * 1000)
        heat_out = with_cam.infer_outputs(samples[-1])
        with_cam.close()
        without.close()
        int8_variant = _int8_cam_variant(args.run, args.bundle, Path(tmp)) if args.run else None

    assert heat_out.heatmap is not None
    heat = positive_heat(heat_out.heatmap[0], bundle.labels, bundle.positive_label)
    image = decode_file(
        args.data
        / "dicom/siim_torchxrayvision"
        / next(p.name for p in (args.data / "dicom/siim_torchxrayvision").glob("*.dcm"))
    ).pixels
    report_ms: list[float] = []
    for _ in range(20):
        t0 = time.perf_counter()
        png_bytes(overlay(image, positive_heat(heat_out.heatmap[0], bundle.labels, bundle.positive_label)))
        report_ms.append((time.perf_counter() - t0) * 1000)

    w, wo = _percentiles(times["with_cam"]), _percentiles(times["without_cam"])
    result = {
        "model": f"{bundle.name} {bundle.version} ({artifact.quantization})",
        "cpu": cpu_summary(),
        "threads": args.threads,
        "batch": 1,
        "rounds": args.rounds,
        "infer_ms_with_cam": w,
        "infer_ms_without_cam": wo,
        "ratio_p50": round(w["p50"] / wo["p50"], 4),
        "ratio_mean": round(w["mean"] / wo["mean"], 4),
        "extra_ms_p50": round(w["p50"] - wo["p50"], 4),
        "heat_grid": list(heat.shape),
        "overlay_png_ms_1024px": _percentiles(report_ms),
        "source_image_shape": list(image.shape),
    }
    if int8_variant is not None:
        result["map_precision"] = int8_variant
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
