"""Bundle authenticity (issue 14, item 7): the manifest's signature is checked before any hash is believed.

Real keys, real ECDSA P-256 signatures, real tiny ONNX bundles. The session's
configured trust (conftest) is the bundled models' key plus the test key; the
tests here pass explicit :class:`BundleTrust` values or configurations.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import jsonschema
import pytest
from helpers import (
    TEST_KEY_FINGERPRINT,
    TEST_PUBLIC_KEY,
    make_tiny_bundle,
    sign_bundle,
    tamper_like_the_probe,
)

from edge_runtime.bundle import BundleTrust, load_bundle, write_manifest
from edge_runtime.cli import main
from edge_runtime.config import ModelConfig, RuntimeConfig, load_config
from edge_runtime.errors import ConfigError, ModelBundleError
from edge_runtime.pipeline import ScanAnalyzer
from edge_runtime.results import load_schema
from edge_runtime.signing import (
    SIGNATURE_NAME,
    bundled_models_key_path,
    generate_signing_key,
    load_public_key,
    public_key_fingerprint,
)

BUNDLED_FINGERPRINT = public_key_fingerprint(load_public_key(bundled_models_key_path()))
TEST_TRUST = BundleTrust.from_entries([TEST_PUBLIC_KEY])
STATUS_VALIDATOR = jsonschema.Draft202012Validator(load_schema("status-v1"))


def test_the_probe_is_refused_before_anything_runs(tiny_bundle: Path, capsys):
    load_bundle(tiny_bundle, trust=TEST_TRUST)  # intact: loads
    tamper_like_the_probe(tiny_bundle)
    with pytest.raises(ModelBundleError) as info:
        ScanAnalyzer.from_bundle_path(tiny_bundle, trust=TEST_TRUST)
    assert "altered after signing" in info.value.message
    assert TEST_KEY_FINGERPRINT in info.value.message
    # The admin's view of it: refused, no "hashes verified".
    assert main(["model", "info", str(tiny_bundle)]) == 2
    captured = capsys.readouterr()
    assert "altered after signing" in captured.err and "hashes verified" not in captured.out


def test_unsigned_bundle_is_refused_saying_what_to_do(tmp_path: Path):
    bundle = make_tiny_bundle(tmp_path / "unsigned", signed=False)
    assert not (bundle / SIGNATURE_NAME).exists()
    with pytest.raises(ModelBundleError) as info:
        load_bundle(bundle, trust=TEST_TRUST)
    assert f"not signed (no {SIGNATURE_NAME})" in info.value.message
    assert "--signing-key" in info.value.action and "Model.TrustedKeys" in info.value.action
    assert "RequireSignature: false" in info.value.action


def test_bundle_signed_by_an_untrusted_key_is_refused_naming_both_keys(tmp_path: Path):
    other_private, _, other_fingerprint = generate_signing_key(tmp_path / "keys", "someone-else")
    bundle = sign_bundle(make_tiny_bundle(tmp_path / "b", signed=False), other_private)
    with pytest.raises(ModelBundleError) as info:
        load_bundle(bundle, trust=TEST_TRUST)
    assert f"signed by key {other_fingerprint}, which is not trusted" in info.value.message
    assert f"trusted: {TEST_KEY_FINGERPRINT}" in info.value.message
    # The same bundle loads where that key is trusted (the signature itself is fine).
    trusted = BundleTrust.from_entries([tmp_path / "keys" / "someone-else.pub.pem"])
    assert load_bundle(bundle, trust=trusted).signature.signer == other_fingerprint


def test_damaged_signature_file_is_refused(tiny_bundle: Path):
    sig = tiny_bundle / SIGNATURE_NAME
    doc = json.loads(sig.read_text())
    doc["signature"] = doc["signature"][:-8] + "AAAAAAA="
    sig.write_text(json.dumps(doc))
    with pytest.raises(ModelBundleError, match="altered after signing"):
        load_bundle(tiny_bundle, trust=TEST_TRUST)
    sig.write_text(json.dumps({**doc, "algorithm": "rsa-pss-sha256"}))
    with pytest.raises(ModelBundleError, match=r"is not a healthdiag\.bundle-signature/1 signature"):
        load_bundle(tiny_bundle, trust=TEST_TRUST)


def test_development_mode_loads_with_a_warning_every_time_and_status_says_not_verified(
    tmp_path: Path, caplog
):
    bundle = make_tiny_bundle(tmp_path / "dev", signed=False)
    config = RuntimeConfig.from_mapping(
        {"Model": {"BundlePath": str(bundle), "RequireSignature": False}, "Decode": {"Isolate": False}}
    )
    caplog.set_level(logging.WARNING, logger="edge_runtime.signing")
    analyzer = ScanAnalyzer.from_config(config)
    try:
        status = analyzer.status_model()
    finally:
        analyzer.close()
    load_bundle(bundle, trust=BundleTrust.from_config(config.model))
    warnings = [r.getMessage() for r in caplog.records if r.name == "edge_runtime.signing"]
    assert len(warnings) == 2, warnings  # one per load
    assert "NOT authenticated (it is not signed" in warnings[0] and "RequireSignature is false" in warnings[0]
    assert status["signature"] == "not verified"
    STATUS_VALIDATOR.validate({**_status_shell(), "model": status})


def test_verified_bundle_status_names_the_signer(tiny_bundle: Path):
    config = RuntimeConfig.from_mapping(
        {
            "Model": {"BundlePath": str(tiny_bundle), "TrustedKeys": [TEST_PUBLIC_KEY.read_text()]},
            "Decode": {"Isolate": False},
        }
    )
    analyzer = ScanAnalyzer.from_config(config)  # the key given inline, as a Greengrass config would
    try:
        status = analyzer.status_model()
    finally:
        analyzer.close()
    assert status["signature"] == f"verified ({TEST_KEY_FINGERPRINT[:16]})"
    STATUS_VALIDATOR.validate({**_status_shell(), "model": status})


def _status_shell() -> dict:
    """The smallest valid status message, to check the model section against the schema."""
    return {
        "schema_version": "1.0",
        "message_type": "status",
        "state": "online",
        "timestamp_utc": "2026-11-30T00:00:00Z",
        "client_id": "box-1",
    }


def test_bundled_model_verifies_with_the_shipped_key_alone(default_bundle: Path):
    defaults = ModelConfig()  # not the test session's environment: what a fresh box trusts
    assert defaults.require_signature is True
    assert defaults.trusted_keys == (str(bundled_models_key_path()),)
    bundle = load_bundle(default_bundle, trust=BundleTrust.from_config(defaults))
    assert bundle.signature.verified and bundle.signature.signer == BUNDLED_FINGERPRINT
    assert SIGNATURE_NAME not in bundle.manifest.files  # it signs the manifest, not listed in it
    # A box that trusts only its own pipeline's key does not run the bundled model.
    with pytest.raises(ModelBundleError, match=f"signed by key {BUNDLED_FINGERPRINT}, which is not trusted"):
        load_bundle(default_bundle, trust=TEST_TRUST)


def test_write_manifest_skips_the_signature_and_drops_a_stale_one(tiny_bundle: Path):
    assert (tiny_bundle / SIGNATURE_NAME).is_file()
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    write_manifest(tiny_bundle, manifest)
    assert set(json.loads((tiny_bundle / "manifest.json").read_text())["files"]) == {"model.onnx"}
    assert not (tiny_bundle / SIGNATURE_NAME).exists()  # its manifest is gone: so is its signature
    with pytest.raises(ModelBundleError, match="not signed"):
        load_bundle(tiny_bundle, trust=TEST_TRUST)


def test_trusted_keys_are_checked_at_start_up(tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        RuntimeConfig.from_mapping({"Model": {"TrustedKeys": [str(tmp_path / "missing.pub.pem")]}})
    assert "Model.TrustedKeys: Value error, cannot read public key file" in info.value.message
    assert "missing.pub.pem" in info.value.message
    private, _, _ = generate_signing_key(tmp_path, "k")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        RuntimeConfig.from_mapping({"Model": {"TrustedKeys": [str(private)]}})
    config = load_config(
        environ={
            "EDGE_RUNTIME__MODEL__TRUSTED_KEYS": json.dumps([str(TEST_PUBLIC_KEY)]),
            "EDGE_RUNTIME__MODEL__REQUIRE_SIGNATURE": "false",
        }
    )
    trust = BundleTrust.from_config(config.model)
    assert trust.fingerprints == [TEST_KEY_FINGERPRINT] and trust.require_signature is False


def test_model_info_names_the_signer_or_says_it_is_not_authenticated(tmp_path: Path, capsys):
    bundle = make_tiny_bundle(tmp_path / "b")
    assert main(["model", "info", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert f"signed by trusted key {TEST_KEY_FINGERPRINT}" in out and "all 1 file hashes verified" in out
    shutil.rmtree(bundle)
    make_tiny_bundle(bundle, signed=False)
    config = tmp_path / "dev.yaml"
    config.write_text("Model:\n  RequireSignature: false\n")
    assert main(["model", "info", str(bundle), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "NOT AUTHENTICATED: it is not signed" in out
