"""``python -m training export --framework keras``: the Keras model to an INT8 LiteRT file the edge runs.

A tiny Keras run (the CLI run of ``tests/test_keras_training.py``: 16 training and 8 validation
Kermany images at 64 px, 2 steps per epoch), then the export: TensorFlow's converter in
``.venv-keras`` writes ``model.int8.keras.tflite`` (probabilities, class-activation heat-map and
pooled features, INT8 except the float head) and the command checks it here through the edge's
LiteRT backend. The test then loads the file itself with ``LiteRtBackend`` from a signed bundle
whose manifest describes it, on the run's images preprocessed by the edge code (NCHW float32, what
the runtime feeds), and compares with the Keras FP32 model and with ``.venv-keras``'s interpreter,
and once more under QEMU's AVX2-only ``EPYC-Milan`` (skipped without ``qemu-x86_64``).

The CLI run is ``slow``; it skips without ``.venv-keras``, ``../shared/data``, torch or
ai-edge-litert, unless ``EDGE_RUNTIME_TESTS_REQUIRE_KERAS=1`` (then the first two fail).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import KERMANY_ROOT, TINY_KERAS_SIZE, sign_bundle

REPO_ROOT = Path(__file__).resolve().parents[1]
KERMANY = KERMANY_ROOT
SHIPPED_TFLITE = REPO_ROOT / "edge_runtime" / "models" / "pneumonia-cxr" / "model.int8.tflite"
SIZE = TINY_KERAS_SIZE

#: The edge backend (ai-edge-litert) against ``.venv-keras``'s tf.lite interpreter on the SAME file.
#: Measured: heat-map and features identical (0.0); probabilities 4.8e-4 on this 64 px run (0.0 on a
#: 128 px run of 300 images): the two runtimes' INT8 kernels (the pooling before the float
#: classifier) may round one step apart. 5e-3 is 10x that, and far below any INT8-vs-FP32 effect.
SAME_FILE_ATOL = 5e-3
#: The edge backend's P(positive) against the Keras FP32 model. Measured on this run: max 0.016,
#: mean 0.0071 (8 validation images). The PyTorch route's test allows 0.1 / 0.03 (test_tflite_export);
#: the same bounds leave 6x / 4x margin here. (A 128 px run of 300 images measured max 0.39 on one
#: of 44 validation images, mean 0.023, AUC 0.9979 -> 0.9959: INT8 error is larger on real runs.)
MAX_DP, MEAN_DP = 0.1, 0.03


@pytest.fixture(scope="module")
def exported(tiny_keras_export: tuple[Path, str]) -> dict:
    folder, output = tiny_keras_export  # the session's tiny run, exported (conftest.py)
    return {
        "folder": folder,
        "output": output,
        "file": folder / "model.int8.keras.tflite",
        "summary": json.loads((folder / "keras_tflite_export_summary.json").read_text(encoding="utf-8")),
    }


def _profile(path: Path) -> collections.Counter[tuple[str, str]]:
    """(op, dtype of its first input) -> count, as LiteRT reports the ops (delegate nodes left out)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for op in interpreter._get_ops_details():
        if op["op_name"] == "DELEGATE":
            continue
        first = int(op["inputs"][0])
        counts[(op["op_name"], np.dtype(interpreter._get_tensor_details(first, 0)["dtype"]).name)] += 1
    return counts


@pytest.mark.slow
def test_the_summary_reports_a_checked_int8_export(exported: dict) -> None:
    summary = exported["summary"]
    assert summary["quantization"] == "int8-static-wi8-ai8" and summary["calibration_split"] == "train"
    assert summary["calibration_images"] == 16  # every training image of the tiny run (default: up to 200)
    assert summary["input_range"] == [-1.0, 1.0] and summary["saturated_biases"] == 0
    assert summary["validation_images"] == 8 and set(summary["val_auc"]) == {"keras_fp32", "int8"}
    assert 2_000_000 < summary["size_bytes"] == exported["file"].stat().st_size < 6_000_000
    diffs = summary["int8_vs_keras_fp32"]
    assert diffs["probabilities"]["max_abs_diff"] < MAX_DP
    # The heat-map is the calibrated logits' decomposition: its FP32 spatial mean is the logit margin.
    assert diffs["cam"]["fp32_mean_vs_logit_margin_max_abs"] < 1e-4
    assert min(diffs["features"]["correlation"]) > 0.9
    names = {o["name"]: o for o in summary["tensors"]["outputs"]}
    assert summary["tensors"]["input"]["name"] == "input" and set(names) == {
        "probabilities",
        "cam",
        "features",
    }
    assert summary["output"]["features"]["layers"] == [
        "_blocks.2",
        "_blocks.4",
        "_blocks.7",
        "_blocks.10",
        "_blocks.14",
    ]
    assert summary["output"]["features"]["dims"] == [24, 40, 80, 112, 192]
    check = summary["edge_litert_backend"]
    assert check["inputs_identical_to_keras_inputs"] and check["images"] == 8
    assert "edge LiteRT backend on 8 validation images" in exported["output"]


