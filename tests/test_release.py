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
import yaml
from botocore.stub import ANY, Stubber
from helpers import BUCKET, NOW, REGION, make_tiny_bundle, moto_release_clients
from helpers import make_thing_group as _group
from helpers import model_component_arn as _arn
from helpers import model_recipe as _recipe

moto = pytest.importorskip("moto", reason="moto is not installed (pip install moto[all])")

from cdk.release import main  # noqa: E402
from cdk.release_steps import (  # noqa: E402
    MODEL_COMPONENT,
    Clients,
    ReleaseError,
    Rollout,
    deploy,
    publish,
    recipe_meaning,
    rollback,
    same_recipe,
    status,
    trust_signing_key,
)

RUNTIME = "com.healthdiag.EdgeInference"


@pytest.fixture(name="aws")
def aws_clients(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Clients, Stubber]]:
    yield from moto_release_clients(monkeypatch, Clients)


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


def _as_the_service_returns_it(recipe: str, fmt: str = "JSON", **changes: Any) -> bytes:
    """``recipe`` as GetComponent gives it back: re-serialised (keys sorted, comments gone), artifacts
    with the digest and algorithm the service computed, the empty top-level Lifecycle dropped.
    ``changes`` replace top-level keys (a different recipe)."""
    data = yaml.safe_load(recipe)
    data.pop("Lifecycle")
    for manifest in data["Manifests"]:
        for artifact in manifest["Artifacts"]:
            artifact.update(Digest="q1w2e3r4t5y6u7i8o9p0q1w2e3r4t5y6u7i8o9p0abc=", Algorithm="SHA-256")
    data.update(changes)
    if fmt == "JSON":
        return json.dumps(data, sort_keys=True).encode()
    return yaml.safe_dump(data, sort_keys=True).encode()


def _published_once(clients: Clients, stub: Stubber, bundle: Path, version: str) -> dict[str, Any]:
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
    return publish(clients, bundle, BUCKET)


@pytest.mark.parametrize("fmt", ["JSON", "YAML"])
def test_publish_reads_the_service_normalised_recipe_as_the_same(
    aws: tuple[Clients, Stubber], tmp_path: Path, fmt: str
) -> None:
    clients, stub = aws
    bundle = make_tiny_bundle(tmp_path / "b", version="0.2.0")
    _published_once(clients, stub, bundle, "0.2.0")
    query = {"arn": _arn("0.2.0"), "recipeOutputFormat": "YAML"}
    normalised = _as_the_service_returns_it(_recipe("0.2.0"), fmt)
    assert normalised.decode().strip() != _recipe("0.2.0").strip()
    stub.add_response("get_component", {"recipeOutputFormat": fmt, "recipe": normalised}, query)
    assert publish(clients, bundle, BUCKET)["status"] == "already published"
    # The same after a concurrent create (409): the service's copy is what it answers with.
    stub.add_client_error(
        "get_component", "ResourceNotFoundException", http_status_code=404, expected_params=query
    )
    stub.add_client_error(
        "create_component_version",
        "ConflictException",
        http_status_code=409,
        expected_params={"inlineRecipe": _recipe("0.2.0").encode()},
    )
    stub.add_response("get_component", {"recipeOutputFormat": fmt, "recipe": normalised}, query)
    assert publish(clients, bundle, BUCKET)["status"] == "already published"


def _other_artifact(recipe: str) -> dict[str, Any]:
    manifests = yaml.safe_load(recipe)["Manifests"]
    manifests[0]["Artifacts"][0]["Uri"] = f"s3://other-bucket/{MODEL_COMPONENT}/0.2.0/pneumonia-cxr.zip"
    return {"Manifests": manifests}


