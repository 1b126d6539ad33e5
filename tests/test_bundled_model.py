"""The shipped models give their validated answers on this CPU and on an AVX2-only one.

Both bundles in ``edge_runtime/models/``: the default (trained with PyTorch) and the Keras route's
(``pneumonia-cxr-keras``, issue 29), each through every backend it ships.

These are the tests that fail when the model's conformance check would fail
on the CPU running them: the bundle's own reference images (training images
with FP32 probabilities recorded where the bundle was built) through the real
load path, per backend, here and on QEMU's ``EPYC-Milan`` (AVX2, no AVX-512,
no VNNI), where the 0.1.x recipe drifted by up to 0.75.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_runtime.bundle import load_bundle
from edge_runtime.pipeline import ScanAnalyzer
from training.export.emulation import AVX2_ONLY_CPU, emulator, run_emulated


def _backends(bundle: Path) -> list[str]:
    return [a["backend"] for a in json.loads((bundle / "manifest.json").read_text())["artifacts"]]


@pytest.mark.parametrize("backend", ["onnxruntime", "litert"])
def test_bundled_model_passes_its_conformance_check_here(shipped_bundle: Path, backend: str) -> None:
    if backend not in _backends(shipped_bundle):
        pytest.skip(f"the bundled model has no {backend} file")
    if backend == "litert":
        pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed")
    analyzer = ScanAnalyzer.from_bundle_path(shipped_bundle, backend)  # raises if it fails
    try:
        report = analyzer.conformance
        assert report is not None, "the bundled model must carry a conformance reference set"
        assert report.passed, report.explain()
        assert len(report.rows) >= 32 and {row.label for row in report.rows} == {0, 1}
    finally:
        analyzer.close()


def test_bundled_model_is_calibrated_and_cpu_independent_by_construction(shipped_bundle: Path) -> None:
    from training.export.onnx_export import integer_ranges

    bundle = load_bundle(shipped_bundle)
    assert bundle.signature.verified  # by the project key the runtime trusts by default
    # Temperature scaling makes the operating point an ordinary probability (0.1.1: 0.99986).
    assert 0.05 < bundle.threshold < 0.99
    onnx_file = bundle.artifact("onnxruntime")
    assert onnx_file.quantization.endswith("u8s8-rr") and not onnx_file.requires_int8_dot
    ranges = integer_ranges(onnx_file.path)
    assert ranges["activation_dtypes"] == ["uint8"] and ranges["weight_dtypes"] == ["int8"]
    assert ranges["weight_min"] >= -64 and ranges["weight_max"] <= 64  # no VPMADDUBSW saturation


@pytest.mark.skipif(emulator() is None, reason="qemu-x86_64 not installed (apt-get install qemu-user)")
def test_bundled_model_passes_its_conformance_check_on_an_avx2_only_cpu(shipped_bundle: Path) -> None:
    import importlib.util

    done = run_emulated(
        ["-m", "edge_runtime.cli", "model", "verify", str(shipped_bundle), "--backend", "all"],
        AVX2_ONLY_CPU,
        timeout_s=600,
    )
    assert "INT8 features: avx2)" in done.stdout, done.stdout[-2000:]  # AVX2 only: the emulation took
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    backends = _backends(shipped_bundle)
    if importlib.util.find_spec("ai_edge_litert") is None:
        backends.remove("litert")  # skipped by `model verify`, with a line saying so
    for backend in backends:
        assert f"conformance check passed for model {load_bundle(shipped_bundle).name} " in done.stdout
        assert f"on backend {backend} " in done.stdout, done.stdout[-3000:]
    # The heat-map is checked there too (0.3.0: the u8s8-rr trunk is integer-identical, the map's
    # float 1x1 convolution on it is within rounding of this machine's).
    assert "heat-map: max difference from FP32" in done.stdout
