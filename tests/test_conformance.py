"""The on-device conformance check: a model is only used where it reproduces its references.

Runs the real check (``edge_runtime.conformance``) through the same load path
as the service (``ScanAnalyzer.from_bundle_path``) and the CLI, on a tiny real
ONNX model whose reference set is computed here (so it must pass) and on the
same bundle with one reference moved by 0.3 (as if this CPU computed that much
differently from the build machine: it must be refused, naming the CPU
features and the image).
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from helpers import make_tiny_bundle, sign_bundle

from edge_runtime.backends import create_backend
from edge_runtime.bundle import load_bundle
from edge_runtime.cli import main as cli_main
from edge_runtime.conformance import check_conformance, require_cpu_support
from edge_runtime.cpu import cpu_summary
from edge_runtime.errors import ConformanceError, ModelBundleError
from edge_runtime.pipeline import ScanAnalyzer
from edge_runtime.results import build_status

SCHEMAS = Path(__file__).resolve().parents[1] / "edge_runtime" / "schemas"


def test_a_conforming_bundle_loads_and_reports_its_check(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "ok", conformance=True)
    analyzer = ScanAnalyzer.from_bundle_path(bundle)
    try:
        report = analyzer.conformance
        assert report is not None and report.passed
        assert len(report.rows) == 8
        # The same engine on the same CPU: the references are reproduced to float precision.
        assert report.max_abs_diff < 1e-6
        assert report.decisions_differing == 0
        assert report.cpu["int8_features"] == cpu_summary()["int8_features"]
        assert "passed" in report.explain()
    finally:
        analyzer.close()


def test_a_drifted_model_is_refused_naming_the_cpu_and_the_image(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "drift", conformance=True, drift=0.3)
    with pytest.raises(ConformanceError) as info:
        ScanAnalyzer.from_bundle_path(bundle)
    message = info.value.message
    assert "conformance check FAILED" in message
    assert "grey-7.png" in message  # the worst reference image
    assert "INT8 features" in message and "allowed 0.0200" in message
    assert isinstance(info.value, ModelBundleError)  # refused exactly like a hash mismatch
    assert "previous model stays" in info.value.action


def test_a_decision_flip_outside_the_margin_fails_even_within_tolerance(tmp_path: Path) -> None:
    # The last reference is 0.015 below this CPU's output (within the 0.02 tolerance). With the
    # threshold halfway between them the decision differs, and the reference is 0.0075 from the
    # threshold, outside a 0.005 margin: the answer a subscriber sees would change, so it fails.
    bundle = load_bundle(make_tiny_bundle(tmp_path / "flip", conformance=True, drift=0.015, margin=0.005))
    backend = create_backend("onnxruntime")
    backend.load(bundle)
    try:
        here = check_conformance(bundle, backend)
        assert here is not None and here.passed  # threshold 0.5: same decisions, |dp| 0.015
        output = here.rows[-1].output
        flipped = check_conformance(bundle, backend, threshold=output - 0.0075)
        assert flipped is not None and not flipped.passed
        assert flipped.decisions_differing == 1 and flipped.max_abs_diff <= 0.02
        assert not flipped.worst.near_threshold and flipped.worst.source == "grey-7.png"
        # Inside the margin the same flip is tolerated.
        near = check_conformance(bundle, backend, threshold=output - 0.012)
        assert near is not None and near.passed and near.decisions_differing == 1
    finally:
        backend.close()


def test_status_message_carries_the_check_and_validates(tmp_path: Path) -> None:
    analyzer = ScanAnalyzer.from_bundle_path(make_tiny_bundle(tmp_path / "ok", conformance=True))
    try:
        model = analyzer.status_model()
    finally:
        analyzer.close()
    assert model["conformance"]["passed"] is True
    assert "worst" not in model["conformance"]  # no file names on the status topic
    status = build_status("online", "box-1", model=model, counters={"received": 0})
    schema = json.loads((SCHEMAS / "status-v1.schema.json").read_text(encoding="utf-8"))
    jsonschema.validate(status, schema)


def test_model_verify_prints_the_table_and_exits_by_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ok = make_tiny_bundle(tmp_path / "ok", conformance=True)
    assert cli_main(["model", "verify", str(ok)]) == 0
    out = capsys.readouterr().out
    assert "grey-0.png" in out and "passed" in out and "p_fp32" in out
    bad = make_tiny_bundle(tmp_path / "bad", conformance=True, drift=0.3)
    assert cli_main(["model", "verify", str(bad), "--json"]) == 1
    reports = json.loads(capsys.readouterr().out)
    assert reports[0]["passed"] is False and reports[0]["worst"]["image"] == "grey-7.png"
    old = make_tiny_bundle(tmp_path / "old")
    assert cli_main(["model", "verify", str(old)]) == 2
    assert "no conformance reference set" in capsys.readouterr().err


def test_a_model_restricted_to_vnni_is_refused_elsewhere(tmp_path: Path) -> None:
    bundle_dir = make_tiny_bundle(tmp_path / "vnni")
    manifest = json.loads((bundle_dir / "manifest.json").read_text(encoding="utf-8"))
    here = cpu_summary()["int8_dot"]
    others = [dot for dot in ("vnni", "vpmaddubsw", "arm-dot") if dot != here]
    manifest["artifacts"][0]["requires_int8_dot"] = others
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    sign_bundle(bundle_dir)  # re-signed, as packaging would
    bundle = load_bundle(bundle_dir)
    with pytest.raises(ConformanceError, match=f"uses {here}"):
        require_cpu_support(bundle.artifact("onnxruntime"))
    with pytest.raises(ConformanceError):
        ScanAnalyzer.from_bundle_path(bundle_dir)
    manifest["artifacts"][0]["requires_int8_dot"] = [here]
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    sign_bundle(bundle_dir)  # re-signed, as packaging would
    require_cpu_support(load_bundle(bundle_dir).artifact("onnxruntime"))  # allowed here


def test_a_reference_set_missing_from_files_is_refused(tmp_path: Path) -> None:
    bundle_dir = make_tiny_bundle(tmp_path / "ok", conformance=True)
    manifest = json.loads((bundle_dir / "manifest.json").read_text(encoding="utf-8"))
    del manifest["files"]["conformance.npz"]
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    sign_bundle(bundle_dir)  # re-signed, as packaging would
    with pytest.raises(ModelBundleError, match="reference-set file"):
        load_bundle(bundle_dir)
