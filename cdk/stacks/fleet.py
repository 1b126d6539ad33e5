"""The device fleet: what a Greengrass core device may do, and the canary and fleet groups.

* **Token exchange role** (assumed by ``credentials.iot.amazonaws.com``
  through the role alias) may read the component artifacts and nothing
  else: ``s3:GetObject`` on ``com.healthdiag.*`` keys of the artifact bucket
  (and ``s3:GetBucketLocation`` of that bucket),
  ``kms:Decrypt`` of the bucket's key through S3 only, and write its own
  Greengrass log group. Without ``s3:GetObject`` there a deployment fails
  to download its artifact.
* **IoT policy** for core devices: connect as their own thing name, publish
  and subscribe under their own Greengrass topics, publish results under
  ``<ResultsTopicPrefix>/results``, publish *retained* only their own health
  report (``<StatusTopicPrefix>/<thing name>``, never another box's), assume
  the role alias.
* **Fleet provisioning by claim**: a provisioning template that registers a
  new box as ``<prefix>-<serial>`` in the canary or the fleet group with its
  own certificate and the core-device policy, its role, and the policy of the
  claim certificate (provisioning topics only).
* **Thing groups**: a canary group and a fleet group, **disjoint** (the
  release command refuses to deploy when a device is in both with different
  versions). Disjoint groups rather than ``ParentTargetArn`` sub-deployments
  because a device in two groups whose deployments pin different model
  versions fails with NoAvailableComponentVersionException, and disjoint
  groups make "which version does this box run" a one-group question.
"""

from __future__ import annotations

import json

from aws_cdk import Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_iot as iot
from constructs import Construct

from ..config import ReleaseConfig
from .artifacts import ArtifactsStack, acknowledge, artifact_bucket_name, nag_account_region

__all__ = ["MODEL_COMPONENT_PREFIX", "FleetStack"]

MODEL_COMPONENT_PREFIX = "com.healthdiag."


