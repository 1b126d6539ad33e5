"""Run the release state machine in moto's Step Functions interpreter, with stand-ins where moto has none.

Why: a hand-written ASL walker only proves that the definition does what the
walker thinks ASL means. moto (``mock_aws(config={"stepfunctions":
{"execute_state_machine": True}})``) executes a definition with the
interpreter it took from LocalStack: real JSONPath, intrinsic functions,
Choice rules, Map, Retry/Catch, ``.waitForTaskToken``; its aws-sdk tasks call
moto's own S3, IoT, SNS and SageMaker. This module fills the gaps, each as
narrowly as it can:

* **aws-sdk request and response shapes**: moto's copy passes a Task's
  ``Parameters`` to boto unchanged and returns boto's answer unchanged
  (``_normalise_parameters``/``_normalise_response`` are no-ops). Step
  Functions speaks PascalCase JSON: the parameters are mapped to botocore's
  member names (``TargetArn`` -> ``targetArn`` for Greengrass v2 and IoT), and
  the answer back to PascalCase JSON, with blobs base64-encoded, streamed
  bodies (S3 ``Body``) as text and timestamps as ISO 8601, as Step Functions
  does. Error names become ``<Service>.<Exception>`` with Step Functions'
  PascalCase service names (``GreengrassV2.ThrottlingException``).
* **Greengrass v2 and IoT data plane**: moto has no greengrassv2 and no
  retained messages. Calls for ``aws-sdk:greengrassv2`` and
  ``aws-sdk:iotdataplane`` are routed (by replacing the interpreter's
  ``boto_client_for`` in its aws-sdk module) to :class:`Greengrass` and
  :class:`IotData`: in-test services validating each request against
  botocore's input shape and answering in its output shape.
  ``CreateDeployment`` creates the deployment's IoT job in moto's IoT, as
  Greengrass does.
* **IoT job progress**: moto's ``DescribeJob`` reports a fixed
  ``JobProcessDetails``. moto's ``describe_job`` is wrapped so that each read
  first writes the scripted per-device job executions into moto's own job
  executions and computes ``JobProcessDetails`` (and ``CANCELED`` by the
  job's ``AbortConfig``) from them; the answer is still moto's.
* **SageMaker ``createTrainingJob.sync``**: moto's interpreter lists sagemaker
  as unsupported (request-response and ``.waitForTaskToken`` only; ``.sync``
  raises). A task class for ``sagemaker`` creates the job in moto's SageMaker
  (where it is ``Completed`` at once), then does what the training container
  does (``cdk/training_image/entry.py``): writes ``releases/<job>/verdict.json``
  to the records bucket. Its ``.sync`` result is moto's
  ``DescribeTrainingJob``.
* **JSONPath**: moto returns ``["id"]`` for ``$.list.Deployments[0].DeploymentId``
  (its own fix for getmoto/moto#7825 wraps every match under an index); Step
  Functions returns ``"id"``. Paths made only of names and literal indexes are
  evaluated as Step Functions does; the rest (filters, wildcards, slices) as moto does.
* **Time**: ``Wait`` states do not sleep. ``WaitFunction._wait_interval`` is
  replaced by a virtual clock that advances by the wait; the interpreter's
  ``datetime`` (state ``EnteredTime``, history timestamps, timestamp waits)
  reads that clock; a Retry's interval (``time.sleep`` in moto's retrier)
  advances it too. The execution times out (``TIMED_OUT``) when the
  virtual time passes the definition's ``TimeoutSeconds``, as it would in AWS.
* **Approval**: an SQS queue subscribed to the approval topic plays the
  approver: when the ``.waitForTaskToken`` message arrives, the harness calls
  ``SendTaskSuccess`` (or ``SendTaskFailure``) with its token.

Every request any Task sends (moto's services included) is recorded with its
state and checked against botocore's input shape, enum values included
(:func:`request_problems`): that is where a parameter AWS would refuse shows.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import json
import os
import re
import sys
import threading
import time
import types
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any
from unittest import mock

import boto3
import botocore.session
from botocore.config import Config
from botocore.errorfactory import ClientExceptionsFactory
from botocore.exceptions import ClientError
from botocore.model import ListShape, MapShape, OperationModel, ServiceModel, Shape, StructureShape
from botocore.response import StreamingBody
from botocore.validate import ParamValidator
from moto import mock_aws
from moto.iot.models import FakeJobExecution, IoTBackend
from moto.stepfunctions.parser.api import HistoryEventType, TaskFailedEventDetails
from moto.stepfunctions.parser.asl.component.common.error_name.custom_error_name import CustomErrorName
from moto.stepfunctions.parser.asl.component.common.error_name.failure_event import FailureEvent
from moto.stepfunctions.parser.asl.component.common.retry import retrier_decl as _retrier_module
from moto.stepfunctions.parser.asl.component.state import state as _state_module
from moto.stepfunctions.parser.asl.component.state.exec.state_task import state_task_factory
from moto.stepfunctions.parser.asl.component.state.exec.state_task.service import (
    state_task_service_aws_sdk as _aws_sdk_module,
)
from moto.stepfunctions.parser.asl.component.state.exec.state_task.service import (
    state_task_service_callback as _callback_module,
)
from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.resource import ResourceCondition
from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service_aws_sdk import (
    StateTaskServiceAwsSdk,
)
from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service_sns import (
    StateTaskServiceSns,
)
from moto.stepfunctions.parser.asl.component.state.wait.wait_function import timestamp as _timestamp_module
from moto.stepfunctions.parser.asl.component.state.wait.wait_function.wait_function import WaitFunction
from moto.stepfunctions.parser.asl.eval.event import event_manager as _event_manager_module
from moto.stepfunctions.parser.asl.utils import json_path as _json_path_module
from moto.stepfunctions.parser.models import StepFunctionsParserBackend

__all__ = [
    "ACCOUNT",
    "REGION",
    "Call",
    "Definition",
    "Device",
    "Result",
    "Scenario",
    "definition_from_templates",
    "request_problems",
    "run_release",
    "status_report",
]

ACCOUNT = "111122223333"
REGION = "eu-west-1"
PSEUDO = {
    "AWS::Partition": "aws",
    "AWS::Region": REGION,
    "AWS::AccountId": ACCOUNT,
    "AWS::URLSuffix": "amazonaws.com",
    "AWS::StackName": "healthdiag-pipeline",
}

# moto intercepts every botocore client; one session keeps the service models loaded between runs.
_SESSION = boto3.session.Session(
    aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
)
_NO_RETRIES = Config(retries={"max_attempts": 0, "total_max_attempts": 1}, parameter_validation=False)
_VALIDATED: set[str] = set()  # definitions moto's parser accepted already (parsing takes ~1 s)

#: Step Functions' aws-sdk service names -> botocore's.
_BOTO_SERVICE = {"iotdataplane": "iot-data", "sfn": "stepfunctions", "states": "stepfunctions"}
#: The ``<Service>`` of ``<Service>.<Exception>`` error names (PascalCase, as Step Functions names them).
_ERROR_SERVICE = {
    "greengrassv2": "GreengrassV2",
    "iotdataplane": "IotDataPlane",
    "iot": "Iot",
    "s3": "S3",
    "sns": "Sns",
    "sagemaker": "SageMaker",
}
_JOB_COUNTS = {
    "QUEUED": "numberOfQueuedThings",
    "IN_PROGRESS": "numberOfInProgressThings",
    "SUCCEEDED": "numberOfSucceededThings",
    "FAILED": "numberOfFailedThings",
    "REJECTED": "numberOfRejectedThings",
    "TIMED_OUT": "numberOfTimedOutThings",
    "CANCELED": "numberOfCanceledThings",
    "REMOVED": "numberOfRemovedThings",
}
_TERMINAL = {"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED", "REMOVED"}
_FAILED = {"FAILED", "REJECTED", "TIMED_OUT"}


# -- botocore models: validation and Step Functions' JSON <-> boto -------------------------------


@cache
def _model(service: str) -> ServiceModel:
    return botocore.session.get_session().get_service_model(service)


def _operation(service: str, operation: str) -> OperationModel:
    return _model(service).operation_model(operation)


def _java_pattern(pattern: str) -> re.Pattern[str] | None:
    """A service model's ``pattern`` (Java regex) in Python's dialect; None where it has no equivalent."""
    try:
        return re.compile(pattern.replace("\\p{Alnum}", "[A-Za-z0-9]"))
    except re.error:
        return None


def _constraint_problems(value: Any, shape: Shape, path: str) -> list[str]:
    """What the service refuses that botocore's ParamValidator lets through: enums, maximum lengths
    and sizes, patterns (it checks types, required members and minimums only). A training job name
    with a dot or a hyperparameter over 2 500 characters passes the client and fails at AWS."""
    problems: list[str] = []
    maximum = shape.metadata.get("max")
    if isinstance(shape, StructureShape) and isinstance(value, dict):
        for key, member in shape.members.items():
            if key in value:
                problems += _constraint_problems(value[key], member, f"{path}.{key}" if path else key)
    elif isinstance(shape, ListShape) and isinstance(value, list):
        if maximum is not None and len(value) > maximum:
            problems.append(f"Invalid length for parameter {path}: {len(value)} items, at most {maximum}")
        for index, item in enumerate(value):
            problems += _constraint_problems(item, shape.member, f"{path}[{index}]")
    elif isinstance(shape, MapShape) and isinstance(value, dict):
        if maximum is not None and len(value) > maximum:
            problems.append(f"Invalid length for parameter {path}: {len(value)} entries, at most {maximum}")
        for key, item in value.items():
            problems += _constraint_problems(key, shape.key, f"{path} key")
            problems += _constraint_problems(item, shape.value, f"{path}.{key}" if path else key)
    elif shape.type_name == "string" and isinstance(value, str):
        bad = f"Invalid value for parameter {path}, value: {value!r}"
        if shape.enum and value not in shape.enum:
            problems.append(f"{bad}, valid values: {shape.enum}")
        if maximum is not None and len(value) > maximum:
            problems.append(f"Invalid length for parameter {path}: {len(value)} chars, at most {maximum}")
        pattern = _java_pattern(shape.metadata["pattern"]) if "pattern" in shape.metadata else None
        if pattern is not None and not pattern.fullmatch(value):
            problems.append(f"{bad}, pattern: {pattern.pattern}")
    return problems


def request_problems(service: str, operation: str, params: Mapping[str, Any]) -> list[str]:
    """What AWS would refuse in ``params`` (botocore member names): types, required, unknown members,
    enums, maximum lengths and patterns."""
    shape = _operation(service, operation).input_shape
    report = ParamValidator().validate(dict(params), shape)
    problems = report.generate_report().splitlines() if report.has_errors() else []
    return [p.strip() for p in problems if p.strip()] + _constraint_problems(params, shape, "")


def _to_boto(value: Any, shape: Shape | None) -> Any:
    """Step Functions' PascalCase JSON -> botocore member names and types (unknown keys kept)."""
    if shape is None:
        return value
    if isinstance(shape, StructureShape) and isinstance(value, dict):
        members = {name.lower(): name for name in shape.members}
        out = {}
        for key, item in value.items():
            name = members.get(key.lower(), key)
            out[name] = _to_boto(item, shape.members.get(name))
        return out
    if isinstance(shape, ListShape) and isinstance(value, list):
        return [_to_boto(item, shape.member) for item in value]
    if isinstance(shape, MapShape) and isinstance(value, dict):
        return {key: _to_boto(item, shape.value) for key, item in value.items()}
    if shape.type_name == "blob":
        return value.encode() if isinstance(value, str) else value
    if shape.type_name == "string" and not isinstance(value, str):
        return json.dumps(value, separators=(",", ":"))
    return value


