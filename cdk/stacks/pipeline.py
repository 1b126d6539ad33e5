"""The release pipeline: train -> gate -> (approve) -> canary -> soak -> fleet, rolling back on failure.

An AWS Step Functions state machine, built only from service integrations
(no Lambda: every step is a SageMaker, S3, SNS, Greengrass v2 or IoT call):

1. **Train, gate, package, publish** (``Train``): a SageMaker training job
   whose container (``cdk/training_image``) runs the project's own
   ``python -m training pipeline``, the gate (:mod:`cdk.gate`) against the
   manifest in production, and, only if it passed, ``cdk.release_steps.publish``
   (bundle upload and component version, idempotent). It writes its verdict
   to ``releases/<execution>/verdict.json`` in the records bucket.
2. **Gate** (``ReadVerdict`` -> ``GatePassed?``): a failed gate ends the
   execution (``GateFailed``) with the verdict on record.
3. **Approval** (``ApproveRelease``, when ``ApprovalRequired``): an SNS
   message carries a task token; the approver role (MFA) calls ``SendTaskSuccess``.
4. **Canary** (``Canary*``): the canary group's one deployment is read and
   revised with only the model component's version changed
   (``States.JsonMerge``), with the configured rollout, abort and timeout and
   ``FailureHandlingPolicy: ROLLBACK``. Each ``CanarySoakMinutes`` the IoT
   job is counted until the group has *settled* (:meth:`PipelineStack._rollout`):
   more failed devices than ``MaxCanaryFailures``, an aborted job, or no
   settling within ``MaxSoakPeriods`` roll the canary back to its previous
   components (``CanaryRollback``) and fail the execution. Then every canary
   device the deployment reached must show, in its own health report, the new
   version, a passed conformance check and at most ``MaxCanaryFailures``
   quarantined scans (``CanaryReports``), else the canary is rolled back too.
5. **Fleet** (``Fleet*``): the same for the fleet group, with its own rate,
   soak, share and ``MaxFleetFailedPercent``, without per-device reports.

Every AWS call is retried; one that still fails is recorded and ends the
execution, after rolling its group back once a deployment exists. Every
outcome is written to the records bucket (Object Lock) as
``releases/<execution>/outcome-<state>.json``; an execution that fails, times
out or is stopped is also announced on the alerts topic and recorded by
EventBridge (:meth:`PipelineStack._alarms`).

The canary's device reports are read as the runtime publishes them
(``edge_runtime.health``: retained, per thing, on change and every
``Greengrass.StatusEverySeconds``).

Why one module over 500 lines: the state machine is one definition; its states refer to each
other by name, so reading it in one file is how an ops engineer follows a release.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aws_cdk import Duration, IgnoreMode, Size, Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk import aws_stepfunctions_tasks as tasks
from constructs import Construct

from components.names import MODEL_COMPONENT

from ..config import ReleaseConfig
from .artifacts import (
    ArtifactsStack,
    acknowledge,
    artifact_bucket_name,
    nag_account_region,
    records_bucket_name,
    training_role_name,
)
from .fleet import MODEL_COMPONENT_PREFIX

__all__ = ["MODEL_COMPONENT", "REPO_ROOT", "PipelineStack"]

REPO_ROOT = Path(__file__).resolve().parents[2]
#: IoT job execution counts (JobProcessDetails) by what they mean for a rollout.
_SUCCEEDED = "NumberOfSucceededThings"
_FAILED = ("NumberOfFailedThings", "NumberOfRejectedThings", "NumberOfTimedOutThings")
_PENDING = ("NumberOfQueuedThings", "NumberOfInProgressThings")


def _retried(task: sfn.TaskStateBase) -> None:
    """Retry ``task`` the way every AWS call of the pipeline is retried.

    A throttled or briefly unavailable API must not end a release with the fleet half
    deployed. Task failures are retried whatever their name (the SDK integrations' error
    names differ by service), a few times, with jittered back-off.
    """
    task.add_retry(
        errors=["States.TaskFailed", "States.Timeout"],
        interval=Duration.seconds(5),
        max_attempts=4,
        backoff_rate=2.0,
        jitter_strategy=sfn.JitterType.FULL,
    )


def _add(*terms: str) -> str:
    """The sum of ``terms`` (paths or intrinsics) as one ``States.MathAdd`` expression, balanced."""
    items = list(terms)
    while len(items) > 1:
        pairs = [f"States.MathAdd({a}, {b})" for a, b in zip(items[::2], items[1::2], strict=False)]
        items = pairs + ([items[-1]] if len(items) % 2 else [])
    return items[0]


def _times_ten_power(path: str, power: int) -> str:
    """``path`` x 10**power: JSONPath intrinsics add but do not multiply, so shift the decimal digits.

    ``States.Format('{}00', n)`` appends zeros; formatting ``n + 1`` and taking the
    1 x 10**power back off keeps a zero count (``'000'``) out of ``States.StringToJson``.
    """
    zeros = "0" * power
    return (
        f"States.MathAdd(States.StringToJson(States.Format('{{}}{zeros}', "
        f"States.MathAdd({path}, 1))), -{10**power})"
    )


def _times(path: str, factor: int) -> str | int:
    """``path`` x ``factor`` (0 <= factor <= 10) as an intrinsic expression (0: the number 0)."""
    if not 0 <= factor <= 10:
        raise ValueError(f"factor {factor} outside 0..10")
    if factor == 0:
        return 0
    if factor == 10:
        return _times_ten_power(path, 1)
    return _add(*[path] * factor)


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
        for email in config.approver_emails:
            self.approval_topic.add_subscription(subscriptions.EmailSubscription(email))
        self.training_role = self._training_role(artifacts)
        # Every terminal path writes its record: a failed call (after its retries) is recorded with
        # its error and ends the execution; once a group has a new deployment, it is rolled back first.
        self.failed = self._record("Failed").next(
            sfn.Fail(self, "FailedEnd", error="ReleaseFailed", cause="A step failed; see the release record")
        )
        train = self._train(artifacts)
        read_verdict = self._task(
            tasks.CallAwsService(
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
        )
        gate_failed = self._record("GateFailed").next(
            sfn.Fail(self, "GateFailedEnd", error="GateFailed", cause="The candidate did not pass the gate")
        )
        canary = self._rollout("Canary")
        fleet_chain = self._rollout("Fleet")
        released = self._record("Released").next(sfn.Succeed(self, "ReleaseDone"))
        fleet_chain.healthy.next(released)
        canary.healthy.next(fleet_chain.entry)
        start_canary: sfn.IChainable = canary.entry
        if config.approval_required:
            approve = self._task(
                tasks.SnsPublish(
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
                            '--task-output \'{"approver": "<name>"}\' (as the approver role)',
                        }
                    ),
                    result_path="$.approval",
                    task_timeout=sfn.Timeout.duration(Duration.days(7)),
                ),
                retry=False,  # a second publish would send a second token
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
        # The records bucket and the approval topic are encrypted with the data key: reading the
        # verdict, writing records and publishing the approval request all need it.
        artifacts.data_key.grant_encrypt_decrypt(self.state_machine)
        self.approver_role = self._approver_role()
        self.alerts_topic = self._alarms(artifacts, log_group)
        self._acknowledge()

    # -- pieces ------------------------------------------------------------------------------------

    def _training_role(self, artifacts: ArtifactsStack) -> iam.Role:
        role = iam.Role(
            self,
            "TrainingRole",
            # Named: the signing key's policy (artifacts stack) lets only this role sign.
            role_name=training_role_name(self.config.name_prefix),
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
                        self.artifact_bucket.arn_for_objects("weights/*"),
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
                    # The container signs the manifest, then checks the signature with the public key
                    # as a box would, before anything is published.
                    sid="SignManifests",
                    actions=["kms:Sign", "kms:GetPublicKey"],
                    resources=[artifacts.signing_key.key_arn],
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
                    sid="ListPublishedVersions",
                    actions=["greengrass:ListComponentVersions"],
                    resources=[component],
                ),
                iam.PolicyStatement(
                    sid="ReadProductionGroup",
                    actions=["iot:DescribeThingGroup"],
                    resources=[self.group_arns["Fleet"]],
                ),
                iam.PolicyStatement(
                    sid="ReadProductionDeployment",
                    actions=["greengrass:GetDeployment"],
                    resources=[f"arn:{self.partition}:greengrass:{self.region}:{self.account}:deployments:*"],
                ),
                iam.PolicyStatement(
                    # What Greengrass reads with the caller's rights to answer GetDeployment and
                    # ListDeployments (their dependent actions in the Service Authorization Reference).
                    sid="ReadDeploymentJobs",
                    actions=["iot:DescribeJob", "iot:DescribeThing", "iot:GetThingShadow"],
                    resources=[
                        f"arn:{self.partition}:iot:{self.region}:{self.account}:job/*",
                        f"arn:{self.partition}:iot:{self.region}:{self.account}:thing/*",
                    ],
                ),
                iam.PolicyStatement(
                    # ListDeployments takes no resource ARN (Service Authorization Reference).
                    sid="ListDeployments",
                    actions=["greengrass:ListDeployments"],
                    resources=["*"],
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

    def _alarms(self, artifacts: ArtifactsStack, log_group: logs.LogGroup) -> sns.Topic:
        """Nothing ends silently: an execution that fails, times out or is stopped, and a deployment
        that fails on a box, is announced on the alerts topic (and, for the execution, recorded).

        An execution that times out or is stopped cannot write its own record: the rule hands the
        event to a one-step state machine that writes ``releases/<execution>/outcome-<STATUS>.json``.
        """
        alerts = sns.Topic(
            self,
            "AlertsTopic",
            display_name="HealthDiag release and deployment failures",
            master_key=artifacts.data_key,
            enforce_ssl=True,
        )
        for email in self.config.approver_emails:
            alerts.add_subscription(subscriptions.EmailSubscription(email))
        artifacts.data_key.grant_encrypt_decrypt(iam.ServicePrincipal("events.amazonaws.com"))
        write = tasks.CallAwsService(
            self,
            "RecordEnd",
            service="s3",
            action="putObject",
            parameters={
                "Bucket": self.records.bucket_name,
                "Key.$": "States.Format('releases/{}/outcome-{}.json', $.detail.name, $.detail.status)",
                "Body.$": "States.JsonToString($)",
                "ContentType": "application/json",
                "ChecksumAlgorithm": "SHA256",
            },
            iam_resources=[self.records.arn_for_objects("releases/*")],
            result_path=sfn.JsonPath.DISCARD,
        )
        _retried(write)
        recorder = sfn.StateMachine(
            self,
            "RecordAbnormalEnd",
            definition_body=sfn.DefinitionBody.from_chainable(write),
            timeout=Duration.minutes(10),
            tracing_enabled=True,
            logs=sfn.LogOptions(destination=log_group, level=sfn.LogLevel.ALL, include_execution_data=False),
        )
        artifacts.data_key.grant_encrypt_decrypt(recorder)
        events.Rule(
            self,
            "ReleaseEndedBadly",
            description="A release execution failed, timed out or was stopped",
            event_pattern=events.EventPattern(
                source=["aws.states"],
                detail_type=["Step Functions Execution Status Change"],
                detail={
                    "status": ["FAILED", "TIMED_OUT", "ABORTED"],
                    "stateMachineArn": [self.state_machine.state_machine_arn],
                },
            ),
            targets=[targets.SnsTopic(alerts), targets.SfnStateMachine(recorder)],
        )
        events.Rule(
            self,
            "DeploymentFailedOnABox",
            description="A Greengrass deployment failed on a core device",
            event_pattern=events.EventPattern(
                source=["aws.greengrass"],
                detail_type=["Greengrass V2 Effective Deployment Status Change"],
                detail={"status": ["FAILED"]},
            ),
            targets=[targets.SnsTopic(alerts)],
        )
        return alerts

    def _approver_role(self) -> iam.Role:
        """The one role meant to answer the approval request (with MFA); its calls are in CloudTrail.

        Step Functions accepts a task token from any principal allowed ``states:SendTaskSuccess``
        on the state machine: give that permission to this role only (the approval message
        says so), and the record names who answered (CloudTrail has the session).
        """
        role = iam.Role(
            self,
            "ApproverRole",
            assumed_by=iam.AccountRootPrincipal().with_conditions(
                {"Bool": {"aws:MultiFactorAuthPresent": "true"}}
            ),
            description="Approves or rejects HealthDiag model releases (task token of ApproveRelease)",
            max_session_duration=Duration.hours(1),
        )
        role.add_to_policy(
            iam.PolicyStatement(
                sid="AnswerReleaseApprovals",
                actions=["states:SendTaskSuccess", "states:SendTaskFailure"],
                resources=[self.state_machine.state_machine_arn],
            )
        )
        return role

    def _train(self, artifacts: ArtifactsStack) -> sfn.TaskStateBase:
        image = tasks.DockerImage.from_asset(
            self,
            "TrainingImage",
            directory=str(REPO_ROOT),
            file="cdk/training_image/Dockerfile",
            # SageMaker's ml.m5 hosts are x86-64: an image built on an arm64 laptop would not start.
            platform=ecr_assets.Platform.LINUX_AMD64,
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
        job = tasks.SageMakerCreateTrainingJob(
            self,
            "Train",
            # Training job names allow no dots (an execution named release-0.3.0 is fine): the name
            # is derived from the execution's; the container gets the execution name itself.
            training_job_name=sfn.JsonPath.format(
                "release-{}", sfn.JsonPath.hash(sfn.JsonPath.string_at("$$.Execution.Name"), "SHA-1")
            ),
            role=self.training_role,
            algorithm_specification=tasks.AlgorithmSpecification(training_image=image),
            hyperparameters={
                "release": sfn.JsonPath.string_at("$$.Execution.Name"),
                # The execution input as given ({} or {"version": "0.3.0", "config": "..."}).
                "input": sfn.JsonPath.json_to_string(sfn.JsonPath.object_at("$$.Execution.Input")),
            },
            input_data_config=[
                tasks.Channel(
                    channel_name="data",
                    data_source=tasks.DataSource(
                        s3_data_source=tasks.S3DataSource(
                            s3_location=tasks.S3Location.from_bucket(self.artifact_bucket, "datasets/")
                        )
                    ),
                ),
                # The pretrained weights the config starts from (one .pth under weights/).
                tasks.Channel(
                    channel_name="weights",
                    data_source=tasks.DataSource(
                        s3_data_source=tasks.S3DataSource(
                            s3_location=tasks.S3Location.from_bucket(self.artifact_bucket, "weights/")
                        )
                    ),
                ),
            ],
            output_data_config=tasks.OutputDataConfig(
                s3_output_location=tasks.S3Location.from_bucket(self.artifact_bucket, "candidates/"),
                encryption_key=artifacts.data_key,
            ),
            resource_config=tasks.ResourceConfig(
                instance_count=1,
                # CDK writes the "ml." prefix itself ("ml.m5.2xlarge").
                instance_type=ec2.InstanceType("m5.2xlarge"),
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
        return self._task(job)

    def _task(
        self, task: sfn.TaskStateBase, *, retry: bool = True, catch: sfn.IChainable | None = None
    ) -> sfn.TaskStateBase:
        """``task`` with the retry every AWS call gets and its failure routed (default: recorded, failed)."""
        if retry:
            _retried(task)
        task.add_catch(catch or self.failed, errors=["States.ALL"], result_path="$.error")
        return task

    def _record(self, outcome: str) -> tasks.CallAwsService:
        """Write the execution's state (verdict, deployments, job counts, error) to the records bucket."""
        record = tasks.CallAwsService(
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
        # Retried like every call; a record that still cannot be written fails the execution with
        # S3's error (the execution's failure alarm reports it), never loops back into a record.
        _retried(record)
        return record

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
                        "iot:DescribeThing",
                        "iot:GetThingShadow",
                        "iot:UpdateThingShadow",
                        "iot:DeleteThingShadow",
                    ],
                    resources=[
                        *self.group_arns.values(),
                        f"arn:{self.partition}:iot:{self.region}:{self.account}:job/*",
                        f"arn:{self.partition}:iot:{self.region}:{self.account}:thing/*",
                    ],
                )
            ]
        # CreateDeployment and ListDeployments take no resource ARN (resource "*" only, Service
        # Authorization Reference); a statement scoped to a group or deployment never matches them.
        resources = ["*"] if action in ("createDeployment", "listDeployments") else [deployments]
        return tasks.CallAwsService(
            self,
            state,
            service="greengrassv2",
            action=action,
            parameters=parameters,
            iam_resources=resources,
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

    def _rollout(self, group: str) -> _Rollout:
        """Read the group's deployment, revise it, soak until it settles; roll back when it does not.

        After each soak the group's IoT job is counted: it has *settled* when no more than
        the allowed devices failed and at least ``<Group>MinSucceededPercent`` of the targeted
        devices succeeded (the rest may be switched off: a group deployment is a continuous
        job, and a box that is off stays QUEUED for ever), or when none is pending at all.
        Too many failures, an aborted (CANCELED) job, or no settling within ``MaxSoakPeriods``
        soaks roll the group back to the components it ran before.
        """
        key = group.lower()
        rollout = self.config.rollout
        canary = group == "Canary"
        rate = rollout.canary_rate_per_minute if canary else rollout.fleet_rate_per_minute
        soak_minutes = rollout.canary_soak_minutes if canary else rollout.fleet_soak_minutes
        share = rollout.canary_min_succeeded_percent if canary else rollout.fleet_min_succeeded_percent
        target = self.group_arns[group]
        listed = self._task(
            self._greengrass(
                f"{group}ListDeployments",
                "listDeployments",
                {"TargetArn": target, "HistoryFilter": "LATEST_ONLY"},
                f"$.{key}.list",
            )
        )
        current = self._task(
            self._greengrass(
                f"{group}GetDeployment",
                "getDeployment",
                {"DeploymentId.$": f"$.{key}.list.Deployments[0].DeploymentId"},
                f"$.{key}.current",
                {"Components.$": "$.Components"},
            )
        )
        no_deployment = sfn.Pass(
            self,
            f"{group}NoDeployment",
            result=sfn.Result.from_object({"Components": {}}),
            result_path=f"$.{key}.current",
        )
        create = self._task(
            self._greengrass(
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
        )
        rollback_failed = self._record(f"{group}RollbackFailed").next(
            sfn.Fail(
                self,
                f"{group}RollbackFailedEnd",
                error=f"{group}RollbackFailed",
                cause=f"The {key} group could not be rolled back: deploy its previous components by hand "
                "(release.py rollback)",
            )
        )
        rollback = self._task(
            self._greengrass(
                f"{group}Rollback",
                "createDeployment",
                {
                    "TargetArn": target,
                    "DeploymentName.$": (
                        f"States.Format('{group}: rollback of release {{}}', $$.Execution.Name)"
                    ),
                    "Components.$": f"$.{key}.current.Components",
                    **self._deployment_settings(rate),
                },
                f"$.{key}.rollback",
            ),
            catch=rollback_failed,
        )
        rollback.next(self._record(f"{group}RolledBack")).next(
            sfn.Fail(
                self,
                f"{group}FailedEnd",
                error=f"{group}Failed",
                cause=f"The {key} group did not settle on the new model; rolled back",
            )
        )
        start = sfn.Pass(
            self,
            f"{group}StartSoak",
            result=sfn.Result.from_object({"soaks": 0}),
            result_path=f"$.{key}.tally",
        )
        soak = sfn.Wait(
            self, f"{group}Soak", time=sfn.WaitTime.duration(Duration.minutes(max(soak_minutes, 1)))
        )
        details = "$.Job.JobProcessDetails"
        job = self._task(
            tasks.CallAwsService(
                self,
                f"{group}ReadJob",
                service="iot",
                action="describeJob",
                parameters={"JobId.$": f"$.{key}.created.IotJobId"},
                iam_resources=[f"arn:{self.partition}:iot:{self.region}:{self.account}:job/*"],
                result_selector={
                    "status.$": "$.Job.Status",
                    "succeeded.$": f"{details}.{_SUCCEEDED}",
                    "failed.$": _add(*[f"{details}.{n}" for n in _FAILED]),
                    "pending.$": _add(*[f"{details}.{n}" for n in _PENDING]),
                    "targeted.$": _add(*[f"{details}.{n}" for n in (_SUCCEEDED, *_FAILED, *_PENDING)]),
                },
                result_path=f"$.{key}.job",
            ),
            catch=rollback,
        )
        counts = f"$.{key}.job"
        tally = sfn.Pass(
            self,
            f"{group}Tally",
            parameters={
                "soaks.$": f"States.MathAdd($.{key}.tally.soaks, 1)",
                "succeeded100.$": _times_ten_power(f"{counts}.succeeded", 2),
                "targeted100.$": _times_ten_power(f"{counts}.targeted", 2),
                "targeted5.$": _add(*[f"{counts}.targeted"] * 5),
                "failed100.$": _times_ten_power(f"{counts}.failed", 2),
            },
            result_path=f"$.{key}.tally",
        )
        # 100 x succeeded >= share x targeted, as 100 x succeeded + (100 - share) x targeted >=
        # 100 x targeted: the share is a multiple of 5, so (100 - share) x targeted is a few
        # additions of 5 x targeted (JSONPath intrinsics have no multiplication).
        tallied = f"$.{key}.tally"
        missing = (100 - share) // 5
        reached = _add(f"{tallied}.succeeded100", *[f"{tallied}.targeted5"] * missing)
        allowed = 0 if canary else _times(f"{counts}.targeted", rollout.max_fleet_failed_percent)
        shares = sfn.Pass(
            self,
            f"{group}Shares",
            parameters={
                "soaks.$": f"{tallied}.soaks",
                "reached.$": reached,
                "needed.$": f"{tallied}.targeted100",
                "failed100.$": f"{tallied}.failed100",
                **({"failedAllowed": allowed} if isinstance(allowed, int) else {"failedAllowed.$": allowed}),
            },
            result_path=f"$.{key}.tally",
        )
        healthy = sfn.Pass(self, f"{group}Healthy")
        done: sfn.IChainable = self._device_reports(key, rollback, healthy) if canary else healthy
        too_many_failed = (
            sfn.Condition.number_greater_than(f"{counts}.failed", rollout.max_canary_failures)
            if canary
            else sfn.Condition.number_greater_than_json_path(
                f"{tallied}.failed100", f"{tallied}.failedAllowed"
            )
        )
        check = (
            sfn.Choice(self, f"{group}Settled?")
            .when(too_many_failed, rollback)
            .when(sfn.Condition.string_equals(f"{counts}.status", "CANCELED"), rollback)
            .when(sfn.Condition.number_equals(f"{counts}.pending", 0), done)
            .when(
                sfn.Condition.number_greater_than_equals_json_path(f"{tallied}.reached", f"{tallied}.needed"),
                done,
            )
            .when(
                sfn.Condition.number_greater_than_equals(f"{tallied}.soaks", rollout.max_soak_periods),
                rollback,
            )
            .otherwise(soak)
        )
        soak.next(job).next(tally).next(shares).next(check)
        create.next(start).next(soak)
        current.next(create)
        no_deployment.next(create)
        listed.next(
            sfn.Choice(self, f"{group}HasDeployment?")
            .when(sfn.Condition.is_present(f"$.{key}.list.Deployments[0]"), current)
            .otherwise(no_deployment)
        )
        return _Rollout(entry=listed, healthy=healthy)

    def _device_reports(self, key: str, rollback: sfn.IChainable, healthy: sfn.Pass) -> sfn.IChainable:
        """The own health report of every canary device the deployment reached: the new version,
        conformance passed, few failures.

        The runtime publishes it retained on ``<StatusTopicPrefix>/<thing name>`` in AWS IoT
        Core (``Greengrass.StatusTopic``), a topic only that box may write. A deployment can
        succeed while the runtime refuses the model (a failed conformance check keeps the old
        one), so the IoT job alone cannot promote a release. The devices are the job's
        SUCCEEDED executions, read a page (250) at a time; a retained payload is a blob,
        base64 in the SDK integration's JSON.
        """
        prefix = self.config.status_topic_prefix
        # The devices the deployment reached (a switched-off box is not judged: the soak's share
        # already allows for it), a page of 250 at a time.
        executions = {
            "JobId.$": f"$.{key}.created.IotJobId",
            "Status": "SUCCEEDED",
            "MaxResults": 250,
        }
        jobs = f"arn:{self.partition}:iot:{self.region}:{self.account}:job/*"
        things = self._task(
            tasks.CallAwsService(
                self,
                "CanaryListThings",
                service="iot",
                action="listJobExecutionsForJob",
                parameters=executions,
                iam_resources=[jobs],
                result_path=f"$.{key}.things",
            ),
            catch=rollback,
        )
        next_page = self._task(
            tasks.CallAwsService(
                self,
                "CanaryListMoreThings",
                service="iot",
                action="listJobExecutionsForJob",
                parameters={**executions, "NextToken.$": f"$.{key}.things.NextToken"},
                iam_resources=[jobs],
                result_path=f"$.{key}.things",
            ),
            catch=rollback,
        )
        report = tasks.CallAwsService(
            self,
            "CanaryGetReport",
            service="iotdataplane",
            action="getRetainedMessage",
            iam_action="iot:GetRetainedMessage",
            # arn:...:thing/<name> -> <name>
            parameters={
                "Topic.$": f"States.Format('{prefix}/{{}}', "
                "States.ArrayGetItem(States.StringSplit($.thing, '/'), 1))"
            },
            iam_resources=[f"arn:{self.partition}:iot:{self.region}:{self.account}:topic/{prefix}/*"],
            result_selector={"report.$": "States.StringToJson(States.Base64Decode($.Payload))"},
            result_path="$.got",
        )
        _retried(report)
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
            items_path=f"$.{key}.things.ExecutionSummaries",
            item_selector={"thing.$": "$$.Map.Item.Value.ThingArn", "version.$": "$.gate.verdict.version"},
            max_concurrency=10,
            result_path=sfn.JsonPath.DISCARD,
        )
        each.item_processor(report.next(judge))
        each.add_catch(rollback, errors=["States.ALL"], result_path=f"$.{key}.reportError")
        more = (
            sfn.Choice(self, "CanaryMoreThings?")
            .when(sfn.Condition.is_present(f"$.{key}.things.NextToken"), next_page)
            .otherwise(healthy)
        )
        each.next(more)
        next_page.next(each)
        things.next(each)
        return things

    def _acknowledge(self) -> None:
        """cdk-nag findings in this stack that are acceptable, each with its reason."""
        account, region = nag_account_region(self)
        arn = f"arn:<AWS::Partition>:{{}}:{region}:{account}:{{}}"
        prefix = self.config.name_prefix
        artifacts = f"arn:<AWS::Partition>:s3:::{prefix}-artifacts-{region}-{account}"
        records = f"arn:<AWS::Partition>:s3:::{prefix}-records-{region}-{account}"
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
            f"AwsSolutions::AwsSolutions-IAM5[Resource::{artifacts}/weights/*]": (
                "The pretrained-weights channel is the weights/ prefix (one .pth file, named by its source)."
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
