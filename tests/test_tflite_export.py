"""The TFLite INT8 export (``training/export/tflite_export.py``) end to end, across two environments.

The exporter needs litert-torch and ai-edge-quantizer, which conflict with the
main environment, so it runs in ``.venv-tflite`` (``training/tflite_env.sh
setup``) as a subprocess. The ``.tflite`` it writes is then loaded HERE, in the
main environment, through the edge runtime's own LiteRT backend (ai-edge-litert)
and compared with PyTorch.

The model is EfficientNet-Lite0 with the ImageNet backbone when the shared
weights file exists (random weights otherwise) and an untrained 2-class head;
the data are a few synthetic grey images laid out and named like the Kermany
set, so the test needs nothing but the two environments.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import sign_bundle

from edge_runtime.bundle import default_bundle_path, load_bundle, write_manifest
from edge_runtime.decode import decode_file
from edge_runtime.preprocess import preprocess

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = REPO_ROOT / ".venv-tflite" / "bin" / "python"
IMAGENET_WEIGHTS = REPO_ROOT.parent / "shared" / "data" / "weights" / "efficientnet-lite0-57934424.pth"
PER_CLASS = 10

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not VENV_PYTHON.is_file(),
        reason=f"no TFLite export environment at {VENV_PYTHON.parent.parent} "
        "(create it with: training/tflite_env.sh setup)",
    ),
]


def _synthetic_kermany(root: Path, seed: int = 0) -> Path:
    """``root/train/{NORMAL,PNEUMONIA}`` with smooth grey 'radiographs', Kermany file names."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:96, 0:80].astype(np.float32)
    for label in ("NORMAL", "PNEUMONIA"):
        folder = root / "train" / label
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            cy, cx = rng.uniform(20, 76), rng.uniform(15, 65)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(6, 20) ** 2))
            image = 0.25 + 0.4 * xx / 80 + (0.35 if label == "PNEUMONIA" else 0.15) * blob
            image += rng.normal(0.0, 0.03, image.shape)
            grey = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
            name = f"IM-{i + 1:04d}-0001.png" if label == "NORMAL" else f"person{i + 1}_bacteria_{i + 1}.png"
            cv2.imwrite(str(folder / name), grey)
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch = pytest.importorskip("torch", reason="torch (training extra) not installed")
    pytest.importorskip("efficientnet_lite_pytorch", reason="training extra not installed")
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert not installed")
    from training.model.models import build_model

    root = tmp_path_factory.mktemp("tflite-export")
    data = _synthetic_kermany(root / "data")
    torch.manual_seed(0)
    weights = IMAGENET_WEIGHTS if IMAGENET_WEIGHTS.is_file() else None
    model = build_model("efficientnet-lite0", 2, weights).eval()
    run = root / "run"
    run.mkdir()
    checkpoint = run / "checkpoint.pt"
    torch.save(
        {
            "model": "efficientnet-lite0",
            "num_classes": 2,
            "labels": ["NORMAL", "PNEUMONIA"],
            "cut": 16,
            "state_dict": model.state_dict(),
        },
        checkpoint,
    )
    out = root / "model.int8.tflite"
    proc = subprocess.run(
        [
            str(VENV_PYTHON),
            "-m",
            "training.export.tflite_export",
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(out),
            "--data",
            str(data),
            "--calibration-images",
            "4",
            "--threads",
            "1",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)  # stdout carries only the summary (converter logs go to stderr)
    # ... and the same summary lies beside the model, where `python -m training package` reads it.
    assert json.loads(out.with_name("tflite_export_summary.json").read_text()) == summary

    # A bundle like the shipped one, with the TFLite model as its litert artifact.
    shipped = load_bundle(default_bundle_path())
    bundle_dir = root / "bundle"
    bundle_dir.mkdir()
    (bundle_dir / "model.int8.tflite").write_bytes(out.read_bytes())
    # Not its reference set: that belongs to the shipped model, not to this one.
    manifest = {
        k: v
        for k, v in shipped.manifest.to_json_dict().items()
        if k not in ("files", "created_utc", "conformance")
    }
    artifact = {"file": "model.int8.tflite", "backend": "litert", "quantization": summary["quantization"]}
    if manifest["output"].get("features"):
        artifact["features"] = True  # the export adds the pooled stage ends (issue #26)
    manifest["artifacts"] = [artifact]
    # The shipped out-of-distribution statistics belong to the shipped model, not to this one.
    manifest["intended_use"] = {k: v for k, v in manifest["intended_use"].items() if k != "ood"}
    write_manifest(bundle_dir, manifest)
    sign_bundle(bundle_dir)
    return {"summary": summary, "bundle": bundle_dir, "model": model, "data": data, "out": out}


def test_export_reports_a_checked_int8_model(exported: dict):
    summary = exported["summary"]
    assert summary["quantization"] == "int8-static-wi8-ai8"
    assert summary["calibration_images"] == 4 and summary["calibration_split"] == "train"
    assert summary["saturated_biases"] == 0
    assert summary["input_range"] == [-1.0, 1.0]
    # Conversion alone is exact; quantization is what differs.
    assert summary["float_tflite_vs_torch"]["max_abs_diff"] < 1e-4
    assert summary["validation_images"] >= 2
    assert 0.0 <= summary["int8_vs_torch"]["max_abs_diff"] <= 1.0
    assert exported["out"].stat().st_size < 6_000_000  # ~4 MB: INT8 weights, not float


def test_tflite_is_int8_nhwc_with_float_probabilities(exported: dict):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(exported["out"]))
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    spec = load_bundle(default_bundle_path()).preprocessing  # a bare checkpoint takes the shipped spec
    assert list(inp["shape"]) == [1, spec.height, spec.width, 3]
    assert inp["dtype"] == np.int8
    assert out["dtype"] == np.float32  # float head: probabilities are not on a 1/256 grid
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "SOFTMAX"} <= ops


