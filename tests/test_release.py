"""The release command against moto (S3, IoT, STS) and a Stubber for Greengrass v2.

moto has no Greengrass v2, so its calls go through ``botocore.stub.Stubber``:
every request the command makes is checked against the real service model,
and the expected parameters (merged components, rollout, rollback policy)
are asserted exactly.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import ANY, Stubber
from conftest import make_tiny_bundle

moto = pytest.importorskip("moto", reason="moto is not installed (pip install moto[all])")

from cdk.release import (  # noqa: E402
    MODEL_COMPONENT,
    Clients,
    ReleaseError,
    Rollout,
    _components_build,
    deploy,
    main,
    publish,
    rollback,
    status,
)
from cdk.trust import trust_signing_key  # noqa: E402

REGION = "eu-west-1"
ACCOUNT = "123456789012"  # moto's account
RUNTIME = "com.healthdiag.EdgeInference"
BUCKET = "healthdiag-artifacts"
NOW = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)


@pytest.fixture(name="aws")
def aws_clients(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Clients, Stubber]]:
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(key, value)
    with moto.mock_aws():
        greengrass = boto3.client("greengrassv2", region_name=REGION)
        clients = Clients(
            s3=boto3.client("s3", region_name=REGION),
            iot=boto3.client("iot", region_name=REGION),
            greengrass=greengrass,
            sts=boto3.client("sts", region_name=REGION),
            region=REGION,
        )
        clients.s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        with Stubber(greengrass) as stub:
            yield clients, stub
            stub.assert_no_pending_responses()


def _arn(version: str | None = None) -> str:
    arn = f"arn:aws:greengrass:{REGION}:{ACCOUNT}:components:{MODEL_COMPONENT}"
    return f"{arn}:versions:{version}" if version else arn


def _recipe(version: str) -> str:
    return str(_components_build().render_recipe(MODEL_COMPONENT, version, BUCKET))


def _group(clients: Clients, name: str, things: list[str]) -> str:
    arn = clients.iot.create_thing_group(thingGroupName=name)["thingGroupArn"]
    for thing in things:
        clients.iot.create_thing(thingName=thing)
        clients.iot.add_thing_to_thing_group(thingGroupName=name, thingName=thing)
    return str(arn)


def _stub_current(stub: Stubber, target: str, model_version: str | None, job: str = "job-1") -> None:
    """list_deployments + get_deployment for a group whose deployment pins ``model_version``."""
    if model_version is None:
        stub.add_response(
            "list_deployments", {"deployments": []}, {"targetArn": target, "historyFilter": "LATEST_ONLY"}
        )
        return
    stub.add_response(
        "list_deployments",
        {
            "deployments": [
                {
                    "targetArn": target,
                    "deploymentId": f"dep-{model_version}",
                    "deploymentName": "x",
                    "creationTimestamp": NOW,
                    "deploymentStatus": "ACTIVE",
                    "isLatestForTarget": True,
                }
            ]
        },
        {"targetArn": target, "historyFilter": "LATEST_ONLY"},
    )
    stub.add_response(
        "get_deployment",
        {
            "targetArn": target,
            "deploymentId": f"dep-{model_version}",
            "deploymentStatus": "ACTIVE",
            "iotJobId": job,
            "components": {
                RUNTIME: {
                    "componentVersion": "0.1.0",
                    "configurationUpdate": {"merge": '{"Mqtt":{"Enabled":false}}'},
                },
                MODEL_COMPONENT: {"componentVersion": model_version},
            },
        },
        {"deploymentId": f"dep-{model_version}"},
    )


def test_publish_uploads_and_creates_then_is_idempotent_and_refuses_other_content(
    aws: tuple[Clients, Stubber], tmp_path: Path
) -> None:
    clients, stub = aws
    bundle = make_tiny_bundle(tmp_path / "b", version="0.2.0")
    not_found = {"arn": _arn("0.2.0"), "recipeOutputFormat": "YAML"}
    stub.add_client_error(
        "get_component", "ResourceNotFoundException", http_status_code=404, expected_params=not_found
    )
    stub.add_response(
        "create_component_version",
        {
            "arn": _arn("0.2.0"),
            "componentName": MODEL_COMPONENT,
            "componentVersion": "0.2.0",
            "creationTimestamp": NOW,
            "status": {"componentState": "REQUESTED"},
        },
        {"inlineRecipe": _recipe("0.2.0").encode()},
    )
    first = publish(clients, bundle, BUCKET)
    assert first["status"] == "published"
    key = f"{MODEL_COMPONENT}/0.2.0/pneumonia-cxr.zip"
    head = clients.s3.head_object(Bucket=BUCKET, Key=key)
    assert head["Metadata"]["sha256"] == first["sha256"]

    # Same version, same content: nothing is created again (a create would answer 409).
    stub.add_response(
        "get_component", {"recipeOutputFormat": "YAML", "recipe": _recipe("0.2.0").encode()}, not_found
    )
    assert publish(clients, bundle, BUCKET)["status"] == "already published"

    # Same version, other content: refused with the way out.
    changed = make_tiny_bundle(tmp_path / "c", version="0.2.0", conformance=True)
    stub.add_response(
        "get_component", {"recipeOutputFormat": "YAML", "recipe": _recipe("0.2.0").encode()}, not_found
    )
    with pytest.raises(ReleaseError, match="immutable") as info:
        publish(clients, changed, BUCKET)
    assert "new version" in info.value.action


def test_publish_treats_a_concurrent_identical_create_as_published(
    aws: tuple[Clients, Stubber], tmp_path: Path
) -> None:
    clients, stub = aws
    bundle = make_tiny_bundle(tmp_path / "b", version="0.2.1")
    query = {"arn": _arn("0.2.1"), "recipeOutputFormat": "YAML"}
    stub.add_client_error(
        "get_component", "ResourceNotFoundException", http_status_code=404, expected_params=query
    )
    stub.add_client_error(
        "create_component_version",
        "ConflictException",
        http_status_code=409,
        expected_params={"inlineRecipe": _recipe("0.2.1").encode()},
    )
    stub.add_response(
        "get_component", {"recipeOutputFormat": "YAML", "recipe": _recipe("0.2.1").encode()}, query
    )
    assert publish(clients, bundle, BUCKET)["status"] == "already published"


def test_publish_refuses_a_damaged_bundle(aws: tuple[Clients, Stubber], tmp_path: Path) -> None:
    clients, _ = aws
    bundle = make_tiny_bundle(tmp_path / "b", version="0.2.0")
    (bundle / "model.onnx").write_bytes(b"not the model")
    with pytest.raises(ReleaseError, match="failed verification"):
        publish(clients, bundle, BUCKET)


def test_deploy_merges_the_group_deployment_with_rollout_abort_and_rollback(
    aws: tuple[Clients, Stubber],
) -> None:
    clients, stub = aws
    canary = _group(clients, "canary", ["box-1", "box-2"])
    _group(clients, "fleet", ["box-3"])
    stub.add_response("describe_component", {"arn": _arn("0.2.0")}, {"arn": _arn("0.2.0")})
    fleet_arn = clients.iot.describe_thing_group(thingGroupName="fleet")["thingGroupArn"]
    _stub_current(stub, fleet_arn, "0.1.1")  # the other group, checked for shared devices
    _stub_current(stub, canary, "0.1.1")
    rollout = Rollout(base_rate_per_minute=2, abort_failure_percent=20.0)
    stub.add_response(
        "create_deployment",
        {"deploymentId": "dep-new", "iotJobId": "job-new"},
        {
            "targetArn": canary,
            "deploymentName": f"canary: {MODEL_COMPONENT} 0.2.0",
            # Merged: the runtime keeps its version and configuration; only the model moves.
            "components": {
                RUNTIME: {
                    "componentVersion": "0.1.0",
                    "configurationUpdate": {"merge": '{"Mqtt":{"Enabled":false}}'},
                },
                MODEL_COMPONENT: {"componentVersion": "0.2.0"},
            },
            "iotJobConfiguration": {
                "jobExecutionsRolloutConfig": {
                    "exponentialRate": {
                        "baseRatePerMinute": 2,
                        "incrementFactor": 2.0,
                        "rateIncreaseCriteria": {"numberOfSucceededThings": 5},
                    },
                    "maximumPerMinute": 1000,
                },
                "abortConfig": {
                    "criteriaList": [
                        {
                            "failureType": "ALL",
                            "action": "CANCEL",
                            "thresholdPercentage": 20.0,
                            "minNumberOfExecutedThings": 5,
                        }
                    ]
                },
                "timeoutConfig": {"inProgressTimeoutInMinutes": 60},
            },
            "deploymentPolicies": {
                "failureHandlingPolicy": "ROLLBACK",
                "componentUpdatePolicy": {"timeoutInSeconds": 120, "action": "NOTIFY_COMPONENTS"},
                "configurationValidationPolicy": {"timeoutInSeconds": 60},
            },
            "tags": {"healthdiag-release": "deploy 0.2.0"},
        },
    )
    result = deploy(clients, "canary", "0.2.0", rollout=rollout, other_groups=["fleet"])
    assert result["previous"] == "0.1.1" and result["deploymentId"] == "dep-new"


def test_deploy_refuses_devices_that_another_group_pins_to_another_version(
    aws: tuple[Clients, Stubber],
) -> None:
    clients, stub = aws
    _group(clients, "canary", ["box-1", "box-2"])
    fleet = _group(clients, "fleet", ["box-3"])
    clients.iot.add_thing_to_thing_group(thingGroupName="fleet", thingName="box-2")
    stub.add_response("describe_component", {"arn": _arn("0.2.0")}, {"arn": _arn("0.2.0")})
    _stub_current(stub, fleet, "0.1.1")
    with pytest.raises(ReleaseError, match="NoAvailableComponentVersionException") as info:
        deploy(clients, "canary", "0.2.0", other_groups=["fleet"])
    assert "box-2" in info.value.message and "disjoint" in info.value.action


def test_deploy_refuses_an_unpublished_version(aws: tuple[Clients, Stubber]) -> None:
    clients, stub = aws
    _group(clients, "canary", ["box-1"])
    stub.add_client_error(
        "describe_component",
        "ResourceNotFoundException",
        http_status_code=404,
        expected_params={"arn": _arn("9.9.9")},
    )
    with pytest.raises(ReleaseError, match="not published"):
        deploy(clients, "canary", "9.9.9")


def test_rollback_deploys_the_previous_published_version(aws: tuple[Clients, Stubber]) -> None:
    clients, stub = aws
    canary = _group(clients, "canary", ["box-1"])
    _stub_current(stub, canary, "0.2.0")
    stub.add_response(
        "list_component_versions",
        {
            "componentVersions": [
                {"componentName": MODEL_COMPONENT, "componentVersion": v, "arn": _arn(v)}
                for v in ("0.2.0", "0.1.0", "0.1.1", "0.10.0")
            ]
        },
        {"arn": _arn()},
    )
    stub.add_response("describe_component", {"arn": _arn("0.1.1")}, {"arn": _arn("0.1.1")})
    _stub_current(stub, canary, "0.2.0")
    expected: dict[str, Any] = {
        "targetArn": canary,
        "deploymentName": ANY,
        "components": ANY,
        "iotJobConfiguration": ANY,
        "deploymentPolicies": ANY,
        "tags": {"healthdiag-release": "rollback from 0.2.0"},
    }
    stub.add_response("create_deployment", {"deploymentId": "dep-back"}, expected)
    identity_calls: list[str] = []
    clients.sts.meta.events.register(
        "before-call.sts.GetCallerIdentity", lambda **_: identity_calls.append("sts")
    )
    result = rollback(clients, "canary")
    assert len(identity_calls) == 1  # the account is asked once per command, not per ARN
    assert (result["previous"], result["version"]) == ("0.2.0", "0.1.1")  # semver order, not text


def test_status_reports_the_job_progress(aws: tuple[Clients, Stubber]) -> None:
    clients, stub = aws
    canary = _group(clients, "canary", ["box-1", "box-2"])
    clients.iot.create_job(jobId="job-1", targets=[canary], document=json.dumps({"x": 1}))
    _stub_current(stub, canary, "0.2.0", job="job-1")
    report = status(clients, "canary")
    assert report["model"] == "0.2.0" and report["job"]["jobId"] == "job-1"
    assert report["job"]["status"] == "QUEUED"
    assert report["job"]["devices"]["numberOfQueuedThings"] == 1
    assert report["job"]["devices"]["numberOfFailedThings"] == 0


def test_cli_says_what_to_do_and_exits_1(
    aws: tuple[Clients, Stubber], capsys: pytest.CaptureFixture[str]
) -> None:
    clients, _ = aws
    assert main(["status", "--group", "nowhere"], clients=clients) == 1
    err = capsys.readouterr().err
    assert "Thing group 'nowhere' does not exist" in err and "→" in err


def test_trust_puts_the_pipeline_signing_key_into_the_group_runtime_config(
    aws: tuple[Clients, Stubber],
) -> None:
    """Fleet boxes trust only the runtime's own key by default: KMS-signed bundles need this once."""
    from edge_runtime.signing import public_key_fingerprint

    clients, stub = aws
    clients.kms = boto3.client("kms", region_name=REGION)
    key_id = clients.kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    canary = _group(clients, "canary", ["box-1"])
    _stub_current(stub, canary, "0.2.0")
    stub.add_response("create_deployment", {"deploymentId": "dep-trust"}, None)
    result = trust_signing_key(clients, "canary", key_id)
    assert result["deploymentId"] == "dep-trust"
    (fingerprint,) = result["trusted_fingerprints"]
    der = clients.kms.get_public_key(KeyId=key_id)["PublicKey"]
    from cryptography.hazmat.primitives import serialization

    assert fingerprint == public_key_fingerprint(serialization.load_der_public_key(der))


