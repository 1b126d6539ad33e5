"""The release pipeline's state machine: valid ASL, and its gate, canary and fleet branches walked.

The definition is taken from the synthesized template and walked by
``asl_runner`` with stand-ins for the services: each test says what S3,
Greengrass v2 and IoT answer and checks what the pipeline asks of them (the
merged components it deploys, the components it rolls back to) and where it
ends. ``asl-validator`` (npm, installed by ``.ci/run`` in ``cdk/``) checks
the definition against the States Language specification.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from asl_runner import run

os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")
cdk = pytest.importorskip("aws_cdk", reason="aws-cdk-lib is not installed (pip install -e '.[cdk]')")
pytest.importorskip("cdk_nag", reason="cdk-nag is not installed (pip install -e '.[cdk]')")

from aws_cdk import assertions  # noqa: E402

from cdk.app import build_app  # noqa: E402
from cdk.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = "com.healthdiag.model.PneumoniaCXR"
RUNTIME = "com.healthdiag.EdgeInference"
PREVIOUS = {RUNTIME: {"ComponentVersion": "0.1.0"}, MODEL: {"ComponentVersion": "0.1.1"}}


_PSEUDO = {
    "AWS::Partition": "aws",
    "AWS::Region": "eu-west-1",
    "AWS::AccountId": "111122223333",
    "AWS::URLSuffix": "amazonaws.com",
}


def _flatten(value: Any) -> str:
    """A DefinitionString (``Fn::Join`` of text and references) as text, references as placeholders."""
    if isinstance(value, str):
        return value
    sep, parts = value["Fn::Join"]
    out = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
        elif "Ref" in part:
            out.append(_PSEUDO.get(part["Ref"], f"ref-{part['Ref']}"))
        else:
            out.append(f"ATT-{'-'.join(map(str, next(iter(part.values()))))}")
    return sep.join(out)


def _definition(**config: Any) -> dict[str, Any]:
    app = build_app(load_config({"Account": "111122223333", "Region": "eu-west-1", **config}))
    stack = next(
        s for s in app.node.children if isinstance(s, cdk.Stack) and s.stack_name.endswith("pipeline")
    )
    template = assertions.Template.from_stack(stack)
    (machine,) = template.find_resources("AWS::StepFunctions::StateMachine").values()
    return dict(json.loads(_flatten(machine["Properties"]["DefinitionString"])))


@pytest.fixture(scope="module")
def definition() -> dict[str, Any]:
    return _definition()


class Services:
    """Stand-ins for S3, Greengrass v2, IoT and SNS: scripted answers, every request kept."""

    def __init__(
        self,
        *,
        verdict: dict[str, Any],
        jobs: dict[str, list[dict[str, int]]],
        existing: dict[str, Any] | None = None,
        reports: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.verdict = verdict
        self.jobs = {group: list(answers) for group, answers in jobs.items()}
        self.existing = existing
        self.records: dict[str, Any] = {}
        self.reports = reports if reports is not None else {"box-1": report(), "box-2": report()}

    def __call__(self, state: str, params: dict[str, Any]) -> Any:
        if state == "Train":
            return {"TrainingJobStatus": "Completed"}
        if state == "ReadVerdict":
            assert params["Key"] == "releases/release-1/verdict.json"
            return {"Body": json.dumps(self.verdict)}
        if state == "ApproveRelease":
            assert "taskToken" in params["Message"]
            return {"approver": "dr-ops"}
        if state == "CanaryListThings":
            assert params["ThingGroupName"] == "healthdiag-canary"
            return {"Things": sorted(self.reports)}
        if state == "CanaryGetReport":
            thing = params["Topic"].rsplit("/", 1)[1]
            assert params["Topic"] == f"healthdiag/edge/status/{thing}"
            return {"Topic": params["Topic"], "Payload": json.dumps(self.reports[thing])}
        if state.startswith("Record"):
            assert params["ChecksumAlgorithm"] == "SHA256"
            self.records[params["Key"]] = json.loads(params["Body"])
            return {}
        group = "Canary" if state.startswith("Canary") else "Fleet"
        if state.endswith("ListDeployments"):
            listed = [{"DeploymentId": f"{group}-dep"}] if self.existing is not None else []
            return {"Deployments": listed}
        if state.endswith("GetDeployment"):
            return {"Components": self.existing, "DeploymentId": f"{group}-dep"}
        if state.endswith("Deploy") or state.endswith("Rollback"):
            return {"DeploymentId": f"{state}-id", "IotJobId": f"{group}-job"}
        if state.endswith("ReadJob"):
            counts = {
                "NumberOfFailedThings": 0,
                "NumberOfRejectedThings": 0,
                "NumberOfTimedOutThings": 0,
                "NumberOfQueuedThings": 0,
                "NumberOfInProgressThings": 0,
                "NumberOfSucceededThings": 3,
            }
            counts.update(self.jobs[group].pop(0))
            return {"Job": {"Status": "COMPLETED", "JobProcessDetails": counts}}
        raise AssertionError(f"unexpected state {state}")


PASSED = {
    "passed": True,
    "version": "0.2.0",
    "checks": [],
    "component": {MODEL: {"ComponentVersion": "0.2.0"}},
}


def report(version: str = "0.2.0", conformance: bool = True, quarantined: int = 0) -> dict[str, Any]:
    """A device's retained health report, as edge_runtime.service publishes it."""
    return {
        "schema_version": "1.0",
        "message_type": "status",
        "state": "online",
        "client_id": "box",
        "model": {
            "name": "pneumonia-cxr",
            "version": version,
            "backend": "onnxruntime",
            "conformance": {
                "passed": conformance,
                "backend": "onnxruntime",
                "images": 32,
                "max_abs_diff": 0.01,
                "max_abs_diff_allowed": 0.31,
                "decisions_differing": 0,
            },
        },
        "counters": {"received": 10, "processed": 10 - quarantined, "quarantined": quarantined},
    }