@pytest.mark.parametrize(
    "difference",
    [
        pytest.param(_other_artifact, id="another artifact URI"),
        pytest.param(
            lambda _: {"ComponentConfiguration": {"DefaultConfiguration": {"Threshold": 0.2}}},
            id="another default configuration",
        ),
        pytest.param(
            lambda _: {"ComponentDependencies": {RUNTIME: {"VersionRequirement": ">=0.1.0"}}},
            id="a dependency",
        ),
    ],
)
def test_publish_refuses_a_published_recipe_that_means_something_else(
    aws: tuple[Clients, Stubber], tmp_path: Path, difference: Any
) -> None:
    clients, stub = aws
    bundle = make_tiny_bundle(tmp_path / "b", version="0.2.0")
    _published_once(clients, stub, bundle, "0.2.0")
    query = {"arn": _arn("0.2.0"), "recipeOutputFormat": "YAML"}
    other = _as_the_service_returns_it(_recipe("0.2.0"), **difference(_recipe("0.2.0")))
    stub.add_response("get_component", {"recipeOutputFormat": "JSON", "recipe": other}, query)
    with pytest.raises(ReleaseError, match="immutable"):
        publish(clients, bundle, BUCKET)
    stub.add_client_error(
        "get_component", "ResourceNotFoundException", http_status_code=404, expected_params=query
    )
    stub.add_client_error(
        "create_component_version",
        "ConflictException",
        http_status_code=409,
        expected_params={"inlineRecipe": _recipe("0.2.0").encode()},
    )
    stub.add_response("get_component", {"recipeOutputFormat": "JSON", "recipe": other}, query)
    with pytest.raises(ReleaseError, match="with another recipe"):
        publish(clients, bundle, BUCKET)


def test_recipes_are_compared_by_meaning() -> None:
    """Keys case-insensitive (as Greengrass reads them), Greengrass's defaults written out or not."""
    ours = _recipe("0.2.0")
    data = yaml.safe_load(ours)
    shouted = {key.upper() if key.startswith("Component") else key: value for key, value in data.items()}
    assert same_recipe(json.dumps(shouted), ours)
    assert not same_recipe(None, ours) and not same_recipe("not: [a recipe", ours)
    for manifest in data["Manifests"]:
        manifest["Artifacts"][0].pop("Unarchive")  # NONE: the zip would no longer be unpacked
    assert not same_recipe(json.dumps(data), ours)
    assert recipe_meaning(ours)["manifests"][0] == {
        "platform": {"os": "linux", "architecture": "amd64"},
        "lifecycle": {},
        "selections": [],
        "artifacts": [
            {
                "uri": f"s3://{BUCKET}/{MODEL_COMPONENT}/0.2.0/pneumonia-cxr.zip",
                "unarchive": "ZIP",
                "read": "ALL",
                "execute": "NONE",
            }
        ],
    }


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


def _history(target: str, entries: list[tuple[str, int, str]]) -> list[dict[str, Any]]:
    """ListDeployments items (botocore's shape): (deploymentId, minutes after NOW, status)."""
    return [
        {
            "targetArn": target,
            "revisionId": str(minutes),
            "deploymentId": deployment,
            "deploymentName": deployment,
            "creationTimestamp": NOW + dt.timedelta(minutes=minutes),
            "deploymentStatus": state,
            "isLatestForTarget": state == "ACTIVE",
        }
        for deployment, minutes, state in entries
    ]


def _stub_deployment(stub: Stubber, target: str, deployment: str, components: dict[str, Any]) -> None:
    stub.add_response(
        "get_deployment",
        {
            "targetArn": target,
            "deploymentId": deployment,
            "deploymentStatus": "INACTIVE",
            "components": components,
        },
        {"deploymentId": deployment},
    )


