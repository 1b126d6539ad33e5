"""``python -m cdk.release``: publish, deploy, follow and roll back model versions, without the pipeline.

For an ops engineer with AWS credentials (boto3's usual chain). Each command does one step the
release pipeline also does, by calling one function of :mod:`cdk.release_steps` (where each
step, and the Greengrass v2 trap it guards against, is described):

* ``publish --bundle DIR --bucket B``: :func:`~cdk.release_steps.publish`, the bundle as a
  model component version (a no-op when that version is already published with the same
  content);
* ``deploy --group G --version V [--other-group G2]``: :func:`~cdk.release_steps.deploy`, the
  group's deployment revised to pin ``V``, with a rollout, abort and rollback policy;
* ``status --group G``: :func:`~cdk.release_steps.status`, the deployment and its devices;
* ``rollback --group G``: :func:`~cdk.release_steps.rollback`, what the group ran before;
* ``list [--group G ...]``: published versions, and which one each group runs;
* ``trust --group G --kms-key ARN``: :func:`~cdk.release_steps.trust_signing_key`, once per
  fleet before its first signed release, so its runtime accepts the bundles the pipeline signs;
* ``gate --bundle DIR [--production DIR]``: the release pipeline's evaluation gate
  (:mod:`cdk.gate`) with the stack's thresholds; run it before ``publish``.

Only the command line is here: arguments, printing (JSON on stdout; errors, with what to do, on
stderr) and the exit status (0 done, 1 a step refused, 2 an AWS error). Nothing imports this
module but its tests. Not for diagnostic use: the model is a research model.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from .release_steps import (
    Clients,
    ReleaseError,
    Rollout,
    deploy,
    deployed_versions,
    list_versions,
    publish,
    rollback,
    status,
    trust_signing_key,
)

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cdk.release",
        description="Publish model bundles as Greengrass component versions and roll them out to thing "
        "groups (canary first), follow the rollout and roll back. Uses your AWS credentials.",
        epilog="Exit status: 0 done, 1 a release step refused (the message says why and what to do), "
        "2 an AWS error.",
    )
    parser.add_argument("--region", default=None, help="AWS region (default: the AWS CLI's)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    p = sub.add_parser("publish", help="upload a bundle and create its model component version")
    p.add_argument("--bundle", type=Path, required=True, help="model bundle folder (manifest.json)")
    p.add_argument("--bucket", required=True, help="artifact bucket (the CDK app's artifacts bucket)")
    p = sub.add_parser("deploy", help="revise a thing group's deployment to pin a model version")
    p.add_argument("--group", required=True, help="thing group name (canary or fleet)")
    p.add_argument("--version", required=True, help="published model component version")
    p.add_argument(
        "--other-group",
        action="append",
        default=[],
        metavar="GROUP",
        help="another group to check for devices pinned to a different version (repeat)",
    )
    p.add_argument("--rate", type=int, default=5, help="devices per minute to start with (default 5)")
    p.add_argument(
        "--abort-percent",
        type=float,
        default=10.0,
        help="cancel the rollout when this %% of executed devices failed (default 10)",
    )
    p = sub.add_parser("rollback", help="deploy again what a group ran before its current model version")
    p.add_argument("--group", required=True)
    p.add_argument("--other-group", action="append", default=[], metavar="GROUP")
    p = sub.add_parser("trust", help="make a group's runtime trust the pipeline's bundle-signing key")
    p.add_argument("--group", required=True)
    p.add_argument("--kms-key", required=True, help="the signing key's ARN or id (artifacts stack output)")
    p.add_argument(
        "--keep-bundled-key",
        action="store_true",
        help="also trust the key of the models bundled in the runtime (development fleets only)",
    )
    p = sub.add_parser("status", help="a group's deployment and its devices' progress")
    p.add_argument("--group", required=True)
    p = sub.add_parser("list", help="published model versions and what each group runs")
    p.add_argument("--group", action="append", default=[], metavar="GROUP")
    p = sub.add_parser(
        "gate",
        help="check a bundle against the stack's gate thresholds (and production, non-inferiority)",
        description="Exit 0 when every check passes, 1 otherwise; no AWS call is made.",
    )
    p.add_argument("--bundle", type=Path, required=True, help="candidate bundle folder")
    p.add_argument("--production", type=Path, default=None, help="the bundle in production, if any")
    p.add_argument("--config", default=None, help="stack config JSON (thresholds under 'Gate')")
    return parser


def _gate(args: argparse.Namespace) -> int:
    from edge_runtime.bundle import load_bundle
    from edge_runtime.errors import ModelBundleError

    from .config import load_config
    from .gate import evaluate_gate

    try:
        # The gate reads manifests as JSON dicts (as the pipeline's entry point does).
        candidate = load_bundle(args.bundle).manifest.to_json_dict()
        production = load_bundle(args.production).manifest.to_json_dict() if args.production else None
    except ModelBundleError as exc:
        raise ReleaseError(exc.message, exc.action) from None
    verdict = evaluate_gate(candidate, load_config(None, args.config).gate, production)
    for check in verdict.checks:
        print(f"{'PASS' if check.passed else 'FAIL'}  {check.name}: {check.detail}")
    print(f"gate {'passed' if verdict.passed else 'FAILED'} for {verdict.candidate}")
    return 0 if verdict.passed else 1


def main(argv: Sequence[str] | None = None, clients: Clients | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "gate":
            return _gate(args)
        clients = clients or Clients.create(args.region)
        if args.command == "publish":
            result: Any = publish(clients, args.bundle, args.bucket)
        elif args.command == "deploy":
            rollout = Rollout(base_rate_per_minute=args.rate, abort_failure_percent=args.abort_percent)
            result = deploy(clients, args.group, args.version, rollout=rollout, other_groups=args.other_group)
        elif args.command == "rollback":
            result = rollback(clients, args.group, other_groups=args.other_group)
        elif args.command == "status":
            result = status(clients, args.group)
        elif args.command == "trust":
            result = trust_signing_key(
                clients, args.group, args.kms_key, keep_bundled_key=args.keep_bundled_key
            )
        else:
            result = {"versions": list_versions(clients), "groups": deployed_versions(clients, args.group)}
    except ReleaseError as exc:
        print(f"error: {exc.message}\n→ {exc.action}", file=sys.stderr)
        return 1
    except (ClientError, BotoCoreError) as exc:
        print(f"error: AWS refused the request: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