def test_edge_litert_backend_matches_pytorch(exported: dict):
    import torch

    from edge_runtime.backends import create_backend

    bundle = load_bundle(exported["bundle"])
    spec = bundle.preprocessing
    paths = sorted(exported["data"].rglob("*.png"))
    batch = np.stack([preprocess(decode_file(p).pixels, spec) for p in paths])  # NCHW, as on the edge
    backend = create_backend("litert", threads=1)
    backend.load(bundle)
    try:
        p_tflite = backend.infer(batch)
    finally:
        backend.close()
    with torch.inference_mode():
        p_torch = torch.softmax(exported["model"](torch.from_numpy(batch)), dim=1).numpy()
    assert p_tflite.shape == p_torch.shape == (len(paths), 2)
    np.testing.assert_allclose(p_tflite.sum(axis=1), 1.0, atol=1e-5)
    diff = np.abs(p_tflite[:, 1] - p_torch[:, 1])
    assert diff.max() < 0.1, f"INT8 TFLite vs PyTorch: max |dp| {diff.max():.4f}"
    assert diff.mean() < 0.03, f"INT8 TFLite vs PyTorch: mean |dp| {diff.mean():.4f}"


def test_export_adds_the_features_output_close_to_pytorch(exported: dict):
    """The pooled stage ends (issue #26): INT8 TFLite vs PyTorch per stage, from the export's check."""
    features = exported["summary"]["features"]
    assert features["name"] == "features"
    assert features["layers"] == ["_blocks.2", "_blocks.4", "_blocks.7", "_blocks.10", "_blocks.14"]
    assert features["dims"] == [24, 40, 80, 112, 192]
    # INT8 activations pooled: each stage's values keep their pattern across images.
    assert min(features["int8_vs_torch"]["correlation"]) > 0.95
    bundle = load_bundle(exported["bundle"])
    if bundle.manifest.output.features is None:
        return
    from edge_runtime.backends import create_backend

    backend = create_backend("litert", threads=1)
    backend.load(bundle)
    try:
        out = backend.infer_outputs(np.zeros((2, *bundle.preprocessing.sample_shape), dtype=np.float32))
    finally:
        backend.close()
    assert out.scores.shape == (2, 2) and out.features is not None and out.features.shape == (2, 448)
