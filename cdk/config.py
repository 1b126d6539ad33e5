"""The stacks' parameters: one typed config, from CDK context or a JSON file, never code edits.

``cdk synth -c healthdiag='{"FleetGroup": "clinic-a"}'`` overrides single keys;
``cdk synth -c config=deploy/prod.json`` reads a file. Defaults are in
``cdk.json`` (context key ``healthdiag``) and here. Keys are PascalCase like
the runtime's configuration; unknown keys are refused with their name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["ConfigError", "GateThresholds", "ReleaseConfig", "RolloutSettings", "load_config"]


class ConfigError(ValueError):
    """The stack configuration is invalid; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        alias_generator=lambda s: "".join(part.capitalize() for part in s.split("_")),
        populate_by_name=True,
    )


class GateThresholds(_Section):
    """What a candidate model must show on the held-out test split before it is published."""

    min_auc_lower_ci: float = Field(0.95, ge=0, le=1, description="lower bound of the AUC 95 % CI")
    min_sensitivity: float = Field(0.95, ge=0, le=1, description="at the validated operating point")
    min_specificity: float = Field(0.75, ge=0, le=1, description="at the validated operating point")
    max_int8_auc_drop: float = Field(0.005, ge=0, le=1, description="FP32 AUC - INT8 AUC")
    max_ece: float = Field(0.2, ge=0, le=1, description="expected calibration error, 10 bins")
    non_inferiority_margin: float = Field(
        0.01, ge=0, le=1, description="candidate AUC may be at most this much below production"
    )


class RolloutSettings(_Section):
    """How a deployment spreads over a group, and when a group's rollout has settled.

    A group deployment is a continuous IoT job: a box that is switched off stays
    ``QUEUED`` for ever, so "every device finished" never comes. A group has settled
    when its failed devices are within its limit and at least its share of the
    targeted devices succeeded; it gets ``MaxSoakPeriods`` soaks to get there, then
    it is rolled back (a release never waits without end).
    """

    canary_rate_per_minute: int = Field(2, ge=1, le=1000)
    fleet_rate_per_minute: int = Field(20, ge=1, le=1000)
    increment_factor: float = Field(2.0, ge=1.1, le=5.0)
    abort_failure_percent: float = Field(10.0, ge=0, le=100)
    abort_min_executed: int = Field(5, ge=1)
    timeout_minutes: int = Field(60, ge=1, le=10080)
    canary_soak_minutes: int = Field(60, ge=0, le=10080)
    fleet_soak_minutes: int = Field(60, ge=0, le=10080)
    max_canary_failures: int = Field(
        0, ge=0, description="canary devices whose deployment may fail, and scans each may quarantine"
    )
    max_fleet_failed_percent: int = Field(
        1, ge=0, le=10, description="fleet devices whose deployment may fail, in percent of those targeted"
    )
    canary_min_succeeded_percent: int = Field(
        80,
        ge=50,
        le=100,
        multiple_of=5,
        description="share of canary devices that must have the new version (steps of 5)",
    )
    fleet_min_succeeded_percent: int = Field(
        95,
        ge=50,
        le=100,
        multiple_of=5,
        description="share of fleet devices that must have the new version (steps of 5)",
    )
    max_soak_periods: int = Field(
        24, ge=1, le=1000, description="soaks a group gets to settle before it is rolled back"
    )


class ReleaseConfig(_Section):
    """Everything a deployment of the stacks may vary."""

    account: str | None = Field(None, description="AWS account (default: the CLI's)")
    region: str | None = Field(None, description="AWS region (default: the CLI's)")
    name_prefix: str = Field("healthdiag", pattern=r"^[a-z][a-z0-9-]{1,30}$")
    canary_group: str = Field("healthdiag-canary", pattern=r"^[a-zA-Z0-9:_-]{1,128}$")
    fleet_group: str = Field("healthdiag-fleet", pattern=r"^[a-zA-Z0-9:_-]{1,128}$")
    results_topic_prefix: str = "healthdiag/edge"
    status_topic_prefix: str = Field(
        "healthdiag/edge/status",
        pattern=r"^[A-Za-z0-9_/-]{1,200}$",
        description="the runtime's Greengrass.StatusTopic: each box publishes <prefix>/<thing name>",
    )
    approver_emails: list[str] = Field(
        default_factory=list, description="subscribed to the approval topic (confirm the e-mail AWS sends)"
    )
    records_retention_days: int = Field(2555, ge=1, le=36500, description="Object Lock, compliance mode")
    artifact_noncurrent_days: int = Field(365, ge=1, description="keep replaced artifact versions")
    approval_required: bool = True
    gate: GateThresholds = GateThresholds.model_validate({})  # frozen: one shared default is safe
    rollout: RolloutSettings = RolloutSettings.model_validate({})


def load_config(context: dict[str, Any] | None, config_file: str | None = None) -> ReleaseConfig:
    """``context`` (the ``healthdiag`` context value, a dict or a JSON string) over the file over defaults."""
    data: dict[str, Any] = {}
    if config_file:
        try:
            data.update(json.loads(Path(config_file).read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read stack config {config_file}: {exc}") from exc
    if isinstance(context, str):
        context = json.loads(context)
    data.update(context or {})
    try:
        config = ReleaseConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"invalid stack config: {problems}") from None
    if config.canary_group == config.fleet_group:
        raise ConfigError("CanaryGroup and FleetGroup must differ: the canary must be a separate group")
    return config