@pytest.mark.slow
def test_the_file_is_int8_where_the_pytorch_routes_is(exported: dict) -> None:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(exported["file"]))
    inp = interpreter.get_input_details()[0]
    assert list(inp["shape"]) == [1, SIZE, SIZE, 3] and inp["dtype"] == np.int8  # NHWC, as the PyTorch file
    scale, zero = inp["quantization"]
    assert scale == pytest.approx(2 / 255) and zero == -1  # the spec's exact [-1, 1]
    assert all(d["dtype"] == np.float32 for d in interpreter.get_output_details())
    ours = _profile(exported["file"])
    assert ours[("CONV_2D", "int8")] == 33 and ours[("CONV_2D", "float32")] == 1  # only the CAM's is float
    assert {("DEPTHWISE_CONV_2D", "int8"), ("ADD", "int8"), ("MEAN", "int8")} <= set(ours)
    assert {("FULLY_CONNECTED", "float32"), ("SOFTMAX", "float32"), ("CONCATENATION", "float32")} <= set(ours)
    float_ops = {op for op, dtype in ours if dtype == "float32"}
    assert float_ops == {"CONV_2D", "FULLY_CONNECTED", "SOFTMAX", "CONCATENATION"}
    if SHIPPED_TFLITE.is_file():  # the PyTorch route's file (litert-torch + ai-edge-quantizer)
        assert ours == _profile(SHIPPED_TFLITE)


