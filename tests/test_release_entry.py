"""The pipeline container's release step: gate against production, sign, publish, write the verdict.

Real bundle (the bundled model) and real manifests; moto for S3, KMS (an ECC
signing key: the signature is verified) and IoT, the Greengrass v2 Stubber
for the deployment read and the component creation.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from botocore.stub import Stubber
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

moto = pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")

from cdk.training_image.entry import release_candidate  # noqa: E402

RECORDS = "healthdiag-records"


def _environment(clients: Clients) -> dict[str, str]:
    clients.kms = boto3.client("kms", region_name=REGION)
    key = clients.kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["Arn"]
    clients.s3.create_bucket(Bucket=RECORDS, CreateBucketConfiguration={"LocationConstraint": REGION})
    return {
        "HEALTHDIAG_ARTIFACT_BUCKET": BUCKET,
        "HEALTHDIAG_RECORDS_BUCKET": RECORDS,
        "HEALTHDIAG_SIGNING_KEY": key,
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
    record = release_candidate(clients, default_bundle, env, "release-7", run_dir=run)
    assert record["passed"] and record["production"].endswith("0.1.1")
    assert record["dataset_sha256"] == hashlib.sha256((run / "split.json").read_bytes()).hexdigest()
    assert record["evaluation"] == {"threshold": 0.93}
    assert record["publish"]["status"] == "published"
    assert record["component"] == {MODEL_COMPONENT: {"ComponentVersion": version}}
    digest = bytes.fromhex(record["manifest_sha256"])
    verified = clients.kms.verify(
        KeyId=env["HEALTHDIAG_SIGNING_KEY"],
        Message=digest,
        MessageType="DIGEST",
        Signature=base64.b64decode(record["manifest_signature"]),
        SigningAlgorithm="ECDSA_SHA_256",
    )
    assert verified["SignatureValid"]
    stored = json.loads(
        clients.s3.get_object(Bucket=RECORDS, Key="releases/release-7/verdict.json")["Body"].read()
    )
    assert stored == record


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
