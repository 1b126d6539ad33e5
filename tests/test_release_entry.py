"""The pipeline container's release step: gate against production, sign, publish, write the verdict.

Real bundle (a copy of the bundled model) and real manifests; moto for S3 and
IoT, the Greengrass v2 Stubber for the deployment read and the component
creation. KMS is a botocore Stubber backed by a real P-256 key: moto's KMS
ignores ``MessageType=DIGEST`` (it hashes the digest again), so its
signatures would not be what real KMS returns; the Stubber checks the
request against the real service model and answers with what KMS would
(ECDSA over the manifest whose sha256 was sent), and the runtime's own
verifier checks the result.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest
from botocore.stub import Stubber
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from test_release import (
    BUCKET,
    NOW,
    REGION,
    _arn,
    _group,
    _recipe,
    aws_clients,  # noqa: F401 (the 'aws' fixture)
)

from cdk.release import MODEL_COMPONENT, Clients
from edge_runtime.bundle import BundleTrust, load_bundle
from edge_runtime.config import ModelConfig, RuntimeConfig
from edge_runtime.errors import ModelBundleError
from edge_runtime.signing import SIGNATURE_NAME, public_key_fingerprint

moto = pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")

from cdk.training_image.entry import release_candidate  # noqa: E402

RECORDS = "healthdiag-records"
KMS_KEY = f"arn:aws:kms:{REGION}:111122223333:key/0d1c2b3a-4f5e-6d7c-8b9a-0f1e2d3c4b5a"


class StubbedKms:
    """The pipeline's asymmetric KMS key (ECC_NIST_P256, SIGN_VERIFY), answered by a local private key."""

    def __init__(self, clients: Clients) -> None:
        self.private_key = ec.generate_private_key(ec.SECP256R1())
        self.public_pem = (
            self.private_key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )
        clients.kms = boto3.client("kms", region_name=REGION)
        self.stub = Stubber(clients.kms)
        self.stub.activate()

    def expect_signing(self, bundle_dir: Path) -> None:
        """KMS Sign on sha256(manifest.json) (DIGEST) then GetPublicKey, as real KMS answers them."""
        manifest = (bundle_dir / "manifest.json").read_bytes()
        self.stub.add_response(
            "sign",
            {
                "KeyId": KMS_KEY,
                "Signature": self.private_key.sign(manifest, ec.ECDSA(hashes.SHA256())),
                "SigningAlgorithm": "ECDSA_SHA_256",
            },
            {
                "KeyId": KMS_KEY,
                "Message": hashlib.sha256(manifest).digest(),
                "MessageType": "DIGEST",
                "SigningAlgorithm": "ECDSA_SHA_256",
            },
        )
        der = self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.stub.add_response(
            "get_public_key",
            {
                "KeyId": KMS_KEY,
                "PublicKey": der,
                "KeySpec": "ECC_NIST_P256",
                "KeyUsage": "SIGN_VERIFY",
                "SigningAlgorithms": ["ECDSA_SHA_256"],
            },
            {"KeyId": KMS_KEY},
        )


def _environment(clients: Clients) -> dict[str, str]:
    clients.s3.create_bucket(Bucket=RECORDS, CreateBucketConfiguration={"LocationConstraint": REGION})
    return {
        "HEALTHDIAG_ARTIFACT_BUCKET": BUCKET,
        "HEALTHDIAG_RECORDS_BUCKET": RECORDS,
        "HEALTHDIAG_SIGNING_KEY": KMS_KEY,
        "HEALTHDIAG_FLEET_GROUP": "fleet",
        "HEALTHDIAG_GATE": "{}",
    }


def _production(clients: Clients, stub: Stubber, manifest: dict[str, Any], version: str) -> None:
    """The fleet group runs ``version``, whose artifact zip holds ``manifest``."""
    fleet = _group(clients, "fleet", ["box-9"])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("manifest.json", json.dumps({**manifest, "version": version}))
    clients.s3.put_object(
        Bucket=BUCKET, Key=f"{MODEL_COMPONENT}/{version}/pneumonia-cxr.zip", Body=buffer.getvalue()
    )
    stub.add_response(
        "list_deployments",
        {"deployments": [{"deploymentId": "dep-prod", "targetArn": fleet, "creationTimestamp": NOW}]},
        {"targetArn": fleet, "historyFilter": "LATEST_ONLY"},
    )
    stub.add_response(
        "get_deployment",
        {"deploymentId": "dep-prod", "components": {MODEL_COMPONENT: {"componentVersion": version}}},
        {"deploymentId": "dep-prod"},
    )