def _to_sfn(value: Any, shape: Shape | None) -> Any:
    """A botocore answer -> the JSON Step Functions hands to ResultSelector (PascalCase, base64 blobs)."""
    if isinstance(value, StreamingBody):
        return value.read().decode()  # S3 GetObject's Body arrives as text
    if isinstance(value, _dt.datetime):
        return value.isoformat()
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(shape, StructureShape) and isinstance(value, dict):
        return {
            key[:1].upper() + key[1:]: _to_sfn(item, shape.members.get(key))
            for key, item in value.items()
            if key != "ResponseMetadata"
        }
    if isinstance(shape, ListShape) and isinstance(value, list):
        return [_to_sfn(item, shape.member) for item in value]
    if isinstance(shape, MapShape) and isinstance(value, dict):
        return {key: _to_sfn(item, shape.value) for key, item in value.items()}
    if isinstance(value, dict):
        return {key: _to_sfn(item, None) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_sfn(item, None) for item in value]
    return value


def _client_error(service: str, code: str, message: str, status: int = 400) -> ClientError:
    """The exception botocore raises for ``code`` (its modelled class where the model has one)."""
    exceptions = ClientExceptionsFactory().create_client_exceptions(_model(service))
    cls = getattr(exceptions, code, None) or type(code, (ClientError,), {})
    response = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status, "RequestId": str(uuid.uuid4())},
    }
    return cls(response, code)  # type: ignore[no-any-return]


