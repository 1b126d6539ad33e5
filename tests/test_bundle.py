"""Model bundles are verified before anything runs on a patient's scan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_tiny_bundle, sign_bundle

from edge_runtime.backends import create_backend
from edge_runtime.bundle import load_bundle
from edge_runtime.cli import main
from edge_runtime.errors import BackendError, ModelBundleError


def test_tiny_bundle_loads_and_verifies(tiny_bundle: Path):
    bundle = load_bundle(tiny_bundle)
    assert bundle.labels == ["NORMAL", "PNEUMONIA"]
    assert bundle.threshold == 0.5
    assert set(bundle.manifest.files) == {"model.onnx"}


def test_altered_model_file_is_refused_naming_the_file(tiny_bundle: Path):
    model = tiny_bundle / "model.onnx"
    model.write_bytes(model.read_bytes() + b"\0")
    with pytest.raises(ModelBundleError) as info:
        load_bundle(tiny_bundle)
    assert str(model) in str(info.value)
    assert "does not match its manifest" in str(info.value)
    assert "Redeploy" in info.value.action


def test_missing_file_and_missing_manifest(tiny_bundle: Path, tmp_path: Path):
    (tiny_bundle / "model.onnx").unlink()
    with pytest.raises(ModelBundleError, match=r"model\.onnx is listed in the manifest but missing"):
        load_bundle(tiny_bundle)
    with pytest.raises(ModelBundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def _rewrite_manifest(bundle: Path, **changes) -> None:
    """Change manifest values and sign the result: a trusted signer's faulty manifest is still refused."""
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    for dotted, value in changes.items():
        node = manifest
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(json.dumps(manifest))
    sign_bundle(bundle)


def test_manifest_input_that_disagrees_with_the_model_is_refused(tmp_path: Path):
    bundle_dir = make_tiny_bundle(tmp_path / "b1")
    # Manifest claims 128 px preprocessing; the ONNX graph declares 64 px.
    _rewrite_manifest(
        bundle_dir, preprocessing__height=128, preprocessing__width=128, input__shape=["batch", 3, 128, 128]
    )
    bundle = load_bundle(bundle_dir)
    backend = create_backend("onnxruntime")
    with pytest.raises(ModelBundleError, match=r"expects input shape \['batch', 3, 64, 64\]"):
        backend.load(bundle)
    bundle_dir = make_tiny_bundle(tmp_path / "b2")
    _rewrite_manifest(bundle_dir, input__name="pixels")
    with pytest.raises(ModelBundleError, match="names its input 'input'"):
        create_backend("onnxruntime").load(load_bundle(bundle_dir))
    bundle_dir = make_tiny_bundle(tmp_path / "b3")
    _rewrite_manifest(bundle_dir, output__name="logits")
    with pytest.raises(ModelBundleError, match="names its first output 'probabilities'"):
        create_backend("onnxruntime").load(load_bundle(bundle_dir))


def test_inconsistent_manifest_values(tmp_path: Path):
    bundle_dir = make_tiny_bundle(tmp_path / "b")
    _rewrite_manifest(bundle_dir, positive_label="EFFUSION")
    with pytest.raises(ModelBundleError, match="positive_label 'EFFUSION'"):
        load_bundle(bundle_dir)
    bundle_dir = make_tiny_bundle(tmp_path / "c")
    _rewrite_manifest(bundle_dir, input__shape=["batch", 3, 32, 32])
    with pytest.raises(ModelBundleError, match="disagrees with the preprocessing spec"):
        load_bundle(bundle_dir)


def test_backend_without_artifact_and_unknown_backend(tiny_bundle: Path):
    bundle = load_bundle(tiny_bundle)
    with pytest.raises(ModelBundleError, match="no model file for backend 'litert'"):
        bundle.artifact("litert")
    with pytest.raises(BackendError, match="Unknown backend 'tensorrt'"):
        create_backend("tensorrt")


def test_cli_model_info(tiny_bundle: Path, capsys):
    assert main(["model", "info", str(tiny_bundle)]) == 0
    out = capsys.readouterr().out
    assert "tiny-test-model 0.0.1" in out and "hashes verified" in out and "threshold" in out
    (tiny_bundle / "model.onnx").write_bytes(b"garbage")
    assert main(["model", "info", str(tiny_bundle)]) == 2
    err = capsys.readouterr().err
    assert "does not match its manifest" in err and "Redeploy" in err