def test_trust_merges_only_the_model_keys_and_keeps_the_rest(aws: tuple[Clients, Stubber]) -> None:
    import json as _json

    from cryptography.hazmat.primitives import serialization

    clients, stub = aws
    clients.kms = boto3.client("kms", region_name=REGION)
    key_id = clients.kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    pem = (
        serialization.load_der_public_key(clients.kms.get_public_key(KeyId=key_id)["PublicKey"])
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    canary = _group(clients, "canary", ["box-1"])
    _stub_current(stub, canary, "0.2.0")
    merged = {"Model": {"RequireSignature": True, "TrustedKeys": [pem]}, "Mqtt": {"Enabled": False}}
    merge = _json.dumps(merged, separators=(",", ":"), sort_keys=True)
    stub.add_response(
        "create_deployment",
        {"deploymentId": "dep-trust"},
        {
            "targetArn": canary,
            "deploymentName": ANY,
            "components": {
                RUNTIME: {
                    "componentVersion": "0.1.0",
                    "configurationUpdate": {"merge": merge},
                },
                MODEL_COMPONENT: {"componentVersion": "0.2.0"},
            },
            "iotJobConfiguration": ANY,
            "deploymentPolicies": ANY,
            "tags": ANY,
        },
    )
    trust_signing_key(clients, "canary", key_id)
    rsa = clients.kms.create_key(KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    with pytest.raises(ReleaseError, match="ECDSA P-256"):
        trust_signing_key(clients, "canary", rsa)