# -- the scenario --------------------------------------------------------------------------------


def status_report(version: str = "0.2.0", passed: bool = True, quarantined: int = 0) -> dict[str, Any]:
    """A device's retained status report, shaped as ``edge_runtime.service`` publishes it."""
    return {
        "schema_version": "1.0",
        "message_type": "status",
        "state": "online",
        "model": {"name": "pneumonia-cxr", "version": version, "conformance": {"passed": passed}},
        "counters": {"received": 10, "processed": 10 - quarantined, "quarantined": quarantined},
    }


@dataclass
class Device:
    """A thing in a group: its job execution status per read of the release's job, its report.

    ``job`` is one status or a sequence, the n-th entry for the n-th ``DescribeJob`` of the
    group's release deployment (the last repeats). ``report`` is its retained status
    message; None: it never published one. Rollback jobs succeed on every device.
    """

    name: str
    job: str | Sequence[str] = "SUCCEEDED"
    report: dict[str, Any] | None = field(default_factory=status_report)

    def status(self, read: int) -> str:
        if isinstance(self.job, str):
            return self.job
        return self.job[min(read, len(self.job) - 1)]


@dataclass
class Scenario:
    """What the services hold and do during one release.

    ``previous``: thing group name -> the components of its current deployment (a
    group absent has never had one). ``throttle``: Greengrass v2 operation -> the
    indexes (0-based, counted per operation) of the calls answered with
    ``ThrottlingException``. ``approver``: who sends ``SendTaskSuccess`` for the
    approval message (None: ``SendTaskFailure``). ``reject_invalid``: answer a request
    that fails botocore's validation with ``ValidationException``, as AWS would
    (otherwise it is only recorded in :attr:`Call.problems`).
    """

    verdict: dict[str, Any]
    canary: list[Device] = field(default_factory=list)
    fleet: list[Device] = field(default_factory=list)
    previous: dict[str, dict[str, Any]] = field(default_factory=dict)
    throttle: dict[str, Sequence[int]] = field(default_factory=dict)
    approver: str | None = "dr-ops"
    reject_invalid: bool = False
    canary_group: str = "healthdiag-canary"
    fleet_group: str = "healthdiag-fleet"
    status_topic: str = "healthdiag/edge/status"


@dataclass
class Call:
    """One request a Task state sent: to which service and operation, with what, and its findings."""

    state: str
    service: str  # botocore's name: greengrassv2, iot-data, s3, iot, sns, sagemaker
    operation: str  # e.g. CreateDeployment
    params: dict[str, Any]  # as the service receives them (botocore member names)
    problems: list[str]  # what botocore's model refuses; empty when valid
    error: str | None = None  # the error code the service answered with, if any


@dataclass
class Result:
    """The end of one execution: status, output, history, every request, the records written."""

    status: str
    output: Any
    error: str | None
    cause: str | None
    events: list[dict[str, Any]]
    calls: list[Call]
    records: dict[str, Any]
    deployments: dict[str, list[dict[str, Any]]]  # thing group -> its Greengrass deployments, oldest first
    virtual_seconds: float

    @property
    def states(self) -> list[str]:
        """Every state entered, in order (Map iterations' states included)."""
        return [e["stateEnteredEventDetails"]["name"] for e in self.events if "stateEnteredEventDetails" in e]

    def stand_in(self, service: str) -> list[Call]:
        """The calls a stand-in received (``greengrassv2``, ``iot-data``, ``sagemaker``)."""
        return [c for c in self.calls if c.service == service]

    def call(self, state: str, *, answered: bool = True) -> Call:
        """The last call ``state`` made (by default the last one the service answered without error)."""
        found = [c for c in self.calls if c.state == state and not (answered and c.error)]
        if not found:
            raise AssertionError(f"{state} made no call; states: {self.states}")
        return found[-1]

    def invalid(self) -> list[str]:
        """Every request botocore's model refuses, as ``state Service.Operation: problem`` lines."""
        return [f"{c.state} {c.service}.{c.operation}: {p}" for c in self.calls for p in c.problems]


# -- the definition ------------------------------------------------------------------------------