def test_a_healthy_release_goes_canary_then_fleet_merging_only_the_model(definition: dict[str, Any]) -> None:
    services = Services(
        verdict=PASSED,
        jobs={"Canary": [{"NumberOfInProgressThings": 2}, {}], "Fleet": [{}]},
        existing=PREVIOUS,
    )
    result = run(definition, {}, services)
    assert result.status == "SUCCEEDED" and result.end == "ReleaseDone"
    assert result.states.index("ApproveRelease") < result.states.index("CanaryDeploy")
    assert result.states.index("CanaryHealthy") < result.states.index("FleetDeploy")
    assert result.states.count("CanarySoak") == 2  # still in progress after the first soak
    assert result.states.count("CanaryGetReport") == 2  # every canary device's own report was read
    canary = result.call("CanaryDeploy")
    assert canary["Components"] == {
        RUNTIME: {"ComponentVersion": "0.1.0"},
        MODEL: {"ComponentVersion": "0.2.0"},
    }
    assert canary["TargetArn"].endswith(":thinggroup/healthdiag-canary")
    assert canary["DeploymentPolicies"]["FailureHandlingPolicy"] == "ROLLBACK"
    rollout = canary["IotJobConfiguration"]["JobExecutionsRolloutConfig"]["ExponentialRate"]
    assert rollout["BaseRatePerMinute"] == 2
    fleet = result.call("FleetDeploy")
    assert fleet["TargetArn"].endswith(":thinggroup/healthdiag-fleet")
    assert (
        fleet["IotJobConfiguration"]["JobExecutionsRolloutConfig"]["ExponentialRate"]["BaseRatePerMinute"]
        == 20
    )
    assert "releases/release-1/outcome-Released.json" in services.records


def test_a_failed_gate_stops_before_any_deployment(definition: dict[str, Any]) -> None:
    services = Services(verdict={"passed": False, "checks": [{"name": "AUC", "passed": False}]}, jobs={})
    result = run(definition, {}, services)
    assert (result.status, result.error) == ("FAILED", "GateFailed")
    assert not any(state.endswith("Deploy") for state in result.states)
    record = services.records["releases/release-1/outcome-GateFailed.json"]
    assert record["gate"]["verdict"]["passed"] is False  # the verdict is on record


def test_a_failing_canary_is_rolled_back_to_its_previous_components(definition: dict[str, Any]) -> None:
    services = Services(verdict=PASSED, jobs={"Canary": [{"NumberOfFailedThings": 1}]}, existing=PREVIOUS)
    result = run(definition, {}, services)
    assert (result.status, result.error) == ("FAILED", "CanaryFailed")
    assert result.call("CanaryRollback")["Components"] == PREVIOUS
    assert "FleetDeploy" not in result.states
    assert "releases/release-1/outcome-CanaryRolledBack.json" in services.records


@pytest.mark.parametrize(
    "bad",
    [report(version="0.1.1"), report(conformance=False), report(quarantined=3)],
    ids=["still-old-version", "conformance-failed", "quarantining"],
)
def test_a_canary_device_whose_own_report_is_bad_rolls_the_canary_back(
    definition: dict[str, Any], bad: dict[str, Any]
) -> None:
    # The IoT job says every device succeeded; one runtime says otherwise (e.g. it refused the
    # model at its conformance check and kept the old one).
    services = Services(
        verdict=PASSED, jobs={"Canary": [{}]}, existing=PREVIOUS, reports={"box-1": report(), "box-2": bad}
    )
    result = run(definition, {}, services)
    assert (result.status, result.error) == ("FAILED", "CanaryFailed")
    assert result.call("CanaryRollback")["Components"] == PREVIOUS
    assert "FleetDeploy" not in result.states


def test_a_failing_fleet_is_rolled_back_too(definition: dict[str, Any]) -> None:
    services = Services(
        verdict=PASSED, jobs={"Canary": [{}], "Fleet": [{"NumberOfTimedOutThings": 4}]}, existing=PREVIOUS
    )
    result = run(definition, {}, services)
    assert (result.status, result.error) == ("FAILED", "FleetFailed")
    assert result.call("FleetRollback")["Components"] == PREVIOUS


def test_a_first_release_to_empty_groups_and_no_approval_step() -> None:
    definition = _definition(ApprovalRequired=False)
    services = Services(verdict=PASSED, jobs={"Canary": [{}], "Fleet": [{}]}, existing=None)
    result = run(definition, {}, services)
    assert result.status == "SUCCEEDED" and "ApproveRelease" not in result.states
    assert "CanaryNoDeployment" in result.states
    assert result.call("CanaryDeploy")["Components"] == {MODEL: {"ComponentVersion": "0.2.0"}}


def test_definition_is_valid_states_language(definition: dict[str, Any], tmp_path: Path) -> None:
    validator = REPO / "cdk" / "node_modules" / ".bin" / "asl-validator"
    if not validator.exists():
        pytest.skip("asl-validator not installed (cd cdk && npm ci)")
    path = tmp_path / "release.asl.json"
    path.write_text(json.dumps(definition), encoding="utf-8")
    done = subprocess.run(
        [str(validator), "--json-path", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