def _candidate(default_bundle: Path) -> dict[str, Any]:
    return dict(json.loads((default_bundle / "manifest.json").read_text(encoding="utf-8")))


def test_a_passing_candidate_is_signed_published_and_recorded(
    aws: tuple[Clients, Stubber],
    default_bundle: Path,
    tmp_path: Path,
) -> None:
    clients, stub = aws
    env = _environment(clients)
    kms = StubbedKms(clients)
    bundle = Path(shutil.copytree(default_bundle, tmp_path / "candidate"))
    (bundle / SIGNATURE_NAME).unlink()  # a fresh candidate: signed by the pipeline, not the project key
    kms.expect_signing(bundle)
    older = copy.deepcopy(_candidate(default_bundle))
    older["metrics"]["test"]["auc"] = 0.9481  # what 0.1.1 scored
    _production(clients, stub, older, "0.1.1")
    version = _candidate(default_bundle)["version"]
    stub.add_client_error(
        "get_component",
        "ResourceNotFoundException",
        http_status_code=404,
        expected_params={"arn": _arn(version), "recipeOutputFormat": "YAML"},
    )
    stub.add_response(
        "create_component_version",
        {
            "arn": _arn(version),
            "componentName": MODEL_COMPONENT,
            "componentVersion": version,
            "creationTimestamp": NOW,
            "status": {"componentState": "REQUESTED"},
        },
        {"inlineRecipe": _recipe(version).encode()},
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "split.json").write_text('{"train": ["a.jpeg"], "val": ["b.jpeg"]}')
    (run / "evaluation.json").write_text('{"threshold": 0.93}')
    record = release_candidate(clients, bundle, env, "release-7", run_dir=run)
    assert record["passed"] and record["production"].endswith("0.1.1")
    assert record["dataset_sha256"] == hashlib.sha256((run / "split.json").read_bytes()).hexdigest()
    assert record["evaluation"] == {"threshold": 0.93}
    assert record["publish"]["status"] == "published"
    assert record["component"] == {MODEL_COMPONENT: {"ComponentVersion": version}}
    kms.stub.assert_no_pending_responses()
    digest = bytes.fromhex(record["manifest_sha256"])
    manifest = (bundle / "manifest.json").read_bytes()
    assert digest == hashlib.sha256(manifest).digest()
    public = kms.private_key.public_key()
    public.verify(base64.b64decode(record["manifest_signature"]), manifest, ec.ECDSA(hashes.SHA256()))
    assert record["signing_key_fingerprint"] == public_key_fingerprint(public)
    # A box whose configuration trusts the pipeline's key (inline PEM) accepts the bundle ...
    config = RuntimeConfig.from_mapping({"Model": {"TrustedKeys": [kms.public_pem]}})
    loaded = load_bundle(bundle, trust=BundleTrust.from_config(config.model))
    assert loaded.signature.verified and loaded.signature.signer == record["signing_key_fingerprint"]
    # ... and one that trusts only the project's bundled-models key refuses it.
    with pytest.raises(ModelBundleError, match="which is not trusted"):
        load_bundle(bundle, trust=BundleTrust.from_config(ModelConfig()))
    stored = json.loads(
        clients.s3.get_object(Bucket=RECORDS, Key="releases/release-7/verdict.json")["Body"].read()
    )
    assert stored == record
    key = f"{MODEL_COMPONENT}/{version}/pneumonia-cxr.zip"
    with zipfile.ZipFile(io.BytesIO(clients.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())) as z:
        shipped = {name: z.read(name) for name in z.namelist()}
    assert SIGNATURE_NAME in shipped, "the device would refuse a model zip without its signature"
    assert shipped[SIGNATURE_NAME] == (bundle / SIGNATURE_NAME).read_bytes()


def test_a_candidate_worse_than_production_is_recorded_and_not_published(
    aws: tuple[Clients, Stubber],
    default_bundle: Path,
) -> None:
    clients, stub = aws
    env = _environment(clients)
    better = copy.deepcopy(_candidate(default_bundle))
    better["metrics"]["test"]["auc"] = 0.995
    _production(clients, stub, better, "0.3.0")
    record = release_candidate(clients, default_bundle, env, "release-8")  # no Greengrass stub: no publish
    assert record["passed"] is False and "publish" not in record and "component" not in record
    assert [c["name"] for c in record["checks"] if not c["passed"]] == ["non-inferiority to production"]
    stored = json.loads(
        clients.s3.get_object(Bucket=RECORDS, Key="releases/release-8/verdict.json")["Body"].read()
    )
    assert stored["passed"] is False