@dataclass
class Definition:
    """An ASL definition whose deploy-time values are tokens, and each token's CloudFormation type."""

    asl: dict[str, Any]
    tokens: dict[str, dict[str, Any]]  # token -> the CloudFormation resource it stands for (Type, Properties)

    @property
    def timeout_seconds(self) -> int | None:
        return self.asl.get("TimeoutSeconds")


def definition_from_templates(
    templates: Mapping[str, Mapping[str, Any]], stack: str, machine: str = "Release"
) -> Definition:
    """The state machine ``machine`` (its construct id) of ``stack``; references become typed tokens.

    ``templates``: stack name -> synthesized template (cross-stack imports are looked
    up in the exporting stack's outputs). Pseudo parameters get this harness' account
    and region.
    """
    exports: dict[str, tuple[str, Any]] = {}
    for name, template in templates.items():
        for output in template.get("Outputs", {}).values():
            if "Export" in output:
                exports[output["Export"]["Name"]] = (name, output["Value"])
    tokens: dict[str, dict[str, Any]] = {}

    def token(stack_name: str, logical: str, attribute: str) -> str:
        resource = templates[stack_name]["Resources"][logical]
        text = f"{{{{cfn:{resource['Type']}:{logical}:{attribute}}}}}"
        tokens[text] = resource
        return text

    def text(value: Any, stack_name: str) -> str:
        if isinstance(value, str):
            return value
        if "Ref" in value:
            ref = value["Ref"]
            return PSEUDO[ref] if ref in PSEUDO else token(stack_name, ref, "Ref")
        if "Fn::GetAtt" in value:
            logical, attribute = value["Fn::GetAtt"]
            return token(stack_name, logical, attribute)
        if "Fn::Join" in value:
            sep, parts = value["Fn::Join"]
            return str(sep).join(text(part, stack_name) for part in parts)
        if "Fn::Sub" in value:
            return re.sub(r"\$\{([^}]+)\}", lambda m: PSEUDO[m.group(1)], value["Fn::Sub"])
        if "Fn::ImportValue" in value:
            exporter, exported = exports[value["Fn::ImportValue"]]
            return text(exported, exporter)
        raise ValueError(f"unsupported intrinsic in the definition: {value}")

    logical_id = re.compile(rf"{re.escape(machine)}[0-9A-F]{{8}}")  # CDK: construct id + 8 hex digits
    (found,) = [
        resource
        for logical, resource in templates[stack]["Resources"].items()
        if resource["Type"] == "AWS::StepFunctions::StateMachine" and logical_id.fullmatch(logical)
    ]
    return Definition(json.loads(text(found["Properties"]["DefinitionString"], stack)), tokens)


# -- the stand-ins -------------------------------------------------------------------------------


class _StandIn:
    """A boto-client-shaped service: validates each request and answer against botocore's model."""

    service = ""

    def __init__(self, harness: _Harness) -> None:
        self.harness = harness
        self.lock = threading.RLock()
        self.counts: dict[str, int] = {}

    def __getattr__(self, snake: str) -> Any:
        model = _model(self.service)
        names = {botocore.xform_name(op): op for op in model.operation_names}
        if snake not in names:
            raise AttributeError(snake)
        operation = names[snake]

        def call(**params: Any) -> dict[str, Any]:
            with self.lock:
                index = self.counts.get(operation, 0)
                self.counts[operation] = index + 1
                problems = request_problems(self.service, operation, params)
                if problems and self.harness.scenario.reject_invalid:
                    raise _client_error(self.service, "ValidationException", "; ".join(problems))
                answer = getattr(self, f"_{snake}")(index, **params)
                shape = _operation(self.service, operation).output_shape
                report = ParamValidator().validate(answer, shape)
                if report.has_errors():  # a stand-in bug, not the definition's: fail loudly
                    self.harness.harness_errors.append(f"{operation} answer: {report.generate_report()}")
                return dict(answer)

        return call


class Greengrass(_StandIn):
    """Greengrass v2 for deployments: one list per target ARN, each deployment's IoT job in moto."""

    service = "greengrassv2"

    def __init__(self, harness: _Harness, previous: Mapping[str, Mapping[str, Any]]) -> None:
        super().__init__(harness)
        self.deployments: dict[str, list[dict[str, Any]]] = {}
        for group, components in previous.items():
            target = harness.group_arn(group)
            self.deployments[target] = [
                self._deployment(target, f"{group} deployment", _to_boto(components, _components_shape()), "")
            ]

    def _deployment(self, target: str, name: str, components: dict[str, Any], job: str) -> dict[str, Any]:
        for earlier in self.deployments.get(target, []):
            earlier["isLatestForTarget"] = False
        return {
            "targetArn": target,
            "revisionId": str(len(self.deployments.get(target, [])) + 1),
            "deploymentId": str(uuid.uuid4()),
            "deploymentName": name,
            "deploymentStatus": "ACTIVE",
            "iotJobId": job or str(uuid.uuid4()),
            "iotJobArn": f"arn:aws:iot:{REGION}:{ACCOUNT}:job/{job}",
            "components": components,
            "creationTimestamp": _dt.datetime.now(_dt.UTC),
            "isLatestForTarget": True,
        }

    def _throttled(self, operation: str, index: int) -> None:
        if index in self.harness.scenario.throttle.get(operation, ()):
            raise _client_error(self.service, "ThrottlingException", "Rate exceeded", 429)

    def _list_deployments(self, index: int, **params: Any) -> dict[str, Any]:
        self._throttled("ListDeployments", index)
        found = self.deployments.get(params.get("targetArn", ""), [])
        if params.get("historyFilter", "LATEST_ONLY") == "LATEST_ONLY":
            found = [d for d in found if d["isLatestForTarget"]]
        summary = ("targetArn", "revisionId", "deploymentId", "deploymentName", "creationTimestamp")
        fields = (*summary, "deploymentStatus", "isLatestForTarget")
        return {"deployments": [{k: d[k] for k in fields} for d in reversed(found)]}

    def _get_deployment(self, index: int, deploymentId: str) -> dict[str, Any]:
        self._throttled("GetDeployment", index)
        for deployments in self.deployments.values():
            for deployment in deployments:
                if deployment["deploymentId"] == deploymentId:
                    return dict(deployment)
        raise _client_error(self.service, "ResourceNotFoundException", f"no deployment {deploymentId}", 404)

    def _create_deployment(self, index: int, **params: Any) -> dict[str, Any]:
        self._throttled("CreateDeployment", index)
        target = params["targetArn"]
        job_id = str(uuid.uuid4())
        deployment = self._deployment(
            target, params.get("deploymentName", ""), params.get("components", {}), job_id
        )
        deployment.update(
            {k: params[k] for k in ("deploymentPolicies", "iotJobConfiguration") if k in params}
        )
        self.harness.create_job(job_id, target, params.get("iotJobConfiguration", {}))
        self.deployments.setdefault(target, []).append(deployment)
        return {k: deployment[k] for k in ("deploymentId", "iotJobId", "iotJobArn")}

    def _get_component(self, index: int, arn: str, recipeOutputFormat: str = "JSON") -> dict[str, Any]:
        name, version = arn.split(":components:")[1].split(":versions:")
        recipe = {"RecipeFormatVersion": "2020-01-25", "ComponentName": name, "ComponentVersion": version}
        return {"recipeOutputFormat": recipeOutputFormat, "recipe": json.dumps(recipe).encode()}


