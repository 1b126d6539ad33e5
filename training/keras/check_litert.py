"""The Keras route's INT8 LiteRT file through the edge's own LiteRT backend (MAIN environment).

``python -m training export --framework keras`` runs this after
:mod:`training.keras.export_tflite` (``.venv-keras``). It loads ``model.int8.keras.tflite`` with
:class:`edge_runtime.backends.litert.LiteRtBackend` (ai-edge-litert) from a scratch, UNSIGNED bundle
whose manifest describes the file (the shipped manifest with the run's labels and preprocessing
spec, one ``litert`` artifact with the heat-map and features outputs; never written beside the run,
loaded with a trust that accepts no signature), decodes and preprocesses the run's validation files
with the edge's own code (NCHW float32, the batch the runtime feeds) and compares:

* the backend's probabilities with the ``.venv-keras`` interpreter's on the same file (the same
  INT8 kernels: they should agree to float rounding) and with the Keras FP32 model;
* its heat-map (``[N, classes, h, w]``, transposed back by the backend) and features
  (``[N, 448]``) with the ``.venv-keras`` interpreter's;
* the inputs: the runtime's preprocessing here against ``keras-inputs.npz`` (bit for bit).

The command does not emulate other CPUs. ``tests/test_keras_export.py`` also runs the backend under
QEMU's AVX2-only ``EPYC-Milan`` (``training/export/emulation.py``; the PyTorch route's emulated checks
are ONNX Runtime's only): identical outputs to this AVX-512 VNNI machine's, measured.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.backends.litert import LiteRtBackend
from edge_runtime.bundle import default_bundle_path, load_bundle, write_manifest
from edge_runtime.decode import decode_file
from edge_runtime.preprocess import PreprocessSpec, preprocess
from edge_runtime.signing import BundleTrust

from ..run_files import (
    KERAS_INPUTS_NAME,
    KERAS_TFLITE_NAME,
    KERAS_TFLITE_SUMMARY,
    KERAS_TFLITE_VAL,
    SPLIT_NAME,
)
from .inputs import read_inputs

__all__ = ["check_litert", "scratch_manifest"]


def scratch_manifest(summary: dict[str, Any], spec: PreprocessSpec, file_name: str) -> dict[str, Any]:
    """The shipped manifest rewritten to describe the Keras file: labels, spec, outputs, one artifact.

    What belongs to the shipped model only (its file hashes, conformance reference set and
    out-of-distribution statistics) is left out; the rest is a placeholder for this check.
    """
    shipped = json.loads((default_bundle_path() / "manifest.json").read_text(encoding="utf-8"))
    manifest = {
        k: v for k, v in shipped.items() if k not in ("files", "created_utc", "conformance", "format")
    }
    classes = list(summary["classes"])
    manifest["labels"] = classes
    manifest["positive_label"] = classes[-1]
    manifest["preprocessing"] = spec.to_dict()
    shape = ["batch", *spec.sample_shape]
    manifest["input"] = {**manifest["input"], "shape": shape, "layout": spec.layout}
    manifest["output"] = {"activation": "none", **summary["output"]}
    manifest["artifacts"] = [
        {
            "file": file_name,
            "backend": "litert",
            "quantization": summary["quantization"],
            "heatmap": True,
            "features": True,
        }
    ]
    manifest["intended_use"] = {k: v for k, v in manifest["intended_use"].items() if k != "ood"}
    return manifest


def check_litert(run: str | Path, data: str | Path | None = None, threads: int = 1) -> dict[str, Any]:
    """Run the file through ``LiteRtBackend`` on the run's validation images; returns the comparison."""
    run = Path(run)
    summary = json.loads((run / KERAS_TFLITE_SUMMARY).read_text(encoding="utf-8"))
    split = json.loads((run / SPLIT_NAME).read_text(encoding="utf-8"))
    spec = PreprocessSpec.from_dict(split["spec"])
    root = Path(data) if data is not None else Path(split["data_root"])
    with np.load(run / KERAS_TFLITE_VAL, allow_pickle=False) as saved:
        val = {name: saved[name] for name in saved.files}
    ids = [str(i) for i in val["val_ids"]]
    if ids != [str(i) for i in split["val"]]:
        raise ValueError(f"{run / KERAS_TFLITE_VAL} is not of this run's validation split; export again")
    batch = np.stack([preprocess(decode_file(root / i).pixels, spec) for i in ids])  # as the runtime feeds
    inputs = read_inputs(run / KERAS_INPUTS_NAME).samples("val", 0)
    layout_nhwc = batch.transpose(0, 2, 3, 1) if spec.layout == "NCHW" else batch

    with tempfile.TemporaryDirectory(prefix="keras-litert-") as tmp:
        bundle_dir = Path(tmp)
        (bundle_dir / KERAS_TFLITE_NAME).write_bytes((run / KERAS_TFLITE_NAME).read_bytes())
        write_manifest(bundle_dir, scratch_manifest(summary, spec, KERAS_TFLITE_NAME))
        bundle = load_bundle(bundle_dir, trust=BundleTrust(require_signature=False))
        backend = LiteRtBackend(threads=threads)
        backend.load(bundle)
        try:
            out = backend.infer_outputs(batch)
        finally:
            backend.close()
    assert out.heatmap is not None and out.features is not None  # the manifest names both
    positive = len(summary["classes"]) - 1
    p_edge = out.scores[:, positive].astype(np.float64)
    cam_keras_venv = val["int8_cam"].transpose(0, 3, 1, 2)  # NHWC file output -> the backend's N, K, h, w

    def max_abs(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())

    return {
        "backend": "edge_runtime.backends.litert.LiteRtBackend (ai-edge-litert)",
        "images": len(ids),
        "input_fed": {
            "shape": [int(d) for d in batch.shape],
            "dtype": str(batch.dtype),
            "layout": spec.layout,
        },
        "inputs_identical_to_keras_inputs": bool(np.array_equal(layout_nhwc, inputs)),
        "scores_shape": [int(d) for d in out.scores.shape],
        "heatmap_shape": [int(d) for d in out.heatmap.shape],
        "features_shape": [int(d) for d in out.features.shape],
        "probabilities_vs_keras_venv_interpreter_max_abs": max_abs(out.scores, val["int8_probabilities"]),
        "heatmap_vs_keras_venv_interpreter_max_abs": max_abs(out.heatmap, cam_keras_venv),
        "features_vs_keras_venv_interpreter_max_abs": max_abs(out.features, val["int8_features"]),
        "p_positive_vs_keras_fp32": {
            "max_abs_diff": max_abs(p_edge, val["fp32_probabilities"][:, positive]),
            "mean_abs_diff": float(np.abs(p_edge - val["fp32_probabilities"][:, positive]).mean()),
        },
    }
