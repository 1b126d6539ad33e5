"""The conformance check covers the out-of-distribution score (issue #26).

A tiny bundle whose model also outputs ``features`` and whose reference set holds the build
machine's features: a box scores its own features and the stored ones with the bundle's
statistics; tampered reference features (re-hashed and re-signed, so only the check can catch
them) move the expected scores and the bundle is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import make_tiny_bundle, sign_bundle

from edge_runtime.backends import create_backend
from edge_runtime.bundle import load_bundle, sha256_file
from edge_runtime.conformance import check_conformance, enforce
from edge_runtime.errors import ConformanceError, ModelBundleError


def _rewrite_conformance(bundle: Path, **changes: np.ndarray) -> None:
    """Replace arrays of conformance.npz, rewrite its hash and re-sign, like a determined tamperer."""
    path = bundle / "conformance.npz"
    with np.load(path) as saved:
        arrays = {key: saved[key] for key in saved.files}
    arrays.update(changes)
    np.savez_compressed(path, **arrays)
    manifest_path = bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["conformance.npz"] = sha256_file(path)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    sign_bundle(bundle)


def _check(bundle_dir: Path):
    bundle = load_bundle(bundle_dir)
    backend = create_backend("onnxruntime")
    backend.load(bundle)
    try:
        return check_conformance(bundle, backend)
    finally:
        backend.close()


def test_the_ood_score_is_checked_and_reproduced_here(tmp_path: Path) -> None:
    report = _check(make_tiny_bundle(tmp_path / "ok", conformance=True, ood=True))
    assert report is not None and report.passed
    assert report.ood_checked
    assert all(row.ood_score is not None and row.ood_expected is not None for row in report.rows)
    # The same engine on the same CPU: the build machine's scores to float precision.
    assert report.ood_max_drift is not None and report.ood_max_drift < 1e-6
    assert report.ood_verdicts_differing == 0
    # The set spans both verdicts (the darkest and brightest references are outside).
    assert report.ood_threshold == 1.5
    verdicts = {row.ood_score > report.ood_threshold for row in report.rows}
    assert verdicts == {True, False}
    summary = report.summary()["ood"]
    assert summary["max_drift_allowed"] == 0.05 and summary["verdicts_differing"] == 0
    assert "out-of-distribution score" in report.explain()


def test_tampered_reference_features_are_refused(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "tampered", conformance=True, ood=True)
    with np.load(bundle / "conformance.npz") as saved:
        features = saved["features_expected_onnxruntime"].copy()
    features[3] += 0.3  # one mid-grey reference made to look like another image
    _rewrite_conformance(bundle, features_expected_onnxruntime=features)
    report = _check(bundle)
    assert report is not None and not report.passed
    assert report.worst.index == 3
    assert report.ood_max_drift is not None and report.ood_max_drift > 0.05
    # Probabilities alone still conform: only the features check caught it.
    assert report.max_drift < 1e-6
    with pytest.raises(ConformanceError) as info:
        enforce(report)  # what the service and `model verify` do with a failed report
    assert isinstance(info.value, ModelBundleError)  # refused like a hash mismatch
    assert "out-of-distribution score: max drift" in info.value.message


def test_reference_features_without_tolerances_are_refused(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "no-tolerance", conformance=True, ood=True)
    manifest_path = bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["conformance"]["ood_max_drift"]
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    sign_bundle(bundle)
    with pytest.raises(ModelBundleError, match="ood_max_drift"):
        _check(bundle)


def test_reference_features_of_the_wrong_width_are_refused(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "width", conformance=True, ood=True)
    _rewrite_conformance(bundle, features_expected_onnxruntime=np.zeros((8, 4), dtype=np.float32))
    with pytest.raises(ModelBundleError, match=r"\[images, 3\]"):
        _check(bundle)


def test_a_backend_with_statistics_of_its_own_is_scored_with_them(tmp_path: Path) -> None:
    """``intended_use.ood.by_backend.<name>``: each backend's features, each backend's statistics."""
    from edge_runtime.bundle import write_manifest
    from edge_runtime.conformance import ood_for_backend

    folder = make_tiny_bundle(tmp_path / "own", conformance=True, ood=True)
    (folder / "ood.onnxruntime.npz").write_bytes((folder / "ood.npz").read_bytes())
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["intended_use"]["ood"]["by_backend"] = {
        "onnxruntime": {"file": "ood.onnxruntime.npz", "threshold": 0.5}
    }
    write_manifest(folder, {k: v for k, v in manifest.items() if k not in ("files", "format")})
    sign_bundle(folder)
    found = ood_for_backend(load_bundle(folder), "onnxruntime")
    assert found is not None and found[1] == 0.5
    report = _check(folder)
    assert report is not None and report.ood_threshold == 0.5 and report.passed
    # A statistics file the manifest does not list is refused, naming it: a manifest naming one
    # cannot even be written (the typed manifest checks every file it names).
    manifest["intended_use"]["ood"]["by_backend"]["onnxruntime"]["file"] = "missing.npz"
    with pytest.raises(ModelBundleError, match=r"missing\.npz"):
        write_manifest(folder, {k: v for k, v in manifest.items() if k not in ("files", "format")})
