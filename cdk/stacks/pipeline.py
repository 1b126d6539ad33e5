"""The release pipeline: train -> gate -> (approve) -> canary -> soak -> fleet, rolling back on failure.

An AWS Step Functions state machine, built only from service integrations
(no Lambda: every step is a SageMaker, S3, SNS, Greengrass v2 or IoT call):

1. **Train, gate, package, publish** (``Train``): a SageMaker training job
   whose container (``cdk/training_image``) runs the project's own
   ``python -m training pipeline``, the gate (:mod:`cdk.gate`) against the
   manifest in production, and, only if it passed, ``cdk.release.publish``
   (bundle upload and component version, idempotent). It writes its verdict
   to ``releases/<execution>/verdict.json`` in the records bucket.
2. **Gate** (``ReadVerdict`` -> ``GatePassed?``): a failed gate ends the
   execution (``GateFailed``) with the verdict on record.
3. **Approval** (``ApproveRelease``, when ``ApprovalRequired``): an SNS
   message carries a task token; the approver calls ``SendTaskSuccess``.
4. **Canary** (``Canary*``): the canary group's one deployment is read and
   revised with only the model component's version changed
   (``States.JsonMerge``), with the configured rollout, abort and timeout and
   ``FailureHandlingPolicy: ROLLBACK``. After ``CanarySoakMinutes`` the IoT
   job is read: any failed, rejected or timed-out device beyond
   ``MaxCanaryFailures`` rolls the canary back to its previous components
   (``CanaryRollback``) and fails the execution; devices still queued or in
   progress mean another soak period.
   Then every canary device's own health report must show the new version,
   a passed conformance check and at most ``MaxCanaryFailures`` quarantined
   scans (``CanaryReports``), else the canary is rolled back too.
5. **Fleet** (``Fleet*``): the same for the fleet group, with its own rate.

Every outcome is written to the records bucket (Object Lock) as
``releases/<execution>/outcome-<state>.json``.

The canary's device reports are read as the runtime publishes them
(``edge_runtime.service``: retained, per thing, every heartbeat).

Why one module over 500 lines: the state machine is one definition; its states refer to each
other by name, so reading it in one file is how an ops engineer follows a release.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aws_cdk import Duration, IgnoreMode, Size, Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk import aws_stepfunctions_tasks as tasks
from constructs import Construct

from ..config import ReleaseConfig
from .artifacts import (
    ArtifactsStack,
    acknowledge,
    artifact_bucket_name,
    nag_account_region,
    records_bucket_name,
)
from .fleet import MODEL_COMPONENT_PREFIX

__all__ = ["MODEL_COMPONENT", "REPO_ROOT", "PipelineStack"]

MODEL_COMPONENT = "com.healthdiag.model.PneumoniaCXR"
REPO_ROOT = Path(__file__).resolve().parents[2]
_FAILED = ("NumberOfFailedThings", "NumberOfRejectedThings", "NumberOfTimedOutThings")


class PipelineStack(Stack):
    """The state machine and what it needs (training role, approval topic, log group)."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: ReleaseConfig,
        artifacts: ArtifactsStack,
        **kwargs: Any,
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.config = config
        # By name, not by cross-stack token: policies then read as the bucket names they grant.
        prefix = config.name_prefix
        self.artifact_bucket = s3.Bucket.from_bucket_name(
            self, "ArtifactBucketRef", artifact_bucket_name(prefix, self.account, self.region)
        )
        self.records = s3.Bucket.from_bucket_name(
            self, "RecordsBucketRef", records_bucket_name(prefix, self.account, self.region)
        )
        arn = f"arn:{self.partition}:iot:{self.region}:{self.account}"
        self.group_arns = {
            "Canary": f"{arn}:thinggroup/{config.canary_group}",
            "Fleet": f"{arn}:thinggroup/{config.fleet_group}",
        }
        self.approval_topic = sns.Topic(
            self,
            "ApprovalTopic",
            display_name="HealthDiag model release approvals",
            master_key=artifacts.data_key,
            enforce_ssl=True,
        )
        self.training_role = self._training_role(artifacts)
        train = self._train(artifacts)
        read_verdict = tasks.CallAwsService(
            self,
            "ReadVerdict",
            service="s3",
            action="getObject",
            parameters={
                "Bucket": self.records.bucket_name,
                "Key.$": "States.Format('releases/{}/verdict.json', $$.Execution.Name)",
            },
            iam_resources=[self.records.arn_for_objects("releases/*")],
            result_selector={"verdict.$": "States.StringToJson($.Body)"},
            result_path="$.gate",
        )
        gate_failed = self._record("GateFailed").next(
            sfn.Fail(self, "GateFailedEnd", error="GateFailed", cause="The candidate did not pass the gate")
        )
        canary = self._rollout("Canary", config.rollout.canary_rate_per_minute)
        fleet_chain = self._rollout("Fleet", config.rollout.fleet_rate_per_minute)
        released = self._record("Released").next(sfn.Succeed(self, "ReleaseDone"))
        canary_ok = fleet_chain.entry
        fleet_chain.healthy.next(released)
        canary.healthy.next(canary_ok)
        start_canary: sfn.IChainable = canary.entry
        if config.approval_required:
            approve = tasks.SnsPublish(
                self,
                "ApproveRelease",
                topic=self.approval_topic,
                integration_pattern=sfn.IntegrationPattern.WAIT_FOR_TASK_TOKEN,
                message=sfn.TaskInput.from_object(
                    {
                        "release": sfn.JsonPath.string_at("$$.Execution.Name"),
                        "verdict": sfn.JsonPath.object_at("$.gate.verdict"),
                        "taskToken": sfn.JsonPath.task_token,
                        "approve": "aws stepfunctions send-task-success --task-token <taskToken> "
                        '--task-output \'{"approver": "<name>"}\'',
                    }
                ),
                result_path="$.approval",
                task_timeout=sfn.Timeout.duration(Duration.days(7)),
            )
            approve.next(canary.entry)
            start_canary = approve
        definition = train.next(read_verdict).next(
            sfn.Choice(self, "GatePassed?")
            .when(sfn.Condition.boolean_equals("$.gate.verdict.passed", True), start_canary)
            .otherwise(gate_failed)
        )
        log_group = logs.LogGroup(
            self,
            "ReleaseLogs",
            retention=logs.RetentionDays.ONE_YEAR,
            encryption_key=artifacts.data_key,
        )
        artifacts.data_key.grant_encrypt_decrypt(iam.ServicePrincipal(f"logs.{self.region}.amazonaws.com"))
        self.state_machine = sfn.StateMachine(
            self,
            "Release",
            definition_body=sfn.DefinitionBody.from_chainable(definition),
            timeout=Duration.days(14),
            tracing_enabled=True,
            logs=sfn.LogOptions(destination=log_group, level=sfn.LogLevel.ALL, include_execution_data=False),
        )
        self._acknowledge()

    # -- pieces ------------------------------------------------------------------------------------

    def _training_role(self, artifacts: ArtifactsStack) -> iam.Role:
        role = iam.Role(
            self,
            "TrainingRole",
            assumed_by=iam.ServicePrincipal("sagemaker.amazonaws.com"),
            description="Release training job: reads datasets, writes candidates, verdicts, components",
        )
        component = (
            f"arn:{self.partition}:greengrass:{self.region}:{self.account}:components:{MODEL_COMPONENT}"
        )
        iam.ManagedPolicy(
            self,
            "TrainingPolicy",
            roles=[role],
            statements=[
                iam.PolicyStatement(
                    sid="ReadDatasetsAndProduction",
                    actions=["s3:GetObject"],
                    resources=[
                        self.artifact_bucket.arn_for_objects("datasets/*"),
                        self.artifact_bucket.arn_for_objects(f"{MODEL_COMPONENT_PREFIX}*"),
                    ],
                ),
                iam.PolicyStatement(
                    sid="WriteCandidatesAndArtifacts",
                    actions=["s3:PutObject"],
                    resources=[
                        self.artifact_bucket.arn_for_objects("candidates/*"),
                        self.artifact_bucket.arn_for_objects(f"{MODEL_COMPONENT_PREFIX}*"),
                    ],
                ),
                iam.PolicyStatement(
                    sid="WriteVerdicts",
                    actions=["s3:PutObject"],
                    resources=[self.records.arn_for_objects("releases/*")],
                ),
                iam.PolicyStatement(
                    sid="UseDataKey",
                    actions=["kms:Decrypt", "kms:GenerateDataKey"],
                    resources=[artifacts.data_key.key_arn],
                ),
                iam.PolicyStatement(
                    sid="SignManifests", actions=["kms:Sign"], resources=[artifacts.signing_key.key_arn]
                ),
                iam.PolicyStatement(
                    sid="PublishModelComponent",
                    actions=[
                        "greengrass:CreateComponentVersion",
                        "greengrass:DescribeComponent",
                        "greengrass:GetComponent",
                    ],
                    resources=[component, f"{component}:versions:*"],
                ),
                iam.PolicyStatement(
                    sid="ReadProductionVersion",
                    actions=[
                        "iot:DescribeThingGroup",
                        "greengrass:ListDeployments",
                        "greengrass:GetDeployment",
                    ],
                    resources=[
                        self.group_arns["Fleet"],
                        f"arn:{self.partition}:greengrass:{self.region}:{self.account}:deployments:*",
                    ],
                ),
                iam.PolicyStatement(
                    sid="TrainingLogs",
                    actions=["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
                    resources=[
                        f"arn:{self.partition}:logs:{self.region}:{self.account}:log-group:"
                        "/aws/sagemaker/TrainingJobs*"
                    ],
                ),
            ],
        )
        return role

    def _train(self, artifacts: ArtifactsStack) -> tasks.SageMakerCreateTrainingJob:
        image = tasks.DockerImage.from_asset(
            self,
            "TrainingImage",
            directory=str(REPO_ROOT),
            file="cdk/training_image/Dockerfile",
            # Only what the Dockerfile copies: the rest of a checkout (caches, runs, venvs) stays out.
            exclude=[
                "*",
                "!pyproject.toml",
                "!README.md",
                "!edge_runtime",
                "!training",
                "!components",
                "!recipes",
                "!cdk",
                "cdk/cdk.out",
                "cdk/node_modules",
                "**/__pycache__",
            ],
            ignore_mode=IgnoreMode.DOCKER,
        )
        gate = self.config.gate.model_dump_json(by_alias=True)
        return tasks.SageMakerCreateTrainingJob(
            self,
            "Train",
            training_job_name=sfn.JsonPath.string_at("$$.Execution.Name"),
            role=self.training_role,
            algorithm_specification=tasks.AlgorithmSpecification(training_image=image),
            input_data_config=[
                tasks.Channel(
                    channel_name="data",
                    data_source=tasks.DataSource(
                        s3_data_source=tasks.S3DataSource(
                            s3_location=tasks.S3Location.from_bucket(self.artifact_bucket, "datasets/")
                        )
                    ),
                )
            ],
            output_data_config=tasks.OutputDataConfig(
                s3_output_location=tasks.S3Location.from_bucket(self.artifact_bucket, "candidates/"),
                encryption_key=artifacts.data_key,
            ),
            resource_config=tasks.ResourceConfig(
                instance_count=1,
                instance_type=ec2.InstanceType("ml.m5.2xlarge"),
                volume_size=Size.gibibytes(50),
                volume_encryption_key=artifacts.data_key,
            ),
            stopping_condition=tasks.StoppingCondition(max_runtime=Duration.hours(3)),
            environment={
                "HEALTHDIAG_ARTIFACT_BUCKET": self.artifact_bucket.bucket_name,
                "HEALTHDIAG_RECORDS_BUCKET": self.records.bucket_name,
                "HEALTHDIAG_SIGNING_KEY": artifacts.signing_key.key_arn,
                "HEALTHDIAG_GATE": gate,
                "HEALTHDIAG_FLEET_GROUP": self.config.fleet_group,
            },
            integration_pattern=sfn.IntegrationPattern.RUN_JOB,
            result_path="$.training",
        )

    def _record(self, outcome: str) -> tasks.CallAwsService:
        """Write the execution's state (verdict, deployments, job counts) to the records bucket."""
        return tasks.CallAwsService(
            self,
            f"Record{outcome}",
            service="s3",
            action="putObject",
            parameters={
                "Bucket": self.records.bucket_name,
                "Key.$": f"States.Format('releases/{{}}/outcome-{outcome}.json', $$.Execution.Name)",
                "Body.$": "States.JsonToString($)",
                "ContentType": "application/json",
                "ChecksumAlgorithm": "SHA256",  # Object Lock requires an integrity checksum on PUT
            },
            iam_resources=[self.records.arn_for_objects("releases/*")],
            result_path=sfn.JsonPath.DISCARD,
        )

    def _greengrass(
        self,
        state: str,
        action: str,
        parameters: dict[str, Any],
        result_path: str,
        result_selector: dict[str, Any] | None = None,
    ) -> tasks.CallAwsService:
        deployments = f"arn:{self.partition}:greengrass:{self.region}:{self.account}:deployments:*"
        extra = []
        if action == "createDeployment":
            # Greengrass creates the IoT job and reads the target group with the caller's rights.
            extra = [
                iam.PolicyStatement(
                    actions=[
                        "iot:CreateJob",
                        "iot:DescribeJob",
                        "iot:CancelJob",
                        "iot:UpdateJob",
                        "iot:DescribeThingGroup",
                        "iot:GetThingShadow",
                        "iot:UpdateThingShadow",
                    ],
                    resources=[
                        *self.group_arns.values(),
                        f"arn:{self.partition}:iot:{self.region}:{self.account}:job/*",
                        f"arn:{self.partition}:iot:{self.region}:{self.account}:thing/*",
                    ],
                )
            ]
        return tasks.CallAwsService(
            self,
            state,
            service="greengrassv2",
            action=action,
            parameters=parameters,
            iam_resources=[deployments, *self.group_arns.values()],
            iam_action=f"greengrass:{action[0].upper()}{action[1:]}",
            additional_iam_statements=extra,
            result_path=result_path,
            result_selector=result_selector,
        )

    def _deployment_settings(self, rate: int) -> dict[str, Any]:
        rollout = self.config.rollout
        return {
            "IotJobConfiguration": {
                "JobExecutionsRolloutConfig": {
                    "ExponentialRate": {
                        "BaseRatePerMinute": rate,
                        "IncrementFactor": rollout.increment_factor,
                        "RateIncreaseCriteria": {"NumberOfSucceededThings": rollout.abort_min_executed},
                    },
                    "MaximumPerMinute": 1000,
                },
                "AbortConfig": {
                    "CriteriaList": [
                        {
                            "FailureType": "ALL",
                            "Action": "CANCEL",
                            "ThresholdPercentage": rollout.abort_failure_percent,
                            "MinNumberOfExecutedThings": rollout.abort_min_executed,
                        }
                    ]
                },
                "TimeoutConfig": {"InProgressTimeoutInMinutes": rollout.timeout_minutes},
            },
            "DeploymentPolicies": {
                "FailureHandlingPolicy": "ROLLBACK",
                "ComponentUpdatePolicy": {"TimeoutInSeconds": 120, "Action": "NOTIFY_COMPONENTS"},
                "ConfigurationValidationPolicy": {"TimeoutInSeconds": 60},
            },
        }

    def _rollout(self, group: str, rate: int) -> _Rollout:
        """Read the group's deployment, revise it, soak, check the IoT job; roll back on failure."""
        key = group.lower()
        target = self.group_arns[group]
        listed = self._greengrass(
            f"{group}ListDeployments",
            "listDeployments",
            {"TargetArn": target, "HistoryFilter": "LATEST_ONLY"},
            f"$.{key}.list",
        )
        current = self._greengrass(
            f"{group}GetDeployment",
            "getDeployment",
            {"DeploymentId.$": f"$.{key}.list.Deployments[0].DeploymentId"},
            f"$.{key}.current",
            {"Components.$": "$.Components"},
        )
        no_deployment = sfn.Pass(
            self,
            f"{group}NoDeployment",
            result=sfn.Result.from_object({"Components": {}}),
            result_path=f"$.{key}.current",
        )
        create = self._greengrass(
            f"{group}Deploy",
            "createDeployment",
            {
                "TargetArn": target,
                "DeploymentName.$": f"States.Format('{group}: release {{}}', $$.Execution.Name)",
                "Components.$": (
                    f"States.JsonMerge($.{key}.current.Components, $.gate.verdict.component, false)"
                ),
                **self._deployment_settings(rate),
            },
            f"$.{key}.created",
        )
        soak = sfn.Wait(
            self,
            f"{group}Soak",
            time=sfn.WaitTime.duration(Duration.minutes(max(self.config.rollout.canary_soak_minutes, 1))),
        )
        job = tasks.CallAwsService(
            self,
            f"{group}ReadJob",
            service="iot",
            action="describeJob",
            parameters={"JobId.$": f"$.{key}.created.IotJobId"},
            iam_resources=[f"arn:{self.partition}:iot:{self.region}:{self.account}:job/*"],
            result_selector={"details.$": "$.Job.JobProcessDetails", "status.$": "$.Job.Status"},
            result_path=f"$.{key}.job",
        )
        rollback = self._greengrass(
            f"{group}Rollback",
            "createDeployment",
            {
                "TargetArn": target,
                "DeploymentName.$": f"States.Format('{group}: rollback of release {{}}', $$.Execution.Name)",
                "Components.$": f"$.{key}.current.Components",
                **self._deployment_settings(rate),
            },
            f"$.{key}.rollback",
        )
        failed_end = sfn.Fail(
            self,
            f"{group}FailedEnd",
            error=f"{group}Failed",
            cause=f"Devices of the {key} group failed the new model; rolled back",
        )
        rollback.next(self._record(f"{group}RolledBack")).next(failed_end)
        healthy = sfn.Pass(self, f"{group}Healthy")
        failures = [sfn.Condition.number_greater_than(f"$.{key}.job.details.{n}", 0) for n in _FAILED]
        pending = [
            sfn.Condition.number_greater_than(f"$.{key}.job.details.{n}", 0)
            for n in ("NumberOfQueuedThings", "NumberOfInProgressThings")
        ]
        done: sfn.IChainable = healthy
        if group == "Canary":
            done = self._device_reports(key, rollback, healthy)
        check = (
            sfn.Choice(self, f"{group}Healthy?")
            .when(sfn.Condition.or_(*failures), rollback)
            .when(sfn.Condition.string_equals(f"$.{key}.job.status", "CANCELED"), rollback)
            .when(sfn.Condition.or_(*pending), soak)
            .otherwise(done)
        )
        soak.next(job).next(check)
        create.next(soak)
        current.next(create)
        no_deployment.next(create)
        listed.next(
            sfn.Choice(self, f"{group}HasDeployment?")
            .when(sfn.Condition.is_present(f"$.{key}.list.Deployments[0]"), current)
            .otherwise(no_deployment)
        )
        return _Rollout(entry=listed, healthy=healthy)

    def _device_reports(self, key: str, rollback: sfn.IChainable, healthy: sfn.Pass) -> sfn.IChainable:
        """Every canary device's own health report: the new version, conformance passed, few failures.

        The runtime publishes it retained on ``<StatusTopic>/<thing name>`` in AWS IoT
        Core every heartbeat (``Greengrass.StatusTopic``). A deployment can succeed
        while the runtime refuses the model (a failed conformance check keeps the old
        one), so the IoT job alone cannot promote a release.
        """
        prefix = "healthdiag/edge/status"
        things = tasks.CallAwsService(
            self,
            "CanaryListThings",
            service="iot",
            action="listThingsInThingGroup",
            parameters={"ThingGroupName": self.config.canary_group, "MaxResults": 250},
            iam_resources=[self.group_arns["Canary"]],
            result_path=f"$.{key}.things",
        )
        report = tasks.CallAwsService(
            self,
            "CanaryGetReport",
            service="iotdataplane",
            action="getRetainedMessage",
            iam_action="iot:GetRetainedMessage",
            parameters={"Topic.$": f"States.Format('{prefix}/{{}}', $.thing)"},
            iam_resources=[f"arn:{self.partition}:iot:{self.region}:{self.account}:topic/{prefix}/*"],
            result_selector={"report.$": "States.StringToJson($.Payload)"},
            result_path="$.got",
        )
        ok = sfn.Pass(self, "CanaryReportOk")
        bad = sfn.Fail(
            self,
            "CanaryReportBad",
            error="CanaryReportBad",
            cause="A canary device runs another version, failed its conformance check or "
            "quarantined too many scans",
        )
        judge = (
            sfn.Choice(self, "CanaryReportGood?")
            .when(
                sfn.Condition.and_(
                    sfn.Condition.string_equals_json_path("$.got.report.model.version", "$.version"),
                    sfn.Condition.boolean_equals("$.got.report.model.conformance.passed", True),
                    sfn.Condition.number_less_than_equals(
                        "$.got.report.counters.quarantined", self.config.rollout.max_canary_failures
                    ),
                ),
                ok,
            )
            .otherwise(bad)
        )
        each = sfn.Map(
            self,
            "CanaryReports",
            items_path=f"$.{key}.things.Things",
            item_selector={"thing.$": "$$.Map.Item.Value", "version.$": "$.gate.verdict.version"},
            max_concurrency=10,
            result_path=sfn.JsonPath.DISCARD,
        )
        each.item_processor(report.next(judge))
        each.add_catch(rollback, errors=["States.ALL"], result_path=f"$.{key}.reportError")
        each.next(healthy)
        things.next(each)
        return things

    def _acknowledge(self) -> None:
        """cdk-nag findings in this stack that are acceptable, each with its reason."""
        account, region = nag_account_region(self)
        arn = f"arn:<AWS::Partition>:{{}}:{region}:{account}:{{}}"
        prefix = self.config.name_prefix
        artifacts = f"arn:<AWS::Partition>:s3:::{prefix}-artifacts-{account}-{region}"
        records = f"arn:<AWS::Partition>:s3:::{prefix}-records-{account}-{region}"
        reports = arn.format("iot", "topic/healthdiag/edge/status/*")
        generated = (
            "CDK generates this inline default policy for the role it creates (the state machine's, or "
            "the grants of the SageMaker task); it holds only what the tasks above call."
        )
        reasons = {
            "HIPAA.Security::HIPAA.Security-IAMNoInlinePolicy": generated,
            "AwsSolutions::AwsSolutions-IAM5[Resource::*]": "ecr:GetAuthorizationToken (SageMaker pulls the "
            "training image) and iot:DescribeJob's list form take no resource ARN.",
            f"AwsSolutions::AwsSolutions-IAM5[Resource::{arn.format('greengrass', 'deployments:*')}]": (
                "Greengrass deployment ids are created at run time; the target groups are named exactly."
            ),
            f"AwsSolutions::AwsSolutions-IAM5[Resource::{arn.format('iot', 'job/*')}]": (
                "Greengrass names each deployment's IoT job at run time."
            ),
            f"AwsSolutions::AwsSolutions-IAM5[Resource::{arn.format('iot', 'thing/*')}]": (
                "A deployment's IoT job addresses the group's things, which join and leave the group."
            ),
            f"AwsSolutions::AwsSolutions-IAM5[Resource::{reports}]": (
                "One retained health report per canary device, named by thing at run time."
            ),
            f"AwsSolutions::AwsSolutions-IAM5[Resource::{arn.format('sagemaker', 'training-job/*')}]": (
                "One training job per release, named after the execution at run time."
            ),
            f"AwsSolutions::AwsSolutions-IAM5[Resource::{records}/releases/*]": (
                "One record folder per release (releases/<execution>/), written once under Object Lock."
            ),
            f"AwsSolutions::AwsSolutions-IAM5[Resource::{artifacts}/candidates/*]": (
                "SageMaker writes each job's output under candidates/<job>/."
            ),
            f"AwsSolutions::AwsSolutions-IAM5[Resource::{artifacts}/datasets/*]": (
                "The training data channel is the datasets/ prefix; its files are not known in advance."
            ),
            f"AwsSolutions::AwsSolutions-IAM5[Resource::{artifacts}/{MODEL_COMPONENT_PREFIX}*]": (
                "Component artifacts live at <component>/<version>/; publishing writes a new version's."
            ),
            f"AwsSolutions::AwsSolutions-IAM5[Resource::{arn.format('greengrass', 'components:')}"
            f"{MODEL_COMPONENT}:versions:*]": "Each release publishes a new version of the model component.",
            f"AwsSolutions::AwsSolutions-IAM5[Resource::{arn.format('logs', 'log-group:')}"
            "/aws/sagemaker/TrainingJobs*]": "SageMaker's own log group for training jobs and its streams.",
        }
        for action in (
            "kms:GenerateDataKey*",
            "kms:ReEncrypt*",
            "s3:Abort*",
            "s3:DeleteObject*",
            "s3:GetBucket*",
            "s3:GetObject*",
            "s3:List*",
        ):
            reasons[f"AwsSolutions::AwsSolutions-IAM5[Action::{action}]"] = (
                "Granted by CDK's SageMaker task for the data channel and the output prefix only "
                "(bucket.grantRead/grantReadWrite and the data key), not chosen by hand."
            )
        acknowledge(self, [{"id": finding, "reason": reason} for finding, reason in reasons.items()])


class _Rollout:
    """The first state of a group's rollout and its 'healthy' exit."""

    def __init__(self, entry: sfn.IChainable, healthy: sfn.Pass) -> None:
        self.entry = entry
        self.healthy = healthy