def test_bundled_default_model_is_consistent(default_bundle: Path):
    bundle = load_bundle(default_bundle)
    backend = create_backend("onnxruntime")
    backend.load(bundle)  # verifies the graph's input against the manifest
    manifest = bundle.manifest
    assert manifest.artifacts[0].quantization.startswith("int8")
    assert (default_bundle / "MODEL_CARD.md").is_file()
    assert "MODEL_CARD.md" in manifest.files
    card = (default_bundle / "MODEL_CARD.md").read_text()
    assert "Kermany" in card and "CC BY 4.0" in card and "diagnostic" in card.lower()
    size_mb = (default_bundle / manifest.artifacts[0].file).stat().st_size / 1e6
    assert size_mb < 6


def test_bundled_model_runs_on_both_backends_with_the_same_decisions(default_bundle: Path, shared_data: Path):
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert not installed")
    from edge_runtime.pipeline import ScanAnalyzer

    files = sorted((shared_data / "cxr/kermany_pneumonia_224/test/NORMAL").glob("*.jpeg"))[:4]
    files += sorted((shared_data / "cxr/kermany_pneumonia_224/test/PNEUMONIA").glob("*.jpeg"))[:4]
    onnx = ScanAnalyzer.from_bundle_path(default_bundle, "onnxruntime")
    litert = ScanAnalyzer.from_bundle_path(default_bundle, "litert")
    try:
        for path in files:
            a, b = onnx.analyze(path).result().message(), litert.analyze(path).result().message()
            assert b["model"]["backend"] == "litert"
            assert abs(a["findings"][0]["probability"] - b["findings"][0]["probability"]) < 0.2
            assert a["decision"] == b["decision"], path.name
    finally:
        onnx.close()
        litert.close()


def test_manifest_is_as_strict_as_the_configuration(tmp_path: Path):
    """A key the runtime would silently ignore (a typo) is refused, naming it and every other fault."""
    bundle_dir = make_tiny_bundle(tmp_path / "typo")
    _rewrite_manifest(bundle_dir, output__activaton="softmax", operating_point__threshold=1.5)
    with pytest.raises(ModelBundleError) as info:
        load_bundle(bundle_dir)
    assert "output.activaton: Extra inputs are not permitted" in info.value.message
    assert "operating_point.threshold" in info.value.message
    assert "python -m training package" in info.value.action
    # Sections that describe the model to people stay free-form.
    bundle_dir = make_tiny_bundle(tmp_path / "notes")
    _rewrite_manifest(bundle_dir, training={"notes": ["anything"]}, intended_use__population="adults")
    assert load_bundle(bundle_dir).intended_use["population"] == "adults"


def test_write_manifest_refuses_what_the_edge_would_refuse(tmp_path: Path):
    from edge_runtime.bundle import write_manifest

    bundle_dir = make_tiny_bundle(tmp_path / "w")
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["artifacts"][0]["file"] = "missing.onnx"
    with pytest.raises(ModelBundleError, match=r"model file 'missing\.onnx' has no sha256"):
        write_manifest(bundle_dir, manifest)


def test_model_file_from_another_build_is_refused_even_with_its_hash_rewritten(tmp_path: Path):
    """The manifest's model id is inside the ONNX file too: hashes alone can be rewritten."""
    onnx = pytest.importorskip("onnx")
    from edge_runtime.bundle import sha256_file, write_manifest
    from training.bundle.model_id import stamp_onnx_model_id

    bundle_dir = make_tiny_bundle(tmp_path / "stamped")
    model_path = bundle_dir / "model.onnx"
    model_id = stamp_onnx_model_id(model_path)
    assert stamp_onnx_model_id(model_path) == model_id  # repackaging keeps the id
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["artifacts"][0]["model_id"] = model_id
    sign_bundle(Path(write_manifest(bundle_dir, manifest)).parent)
    create_backend("onnxruntime").load(load_bundle(bundle_dir))  # belongs together: loads

    other = onnx.load(str(model_path))  # another build of the same graph
    onnx.helper.set_model_props(other, {"healthdiag.model_id": "f" * 64})
    onnx.save(other, str(model_path))
    manifest["files"]["model.onnx"] = sha256_file(model_path)  # hash rewritten to match
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    sign_bundle(bundle_dir)  # even by a trusted signer (a packaging mistake, not an attacker)
    with pytest.raises(ModelBundleError, match="is not the model its manifest describes") as info:
        create_backend("onnxruntime").load(load_bundle(bundle_dir))
    assert "Redeploy" in info.value.action
