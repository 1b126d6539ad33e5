"""Backends run real models: the tiny ONNX graph, and a real INT8 TFLite model on LiteRT."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import sign_bundle

from edge_runtime.backends import create_backend
from edge_runtime.bundle import load_bundle, write_manifest
from edge_runtime.preprocess import PreprocessSpec


def test_onnx_backend_batches_and_outputs_probabilities(tiny_bundle: Path):
    backend = create_backend("onnxruntime")
    backend.load(load_bundle(tiny_bundle))
    dark = np.full((1, 3, 64, 64), -1.0, dtype=np.float32)
    bright = np.full((1, 3, 64, 64), 1.0, dtype=np.float32)
    out = backend.infer(np.concatenate([dark, bright]))
    assert out.shape == (2, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)
    assert out[0, 1] < 0.5 < out[1, 1]
    backend.close()


def test_litert_backend_runs_a_real_int8_model(shared_data: Path, tmp_path: Path):
    """Coral's uint8 MobileNet v2 classifies the standard cat picture through our backend."""
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert not installed")
    coral = shared_data / "weights/tflite_coral"
    bundle_dir = tmp_path / "mobilenet"
    bundle_dir.mkdir()
    (bundle_dir / "model.tflite").write_bytes((coral / "mobilenet_v2_1.0_224_quant.tflite").read_bytes())
    labels = (coral / "imagenet_labels.txt").read_text().splitlines()
    spec = PreprocessSpec(mean=(0.5,), std=(0.5,), layout="NHWC", quantize_8bit=False)
    write_manifest(
        bundle_dir,
        {
            "name": "coral-mobilenet-v2",
            "version": "1",
            "labels": labels,
            "positive_label": "Egyptian cat",
            "artifacts": [{"file": "model.tflite", "backend": "litert", "quantization": "uint8"}],
            "input": {"name": "input", "shape": ["batch", 224, 224, 3], "dtype": "float32", "layout": "NHWC"},
            "output": {"name": "output", "activation": "none"},
            "preprocessing": spec.to_dict(),
            "operating_point": {"threshold": 0.5, "method": "n/a"},
        },
    )
    sign_bundle(bundle_dir)
    backend = create_backend("litert", threads=1)
    backend.load(load_bundle(bundle_dir))
    bgr = cv2.imread(str(coral / "cat.bmp"))
    rgb = cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (224, 224), interpolation=cv2.INTER_AREA)
    batch = ((rgb.astype(np.float32) / 255.0 - 0.5) / 0.5)[None]
    scores = backend.infer(batch)
    assert scores.shape == (1, 1001)
    assert labels[int(np.argmax(scores[0]))] == "Egyptian cat"
    # Batch of two (the interpreter is resized) gives the same answer twice.
    scores2 = backend.infer(np.concatenate([batch, batch]))
    assert scores2.shape == (2, 1001)
    np.testing.assert_allclose(scores2[0], scores[0], atol=1e-6)