class IotData(_StandIn):
    """The IoT data plane's retained messages: one per topic, payload as bytes."""

    service = "iot-data"

    def __init__(self, harness: _Harness) -> None:
        super().__init__(harness)
        self.retained: dict[str, bytes] = {}

    def _get_retained_message(self, index: int, topic: str) -> dict[str, Any]:
        if topic not in self.retained:
            raise _client_error(
                self.service, "ResourceNotFoundException", f"No retained message for {topic}", 404
            )
        return {
            "topic": topic,
            "payload": self.retained[topic],
            "qos": 1,
            "lastModifiedTime": int(time.time() * 1000),
        }


class _SageMakerTask(_callback_module.StateTaskServiceCallback):
    """``sagemaker:createTrainingJob(.sync)``: moto's SageMaker, then the container's verdict."""

    harness: _Harness

    def __init__(self) -> None:
        super().__init__(
            supported_integration_patterns={ResourceCondition.Sync, ResourceCondition.WaitForTaskToken}
        )

    def _validate_service_integration_is_supported(self) -> None:
        pass

    def _client(self, region: str) -> Any:
        return self.harness.client("sagemaker")

    def _eval_service_task(self, env, resource_runtime_part, normalised_parameters, state_credentials):  # type: ignore[no-untyped-def]
        client = self._client(resource_runtime_part.region)
        response = client.create_training_job(**normalised_parameters)
        self.harness.training_job_created(normalised_parameters)
        env.stack.append(_to_sfn(response, _operation("sagemaker", "CreateTrainingJob").output_shape))

    def _build_sync_resolver(self, env, resource_runtime_part, normalised_parameters, state_credentials):  # type: ignore[no-untyped-def]
        client = self._client(resource_runtime_part.region)
        name = normalised_parameters["TrainingJobName"]
        shape = _operation("sagemaker", "DescribeTrainingJob").output_shape

        def resolve() -> Any:
            described = client.describe_training_job(TrainingJobName=name)
            status = described["TrainingJobStatus"]
            if status in ("Failed", "Stopped"):
                raise _client_error("sagemaker", f"Training{status}", described.get("FailureReason", status))
            return _to_sfn(described, shape) if status == "Completed" else None

        return resolve

    def _from_error(self, env, ex):  # type: ignore[no-untyped-def]
        if isinstance(ex, ClientError):
            error = f"SageMaker.{ex.response['Error']['Code']}"
            return FailureEvent(
                env=env,
                error_name=CustomErrorName(error_name=error),
                event_type=HistoryEventType.TaskFailed,
                event_details={
                    "taskFailedEventDetails": TaskFailedEventDetails(
                        resource=self._get_sfn_resource(),
                        resourceType=self._get_sfn_resource_type(),
                        error=error,
                        cause=ex.response["Error"]["Message"],
                    )
                },
            )
        return super()._from_error(env=env, ex=ex)


# -- JSONPath as Step Functions evaluates it --------------------------------------------------

_DEFINITE_PATH = re.compile(r"\$(\.[A-Za-z0-9_-]+|\[\d+\])+")
_moto_extract_json = _json_path_module.extract_json


def _extract_json(path: str, data: Any) -> Any:
    """One value for a definite path (names and literal indexes only), moto's answer otherwise."""
    if not _DEFINITE_PATH.fullmatch(path):
        return _moto_extract_json(path, data)
    matches = _json_path_module.parse(path).find(data)
    if not matches:
        raise _json_path_module.NoSuchJsonPathError(json_path=path, data=data)
    return matches[0].value


# -- the virtual clock ---------------------------------------------------------------------------


class _Clock:
    """Virtual seconds added to the real clock; Wait states add their duration instead of sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def module(self) -> types.ModuleType:
        """A ``datetime`` module whose ``datetime.now()`` is the virtual time."""
        clock = self
        shim = types.ModuleType("datetime")
        shim.__dict__.update(_dt.__dict__)

        class VirtualDatetime(_dt.datetime):
            @classmethod
            def now(cls, tz: _dt.tzinfo | None = None) -> _dt.datetime:  # type: ignore[override]
                return _dt.datetime.now(tz) + _dt.timedelta(seconds=clock.offset)

        shim.datetime = VirtualDatetime  # type: ignore[attr-defined]
        return shim


def _time_module(sleep: Any) -> types.ModuleType:
    """A ``time`` module whose ``sleep`` is ``sleep``."""
    shim = types.ModuleType("time")
    shim.__dict__.update(time.__dict__)
    shim.sleep = sleep  # type: ignore[attr-defined]
    return shim


def _jsonable(value: Any) -> Any:
    """A request as JSON (bytes as text): what the tests compare."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode(errors="replace")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, _dt.datetime):
        return value.isoformat()
    return value


