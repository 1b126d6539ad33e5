"""The Keras route to a bundle: ``export --framework keras``, then the PyTorch route's own later stages.

The session's tiny Keras run, exported (``conftest.tiny_keras_export``: 16 training and 8 validation
Kermany images at 64 px), is copied and taken through ``quantize`` (ONNX Runtime, ``u8s8-rr``),
``ood``, ``evaluate`` and ``package --signing-key``, by the real commands. The bundle must be the
PyTorch route's kind of bundle: two backends (ONNX Runtime from the tf2onnx graph, LiteRT from
TensorFlow's converter) with heat-map and features outputs, out-of-distribution statistics per
backend, a conformance reference set that both backends pass here, signed, named for its route,
with a model card that says how to reproduce it with Keras.

``slow``; skips without ``.venv-keras``, ``../shared/data``, torch or ai-edge-litert, unless
``EDGE_RUNTIME_TESTS_REQUIRE_KERAS=1``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import TEST_PUBLIC_KEY, TEST_SIGNING_KEY, TINY_KERAS_SIZE, training_cli

SIZE = TINY_KERAS_SIZE
#: The tf2onnx graph against the Keras FP32 model (training/keras/handoff.py refuses above 1e-3).
#: Measured on a 128 px run: probabilities 5.5e-6, heat-map 5.1e-5, features 7.6e-5.
ONNX_ATOL = 1e-3


@pytest.fixture(scope="module")
def packaged(tiny_keras_export: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("keras-bundle") / "run"
    shutil.copytree(tiny_keras_export[0], folder)
    bundle = folder.parent / "bundle"
    outputs = {}
    for stage in (
        ("quantize", "--calibration-images", "16"),
        ("ood",),
        ("evaluate",),
        ("package", "--bundle", str(bundle), "--version", "0.0.1", "--signing-key", str(TEST_SIGNING_KEY)),
    ):
        done = training_cli(*stage, "--out", str(folder))
        assert done.returncode == 0, f"{stage[0]}: " + done.stdout[-3000:] + done.stderr[-3000:]
        outputs[stage[0]] = done.stdout + done.stderr
    return {"run": folder, "bundle": bundle, "output": outputs}


@pytest.mark.slow
def test_the_export_hands_the_shared_stages_their_files(packaged: dict) -> None:
    import onnx

    run = packaged["run"]
    summary = json.loads((run / "export_summary.json").read_text(encoding="utf-8"))
    assert summary["framework"] == "keras" and summary["opset"] == 17
    assert max(summary["fp32_onnx_vs_keras_max_abs"].values()) < ONNX_ATOL
    assert summary["features"]["dims"] == [24, 40, 80, 112, 192]
    keras_summary = json.loads((run / "keras_train_summary.json").read_text(encoding="utf-8"))
    calibration = json.loads((run / "calibration.json").read_text(encoding="utf-8"))
    assert calibration["temperature"] == keras_summary["calibration"]["temperature"] == summary["temperature"]
    assert not (run / "model.fp32.raw.onnx").exists()  # finished into model.fp32.onnx
    # The PyTorch exporter's graph contract, and the same clean ops after finish_fp32_graph.
    graph = onnx.load(str(run / "model.fp32.onnx")).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert graph.input[0].name == "input" and dims == ["batch", 3, SIZE, SIZE]
    assert [o.name for o in graph.output] == ["probabilities", "cam", "features"]
    ops = {n.op_type for n in graph.node}
    assert ops == {"Conv", "Clip", "Add", "GlobalAveragePool", "Squeeze", "Gemm", "Softmax", "Concat"}
    with np.load(run / "val_predictions.npz") as saved:
        assert sorted(saved.files) == ["fp32", "int8", "keras", "y"]
        np.testing.assert_allclose(saved["fp32"], saved["keras"], atol=ONNX_ATOL)
    train = json.loads((run / "train_summary.json").read_text(encoding="utf-8"))
    assert train["framework"] == "keras" and train["config"]["framework"] == "keras"
    assert train["data"]["train"]["images"] == 16 and train["data"]["val"]["images"] == 8
    evaluation = json.loads((run / "evaluation.json").read_text(encoding="utf-8"))
    assert set(evaluation["validation_agreement"]) == {"int8_vs_fp32", "int8_vs_keras"}
    assert evaluation["test"]["split"] == "official Kermany test"


@pytest.mark.slow
def test_the_onnx_int8_file_is_the_cpu_independent_recipe(packaged: dict) -> None:
    from training.export.onnx_export import integer_ranges

    quantized = json.loads((packaged["run"] / "export_summary.json").read_text(encoding="utf-8"))
    assert quantized["quantization_recipe"] == "u8s8-rr" and "int8_vs_keras" in quantized
    ranges = integer_ranges(packaged["run"] / "model.int8.onnx")
    assert ranges["activation_dtypes"] == ["uint8"] and ranges["weight_dtypes"] == ["int8"]
    assert ranges["weight_min"] >= -64 and ranges["weight_max"] <= 64 and ranges["conv_weights"] >= 49
    emulated = quantized["int8_vs_int8_emulated_avx2"]
    if emulated is not None:  # QEMU installed: the same integers on an AVX2-only CPU
        assert emulated["max_abs_diff"] == 0.0 and emulated["features_max_abs_diff"] == 0.0


@pytest.mark.slow
def test_the_bundle_has_both_backends_and_passes_its_own_check(packaged: dict) -> None:
    from edge_runtime.bundle import load_bundle
    from edge_runtime.conformance import verify_backend
    from edge_runtime.signing import BundleTrust

    bundle = load_bundle(packaged["bundle"], trust=BundleTrust.from_entries([str(TEST_PUBLIC_KEY)]))
    assert bundle.signature.verified
    assert bundle.name == "pneumonia-cxr-keras" and bundle.version == "0.0.1"
    manifest = json.loads((packaged["bundle"] / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["training"]["framework"] == "keras"
    assert "tensorflow-cpu" in manifest["training"]["hardware"]
    artifacts = {a["backend"]: a for a in manifest["artifacts"]}
    assert set(artifacts) == {"onnxruntime", "litert"}
    assert (
        artifacts["onnxruntime"]["quantization"].endswith("u8s8-rr") and artifacts["onnxruntime"]["model_id"]
    )
    assert all(a.get("heatmap") and a.get("features") for a in artifacts.values())
    assert set(manifest["intended_use"]["ood"]["by_backend"]) == {"litert"}
    assert sorted(bundle.backends) == ["litert", "onnxruntime"]
    for backend in bundle.backends:
        report = verify_backend(bundle, backend)
        assert report is not None and report.passed, report.explain() if report else backend
        assert report.heat_max_diff_allowed is not None and report.ood_threshold is not None


@pytest.mark.slow
def test_the_model_card_says_how_the_keras_route_made_it(packaged: dict) -> None:
    card = (packaged["bundle"] / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "python -m training pipeline --framework keras" in card
    assert "Trained in TensorFlow/Keras, exported to ONNX opset 17 by tf2onnx" in card
    assert "TensorFlow's converter" in card and "the Keras FP32 model's decision" in card
    assert "PyTorch weights ported layer by layer to Keras" in card
    assert "timing probe" not in card  # the Keras route has none