@pytest.fixture(scope="module")
def edge_inputs(exported: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A signed bundle describing the file, and the validation images as the runtime feeds them."""
    from edge_runtime.bundle import write_manifest
    from edge_runtime.decode import decode_file
    from edge_runtime.preprocess import PreprocessSpec, preprocess
    from training.keras.check_litert import scratch_manifest

    folder = exported["folder"]
    split = json.loads((folder / "split.json").read_text(encoding="utf-8"))
    spec = PreprocessSpec.from_dict(split["spec"])
    bundle_dir = tmp_path_factory.mktemp("keras-bundle")
    (bundle_dir / "model.int8.keras.tflite").write_bytes(exported["file"].read_bytes())
    write_manifest(bundle_dir, scratch_manifest(exported["summary"], spec, "model.int8.keras.tflite"))
    sign_bundle(bundle_dir)
    batch = np.stack([preprocess(decode_file(KERMANY / i).pixels, spec) for i in split["val"]])  # NCHW
    with np.load(folder / "keras_tflite_val.npz") as saved:
        val = {name: saved[name] for name in saved.files}
    assert [str(i) for i in val["val_ids"]] == split["val"]
    return {"bundle": bundle_dir, "batch": batch, "val": val}


@pytest.mark.slow
def test_the_edge_litert_backend_runs_it_like_keras(edge_inputs: dict) -> None:
    from edge_runtime.backends.litert import LiteRtBackend
    from edge_runtime.bundle import load_bundle

    bundle = load_bundle(edge_inputs["bundle"])
    batch, val = edge_inputs["batch"], edge_inputs["val"]
    assert batch.shape == (8, 3, SIZE, SIZE) and batch.dtype == np.float32
    backend = LiteRtBackend(threads=1)
    backend.load(bundle)
    try:
        out = backend.infer_outputs(batch)
    finally:
        backend.close()
    # The same file in .venv-keras's interpreter.
    np.testing.assert_allclose(out.scores, val["int8_probabilities"], atol=SAME_FILE_ATOL)
    assert out.heatmap is not None and out.features is not None
    np.testing.assert_allclose(out.heatmap, val["int8_cam"].transpose(0, 3, 1, 2), atol=SAME_FILE_ATOL)
    np.testing.assert_allclose(out.features, val["int8_features"], atol=SAME_FILE_ATOL)
    # The Keras FP32 model.
    np.testing.assert_allclose(out.scores.sum(axis=1), 1.0, atol=1e-5)
    dp = np.abs(out.scores[:, 1] - val["fp32_probabilities"][:, 1])
    assert dp.max() < MAX_DP and dp.mean() < MEAN_DP, dp
    # The outputs the manifest names, in the backend's layout: [N, classes, h, w] and [N, sum(dims)].
    assert out.scores.shape == (8, 2)
    assert out.heatmap.shape == (8, 2, SIZE // 32, SIZE // 32) and out.features.shape == (8, 448)
    assert bundle.manifest.heatmap_output("litert") == "cam"
    assert bundle.manifest.features_output("litert") == "features"


_EMULATED_CHILD = """
import sys
import numpy as np
from edge_runtime.backends.litert import LiteRtBackend
from edge_runtime.bundle import load_bundle
from edge_runtime.cpu import cpu_summary

bundle, x_path, out_path = sys.argv[1:4]
backend = LiteRtBackend(threads=1)
backend.load(load_bundle(bundle))
out = backend.infer_outputs(np.load(x_path))
np.savez(out_path, scores=out.scores, heatmap=out.heatmap, features=out.features)
print(cpu_summary())
"""


@pytest.mark.slow
def test_an_avx2_only_cpu_gets_the_same_outputs(edge_inputs: dict, tmp_path: Path) -> None:
    """Beyond the PyTorch route's LiteRT checks: the backend under QEMU's EPYC-Milan (AVX2, no VNNI).

    Measured: identical outputs (0.0) to this machine's (AVX-512 VNNI) on this run and on a 128 px run
    (44 images), i.e. ai-edge-litert's INT8 kernels give the same integers on both.
    """
    from training.export.emulation import AVX2_ONLY_CPU, emulator, run_emulated

    if emulator() is None:
        pytest.skip("qemu-x86_64 not installed (apt-get install qemu-user) or not an x86-64 host")
    from edge_runtime.backends.litert import LiteRtBackend
    from edge_runtime.bundle import load_bundle

    x_path, y_path = tmp_path / "x.npy", tmp_path / "y.npz"
    np.save(x_path, edge_inputs["batch"])
    done = run_emulated(
        ["-c", _EMULATED_CHILD, str(edge_inputs["bundle"]), str(x_path), str(y_path)], AVX2_ONLY_CPU, 600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'int8_features': ['avx2']" in done.stdout, done.stdout[-2000:]  # the emulation took
    backend = LiteRtBackend(threads=1)
    backend.load(load_bundle(edge_inputs["bundle"]))
    try:
        here = backend.infer_outputs(edge_inputs["batch"])
    finally:
        backend.close()
    with np.load(y_path) as emulated:
        np.testing.assert_allclose(emulated["scores"], here.scores, atol=1e-6)
        np.testing.assert_allclose(emulated["heatmap"], here.heatmap, atol=1e-5)
        np.testing.assert_allclose(emulated["features"], here.features, atol=1e-5)


def test_export_keras_names_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch", reason="torch (training extra) not installed")
    from training.cli import main

    with pytest.raises(SystemExit) as info:
        main(["export", "--framework", "keras", "--out", str(tmp_path / "run")])
    assert "run train --framework keras first" in str(info.value.code)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.keras").write_bytes(b"")
    monkeypatch.setenv("KERAS_VENV", str(tmp_path / "no-such-venv"))
    with pytest.raises(SystemExit) as info:
        main(["export", "--framework", "keras", "--out", str(tmp_path / "run")])
    assert "bash training/keras_env.sh setup" in str(info.value.code)
    with pytest.raises(SystemExit) as info:
        main(["export", "--calibration-images", "8", "--out", str(tmp_path / "run")])
    assert "--framework keras only" in str(info.value.code)
