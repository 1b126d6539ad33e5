"""The CDK app: exact resource properties and IAM statements, cdk-nag at synth, cfn-lint, config.

Synthesizes the real app (``cdk.app.build_app``) with ``aws_cdk.assertions``;
cdk-nag's AWS Solutions and HIPAA Security packs run inside ``synth`` and fail
it on any finding that is not acknowledged with a reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")
cdk = pytest.importorskip("aws_cdk", reason="aws-cdk-lib is not installed (pip install -e '.[cdk]')")
pytest.importorskip("cdk_nag", reason="cdk-nag is not installed (pip install -e '.[cdk]')")

from aws_cdk import assertions  # noqa: E402
from aws_cdk import aws_iam as iam  # noqa: E402

from cdk.app import build_app  # noqa: E402
from cdk.config import ConfigError, load_config  # noqa: E402

CONFIG = load_config({"Account": "111122223333", "Region": "eu-west-1"})


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, assertions.Template]]:
    out = tmp_path_factory.mktemp("cdk.out")
    app = build_app(CONFIG, outdir=str(out))
    stacks = {s.stack_name: s for s in app.node.children if isinstance(s, cdk.Stack)}
    templates = {name: assertions.Template.from_stack(stack) for name, stack in stacks.items()}
    app.synth()  # runs cdk-nag: raises on an unacknowledged finding
    return out, templates


def _resources(template: assertions.Template, kind: str) -> dict[str, Any]:
    return dict(template.find_resources(kind))


def _flat(value: Any) -> Any:
    """An ``Fn::Join`` of strings and ``Ref``s as one string (``{Ref}`` for references), recursively."""
    if isinstance(value, dict) and "Fn::Join" in value:
        sep, parts = value["Fn::Join"]
        return sep.join(
            _flat(p) if not isinstance(p, dict) or "Fn::Join" in p else "{" + str(p.get("Ref", p)) + "}"
            for p in parts
        )
    if isinstance(value, list):
        return [_flat(v) for v in value]
    return value


def _statements(template: assertions.Template) -> list[dict[str, Any]]:
    statements = []
    for kind in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
        for resource in _resources(template, kind).values():
            statements += resource["Properties"]["PolicyDocument"]["Statement"]
    return statements


def test_config_comes_from_context_and_refuses_unknown_keys(tmp_path: Path) -> None:
    config = load_config({"FleetGroup": "clinic-a", "Gate": {"MinAucLowerCi": 0.96}})
    assert config.fleet_group == "clinic-a" and config.gate.min_auc_lower_ci == 0.96
    assert config.canary_group == "healthdiag-canary"  # default kept
    path = tmp_path / "prod.json"
    path.write_text(json.dumps({"NamePrefix": "hd-prod", "Rollout": {"CanarySoakMinutes": 120}}))
    from_file = load_config(json.dumps({"FleetGroup": "fleet-b"}), str(path))  # context wins over file
    assert (from_file.name_prefix, from_file.fleet_group, from_file.rollout.canary_soak_minutes) == (
        "hd-prod",
        "fleet-b",
        120,
    )
    with pytest.raises(ConfigError, match="FleetGroupp"):
        load_config({"FleetGroupp": "x"})
    with pytest.raises(ConfigError, match="must differ"):
        load_config({"CanaryGroup": "same", "FleetGroup": "same"})
    with pytest.raises(ConfigError, match="MinSensitivity"):
        load_config({"Gate": {"MinSensitivity": 1.5}})


def test_artifact_bucket_is_encrypted_versioned_tls_only_private_and_expires_old_versions(
    synthesized: tuple[Path, dict[str, assertions.Template]],
) -> None:
    template = synthesized[1]["healthdiag-artifacts"]
    template.has_resource_properties(
        "AWS::S3::Bucket",
        {
            "BucketName": "healthdiag-artifacts-eu-west-1-111122223333",
            "BucketEncryption": {
                "ServerSideEncryptionConfiguration": [
                    {
                        "BucketKeyEnabled": True,
                        "ServerSideEncryptionByDefault": {
                            "SSEAlgorithm": "aws:kms",
                            "KMSMasterKeyID": assertions.Match.any_value(),
                        },
                    }
                ]
            },
            "VersioningConfiguration": {"Status": "Enabled"},
            "PublicAccessBlockConfiguration": {
                "BlockPublicAcls": True,
                "BlockPublicPolicy": True,
                "IgnorePublicAcls": True,
                "RestrictPublicBuckets": True,
            },
            "LifecycleConfiguration": {
                "Rules": [
                    {
                        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 7},
                        "NoncurrentVersionExpiration": {"NoncurrentDays": 365},
                        "Status": "Enabled",
                    }
                ]
            },
            "LoggingConfiguration": {
                "LogFilePrefix": "artifacts/",
                "DestinationBucketName": assertions.Match.any_value(),
            },
        },
    )
    # TLS only: every bucket policy denies requests without aws:SecureTransport.
    for policy in _resources(template, "AWS::S3::BucketPolicy").values():
        denies = [s for s in policy["Properties"]["PolicyDocument"]["Statement"] if s["Effect"] == "Deny"]
        assert any(s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}} for s in denies)
    assert len(_resources(template, "AWS::S3::BucketPolicy")) == 3


def test_release_records_are_immutable_and_the_signing_key_is_asymmetric(
    synthesized: tuple[Path, dict[str, assertions.Template]],
) -> None:
    template = synthesized[1]["healthdiag-artifacts"]
    template.has_resource_properties(
        "AWS::S3::Bucket",
        {
            "ObjectLockEnabled": True,
            "ObjectLockConfiguration": {
                "ObjectLockEnabled": "Enabled",
                "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": 2555}},
            },
            "VersioningConfiguration": {"Status": "Enabled"},
        },
    )
    template.has_resource_properties("AWS::KMS::Key", {"KeySpec": "ECC_NIST_P256", "KeyUsage": "SIGN_VERIFY"})
    template.has_resource_properties("AWS::KMS::Key", {"EnableKeyRotation": True})
    for bucket in _resources(template, "AWS::S3::Bucket").values():
        assert bucket["DeletionPolicy"] == "Retain"  # a stack delete never takes records or artifacts


def test_device_role_reads_only_component_artifacts(
    synthesized: tuple[Path, dict[str, assertions.Template]],
) -> None:
    template = synthesized[1]["healthdiag-fleet"]
    template.has_resource_properties(
        "AWS::IAM::Role",
        {
            "AssumeRolePolicyDocument": {
                "Statement": [
                    {
                        "Action": "sts:AssumeRole",
                        "Effect": "Allow",
                        "Principal": {"Service": "credentials.iot.amazonaws.com"},
                    }
                ]
            },
        },
    )
    statements = {s["Sid"]: s for s in _statements(template)}
    assert set(statements) == {
        "ReadComponentArtifacts",
        "LocateArtifactBucket",
        "DecryptArtifactsThroughS3",
        "WriteGreengrassLogs",
    }
    locate = statements["LocateArtifactBucket"]
    assert locate["Action"] == "s3:GetBucketLocation"  # the nucleus asks before it downloads
    assert _flat(locate["Resource"]).endswith(":s3:::healthdiag-artifacts-eu-west-1-111122223333")
    read = statements["ReadComponentArtifacts"]
    assert read["Action"] == "s3:GetObject"
    assert read["Resource"] == {
        "Fn::Join": [
            "",
            [
                "arn:",
                {"Ref": "AWS::Partition"},
                ":s3:::healthdiag-artifacts-eu-west-1-111122223333/com.healthdiag.*",
            ],
        ]
    }
    decrypt = statements["DecryptArtifactsThroughS3"]
    assert decrypt["Action"] == "kms:Decrypt"
    assert decrypt["Condition"] == {"StringEquals": {"kms:ViaService": "s3.eu-west-1.amazonaws.com"}}
    for statement in statements.values():  # least privilege: no wildcard action, no bare "*" resource
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        assert all("*" not in action for action in actions)
        assert statement["Resource"] != "*"
    template.has_resource_properties(
        "AWS::IoT::RoleAlias",
        {
            "RoleAlias": "healthdiag-TokenExchangeRoleAlias",
            "RoleArn": {"Fn::GetAtt": [assertions.Match.string_like_regexp("TokenExchangeRole"), "Arn"]},
            "CredentialDurationSeconds": 3600,
        },
    )


def test_core_device_policy_and_disjoint_groups(
    synthesized: tuple[Path, dict[str, assertions.Template]],
) -> None:
    template = synthesized[1]["healthdiag-fleet"]
    (policy,) = [
        p
        for p in _resources(template, "AWS::IoT::Policy").values()
        if p["Properties"]["PolicyName"] == "healthdiag-core-device"
    ]
    statements = _flat(policy["Properties"]["PolicyDocument"]["Statement"])
    statements = [{**s, "Resource": _flat(s["Resource"])} for s in statements]
    by_action = {json.dumps(s["Action"]): s for s in statements}
    assert by_action['"iot:Connect"']["Resource"].endswith(":client/${iot:Connection.Thing.ThingName}*")
    assume = by_action['"iot:AssumeRoleWithCertificate"']["Resource"]
    assert assume.endswith(":rolealias/healthdiag-TokenExchangeRoleAlias")
    assert all(
        s["Resource"] != "*" or all(a.startswith("greengrass:") for a in s["Action"]) for s in statements
    )
    groups = {
        r["Properties"]["ThingGroupName"] for r in _resources(template, "AWS::IoT::ThingGroup").values()
    }
    assert groups == {"healthdiag-canary", "healthdiag-fleet"}


def test_cdk_nag_fails_synth_on_an_unacknowledged_finding(tmp_path: Path) -> None:
    app = build_app(CONFIG, outdir=str(tmp_path))
    fleet = next(s for s in app.node.children if isinstance(s, cdk.Stack) and s.stack_name.endswith("fleet"))
    role = iam.Role(fleet, "TooBroad", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"))
    role.add_to_policy(iam.PolicyStatement(actions=["s3:*"], resources=["*"]))
    with pytest.raises(RuntimeError, match="ValidationFailed"):
        app.synth()
    report = json.loads((tmp_path / "validation-report.json").read_text())
    rules = json.dumps(report)
    assert "AwsSolutions-IAM5[Action::s3:*]" in rules


@pytest.mark.skipif(shutil.which("cfn-lint") is None, reason="cfn-lint not installed (pip install cfn-lint)")
def test_templates_are_cfn_lint_clean(synthesized: tuple[Path, dict[str, assertions.Template]]) -> None:
    out = synthesized[0]
    templates = sorted(str(p) for p in out.glob("*.template.json"))
    assert len(templates) == 3
    # W3005: CDK adds an explicit DependsOn from the state machine to its role (for the role's
    # default policy) beside the GetAtt of the role's ARN; the duplicate ordering is harmless.
    done = subprocess.run(
        ["cfn-lint", "--format", "parseable", "--ignore-checks", "W3005", "--", *templates],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_gdk_publishes_into_the_bucket_the_devices_may_read() -> None:
    """``gdk component publish`` uploads to ``<bucket>-<region>-<account id>`` (GDK CLI docs): that must be
    the artifact bucket, or devices (whose role reads only that bucket) fail to download."""
    from cdk.stacks.artifacts import artifact_bucket_name

    for config_file in sorted((Path(__file__).resolve().parents[1] / "components").glob("*/gdk-config.json")):
        (component,) = json.loads(config_file.read_text(encoding="utf-8"))["component"].values()
        publish = component["publish"]
        gdk_bucket = f"{publish['bucket']}-{publish['region']}-111122223333"
        assert gdk_bucket == artifact_bucket_name("healthdiag", "111122223333", publish["region"]), (
            config_file
        )


def test_only_the_release_training_role_may_sign_bundles(
    synthesized: tuple[Path, dict[str, assertions.Template]],
) -> None:
    template = synthesized[1]["healthdiag-artifacts"]
    keys = [
        k
        for k in _resources(template, "AWS::KMS::Key").values()
        if k["Properties"].get("KeyUsage") == "SIGN_VERIFY"
    ]
    (key,) = keys
    (deny,) = [s for s in key["Properties"]["KeyPolicy"]["Statement"] if s["Effect"] == "Deny"]
    assert deny["Action"] == "kms:Sign" and deny["Principal"] == {"AWS": "*"}
    condition = _flat(deny["Condition"]["ArnNotEquals"]["aws:PrincipalArn"])
    assert condition.endswith(":iam::111122223333:role/healthdiag-release-training")
    pipeline = synthesized[1]["healthdiag-pipeline"]
    roles = _resources(pipeline, "AWS::IAM::Role")
    assert any(r["Properties"].get("RoleName") == "healthdiag-release-training" for r in roles.values())


def test_a_new_box_provisions_itself_into_a_group_with_the_core_policy(
    synthesized: tuple[Path, dict[str, assertions.Template]],
) -> None:
    """Fleet provisioning by claim: the template puts a new thing in the canary or fleet group, activates
    its own certificate and attaches the core-device policy; the claim certificate may only provision."""
    template = synthesized[1]["healthdiag-fleet"]
    (provisioning,) = _resources(template, "AWS::IoT::ProvisioningTemplate").values()
    properties = provisioning["Properties"]
    assert properties["Enabled"] is True and properties["TemplateName"] == "healthdiag-core-device"
    body = json.loads(properties["TemplateBody"])
    resources = body["Resources"]
    assert resources["thing"]["Properties"]["ThingGroups"] == [
        {"Fn::If": ["IsCanary", "healthdiag-canary", "healthdiag-fleet"]}
    ]
    assert resources["certificate"]["Properties"]["Status"] == "ACTIVE"
    assert resources["policy"]["Properties"]["PolicyName"] == "healthdiag-core-device"
    policies = {p["Properties"]["PolicyName"]: p for p in _resources(template, "AWS::IoT::Policy").values()}
    assert "healthdiag-core-device" in policies  # the policy the template attaches exists
    claim = policies["healthdiag-provisioning-claim"]["Properties"]["PolicyDocument"]["Statement"]
    topics = [_flat(r) for s in claim if s["Action"] != "iot:Connect" for r in s["Resource"]]
    assert topics and all(
        "$aws/certificates/create/" in t
        or "$aws/provisioning-templates/healthdiag-core-device/provision/" in t
        for t in topics
    ), topics


def test_approvals_go_to_subscribers_and_only_the_approver_role_answers_them(tmp_path: Path) -> None:
    """The approval topic had no subscriber and anyone allowed SendTaskSuccess could approve."""
    app = build_app(
        load_config(
            {"Account": "111122223333", "Region": "eu-west-1", "ApproverEmails": ["ops@hospital.example"]}
        )
    )
    stack = next(
        s for s in app.node.children if isinstance(s, cdk.Stack) and s.stack_name.endswith("pipeline")
    )
    template = assertions.Template.from_stack(stack)
    subscriptions = _resources(template, "AWS::SNS::Subscription").values()
    assert {s["Properties"]["Endpoint"] for s in subscriptions} == {"ops@hospital.example"}
    roles = _resources(template, "AWS::IAM::Role")
    (approver_id,) = [k for k in roles if k.startswith("ApproverRole")]
    trust = roles[approver_id]["Properties"]["AssumeRolePolicyDocument"]["Statement"][0]
    assert trust["Condition"] == {"Bool": {"aws:MultiFactorAuthPresent": "true"}}
    policies = _resources(template, "AWS::IAM::Policy").values()
    answering = [
        s
        for p in policies
        for s in p["Properties"]["PolicyDocument"]["Statement"]
        if "states:SendTaskSuccess" in (s["Action"] if isinstance(s["Action"], list) else [s["Action"]])
    ]
    assert len(answering) == 1 and answering[0]["Resource"] == {
        "Ref": next(
            iter(
                k for k in _resources(template, "AWS::StepFunctions::StateMachine") if k.startswith("Release")
            )
        )
    }
    rules = _resources(template, "AWS::Events::Rule").values()
    patterns = [r["Properties"]["EventPattern"] for r in rules]
    assert any(p["source"] == ["aws.states"] and "TIMED_OUT" in p["detail"]["status"] for p in patterns)
    assert any(p["source"] == ["aws.greengrass"] for p in patterns)