def test_rollback_deploys_what_the_group_ran_before_not_a_lower_published_version(
    aws: tuple[Clients, Stubber],
) -> None:
    """The canary runs 0.2.0 (dep-0.2.0). Before it: a cancelled 0.1.5, an earlier 0.2.0 attempt, and
    0.1.0 with its own runtime configuration, the version it really ran. 0.1.1 and 0.1.5 are published
    (the old rule, "highest published below the current", took one of them); 0.1.0's deployment is
    restored as it was, runtime configuration included."""
    clients, stub = aws
    canary = _group(clients, "canary", ["box-1"])
    _stub_current(stub, canary, "0.2.0")
    ran_before = {
        RUNTIME: {"componentVersion": "0.1.0", "configurationUpdate": {"merge": '{"Mqtt":{"Enabled":true}}'}},
        MODEL_COMPONENT: {"componentVersion": "0.1.0"},
    }
    # Two pages, not in time order: the history is sorted by creation time, newest first.
    stub.add_response(
        "list_deployments",
        {
            "deployments": _history(canary, [("dep-0.1.0", 10, "INACTIVE"), ("dep-0.2.0", 50, "ACTIVE")]),
            "nextToken": "more",
        },
        {"targetArn": canary, "historyFilter": "ALL"},
    )
    stub.add_response(
        "list_deployments",
        {
            "deployments": _history(
                canary,
                [
                    ("dep-0.1.5", 40, "CANCELED"),
                    ("dep-0.2.0-first", 30, "INACTIVE"),
                    ("dep-0.0.9", 5, "INACTIVE"),
                ],
            )
        },
        {"targetArn": canary, "historyFilter": "ALL", "nextToken": "more"},
    )
    # dep-0.1.5 was cancelled: never read. The first 0.2.0 attempt pins the current version: passed over.
    _stub_deployment(stub, canary, "dep-0.2.0-first", {MODEL_COMPONENT: {"componentVersion": "0.2.0"}})
    _stub_deployment(stub, canary, "dep-0.1.0", ran_before)
    _stub_current(stub, canary, "0.2.0")  # revise_deployment reads the deployment it replaces
    expected: dict[str, Any] = {
        "targetArn": canary,
        "deploymentName": ANY,
        "components": ran_before,
        "iotJobConfiguration": ANY,
        "deploymentPolicies": ANY,
        "tags": {"healthdiag-release": "rollback from 0.2.0 to 0.1.0 (dep-0.1.0)"},
    }
    stub.add_response("create_deployment", {"deploymentId": "dep-back"}, expected)
    identity_calls: list[str] = []
    clients.sts.meta.events.register(
        "before-call.sts.GetCallerIdentity", lambda **_: identity_calls.append("sts")
    )
    result = rollback(clients, "canary")
    assert identity_calls == []  # no component ARN is needed: published versions are not consulted
    assert (result["previous"], result["version"]) == ("0.2.0", "0.1.0")
    assert result["restoredDeployment"] == "dep-0.1.0" and result["deploymentId"] == "dep-back"


def test_rollback_refuses_when_the_group_never_ran_another_version(aws: tuple[Clients, Stubber]) -> None:
    """Only the current version in the history (a 'trust' revision keeps the model): nothing to go back to."""
    clients, stub = aws
    canary = _group(clients, "canary", ["box-1"])
    _stub_current(stub, canary, "0.2.0")
    stub.add_response(
        "list_deployments",
        {"deployments": _history(canary, [("dep-0.2.0", 50, "ACTIVE"), ("dep-first", 20, "INACTIVE")])},
        {"targetArn": canary, "historyFilter": "ALL"},
    )
    _stub_deployment(stub, canary, "dep-first", {MODEL_COMPONENT: {"componentVersion": "0.2.0"}})
    with pytest.raises(ReleaseError, match="nothing to roll back to") as info:
        rollback(clients, "canary")
    assert "deploy --group" in info.value.action and "list" in info.value.action


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


@pytest.mark.parametrize(
    ("region", "partition"), [("eu-west-1", "aws"), ("cn-north-1", "aws-cn"), ("us-gov-west-1", "aws-us-gov")]
)
def test_component_arns_are_in_the_regions_partition(region: str, partition: str) -> None:
    """An ``arn:aws:`` ARN is refused in China and GovCloud, where ``deploy`` and ``publish`` work too."""

    class Sts:
        def get_caller_identity(self) -> dict[str, str]:
            return {"Account": "111122223333"}

    clients = Clients(s3=None, iot=None, greengrass=None, sts=Sts(), region=region)
    assert clients.component_arn("0.3.0") == (
        f"arn:{partition}:greengrass:{region}:111122223333:components:{MODEL_COMPONENT}:versions:0.3.0"
    )