class FleetStack(Stack):
    """Roles, the IoT policy and the thing groups of the edge boxes."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: ReleaseConfig,
        artifacts: ArtifactsStack,
        **kwargs: object,
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)  # type: ignore[arg-type]
        prefix = config.name_prefix
        self.token_exchange_role = iam.Role(
            self,
            "TokenExchangeRole",
            assumed_by=iam.ServicePrincipal("credentials.iot.amazonaws.com"),
            description="Greengrass core devices: read HealthDiag component artifacts, write their logs",
        )
        bucket = artifact_bucket_name(prefix, self.account, self.region)
        artifact_objects = f"arn:{self.partition}:s3:::{bucket}/{MODEL_COMPONENT_PREFIX}*"
        log_groups = f"arn:{self.partition}:logs:{self.region}:{self.account}:log-group:/aws/greengrass/*"
        self.token_exchange_policy = iam.ManagedPolicy(
            self,
            "TokenExchangePolicy",
            description="Greengrass core devices: read HealthDiag component artifacts, write their logs",
            roles=[self.token_exchange_role],
            statements=[
                iam.PolicyStatement(
                    sid="ReadComponentArtifacts", actions=["s3:GetObject"], resources=[artifact_objects]
                ),
                iam.PolicyStatement(
                    # The nucleus asks the bucket's region before it downloads (AWS's minimal
                    # token exchange policy has it); without it artifact downloads fail.
                    sid="LocateArtifactBucket",
                    actions=["s3:GetBucketLocation"],
                    resources=[f"arn:{self.partition}:s3:::{bucket}"],
                ),
                iam.PolicyStatement(
                    sid="DecryptArtifactsThroughS3",
                    actions=["kms:Decrypt"],
                    resources=[artifacts.data_key.key_arn],
                    conditions={"StringEquals": {"kms:ViaService": f"s3.{self.region}.amazonaws.com"}},
                ),
                iam.PolicyStatement(
                    sid="WriteGreengrassLogs",
                    actions=[
                        "logs:CreateLogGroup",
                        "logs:CreateLogStream",
                        "logs:PutLogEvents",
                        "logs:DescribeLogStreams",  # the log manager looks for its stream first
                    ],
                    resources=[log_groups, f"{log_groups}:log-stream:*"],
                ),
            ],
        )
        account, region = nag_account_region(self)
        logs = f"arn:<AWS::Partition>:logs:{region}:{account}:log-group:/aws/greengrass/*"
        acknowledge(
            self.token_exchange_policy,
            [
                {
                    "id": "AwsSolutions::AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:s3:::"
                    f"{prefix}-artifacts-{region}-{account}/{MODEL_COMPONENT_PREFIX}*]",
                    "reason": "Devices read every version of the HealthDiag components' artifacts, and only "
                    "those (keys are <component>/<version>/<file>); no other key of the bucket.",
                },
                {
                    "id": f"AwsSolutions::AwsSolutions-IAM5[Resource::{logs}]",
                    "reason": "The nucleus names its log groups per component and device "
                    "(/aws/greengrass/<type>/<region>/<component>); only that prefix is writable.",
                },
                {
                    "id": f"AwsSolutions::AwsSolutions-IAM5[Resource::{logs}:log-stream:*]",
                    "reason": "Log streams are created per day and device inside those log groups.",
                },
            ],
        )
        self.role_alias = iot.CfnRoleAlias(
            self,
            "TokenExchangeRoleAlias",
            role_alias=f"{prefix}-TokenExchangeRoleAlias",
            role_arn=self.token_exchange_role.role_arn,
            credential_duration_seconds=3600,
        )
        thing = "${iot:Connection.Thing.ThingName}"
        results, status = config.results_topic_prefix, config.status_topic_prefix
        if status.startswith(f"{results}/results"):
            raise ValueError(
                f"StatusTopicPrefix {status!r} must not lie under {results}/results, where every box "
                "may publish: a box could then write another box's health report"
            )
        arn = f"arn:{self.partition}:iot:{self.region}:{self.account}"
        self.core_policy = iot.CfnPolicy(
            self,
            "CoreDevicePolicy",
            policy_name=f"{prefix}-core-device",
            policy_document={
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"{arn}:client/{thing}*"},
                    {
                        # The nucleus' own topics (deployments, shadows, jobs) and the results the
                        # runtime sends to IoT Core (Greengrass.IotCoreTopic under <prefix>/results).
                        "Effect": "Allow",
                        "Action": ["iot:Publish", "iot:Receive"],
                        "Resource": [
                            f"{arn}:topic/$aws/things/{thing}/*",
                            f"{arn}:topic/{results}/results",
                            f"{arn}:topic/{results}/results/*",
                        ],
                    },
                    {
                        # The health report the canary check reads: retained, on this box's own
                        # topic only (IoT Core closes an MQTT 3.1.1 connection on a denied publish,
                        # and a box able to write another's report could forge canary evidence).
                        "Effect": "Allow",
                        "Action": ["iot:Publish", "iot:RetainPublish"],
                        "Resource": f"{arn}:topic/{status}/{thing}",
                    },
                    {
                        "Effect": "Allow",
                        "Action": "iot:Subscribe",
                        "Resource": [f"{arn}:topicfilter/$aws/things/{thing}/*"],
                    },
                    {
                        "Effect": "Allow",
                        "Action": ["iot:GetThingShadow", "iot:UpdateThingShadow", "iot:DeleteThingShadow"],
                        "Resource": f"{arn}:thing/{thing}",
                    },
                    {
                        "Effect": "Allow",
                        "Action": "iot:AssumeRoleWithCertificate",
                        "Resource": f"{arn}:rolealias/{self.role_alias.role_alias}",
                    },
                    {
                        # Greengrass data-plane calls of the nucleus; they take no resource ARN.
                        "Effect": "Allow",
                        "Action": [
                            "greengrass:GetComponentVersionArtifact",
                            "greengrass:ResolveComponentCandidates",
                            "greengrass:GetDeploymentConfiguration",
                            "greengrass:ListThingGroupsForCoreDevice",
                        ],
                        "Resource": "*",
                    },
                ],
            },
        )
        self.canary_group = iot.CfnThingGroup(
            self,
            "CanaryGroup",
            thing_group_name=config.canary_group,
            thing_group_properties=iot.CfnThingGroup.ThingGroupPropertiesProperty(
                thing_group_description="Canary boxes: get every model version first (disjoint from fleet)"
            ),
        )
        self.fleet_group = iot.CfnThingGroup(
            self,
            "FleetGroup",
            thing_group_name=config.fleet_group,
            thing_group_properties=iot.CfnThingGroup.ThingGroupPropertiesProperty(
                thing_group_description="The fleet: gets a model version after the canary soaked"
            ),
        )
        self._provisioning(prefix, config, arn)

    def _provisioning(self, prefix: str, config: ReleaseConfig, arn: str) -> None:
        """Fleet provisioning by claim: a new box registers itself into the canary or fleet group.

        The installer puts a *claim* certificate on the box (shared by an installation
        wave, allowed nothing but provisioning); the Greengrass fleet provisioning plugin
        connects with it, gets the box's own certificate and calls the template with the
        box's serial number and group (``fleet`` unless ``canary``). AWS IoT then creates
        the thing ``<prefix>-<serial>`` in that group, activates its certificate and
        attaches the core-device policy: the box's first deployment is its group's.
        """
        template_name = f"{prefix}-core-device"
        self.provisioning_role = iam.Role(
            self,
            "ProvisioningRole",
            assumed_by=iam.ServicePrincipal("iot.amazonaws.com"),
            description="AWS IoT fleet provisioning: register new HealthDiag core devices",
            managed_policies=[
                iam.ManagedPolicy.from_aws_managed_policy_name("service-role/AWSIoTThingsRegistration")
            ],
        )
        acknowledge(
            self.provisioning_role,
            [
                {
                    "id": "AwsSolutions::AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/"
                    "service-role/AWSIoTThingsRegistration]",
                    "reason": "AWS's own policy for the fleet provisioning role: it tracks the registry "
                    "actions a provisioning template may call (things, groups, certificates, policies).",
                }
            ],
        )
        body = {
            "Parameters": {
                "SerialNumber": {"Type": "String"},
                "Group": {"Type": "String", "Default": "fleet"},
                "AWS::IoT::Certificate::Id": {"Type": "String"},
            },
            "Conditions": {"IsCanary": {"Fn::Equals": [{"Ref": "Group"}, "canary"]}},
            "Resources": {
                "thing": {
                    "Type": "AWS::IoT::Thing",
                    "Properties": {
                        "ThingName": {"Fn::Join": ["", [f"{prefix}-", {"Ref": "SerialNumber"}]]},
                        "ThingGroups": [{"Fn::If": ["IsCanary", config.canary_group, config.fleet_group]}],
                    },
                    "OverrideSettings": {"ThingGroups": "MERGE"},
                },
                "certificate": {
                    "Type": "AWS::IoT::Certificate",
                    "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"},
                },
                "policy": {
                    "Type": "AWS::IoT::Policy",
                    "Properties": {"PolicyName": self.core_policy.policy_name},
                },
            },
        }
        self.provisioning_template = iot.CfnProvisioningTemplate(
            self,
            "ProvisioningTemplate",
            template_name=template_name,
            description="A new HealthDiag core device: thing <prefix>-<serial> in the canary or fleet group",
            enabled=True,
            provisioning_role_arn=self.provisioning_role.role_arn,
            template_body=json.dumps(body),
        )
        create = f"{arn}:topic/$aws/certificates/create/*"
        provision = f"{arn}:topic/$aws/provisioning-templates/{template_name}/provision/*"
        self.claim_policy = iot.CfnPolicy(
            self,
            "ClaimCertificatePolicy",
            policy_name=f"{prefix}-provisioning-claim",
            policy_document={
                "Version": "2012-10-17",
                "Statement": [
                    # A box has no thing name yet; the claim certificate may do nothing else.
                    {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"{arn}:client/*"},
                    {
                        "Effect": "Allow",
                        "Action": ["iot:Publish", "iot:Receive"],
                        "Resource": [create, provision],
                    },
                    {
                        "Effect": "Allow",
                        "Action": "iot:Subscribe",
                        "Resource": [
                            create.replace(":topic/", ":topicfilter/"),
                            provision.replace(":topic/", ":topicfilter/"),
                        ],
                    },
                ],
            },
        )