# -- the harness ---------------------------------------------------------------------------------


class _Harness:
    """Everything one execution needs: moto resources, stand-ins, patches, the approver."""

    def __init__(self, definition: Definition, scenario: Scenario) -> None:
        self.definition = definition
        self.scenario = scenario
        self.clock = _Clock()
        self.calls: list[Call] = []
        self.harness_errors: list[str] = []
        self.lock = threading.Lock()
        self.jobs: dict[str, tuple[str, int]] = {}  # job id -> (group name, nth deployment to that group)
        self.job_reads: dict[str, int] = {}
        self.greengrass = Greengrass(self, scenario.previous)
        self.iot_data = IotData(self)
        self.resources: dict[str, str] = {}
        self.clients: dict[str, Any] = {}

    def group_arn(self, group: str) -> str:
        return f"arn:aws:iot:{REGION}:{ACCOUNT}:thinggroup/{group}"

    def devices(self, group: str) -> list[Device]:
        if group == self.scenario.canary_group:
            return self.scenario.canary
        if group == self.scenario.fleet_group:
            return self.scenario.fleet
        return []

    # setup -----------------------------------------------------------------------------------

    def _buckets(self) -> dict[str, bool]:
        """Every bucket the definition names; the records bucket (verdicts, outcomes) under Object Lock."""
        found: dict[str, bool] = {}

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    if key == "Bucket" and isinstance(value, str):
                        found.setdefault(value, False)
                    elif key == "HEALTHDIAG_RECORDS_BUCKET":
                        found[value] = True
                    elif key.endswith("_BUCKET") and isinstance(value, str):
                        found.setdefault(value, False)
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(self.definition.asl)
        return found

    def setup(self) -> str:
        """Create what the definition refers to in moto; the state machine's ARN."""
        iam, s3, kms, sns, sqs, iot = map(self.client, ("iam", "s3", "kms", "sns", "sqs", "iot"))
        for bucket, locked in self._buckets().items():
            s3.create_bucket(
                Bucket=bucket,
                CreateBucketConfiguration={"LocationConstraint": REGION},
                ObjectLockEnabledForBucket=locked,
            )
            if locked:
                self.records_bucket = bucket
        trust = {"Version": "2012-10-17", "Statement": []}
        for text, resource in self.definition.tokens.items():
            logical = text.rsplit(":", 2)[1]
            kind, properties = resource["Type"], resource.get("Properties", {})
            if kind == "AWS::SNS::Topic":
                arn = sns.create_topic(Name=logical)["TopicArn"]
                queue = sqs.create_queue(QueueName=f"{logical}-approver")["QueueUrl"]
                queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])
                sns.subscribe(
                    TopicArn=arn,
                    Protocol="sqs",
                    Endpoint=queue_arn["Attributes"]["QueueArn"],
                    Attributes={"RawMessageDelivery": "true"},
                )
                self.approval_queues = [*getattr(self, "approval_queues", []), queue]
            elif kind == "AWS::IAM::Role":
                arn = iam.create_role(RoleName=logical, AssumeRolePolicyDocument=json.dumps(trust))["Role"][
                    "Arn"
                ]
            elif kind == "AWS::KMS::Key":  # the data key (symmetric), the signing key (ECC_NIST_P256)
                spec = {
                    k: properties[k] for k in ("KeySpec", "KeyUsage") if isinstance(properties.get(k), str)
                }
                arn = kms.create_key(Description=logical, **spec)["KeyMetadata"]["Arn"]
            else:
                raise ValueError(f"no moto resource for {text}")
            self.resources[text] = arn
        for group in (self.scenario.canary_group, self.scenario.fleet_group):
            iot.create_thing_group(thingGroupName=group)
            for device in self.devices(group):
                iot.create_thing(thingName=device.name)
                iot.add_thing_to_thing_group(thingGroupName=group, thingName=device.name)
                if device.report is not None:
                    topic = f"{self.scenario.status_topic}/{device.name}"
                    self.iot_data.retained[topic] = json.dumps(device.report).encode()
        text = json.dumps(self.definition.asl)
        for token, arn in self.resources.items():
            text = text.replace(token, arn)
        role = iam.create_role(RoleName="ReleaseStateMachine", AssumeRolePolicyDocument=json.dumps(trust))
        known = json.dumps(self.definition.asl, sort_keys=True)
        with contextlib.ExitStack() as stack:
            if known in _VALIDATED:  # moto's parser accepted it in an earlier run (~1 s saved per run)
                stack.enter_context(mock.patch.object(StepFunctionsParserBackend, "_validate_definition"))
            machine = self.client("stepfunctions").create_state_machine(
                name="Release", definition=text, roleArn=role["Role"]["Arn"]
            )
        _VALIDATED.add(known)
        return str(machine["stateMachineArn"])

    # what the services do --------------------------------------------------------------------

    def training_job_created(self, params: Mapping[str, Any]) -> None:
        """The training container's last step (entry.py): the verdict, in the records bucket."""
        env = params.get("Environment", {})
        # The container keys the verdict by the ``release`` hyperparameter (the execution name),
        # else by its job name (TRAINING_JOB_NAME), as entry.py does.
        release = params.get("HyperParameters", {}).get("release") or params["TrainingJobName"]
        verdict = {"release": release, **self.scenario.verdict}
        self.client("s3").put_object(
            Bucket=env["HEALTHDIAG_RECORDS_BUCKET"],
            Key=f"releases/{release}/verdict.json",
            Body=json.dumps(verdict, indent=2).encode(),
            ContentType="application/json",
            ChecksumAlgorithm="SHA256",
        )

    def create_job(self, job_id: str, target: str, config: Mapping[str, Any]) -> None:
        """The IoT job Greengrass creates for a deployment, in moto's IoT (continuous, on the group)."""
        group = target.rsplit("/", 1)[1]
        with self.lock:
            nth = sum(1 for g, _ in self.jobs.values() if g == group)
            self.jobs[job_id] = (group, nth)
        # Greengrass' IotJobConfiguration members are IoT CreateJob's, with the same (camelCase) names.
        self.client("iot").create_job(
            jobId=job_id,
            targets=[target],
            targetSelection="CONTINUOUS",
            document=json.dumps({"deployment": job_id}),
            **{
                k: v
                for k, v in config.items()
                if k in ("jobExecutionsRolloutConfig", "abortConfig", "timeoutConfig")
            },
        )

    def describe_job(self, backend: IoTBackend, job: Any) -> None:
        """Before moto answers DescribeJob: the devices' executions, and the counts from them."""
        with self.lock:
            group, nth = self.jobs.get(job.job_id, ("", 0))
            read = self.job_reads.get(job.job_id, 0)
            self.job_reads[job.job_id] = read + 1
        counts = dict.fromkeys(_JOB_COUNTS.values(), 0)
        for device in self.devices(group):
            status = device.status(read) if nth == 0 else "SUCCEEDED"
            thing_arn = f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/{device.name}"
            backend.job_executions[(job.job_id, device.name)] = FakeJobExecution(
                job.job_id, thing_arn, status
            )
            counts[_JOB_COUNTS[status]] += 1
        backend.job_executions.pop((job.job_id, group), None)  # moto's execution for the group ARN itself
        job.job_process_details = {"processingTargets": [], **counts}
        job.status = "IN_PROGRESS" if job.status == "QUEUED" else job.status
        executed = sum(counts[_JOB_COUNTS[s]] for s in _TERMINAL)
        failed = sum(counts[_JOB_COUNTS[s]] for s in _FAILED)
        for criteria in (job.abort_config or {}).get("criteriaList", []):
            enough = executed and executed >= criteria["minNumberOfExecutedThings"]
            if enough and 100.0 * failed / executed >= criteria["thresholdPercentage"]:
                job.status = "CANCELED"  # IoT's AbortConfig cancels the job

    # the interpreter's hooks -----------------------------------------------------------------

    def on_request(self, task: Any, env: Any, params: dict[str, Any]) -> None:
        """Every Task's request: recorded with its state, validated, refused if the scenario says so."""
        resource = task.resource
        api = resource.api_name
        service = _BOTO_SERVICE.get(api, api)
        operation = resource.api_action[:1].upper() + resource.api_action[1:]
        checked = dict(params)
        if service == "sns" and not isinstance(checked.get("Message", ""), str):
            checked["Message"] = json.dumps(checked["Message"])  # the optimized integration stringifies
        problems = request_problems(service, operation, checked)
        state = env.states.context_object.context_object_data["State"]["Name"]
        call = Call(state, service, operation, _jsonable(params), problems)
        with self.lock:
            self.calls.append(call)
        if problems and self.scenario.reject_invalid:
            call.error = "ValidationException"
            raise _client_error(service, "ValidationException", "; ".join(problems))

    def on_error(self, task: Any, env: Any, error: Exception) -> None:
        if isinstance(error, ClientError):
            state = env.states.context_object.context_object_data["State"]["Name"]
            with self.lock:
                for call in reversed(self.calls):
                    if call.state == state:
                        call.error = call.error or error.response["Error"]["Code"]
                        break

    def client(self, service: str) -> Any:
        """One client per service for this run, from one session for all runs (its models stay loaded)."""
        with self.lock:
            if service not in self.clients:
                self.clients[service] = _SESSION.client(service, config=_NO_RETRIES)
            return self.clients[service]

    def on_retry_sleep(self, seconds: float) -> None:
        self.clock.offset += max(float(seconds), 0.0)

    def on_wait(self, env: Any, seconds: float) -> None:
        self.clock.offset += max(float(seconds), 0.0)
        limit = self.definition.timeout_seconds
        if limit is not None and self.clock.offset >= limit:
            env.set_timed_out()  # AWS ends the execution at TimeoutSeconds; so does virtual time

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        harness = self
        clock = self.clock.module()
        originals = {
            cls: cls._eval_service_task
            for cls in (StateTaskServiceAwsSdk, StateTaskServiceSns, _SageMakerTask)
        }
        original_describe_job = IoTBackend.describe_job
        original_factory = state_task_factory.state_task_service_for

        def eval_service_task(task, env, resource_runtime_part, normalised_parameters, state_credentials):  # type: ignore[no-untyped-def]
            harness.on_request(task, env, normalised_parameters)
            try:
                originals[type(task)](
                    task, env, resource_runtime_part, normalised_parameters, state_credentials
                )
            except Exception as error:
                harness.on_error(task, env, error)
                raise

        def normalise_parameters(task, parameters, boto_service_name=None, service_action_name=None):  # type: ignore[no-untyped-def]
            service = _BOTO_SERVICE.get(task.resource.api_name, task.resource.api_name)
            action = task.resource.api_action
            shape = _operation(service, action[:1].upper() + action[1:]).input_shape
            converted = _to_boto(dict(parameters), shape)
            parameters.clear()
            parameters.update(converted)

        def normalise_response(task, response, boto_service_name=None, service_action_name=None):  # type: ignore[no-untyped-def]
            service = _BOTO_SERVICE.get(task.resource.api_name, task.resource.api_name)
            action = task.resource.api_action
            shape = _operation(service, action[:1].upper() + action[1:]).output_shape
            converted = _to_sfn(response, shape)
            response.clear()
            response.update(converted)

        def boto_client_for(region: str, service: str, state_credentials: Any = None) -> Any:
            if service == "greengrassv2":
                return harness.greengrass
            if service == "iotdataplane":
                return harness.iot_data
            return harness.client(service)

        def state_task_service_for(service_name: str) -> Any:
            if service_name == "sagemaker":
                return _SageMakerTask()
            return original_factory(service_name=service_name)

        def describe_job(backend: IoTBackend, job_id: str) -> Any:
            job = original_describe_job(backend, job_id)
            harness.describe_job(backend, job)
            return job

        _SageMakerTask.harness = self
        with contextlib.ExitStack() as stack:
            for cls in originals:
                stack.enter_context(mock.patch.object(cls, "_eval_service_task", eval_service_task))
            stack.enter_context(
                mock.patch.object(StateTaskServiceAwsSdk, "_normalise_parameters", normalise_parameters)
            )
            stack.enter_context(
                mock.patch.object(StateTaskServiceAwsSdk, "_normalise_response", normalise_response)
            )
            stack.enter_context(mock.patch.dict(_aws_sdk_module._SERVICE_ERROR_NAMES, _ERROR_SERVICE))
            stack.enter_context(mock.patch.object(_aws_sdk_module, "boto_client_for", boto_client_for))
            stack.enter_context(
                mock.patch.object(state_task_factory, "state_task_service_for", state_task_service_for)
            )
            stack.enter_context(mock.patch.object(IoTBackend, "describe_job", describe_job))
            stack.enter_context(
                mock.patch.object(
                    WaitFunction,
                    "_wait_interval",
                    lambda _, env, wait_seconds: harness.on_wait(env, wait_seconds),
                )
            )
            for module in (_state_module, _event_manager_module, _timestamp_module):
                stack.enter_context(mock.patch.object(module, "datetime", clock))
            stack.enter_context(
                mock.patch.object(_retrier_module, "time", _time_module(harness.on_retry_sleep))
            )
            for name, module in list(sys.modules.items()):
                if (
                    name.startswith("moto.stepfunctions.parser")
                    and getattr(module, "extract_json", None) is _moto_extract_json
                ):
                    stack.enter_context(mock.patch.object(module, "extract_json", _extract_json))
            yield

    # the execution ---------------------------------------------------------------------------

    def approve(self, sfn: Any, sqs: Any) -> None:
        """The approver: each approval message's task token gets SendTaskSuccess (or Failure)."""
        for queue in getattr(self, "approval_queues", []):
            for message in sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10).get("Messages", []):
                token = json.loads(message["Body"])["taskToken"]
                if self.scenario.approver is None:
                    sfn.send_task_failure(taskToken=token, error="Rejected", cause="the approver said no")
                else:
                    sfn.send_task_success(
                        taskToken=token, output=json.dumps({"approver": self.scenario.approver})
                    )
                sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])

    def execute(self, machine: str, name: str, execution_input: Any, timeout: float) -> Result:
        sfn, sqs = self.client("stepfunctions"), self.client("sqs")
        arn = sfn.start_execution(stateMachineArn=machine, name=name, input=json.dumps(execution_input))[
            "executionArn"
        ]
        deadline = time.monotonic() + timeout
        while (described := sfn.describe_execution(executionArn=arn))["status"] == "RUNNING":
            self.approve(sfn, sqs)
            if time.monotonic() > deadline:
                sfn.stop_execution(executionArn=arn, error="Harness.Timeout")
                raise AssertionError(f"execution still running after {timeout} s (real time)")
            time.sleep(0.02)
        events: list[dict[str, Any]] = []
        pages = sfn.get_paginator("get_execution_history").paginate(executionArn=arn)
        for page in pages:
            events += page["events"]
        failed = next((e for e in events if "executionFailedEventDetails" in e), {})
        details = failed.get("executionFailedEventDetails", {})
        return Result(
            status=described["status"],
            output=json.loads(described["output"]) if described.get("output") else None,
            error=details.get("error"),
            cause=details.get("cause"),
            events=events,
            calls=list(self.calls),
            records=self.records(name),
            deployments={
                target.rsplit("/", 1)[1]: [_jsonable(d) for d in found]
                for target, found in self.greengrass.deployments.items()
            },
            virtual_seconds=self.clock.offset,
        )

    def records(self, release: str) -> dict[str, Any]:
        s3 = self.client("s3")
        listed = s3.list_objects_v2(Bucket=self.records_bucket, Prefix=f"releases/{release}/")
        return {
            item["Key"]: json.loads(s3.get_object(Bucket=self.records_bucket, Key=item["Key"])["Body"].read())
            for item in listed.get("Contents", [])
        }


def _components_shape() -> Shape:
    return _operation("greengrassv2", "CreateDeployment").input_shape.members["components"]


def run_release(
    definition: Definition,
    scenario: Scenario,
    *,
    execution: str = "release-1",
    execution_input: Any = None,
    timeout: float = 30.0,
) -> Result:
    """Create everything in a fresh moto, run one execution to its end, and return what happened."""
    harness = _Harness(definition, scenario)
    env = {"MOTO_ACCOUNT_ID": ACCOUNT, "AWS_DEFAULT_REGION": REGION}
    with (
        mock.patch.dict(os.environ, env),
        mock_aws(config={"stepfunctions": {"execute_state_machine": True}}),
        harness.patched(),
    ):
        machine = harness.setup()
        result = harness.execute(machine, execution, execution_input or {}, timeout)
    if harness.harness_errors:
        raise AssertionError(
            "stand-in answers outside botocore's output shapes: " + "; ".join(harness.harness_errors)
        )
    return result
