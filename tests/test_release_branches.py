"""The release state machine's branches, each executed end to end by moto's Step Functions interpreter.

Why: the definition is only as good as what Step Functions does with it (JSONPath,
intrinsics, Choice rules, Map, Retry, task tokens), and what the services say
back. Each test synthesizes the stacks (once per config), runs one release in
a fresh moto through :mod:`sfn_moto` (moto's interpreter, moto's S3, IoT, SNS,
SageMaker, KMS and IAM; in-test Greengrass v2 and IoT data plane stand-ins) and
checks where the release ends, what it asked Greengrass to deploy, and what it
recorded. Every request a Task sent is also checked against botocore's model of
the operation (types, required members, enums), which is where a parameter AWS
would refuse shows.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")
cdk = pytest.importorskip("aws_cdk", reason="aws-cdk-lib is not installed (pip install -e '.[cdk]')")
pytest.importorskip("cdk_nag", reason="cdk-nag is not installed (pip install -e '.[cdk]')")
pytest.importorskip("antlr4", reason="moto's Step Functions interpreter needs moto[stepfunctions]")

from aws_cdk import assertions  # noqa: E402
from sfn_moto import (  # noqa: E402
    ACCOUNT,
    REGION,
    Definition,
    Device,
    Result,
    Scenario,
    definition_from_templates,
    request_problems,
    run_release,
    status_report,
)

from cdk.app import build_app  # noqa: E402
from cdk.config import load_config  # noqa: E402

MODEL = "com.healthdiag.model.PneumoniaCXR"
RUNTIME = "com.healthdiag.EdgeInference"
CANARY, FLEET = "healthdiag-canary", "healthdiag-fleet"
PREVIOUS = {RUNTIME: {"ComponentVersion": "0.1.0"}, MODEL: {"ComponentVersion": "0.1.1"}}
RELEASED = {RUNTIME: {"ComponentVersion": "0.1.0"}, MODEL: {"ComponentVersion": "0.2.0"}}
PASSED = {
    "version": "0.2.0",
    "passed": True,
    "checks": [{"name": "auc_lower_ci", "passed": True}],
    "component": {MODEL: {"ComponentVersion": "0.2.0"}},
}
FAILED_GATE = {"version": "0.2.0", "passed": False, "checks": [{"name": "auc_lower_ci", "passed": False}]}
# The unattended config: no approval step, and a fleet settles when 90 % of its devices run the release.
UNATTENDED = {"ApprovalRequired": False, "Rollout": {"FleetMinSucceededPercent": 90}}


def _synthesize(**config: Any) -> Definition:
    """The state machine as synthesized now (the stacks change under us: never a cached copy)."""
    app = build_app(load_config({"Account": ACCOUNT, "Region": REGION, **config}))
    stacks = [s for s in app.node.children if isinstance(s, cdk.Stack)]
    templates = {
        s.stack_name: assertions.Template.from_stack(s).to_json()
        for s in stacks
        if s.stack_name.endswith(("-pipeline", "-artifacts"))  # the machine, and the keys it imports
    }
    return definition_from_templates(templates, next(n for n in templates if n.endswith("-pipeline")))


@pytest.fixture(scope="module")
def release() -> Definition:
    return _synthesize()


@pytest.fixture(scope="module")
def unattended() -> Definition:
    return _synthesize(**UNATTENDED)


def received(components: dict[str, Any]) -> dict[str, Any]:
    """Components as Greengrass receives them (botocore's member names: ``componentVersion``)."""
    return {name: {"componentVersion": spec["ComponentVersion"]} for name, spec in components.items()}


def deployed(result: Result, group: str) -> dict[str, Any]:
    """The components of the group's latest Greengrass deployment when the execution ended."""
    return dict(result.deployments[group][-1]["components"])


def devices(prefix: str, count: int, job: str | list[str] = "SUCCEEDED") -> list[Device]:
    return [Device(f"{prefix}-{n}", job) for n in range(1, count + 1)]


def assert_requests_valid(result: Result) -> None:
    """No Task sent a request AWS would refuse (botocore's input shape, enums included)."""
    assert result.invalid() == [], "\n".join(result.invalid())


def test_a_healthy_release_goes_canary_then_fleet_changing_only_the_model(release: Definition) -> None:
    """The whole happy path: approval, canary (still in progress after one soak), reports, fleet, record."""
    scenario = Scenario(
        verdict=PASSED,
        canary=[Device("box-1", ["IN_PROGRESS", "SUCCEEDED"]), Device("box-2")],
        fleet=devices("clinic", 3),
        previous={CANARY: PREVIOUS, FLEET: PREVIOUS},
    )
    result = run_release(release, scenario)
    assert (result.status, result.states[-1]) == ("SUCCEEDED", "ReleaseDone"), (result.error, result.cause)
    order = [
        result.states.index(s) for s in ("ApproveRelease", "CanaryDeploy", "CanaryHealthy", "FleetDeploy")
    ]
    assert order == sorted(order)
    assert result.states.count("CanarySoak") == 2  # box-1 was still in progress after the first soak
    canary = result.call("CanaryDeploy").params
    assert canary["targetArn"].endswith(f":thinggroup/{CANARY}")
    assert canary["components"] == received(RELEASED)  # the group's components, only the model changed
    assert canary["deploymentPolicies"]["failureHandlingPolicy"] == "ROLLBACK"
    fleet = result.call("FleetDeploy").params
    assert fleet["targetArn"].endswith(f":thinggroup/{FLEET}")
    assert fleet["components"] == received(RELEASED)
    assert deployed(result, CANARY) == deployed(result, FLEET) == received(RELEASED)
    topics = sorted(call.params["topic"] for call in result.stand_in("iot-data"))
    assert topics == ["healthdiag/edge/status/box-1", "healthdiag/edge/status/box-2"]  # every canary report
    record = result.records["releases/release-1/outcome-Released.json"]
    assert record["gate"]["verdict"]["version"] == "0.2.0"
    assert_requests_valid(result)


def test_b_a_failed_gate_deploys_nothing(release: Definition) -> None:
    """A candidate that failed the gate ends the execution before approval or any deployment."""
    result = run_release(
        release, Scenario(verdict=FAILED_GATE, canary=devices("box", 2), previous={CANARY: PREVIOUS})
    )
    assert (result.status, result.error) == ("FAILED", "GateFailed")
    assert "ApproveRelease" not in result.states
    assert [c.operation for c in result.stand_in("greengrassv2")] == []  # not even a ListDeployments
    assert deployed(result, CANARY) == received(PREVIOUS)
    record = result.records["releases/release-1/outcome-GateFailed.json"]
    assert record["gate"]["verdict"]["passed"] is False  # the verdict is on record
    assert_requests_valid(result)


def test_c_a_canary_device_failing_its_conformance_check_rolls_the_canary_back(release: Definition) -> None:
    """The IoT job says every device succeeded; one runtime refused the model at its conformance check."""
    scenario = Scenario(
        verdict=PASSED,
        canary=[Device("box-1"), Device("box-2", report=status_report(passed=False))],
        fleet=devices("clinic", 3),
        previous={CANARY: PREVIOUS, FLEET: PREVIOUS},
    )
    result = run_release(release, scenario)
    assert (result.status, result.error) == ("FAILED", "CanaryFailed"), (result.error, result.cause)
    assert "CanaryReportBad" in result.states  # rolled back because of the report, not another error
    assert result.call("CanaryRollback").params["components"] == received(PREVIOUS)
    assert deployed(result, CANARY) == received(PREVIOUS)
    assert "FleetDeploy" not in result.states and deployed(result, FLEET) == received(PREVIOUS)
    assert "releases/release-1/outcome-CanaryRolledBack.json" in result.records
    assert_requests_valid(result)


def test_d_a_fleet_job_with_failed_devices_rolls_the_fleet_back(release: Definition) -> None:
    """Two of five fleet devices fail the deployment: the fleet returns to its previous components."""
    scenario = Scenario(
        verdict=PASSED,
        canary=devices("box", 2),
        fleet=[*devices("clinic", 3), Device("clinic-4", "FAILED"), Device("clinic-5", "FAILED")],
        previous={CANARY: PREVIOUS, FLEET: PREVIOUS},
    )
    result = run_release(release, scenario)
    assert (result.status, result.error) == ("FAILED", "FleetFailed"), (result.error, result.cause)
    assert result.call("FleetRollback").params["components"] == received(PREVIOUS)
    assert deployed(result, FLEET) == received(PREVIOUS)
    assert "CanaryRollback" not in result.states and deployed(result, CANARY) == received(RELEASED)
    assert "releases/release-1/outcome-FleetRolledBack.json" in result.records
    assert_requests_valid(result)


def test_e_a_first_release_to_empty_groups(unattended: Definition) -> None:
    """No deployment yet and no devices: the release deploys the model alone and completes."""
    result = run_release(unattended, Scenario(verdict=PASSED))
    assert result.status == "SUCCEEDED", (result.error, result.cause)
    assert "ApproveRelease" not in result.states
    assert {"CanaryNoDeployment", "FleetNoDeployment"} <= set(result.states)
    assert result.call("CanaryDeploy").params["components"] == received(PASSED["component"])
    assert [len(result.deployments[g]) for g in (CANARY, FLEET)] == [1, 1]
    assert "releases/release-1/outcome-Released.json" in result.records
    assert_requests_valid(result)


def test_f_a_throttled_create_deployment_is_retried_and_the_release_carries_on(release: Definition) -> None:
    """Greengrass answers the fleet's CreateDeployment with ThrottlingException once; the Task retries."""
    scenario = Scenario(
        verdict=PASSED,
        canary=devices("box", 2),
        fleet=devices("clinic", 3),
        previous={CANARY: PREVIOUS, FLEET: PREVIOUS},
        throttle={"CreateDeployment": [1]},  # call 0 is the canary's, call 1 the fleet's
    )
    result = run_release(release, scenario)
    assert result.status == "SUCCEEDED", (result.error, result.cause)
    attempts = [c.error for c in result.stand_in("greengrassv2") if c.state == "FleetDeploy"]
    assert attempts == ["ThrottlingException", None]
    errors = [e["taskFailedEventDetails"]["error"] for e in result.events if "taskFailedEventDetails" in e]
    assert errors == ["GreengrassV2.ThrottlingException"]
    assert len(result.deployments[FLEET]) == 2 and deployed(result, FLEET) == received(RELEASED)
    assert_requests_valid(result)


def test_g_an_offline_device_does_not_hold_the_fleet_soak_forever(unattended: Definition) -> None:
    """One of ten fleet devices stays QUEUED: 9 of 10 meets the configured 90 %, so the soak settles."""
    scenario = Scenario(
        verdict=PASSED,
        canary=devices("box", 2),
        fleet=[*devices("clinic", 9), Device("clinic-offline", "QUEUED", report=None)],
        previous={CANARY: PREVIOUS, FLEET: PREVIOUS},
    )
    result = run_release(unattended, scenario)
    assert result.status == "SUCCEEDED", (result.status, result.error, result.cause)
    assert "FleetRollback" not in result.states
    assert result.states.count("FleetSoak") == 1  # settled at the first read, not at the soak limit
    assert deployed(result, FLEET) == received(RELEASED)
    assert "releases/release-1/outcome-Released.json" in result.records
    assert_requests_valid(result)


def test_request_validation_refuses_what_sagemaker_would() -> None:
    """The check behind every test's ``assert_requests_valid`` is not vacuous: enums and types count."""
    request = {
        "TrainingJobName": "release-1",
        "RoleArn": f"arn:aws:iam::{ACCOUNT}:role/training",
        "AlgorithmSpecification": {"TrainingInputMode": "File", "TrainingImage": "image"},
        "OutputDataConfig": {"S3OutputPath": "s3://bucket/candidates/"},
        "ResourceConfig": {"InstanceCount": 1, "InstanceType": "ml.m5.2xlarge", "VolumeSizeInGB": 50},
        "StoppingCondition": {"MaxRuntimeInSeconds": 10800},
    }
    assert request_problems("sagemaker", "CreateTrainingJob", request) == []
    doubled = {**request, "ResourceConfig": {**request["ResourceConfig"], "InstanceType": "ml.ml.m5.2xlarge"}}
    (problem,) = request_problems("sagemaker", "CreateTrainingJob", doubled)
    assert "ResourceConfig.InstanceType" in problem and "ml.ml.m5.2xlarge" in problem
    untyped = {**request, "ResourceConfig": {**request["ResourceConfig"], "VolumeSizeInGB": "50"}}
    assert any("VolumeSizeInGB" in p for p in request_problems("sagemaker", "CreateTrainingJob", untyped))
    # What the client lets through and SageMaker refuses: a name outside its pattern, a long value.
    dotted = {**request, "TrainingJobName": "release-0.3.0"}
    (problem,) = request_problems("sagemaker", "CreateTrainingJob", dotted)
    assert "TrainingJobName" in problem and "pattern" in problem
    long_input = {**request, "HyperParameters": {"input": "x" * 2501}}
    (problem,) = request_problems("sagemaker", "CreateTrainingJob", long_input)
    assert "HyperParameters.input" in problem and "at most 2500" in problem


def test_a_refused_request_fails_the_release_as_aws_would(release: Definition) -> None:
    """With the services refusing invalid requests, a bad instance type stops the release at Train."""
    train = release.asl["States"]["Train"]
    broken = {
        **train,
        "Parameters": {
            **train["Parameters"],
            "ResourceConfig": {**train["Parameters"]["ResourceConfig"], "InstanceType": "ml.ml.m5.2xlarge"},
        },
    }
    definition = Definition(
        {**release.asl, "States": {**release.asl["States"], "Train": broken}}, release.tokens
    )
    result = run_release(definition, Scenario(verdict=PASSED, reject_invalid=True))
    assert result.status == "FAILED"
    assert not result.stand_in("greengrassv2") and "ReadVerdict" not in result.states
    refused = [c for c in result.calls if c.state == "Train"]
    assert refused and all(c.error == "ValidationException" for c in refused)
    assert any("InstanceType" in p for p in refused[0].problems)


def test_h_a_switched_off_canary_box_is_not_judged_by_its_stale_report(unattended: Definition) -> None:
    """Four of five canary boxes take the release, one is off (QUEUED, its retained report is of the
    old version): 80 % settles the canary, and only the boxes the deployment reached are judged, so
    the stale report does not roll the canary back."""
    from sfn_moto import status_report

    stale = status_report(version="0.1.1")
    scenario = Scenario(
        verdict=PASSED,
        canary=[*devices("box", 4), Device("box-off", "QUEUED", report=stale)],
        fleet=devices("clinic", 3),
        previous={CANARY: PREVIOUS, FLEET: PREVIOUS},
    )
    result = run_release(unattended, scenario)
    assert result.status == "SUCCEEDED", (result.status, result.error, result.cause)
    assert "CanaryRollback" not in result.states and "CanaryReportBad" not in result.states
    assert result.states.count("CanaryGetReport") == 4  # box-off's report was not read
    assert deployed(result, CANARY) == received(RELEASED)
    assert_requests_valid(result)


def test_the_definitions_are_valid_states_language(release: Definition, tmp_path: Path) -> None:
    """``asl-validator`` (npm, installed in ``cdk/`` by ``.ci/setup``) against the States Language spec."""
    validator = Path(__file__).resolve().parents[1] / "cdk" / "node_modules" / ".bin" / "asl-validator"
    if not validator.exists():
        pytest.skip("asl-validator not installed (cd cdk && npm ci)")
    path = tmp_path / "release.asl.json"
    path.write_text(json.dumps(release.asl), encoding="utf-8")
    done = subprocess.run(
        [str(validator), "--json-path", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_i_an_execution_named_with_dots_gets_a_valid_training_job_name(unattended: Definition) -> None:
    """``release-0.3.0`` is a fine execution name but an invalid training job name (no dots): the job
    is named from a hash of it, and the container gets the execution name to file its verdict under."""
    scenario = Scenario(
        verdict=PASSED,
        canary=devices("box", 2),
        fleet=devices("clinic", 2),
        previous={CANARY: PREVIOUS, FLEET: PREVIOUS},
    )
    result = run_release(unattended, scenario, execution="release-0.3.0")
    assert result.status == "SUCCEEDED", (result.status, result.error, result.cause)
    train = result.call("Train").params
    name = train["TrainingJobName"]
    assert re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}", name), name
    assert train["HyperParameters"]["release"] == "release-0.3.0"
    assert json.loads(train["HyperParameters"]["input"]) == {}
    assert "releases/release-0.3.0/outcome-Released.json" in result.records


@pytest.fixture(scope="module")
def tolerant() -> Definition:
    # The IoT job's own abort rule (10 % of 5 boxes executed) would cancel the job first: raised here.
    rollout = {**UNATTENDED["Rollout"], "MaxCanaryFailures": 1, "AbortFailurePercent": 50}
    return _synthesize(**{**UNATTENDED, "Rollout": rollout})


def test_j_max_canary_failures_is_honoured(unattended: Definition, tolerant: Definition) -> None:
    """One of five canary boxes fails its deployment: rolled back at MaxCanaryFailures 0 (the default),
    carried on at 1 (the check used to roll back on any failed device whatever the setting said)."""
    scenario = Scenario(
        verdict=PASSED,
        canary=[*devices("box", 4), Device("box-bad", "FAILED")],
        fleet=devices("clinic", 2),
        previous={CANARY: PREVIOUS, FLEET: PREVIOUS},
    )
    strict = run_release(unattended, scenario)
    assert strict.status == "FAILED" and "CanaryRollback" in strict.states
    assert deployed(strict, CANARY) == received(PREVIOUS)
    allowed = run_release(tolerant, scenario)
    assert allowed.status == "SUCCEEDED", (allowed.status, allowed.error, allowed.cause)
    assert "CanaryRollback" not in allowed.states
    assert allowed.states.count("CanaryGetReport") == 4  # the failed box is not judged by its report
