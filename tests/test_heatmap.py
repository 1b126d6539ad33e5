"""The heat-map: computed inside the exported graph, carried by the backends, checked, drawn and stored.

From the training side to the reader: the exported ONNX graph's ``cam``
output equals the class-activation map PyTorch computes and averages to the
logits; the bundled model's backends return it from the one engine run that
scores the scan; the conformance check covers it (and fails when the map
moves); the overlay is a PNG that OpenCV decodes; the Secondary Capture
reads back with pydicom and passes dciodvfy; and a bundle without a heat-map
still runs, with ``heatmap`` None.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from helpers import make_tiny_bundle

from edge_runtime.backends import BackendOutput, create_backend
from edge_runtime.bundle import BundleTrust, load_bundle
from edge_runtime.conformance import check_conformance
from edge_runtime.heat import heat_difference, normalised_heat
from edge_runtime.pipeline import ScanAnalyzer
from edge_runtime.reports.heatmap import CAUTION, overlay, png_bytes, positive_heat, secondary_capture

SIIM_CR = "dicom/siim_torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


def _kermany(shared_data: Path, label: str, n: int = 1) -> list[Path]:
    return sorted((shared_data / "cxr/kermany_pneumonia_224/test" / label).glob("*.jpeg"))[:n]


# -- the exported graph --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["efficientnet-lite0", "resnet18", "mobilenet_v2", "densenet121"])
def test_exported_cam_is_the_torch_cam_and_averages_to_the_logits(tmp_path: Path, family: str) -> None:
    """FP32: ONNX ``cam`` == PyTorch's CAM, GAP(cam) == logits, probabilities unchanged by the map."""
    torch = pytest.importorskip("torch")
    import onnxruntime as ort

    from edge_runtime.preprocess import PreprocessSpec
    from training.export.onnx_export import export_onnx
    from training.model.models import ClassActivationModel, build_model

    torch.manual_seed(0)
    torch.set_num_threads(1)
    spec = PreprocessSpec(height=64, width=64)
    model = build_model(family, 2, weights_path=None).eval()
    x = torch.randn(3, *spec.sample_shape)
    with torch.no_grad():
        for m in model.modules():  # random BatchNorm statistics, so the maps are not flat
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        logits = model(x).numpy()
        p_torch, cam_torch = (t.numpy() for t in ClassActivationModel(model)(x))
    with_map = export_onnx(model, tmp_path / "cam.onnx", spec, heatmap=True)
    without = export_onnx(model, tmp_path / "plain.onnx", spec, heatmap=False)
    session = ort.InferenceSession(str(with_map), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["probabilities", "cam"]
    import onnx

    assert onnx.load(str(with_map)).graph.node[-1].op_type == "Softmax"  # softmax still inside, last
    probabilities, cam = session.run(None, {"input": x.numpy()})
    plain = ort.InferenceSession(str(without), providers=["CPUExecutionProvider"])
    (p_plain,) = plain.run(None, {"input": x.numpy()})

    assert cam.shape == (3, 2, 2, 2)  # 64 px / stride 32
    np.testing.assert_allclose(cam, cam_torch, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(cam_torch.mean(axis=(2, 3)), logits, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(cam.mean(axis=(2, 3)), logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(p_torch, probabilities, atol=1e-5)
    assert np.array_equal(probabilities, p_plain), "adding the map must not change the probabilities"


def test_families_with_an_mlp_head_export_without_a_map(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from training.model.models import ClassActivationModel, build_model, supports_cam

    for family in ("vgg11_bn", "mobilenet_v3_small"):
        model = build_model(family, 2, weights_path=None)
        assert not supports_cam(model)
        with pytest.raises(ValueError, match="no single linear classifier"):
            ClassActivationModel(model)


# -- the bundled model ---------------------------------------------------------------------------


class _Counting:
    """The real backend, counting engine runs (a scan must be run once, map included)."""

    def __init__(self, inner: ScanAnalyzer) -> None:
        self._inner = inner.backend
        self.name = self._inner.name
        self.runs = 0

    def infer_outputs(self, batch: np.ndarray) -> BackendOutput:
        self.runs += 1
        return self._inner.infer_outputs(batch)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.infer_outputs(batch).scores

    def close(self) -> None:
        self._inner.close()


def test_bundled_model_returns_its_heatmap_from_the_scoring_run(
    default_bundle: Path, shared_data: Path
) -> None:
    bundle = load_bundle(default_bundle)
    assert bundle.manifest.output.heatmap is not None
    assert bundle.manifest.heatmap_output("onnxruntime") == "cam"
    analyzer = ScanAnalyzer.from_bundle_path(default_bundle, "onnxruntime")
    counting = _Counting(analyzer)
    analyzer.backend = counting  # type: ignore[assignment]
    try:
        for path in _kermany(shared_data, "PNEUMONIA") + _kermany(shared_data, "NORMAL"):
            outcome = analyzer.analyze(path)
            assert outcome.heatmap is not None and outcome.image is not None
            # The last feature map's grid: the input side over EfficientNet's total stride of 32.
            side = bundle.preprocessing.height // 32
            assert outcome.heatmap.shape == (side, side) and outcome.heatmap.dtype == np.float32
            assert outcome.heatmap.min() >= 0.0 and outcome.heatmap.max() <= 1.0
            assert outcome.image.ndim == 2
        assert counting.runs == 2  # one engine run per scan: the map costs no second inference
        # The map matches the result: same run as the probability.
        spec = bundle.preprocessing
        from edge_runtime.decode import decode_file
        from edge_runtime.preprocess import preprocess

        path = _kermany(shared_data, "PNEUMONIA")[0]
        batch = preprocess(decode_file(path).pixels, spec)[None]
        out = counting.infer_outputs(batch)
        assert out.heatmap is not None
        expected = positive_heat(out.heatmap[0], bundle.labels, bundle.positive_label)
        assert np.array_equal(analyzer.analyze(path).heatmap, expected)
        assert np.array_equal(out.scores, counting.infer(batch))
    finally:
        analyzer.close()


def test_conformance_covers_the_heatmap_and_fails_when_it_moves(default_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(default_bundle, copy)
    bundle = load_bundle(copy)
    section = bundle.manifest.conformance
    assert section is not None and section.heatmap_max_drift is not None
    backend = create_backend("onnxruntime")
    backend.load(bundle)
    try:
        report = check_conformance(bundle, backend)
        assert report is not None and report.passed, report.explain() if report else ""
        assert report.heat_checked and report.heat_max_drift is not None
        assert report.heat_max_drift <= section.heatmap_max_drift
        assert "heat-map" in report.explain() and "heatmap" in report.summary()

        # The same file computing a different map (here: the build machine's maps mirrored) is refused.
        with np.load(copy / "conformance.npz") as data:
            arrays = {k: data[k] for k in data.files}
        arrays["cam_expected_onnxruntime"] = arrays["cam_expected_onnxruntime"][..., ::-1].copy()
        np.savez_compressed(copy / "conformance.npz", **arrays)
        moved = check_conformance(bundle, backend)
        assert moved is not None and not moved.passed
        assert moved.heat_max_drift is not None and moved.heat_max_drift > section.heatmap_max_drift
    finally:
        backend.close()


def _maps(bundle_dir: Path, backend_name: str, trust: BundleTrust | None = None) -> np.ndarray | None:
    """The backend's raw heat-maps of the bundle's reference images (None: it has none)."""
    from edge_runtime.conformance import reference_inputs
    from edge_runtime.preprocess import preprocess

    bundle = load_bundle(bundle_dir, trust=trust)
    refs = reference_inputs(bundle)
    assert refs is not None
    backend = create_backend(backend_name)
    backend.load(bundle)
    try:
        maps = []
        for image in refs["images"]:
            x = preprocess(image.astype(np.float32) / np.float32(255.0), bundle.preprocessing)[None]
            out = backend.infer_outputs(x)
            if out.heatmap is None:
                return None
            maps.append(out.heatmap[0])
        return np.stack(maps)
    finally:
        backend.close()


def test_backend_parity_onnx_vs_litert_on_the_heatmap(default_bundle: Path) -> None:
    """Both INT8 backends draw the same map within the conformance tolerance, in the same layout."""
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed")
    bundle = load_bundle(default_bundle)
    if bundle.manifest.heatmap_output("litert") is None:
        pytest.skip("the bundled LiteRT file has no heat-map")
    onnx_maps, litert_maps = _maps(default_bundle, "onnxruntime"), _maps(default_bundle, "litert")
    assert onnx_maps is not None and litert_maps is not None
    side = bundle.preprocessing.height // 32  # EfficientNet's total stride
    assert onnx_maps.shape == litert_maps.shape == (len(onnx_maps), 2, side, side)  # NCHW from both
    positive = bundle.labels.index(bundle.positive_label)
    between = [heat_difference(a, b, positive) for a, b in zip(litert_maps, onnx_maps, strict=True)]
    section = bundle.manifest.conformance
    assert section is not None and section.heatmap_max_abs_diff is not None
    # Each is within its FP32 tolerance, so they are within twice of each other; in practice:
    assert max(between) <= section.heatmap_max_abs_diff
    assert float(np.median(between)) <= 0.15
    # Same hottest cell for most images (the maps agree where the evidence is).
    same_peak = [
        normalised_heat(a, positive).argmax() == normalised_heat(b, positive).argmax()
        for a, b in zip(litert_maps, onnx_maps, strict=True)
    ]
    assert np.mean(same_peak) >= 0.75
    backend = create_backend("litert")
    backend.load(bundle)
    try:
        report = check_conformance(bundle, backend)
        assert report is not None and report.passed and report.heat_checked, (
            report.explain() if report else ""
        )
    finally:
        backend.close()


def test_artifact_without_a_map_scores_and_returns_none(default_bundle: Path, tmp_path: Path) -> None:
    """A bundle whose LiteRT file is marked without a map (as a converter that cannot carry it)."""
    import json

    copy = tmp_path / "bundle"
    shutil.copytree(default_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for artifact in manifest["artifacts"]:
        artifact["heatmap"] = False
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "manifest.sig.json").unlink()
    unsigned = BundleTrust(require_signature=False)
    assert load_bundle(copy, trust=unsigned).manifest.heatmap_output("onnxruntime") is None
    assert _maps(copy, "onnxruntime", unsigned) is None
    analyzer = ScanAnalyzer.from_bundle_path(copy, "onnxruntime", trust=unsigned)
    try:
        assert analyzer.conformance is not None and analyzer.conformance.passed
        assert not analyzer.conformance.heat_checked  # the set has maps, this file has none
    finally:
        analyzer.close()


def test_bundle_without_a_heatmap_still_works(tmp_path: Path, shared_data: Path) -> None:
    bundle_dir = make_tiny_bundle(tmp_path / "tiny", conformance=True)
    assert load_bundle(bundle_dir).manifest.output.heatmap is None
    analyzer = ScanAnalyzer.from_bundle_path(
        bundle_dir, "onnxruntime", trust=BundleTrust(require_signature=False)
    )
    try:
        assert analyzer.conformance is not None and not analyzer.conformance.heat_checked
        outcome = analyzer.analyze(_kermany(shared_data, "NORMAL")[0])
        assert outcome.heatmap is None and outcome.image is None
        assert 0.0 <= outcome.analysis.finding.probability <= 1.0
    finally:
        analyzer.close()


def test_manifest_refuses_an_artifact_heatmap_without_an_output(default_bundle: Path) -> None:
    import json

    from edge_runtime.errors import ModelBundleError
    from edge_runtime.manifest import parse_manifest

    data = json.loads((default_bundle / "manifest.json").read_text())
    del data["output"]["heatmap"]
    with pytest.raises(ModelBundleError, match="heat-map"):
        parse_manifest(data, "manifest.json")
    for artifact in data["artifacts"]:
        artifact.pop("heatmap", None)  # a 0.2.0-style manifest: loads, no heat-map
    assert parse_manifest(data, "manifest.json").heatmap_output("onnxruntime") is None


# -- drawing and storing it ----------------------------------------------------------------------


def test_normalised_heat_is_what_is_drawn_and_ignores_a_shift() -> None:
    cam = np.zeros((2, 3, 3), dtype=np.float32)
    cam[1] = np.arange(9, dtype=np.float32).reshape(3, 3)
    heat = positive_heat(cam, ["NORMAL", "PNEUMONIA"], "PNEUMONIA")
    assert heat.dtype == np.float32 and heat.min() == 0.0 and heat.max() == 1.0 and heat[2, 2] == 1.0
    assert np.array_equal(heat, normalised_heat(cam, 1))
    assert heat_difference(cam + 3.0, cam, 1) == 0.0  # all logits shifted: the same picture
    flat = np.zeros((2, 3, 3), dtype=np.float32)
    flat[1, 0, 0] = 1e-3  # rounding noise on a flat map stays dark
    assert positive_heat(flat, ["NORMAL", "PNEUMONIA"], "PNEUMONIA").max() <= 1e-3
    with pytest.raises(ValueError, match="classes=2"):
        positive_heat(cam[:1], ["NORMAL", "PNEUMONIA"], "PNEUMONIA")


def test_overlay_png_decodes_with_opencv(shared_data: Path) -> None:
    from edge_runtime.decode import decode_file

    image = decode_file(shared_data / SIIM_CR).pixels  # 1024 x 1024 CR
    heat = np.array([[0, 0, 0], [0, 0, 0], [0, 0, 1]], dtype=np.float32)
    rgb = overlay(image, heat, max_side=512)
    assert rgb.shape == (512, 512, 3) and rgb.dtype == np.uint8
    # Hot bottom-right is coloured, cold top-left of the image keeps the grey radiograph.
    hot = rgb[-40:, -40:].astype(int)
    cold = rgb[200:240, 40:80].astype(int)
    assert np.abs(hot[..., 0] - hot[..., 2]).mean() > 30
    assert np.abs(cold[..., 0] - cold[..., 2]).max() <= 1
    decoded = cv2.imdecode(np.frombuffer(png_bytes(rgb), np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None
    assert np.array_equal(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB), rgb)  # lossless
    small = overlay(np.full((100, 80), 0.5, dtype=np.float32), heat)
    assert small.shape == (100, 80, 3)  # never enlarged


def test_secondary_capture_reads_back_and_validates(shared_data: Path, tmp_path: Path) -> None:
    source = pydicom.dcmread(shared_data / SIIM_CR, stop_before_pixels=True)
    from edge_runtime.decode import decode_file

    rgb = overlay(decode_file(shared_data / SIIM_CR).pixels, np.eye(3, dtype=np.float32), max_side=256)
    model = {"name": "pneumonia-cxr", "version": "0.3.0", "sha256": "ab" * 32}
    sc = secondary_capture(source, rgb, uid_root="2.25", message_id="m-1", model=model)
    again = secondary_capture(source, rgb, uid_root="2.25", message_id="m-1", model=model)
    other = secondary_capture(source, rgb, uid_root="2.25", message_id="m-2", model=model)
    assert (sc.SOPInstanceUID, sc.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    assert sc.SOPInstanceUID != other.SOPInstanceUID and sc.SeriesInstanceUID != other.SeriesInstanceUID
    path = tmp_path / "heatmap.dcm"
    sc.save_as(path, enforce_file_format=True)

    back = pydicom.dcmread(path)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    assert back.StudyInstanceUID == source.StudyInstanceUID and back.PatientID == source.PatientID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert back.BurnedInAnnotation == "YES" and CAUTION in back.SeriesDescription
    assert "0.3.0" in back.SeriesDescription and ("ab" * 32) in back.DerivationDescription
    assert back.PhotometricInterpretation == "RGB"
    assert np.array_equal(back.pixel_array, rgb)

    validator = shutil.which("dciodvfy")
    if validator is not None:
        done = subprocess.run([validator, str(path)], capture_output=True, text=True, check=False)
        report = done.stdout + done.stderr
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert not errors, report
    else:
        dcmdump = shutil.which("dcmdump")
        if dcmdump is None:
            pytest.skip("neither dciodvfy nor dcmdump is installed")
        done = subprocess.run([dcmdump, str(path)], capture_output=True, text=True, check=False)
        assert done.returncode == 0 and "SecondaryCaptureImageStorage" in done.stdout
