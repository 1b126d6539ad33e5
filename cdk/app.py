"""The CDK app: ``npx cdk synth`` (in ``cdk/``) or ``python -m cdk.app`` (from the repository root).

Stacks: ``<prefix>-artifacts`` (buckets, keys), ``<prefix>-fleet`` (device
role, role alias, IoT policy, canary and fleet groups) and ``<prefix>-pipeline``
(the Step Functions release pipeline, :mod:`cdk.stacks.pipeline`). Parameters come from
the ``healthdiag`` context (``cdk.json``, ``-c healthdiag='{...}'``) or a JSON
file (``-c config=FILE``); see :mod:`cdk.config`. cdk-nag's AWS Solutions
and HIPAA Security packs run on every synth; a finding that is not
suppressed, with its reason, fails it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# jsii, which runs aws-cdk-lib's JavaScript in Node.js, prints a 12-line banner on every synth when
# the Node.js release is past (or near) the end of its support, and its Python side echoes that
# banner as byte strings (b'!!  ...  !!'). Node 20 (end of life 2026-04-30; Debian 12 and CI run it)
# synthesizes these stacks, so the banner is silenced for it here, before aws_cdk starts Node.js:
# this covers `npx cdk synth` (cdk.json runs this module) and `python -m cdk.app` alike. A variable
# already set in the environment wins; other Node.js releases still get jsii's warning.
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")

import aws_cdk as cdk
from cdk_nag import AwsSolutionsChecks, HIPAASecurityChecks

from .config import ReleaseConfig, load_config
from .stacks.artifacts import ArtifactsStack
from .stacks.fleet import FleetStack
from .stacks.pipeline import PipelineStack

__all__ = ["build_app"]


CDK_JSON = Path(__file__).resolve().parent / "cdk.json"


def build_app(config: ReleaseConfig | None = None, outdir: str | None = None) -> cdk.App:
    """The app with its stacks and the cdk-nag checks attached (tests call this directly).

    ``cdk.json``'s context (feature flags, defaults) applies also when the app
    is built without the CDK CLI, so tests synthesize what ``cdk synth`` does.
    """
    context = json.loads(CDK_JSON.read_text(encoding="utf-8"))["context"]
    app = cdk.App(outdir=outdir, context=context) if outdir else cdk.App(context=context)
    if config is None:
        config = load_config(app.node.try_get_context("healthdiag"), app.node.try_get_context("config"))
    env = cdk.Environment(
        account=config.account or os.environ.get("CDK_DEFAULT_ACCOUNT"),
        region=config.region or os.environ.get("CDK_DEFAULT_REGION"),
    )
    artifacts = ArtifactsStack(app, f"{config.name_prefix}-artifacts", config=config, env=env)
    fleet = FleetStack(app, f"{config.name_prefix}-fleet", config=config, artifacts=artifacts, env=env)
    pipeline = PipelineStack(
        app, f"{config.name_prefix}-pipeline", config=config, artifacts=artifacts, env=env
    )
    pipeline.add_stack_dependency(fleet, "deploys to the fleet stack's thing groups")
    cdk.Validations.of(app).add_plugins(
        AwsSolutionsChecks(app, verbose=True), HIPAASecurityChecks(app, verbose=True)
    )
    for stack in (artifacts, fleet, pipeline):
        cdk.Tags.of(stack).add("project", "healthdiag")
    return app


if __name__ == "__main__":
    build_app().synth()
