"""The release steps as functions: publish, deploy, follow, roll back and trust model versions.

What the release command (:mod:`cdk.release`, ``python -m cdk.release``) runs, one function per
command, and what the release pipeline's training container (:mod:`cdk.training_image.entry`)
runs too. Each step does what the pipeline also does, and raises :class:`ReleaseError` (what
failed and what to do) for the traps Greengrass v2 sets:

* :func:`publish`: verify the bundle with the runtime's own loader, zip it exactly as
  ``components.build`` does, upload it to ``s3://B/<component>/<version>/pneumonia-cxr.zip``
  and create the model component version from the recipe the same code renders. Component
  versions are immutable (a second create answers 409 ConflictException): publishing a
  version that already exists with the same recipe and artifact is a no-op, and with other
  content an error that says to bump the version.
* :func:`deploy`: a thing group has one deployment and a new one replaces it, so the group's
  current deployment is read, only the model component's version changed, and the merged set
  deployed (:func:`revise_deployment`), with an IoT job rollout (exponential rate), abort and
  timeout settings and ``FailureHandlingPolicy: ROLLBACK``. It refuses when a device of the
  group is also in another group that pins a different model version (the device would fail
  with NoAvailableComponentVersionException).
* :func:`status`: the group's deployment and its IoT job's per-device counts.
* :func:`rollback`: deploy again what the group ran before: the components of its latest
  earlier deployment that pinned another model version (:func:`previous_deployment`; not
  merely a lower published version, which may never have run, or be the very version being
  rolled back from).
* :func:`list_versions`, :func:`deployed_versions`: published versions, and which one each
  group runs.
* :func:`trust_signing_key`: once per fleet, before its first signed release: put the public
  half of the pipeline's signing key into the runtime component's ``Model.TrustedKeys`` (a
  merge into the group's deployment, keeping everything else), so the boxes accept bundles
  the pipeline signed. Without it they trust only the key the runtime ships with and refuse
  the fleet's models.

The ``gate`` command is :mod:`cdk.gate`'s (no AWS call). Not for diagnostic use: the model is
a research model.

Why a module apart from the command line (#25): the training container and the tests call
these functions, not the command line; argument parsing, printing and exit codes live in
:mod:`cdk.release`, which imports this module and which nothing here imports. One module for
every step, because they share the AWS clients (:class:`Clients`) and the deployment
read/merge/write (:func:`revise_deployment`), ``trust`` included (it lived in
``cdk/trust.py``, which imported the release module while its command line imported it back).
"""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import boto3
import yaml
from botocore.exceptions import ClientError

from components.names import MODEL_COMPONENT, RUNTIME_COMPONENT

if TYPE_CHECKING:
    from edge_runtime.signing import BundleTrust

__all__ = [
    "MODEL_COMPONENT",
    "Clients",
    "ReleaseError",
    "Rollout",
    "deploy",
    "deployed_versions",
    "list_versions",
    "publish",
    "revise_deployment",
    "rollback",
    "status",
    "trust_signing_key",
]

DEPLOYMENT_TAG = "healthdiag-release"
_SHA_METADATA = "sha256"


def _components_build() -> ModuleType:
    """:mod:`components.build`: the one place recipes and artifacts are made (imported on use)."""
    import components.build

    return components.build


class ReleaseError(Exception):
    """A release step that cannot go on, with what to do about it."""

    def __init__(self, message: str, action: str) -> None:
        super().__init__(message)
        self.message = message
        self.action = action


@dataclass
class Clients:
    """The AWS clients a release needs (injected by the tests)."""

    s3: Any
    iot: Any
    greengrass: Any
    sts: Any
    region: str
    kms: Any = None  # signing, in the release pipeline only

    @classmethod
    def create(cls, region: str | None = None) -> Clients:
        session = boto3.session.Session(region_name=region)
        if session.region_name is None:
            raise ReleaseError("No AWS region is set.", "Pass --region or set AWS_REGION.")
        return cls(
            s3=session.client("s3"),
            iot=session.client("iot"),
            greengrass=session.client("greengrassv2"),
            sts=session.client("sts"),
            region=session.region_name,
            kms=session.client("kms"),
        )

    @functools.cached_property
    def account(self) -> str:
        """The caller's account, asked of STS once per command (every ARN needs it)."""
        return str(self.sts.get_caller_identity()["Account"])

    @functools.cached_property
    def partition(self) -> str:
        """``aws``, ``aws-cn`` or ``aws-us-gov``: the region's ARN partition (botocore's endpoint data)."""
        return str(boto3.session.Session().get_partition_for_region(self.region))

    def component_arn(self, version: str | None = None, component: str = MODEL_COMPONENT) -> str:
        account = self.account
        arn = f"arn:{self.partition}:greengrass:{self.region}:{account}:components:{component}"
        return f"{arn}:versions:{version}" if version else arn


@dataclass(frozen=True)
class Rollout:
    """How a deployment reaches the group's devices, and when it stops."""

    base_rate_per_minute: int = 5
    increment_factor: float = 2.0
    notify_after_succeeded: int = 5
    abort_failure_percent: float = 10.0
    abort_min_executed: int = 5
    timeout_minutes: int = 60
    #: Wait for the runtime to report it is safe to update (it reports RUNNING between scans).
    notify_components: bool = True

    def iot_job_configuration(self) -> dict[str, Any]:
        return {
            "jobExecutionsRolloutConfig": {
                "exponentialRate": {
                    "baseRatePerMinute": self.base_rate_per_minute,
                    "incrementFactor": self.increment_factor,
                    "rateIncreaseCriteria": {"numberOfSucceededThings": self.notify_after_succeeded},
                },
                "maximumPerMinute": max(self.base_rate_per_minute, 1000),
            },
            "abortConfig": {
                "criteriaList": [
                    {
                        "failureType": "ALL",
                        "action": "CANCEL",
                        "thresholdPercentage": self.abort_failure_percent,
                        "minNumberOfExecutedThings": self.abort_min_executed,
                    }
                ]
            },
            "timeoutConfig": {"inProgressTimeoutInMinutes": self.timeout_minutes},
        }

    def deployment_policies(self) -> dict[str, Any]:
        return {
            "failureHandlingPolicy": "ROLLBACK",
            "componentUpdatePolicy": {
                "timeoutInSeconds": 120,
                "action": "NOTIFY_COMPONENTS" if self.notify_components else "SKIP_NOTIFY_COMPONENTS",
            },
            "configurationValidationPolicy": {"timeoutInSeconds": 60},
        }


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _existing_recipe(clients: Clients, version: str) -> str | None:
    """The recipe of an already created component version, or None."""
    try:
        got = clients.greengrass.get_component(arn=clients.component_arn(version), recipeOutputFormat="YAML")
    except ClientError as exc:
        if _error_code(exc) == "ResourceNotFoundException":
            return None
        raise
    recipe = got["recipe"]
    return recipe.decode("utf-8") if isinstance(recipe, bytes) else str(recipe)


def _key(mapping: Mapping[str, Any], name: str) -> Any:
    """``mapping[name]`` with recipe keys read case-insensitively, as Greengrass reads them (None: absent)."""
    for key, value in mapping.items():
        if str(key).lower() == name.lower():
            return value
    return None


def _section(mapping: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = _key(mapping, name)
    return dict(value) if isinstance(value, Mapping) else {}


def _upper(value: Any, default: str) -> str:
    return str(value if value is not None else default).upper()


def _artifact_meaning(artifact: Mapping[str, Any]) -> dict[str, Any]:
    """What we author of an artifact; the service adds ``Digest`` and ``Algorithm`` (left out here)."""
    permission = _section(artifact, "Permission")
    return {
        "uri": str(_key(artifact, "Uri")),
        # Greengrass's defaults, which the service may write out: no unarchiving, owner-readable.
        "unarchive": _upper(_key(artifact, "Unarchive"), "NONE"),
        "read": _upper(_key(permission, "Read"), "OWNER"),
        "execute": _upper(_key(permission, "Execute"), "NONE"),
    }


def recipe_meaning(text: str | bytes) -> dict[str, Any]:
    """The parts of a recipe we author, in a form that survives the service's normalisation.

    ``GetComponent`` does not return the recipe as created: comments are gone,
    keys re-ordered and re-serialised (YAML or JSON), artifacts carry a
    ``Digest`` and ``Algorithm`` the service computed. Compared here: name,
    version, dependencies, each manifest's platform, lifecycle and artifacts
    (URI, unarchive, permission) and the default configuration.

    Raises:
        ValueError: ``text`` is not a YAML or JSON mapping.
    """
    raw = text.decode("utf-8") if isinstance(text, bytes) else text
    try:
        data = json.loads(raw) if raw.lstrip().startswith("{") else yaml.safe_load(raw)
    except (ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"not a YAML or JSON recipe: {exc}") from None
    if not isinstance(data, Mapping):
        raise ValueError("a recipe is a mapping")
    dependencies = {
        str(name): {
            "version": str(_key(spec, "VersionRequirement")),
            "type": _upper(_key(spec, "DependencyType"), "HARD"),
        }
        for name, spec in _section(data, "ComponentDependencies").items()
        if isinstance(spec, Mapping)
    }
    manifests = [
        {
            "platform": {str(k).lower(): str(v) for k, v in _section(manifest, "Platform").items()},
            "lifecycle": _section(manifest, "Lifecycle"),
            "selections": sorted(str(s) for s in _key(manifest, "Selections") or []),
            "artifacts": [
                _artifact_meaning(a) for a in _key(manifest, "Artifacts") or [] if isinstance(a, Mapping)
            ],
        }
        for manifest in _key(data, "Manifests") or []
        if isinstance(manifest, Mapping)
    ]
    return {
        "name": str(_key(data, "ComponentName")),
        "version": str(_key(data, "ComponentVersion")),
        "dependencies": dependencies,
        "manifests": manifests,
        "lifecycle": _section(data, "Lifecycle"),
        "configuration": _section(_section(data, "ComponentConfiguration"), "DefaultConfiguration"),
    }


def same_recipe(published: str | bytes | None, ours: str) -> bool:
    """True when the service's copy of a recipe means what ``ours`` means (False: absent or unreadable)."""
    if published is None:
        return False
    try:
        return recipe_meaning(published) == recipe_meaning(ours)
    except ValueError:
        return False


def publish(
    clients: Clients, bundle_dir: Path, bucket: str, trust: BundleTrust | None = None
) -> dict[str, Any]:
    """Upload the bundle and create its component version (idempotent for identical content).

    ``trust``: the signers the build's verification believes (the pipeline's
    KMS key for a bundle it has just signed); None: the configured trust.
    """
    from edge_runtime.signing import BundleTrust, trusting

    build = _components_build()
    with tempfile.TemporaryDirectory(prefix="release-") as tmp:
        try:
            # components/build.py verifies with load_bundle's default trust; it takes no trust argument.
            with trusting(trust or BundleTrust.configured()):
                zip_path, version = build.build_model_artifact(Path(bundle_dir), Path(tmp))
        except build.BuildError as exc:
            raise ReleaseError(str(exc), "Fix or re-package the bundle, then publish again.") from None
        recipe = build.render_recipe(MODEL_COMPONENT, version, bucket)
        digest = _sha256(zip_path)
        key = f"{MODEL_COMPONENT}/{version}/{zip_path.name}"

        def published(status: str, **extra: str) -> dict[str, Any]:
            return {
                "component": MODEL_COMPONENT,
                "version": version,
                "status": status,
                **extra,
                "artifact": f"s3://{bucket}/{key}",
                "sha256": digest,
            }

        existing = _existing_recipe(clients, version)
        if existing is not None:
            if not same_recipe(existing, recipe) or _object_sha(clients, bucket, key) != digest:
                raise ReleaseError(
                    f"{MODEL_COMPONENT} {version} is already published with other content; Greengrass "
                    "component versions are immutable.",
                    "Give the bundle a new version (python -m training package --version X.Y.Z) and "
                    "publish that.",
                )
            return published("already published")
        stored = _object_sha(clients, bucket, key)
        if stored is not None and stored != digest:
            raise ReleaseError(
                f"s3://{bucket}/{key} already holds a different artifact for {version}.",
                "Bump the bundle version; never overwrite an artifact a recipe may point at.",
            )
        if stored is None:
            clients.s3.upload_file(
                str(zip_path), bucket, key, ExtraArgs={"Metadata": {_SHA_METADATA: digest}}
            )
    try:
        created = clients.greengrass.create_component_version(inlineRecipe=recipe.encode("utf-8"))
    except ClientError as exc:
        if _error_code(exc) != "ConflictException":
            raise
        # Created meanwhile (another publisher, or a retried call): same rule as above, once.
        existing = _existing_recipe(clients, version)
        if not same_recipe(existing, recipe):
            raise ReleaseError(
                f"{MODEL_COMPONENT} {version} was created by someone else meanwhile"
                + (" with another recipe." if existing else "; Greengrass cannot show it yet."),
                "Check 'python -m cdk.release list'; bump the version if the content differs.",
            ) from None
        return published("already published")
    return published("published", arn=created["arn"])


def _object_sha(clients: Clients, bucket: str, key: str) -> str | None:
    try:
        head = clients.s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return str(head.get("Metadata", {}).get(_SHA_METADATA, "unknown"))


def _group_arn(clients: Clients, group: str) -> str:
    try:
        return str(clients.iot.describe_thing_group(thingGroupName=group)["thingGroupArn"])
    except ClientError as exc:
        if _error_code(exc) == "ResourceNotFoundException":
            raise ReleaseError(
                f"Thing group {group!r} does not exist.",
                "Check the name (the CDK app creates the canary and fleet groups).",
            ) from None
        raise


def _current_deployment(clients: Clients, target_arn: str) -> dict[str, Any] | None:
    listed = clients.greengrass.list_deployments(targetArn=target_arn, historyFilter="LATEST_ONLY")
    deployments = listed.get("deployments", [])
    if not deployments:
        return None
    return dict(clients.greengrass.get_deployment(deploymentId=deployments[0]["deploymentId"]))


def _things(clients: Clients, group: str) -> set[str]:
    names: set[str] = set()
    for page in clients.iot.get_paginator("list_things_in_thing_group").paginate(thingGroupName=group):
        names.update(page.get("things", []))
    return names


def deployed_versions(clients: Clients, groups: Sequence[str]) -> dict[str, str | None]:
    """The model version each group's current deployment pins (None: none)."""
    out: dict[str, str | None] = {}
    for group in groups:
        current = _current_deployment(clients, _group_arn(clients, group))
        components = (current or {}).get("components", {})
        out[group] = components.get(MODEL_COMPONENT, {}).get("componentVersion")
    return out


def revise_deployment(
    clients: Clients,
    group: str,
    change: Callable[[dict[str, dict[str, Any]]], None],
    *,
    name: str,
    tag: str,
    rollout: Rollout | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """Read ``group``'s deployment, let ``change`` edit its components, deploy the result.

    A thing group has one deployment and a new one replaces it, so every
    revision starts from the current set and keeps what it does not change.
    Returns the current deployment, the deployed components and the AWS answer.
    """
    rollout = rollout or Rollout()
    target_arn = _group_arn(clients, group)
    current = _current_deployment(clients, target_arn) or {}
    components = {key: dict(spec) for key, spec in current.get("components", {}).items()}
    change(components)
    created = clients.greengrass.create_deployment(
        targetArn=target_arn,
        deploymentName=name,
        components=components,
        iotJobConfiguration=rollout.iot_job_configuration(),
        deploymentPolicies=rollout.deployment_policies(),
        tags={DEPLOYMENT_TAG: tag[:256]},
    )
    return current, components, dict(created)


def _refuse_shared_devices(clients: Clients, group: str, version: str, other_groups: Sequence[str]) -> None:
    """Refuse when a device of ``group`` is also in another group that pins another model version."""
    members = _things(clients, group)
    for other, pinned in deployed_versions(clients, [g for g in other_groups if g != group]).items():
        shared = sorted(members & _things(clients, other))
        if pinned and pinned != version and shared:
            raise ReleaseError(
                f"{len(shared)} device(s) of {group!r} ({', '.join(shared[:5])}) are also in {other!r}, "
                f"which pins {MODEL_COMPONENT} {pinned}: Greengrass would fail them with "
                "NoAvailableComponentVersionException.",
                "Keep canary and fleet groups disjoint (remove the devices from one group), or deploy "
                "the same version to both.",
            )


def deploy(
    clients: Clients,
    group: str,
    version: str,
    *,
    rollout: Rollout | None = None,
    other_groups: Sequence[str] = (),
    reason: str = "",
) -> dict[str, Any]:
    """Revise ``group``'s deployment so it pins ``version`` of the model, keeping every other component."""
    rollout = rollout or Rollout()
    try:
        clients.greengrass.describe_component(arn=clients.component_arn(version))
    except ClientError as exc:
        if _error_code(exc) == "ResourceNotFoundException":
            raise ReleaseError(
                f"{MODEL_COMPONENT} {version} is not published in {clients.region}.",
                "Run 'python -m cdk.release publish' first.",
            ) from None
        raise
    _refuse_shared_devices(clients, group, version, other_groups)
    current, components, created = revise_deployment(
        clients,
        group,
        lambda components: components.update({MODEL_COMPONENT: {"componentVersion": version}}),
        name=f"{group}: {MODEL_COMPONENT} {version}",
        tag=reason or f"deploy {version}",
        rollout=rollout,
    )
    previous = current.get("components", {}).get(MODEL_COMPONENT, {}).get("componentVersion")
    return {
        "group": group,
        "version": version,
        "previous": previous,
        "deploymentId": created["deploymentId"],
        "iotJobId": created.get("iotJobId"),
        "components": sorted(components),
    }


def _version_key(text: str) -> tuple[int, ...]:
    core = text.split("-", 1)[0].split("+", 1)[0]
    return tuple(int(part) for part in core.split("."))


def list_versions(clients: Clients) -> list[str]:
    """Published versions of the model component, oldest first."""
    versions: list[str] = []
    paginator = clients.greengrass.get_paginator("list_component_versions")
    try:
        for page in paginator.paginate(arn=clients.component_arn()):
            versions.extend(v["componentVersion"] for v in page.get("componentVersions", []))
    except ClientError as exc:
        if _error_code(exc) != "ResourceNotFoundException":
            raise
        return []  # no version was ever created: the component does not exist yet
    return sorted(set(versions), key=_version_key)


def _model_version(deployment: Mapping[str, Any]) -> str | None:
    version = deployment.get("components", {}).get(MODEL_COMPONENT, {}).get("componentVersion")
    return str(version) if version is not None else None


#: Deployments the group's devices never ran to the end (cancelled, or failed and rolled back).
_NEVER_RAN = frozenset({"CANCELED", "FAILED"})


def previous_deployment(
    clients: Clients, target_arn: str, current: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The target's latest deployment before ``current`` that pinned another model version (None: none).

    Reads the target's whole deployment history (``ListDeployments``,
    ``historyFilter=ALL``), newest first by creation time, skips ``current``
    and everything newer, and deployments that were cancelled or failed, and
    returns the first earlier one (``GetDeployment``) whose model version is
    set and differs from the current one's. Deployments that changed only
    other components (``trust``, a runtime update) keep the current model
    version and are passed over.
    """
    history: list[dict[str, Any]] = []
    paginator = clients.greengrass.get_paginator("list_deployments")
    for page in paginator.paginate(targetArn=target_arn, historyFilter="ALL"):
        history.extend(page.get("deployments", []))
    # Newest first (stable: the service's own order among equal times is kept); undated ones last.
    history.sort(
        key=lambda d: (d.get("creationTimestamp") is not None, d.get("creationTimestamp")), reverse=True
    )
    ids = [d.get("deploymentId") for d in history]
    current_id = current.get("deploymentId")
    if current_id in ids:
        earlier = history[ids.index(current_id) + 1 :]
    else:  # not listed (yet): what was created before it
        created = current.get("creationTimestamp")
        earlier = [
            d
            for d in history
            if created is None or d.get("creationTimestamp") is None or d["creationTimestamp"] < created
        ]
    running = _model_version(current)
    for entry in earlier:
        if entry.get("deploymentStatus") in _NEVER_RAN or entry.get("deploymentId") == current_id:
            continue
        deployment = dict(clients.greengrass.get_deployment(deploymentId=entry["deploymentId"]))
        version = _model_version(deployment)
        if version is not None and version != running:
            return deployment
    return None


def rollback(
    clients: Clients, group: str, *, rollout: Rollout | None = None, other_groups: Sequence[str] = ()
) -> dict[str, Any]:
    """Deploy again the components of what ``group`` ran before its current model version.

    Not "the highest published version below the current one": that may never
    have run on the group, or be the very version a failed rollout is being
    rolled back from. The earlier deployment's whole component set is deployed
    (runtime version and configuration included), as the devices ran it.
    """
    target_arn = _group_arn(clients, group)
    current = _current_deployment(clients, target_arn)
    running = _model_version(current or {})
    if current is None or running is None:
        raise ReleaseError(
            f"Thing group {group!r} has no deployment of {MODEL_COMPONENT}.",
            "Nothing to roll back; use 'deploy' to choose a version.",
        )
    previous = previous_deployment(clients, target_arn, current)
    if previous is None:
        raise ReleaseError(
            f"{group!r} runs {MODEL_COMPONENT} {running}, and none of its earlier deployments ran "
            "another version of it: there is nothing to roll back to.",
            "Deploy a known-good version explicitly: 'python -m cdk.release list' shows the published "
            "versions, 'python -m cdk.release deploy --group G --version V' deploys one.",
        )
    version = _model_version(previous)
    assert version is not None  # previous_deployment returns only deployments that pin one
    _refuse_shared_devices(clients, group, version, other_groups)
    restored = {name: dict(spec) for name, spec in previous.get("components", {}).items()}

    def restore(components: dict[str, dict[str, Any]]) -> None:
        components.clear()
        components.update(restored)

    _, components, created = revise_deployment(
        clients,
        group,
        restore,
        name=f"{group}: {MODEL_COMPONENT} {version} (rollback)",
        tag=f"rollback from {running} to {version} ({previous.get('deploymentId')})",
        rollout=rollout,
    )
    return {
        "group": group,
        "version": version,
        "previous": running,
        "restoredDeployment": previous.get("deploymentId"),
        "deploymentId": created["deploymentId"],
        "iotJobId": created.get("iotJobId"),
        "components": sorted(components),
    }


def trust_signing_key(
    clients: Clients, group: str, key_id: str, *, keep_bundled_key: bool = False
) -> dict[str, Any]:
    """Make ``group``'s runtime trust the KMS key that signs released bundles.

    The public key (KMS ``GetPublicKey``, an ECC_NIST_P256 key) is merged into
    the runtime component's ``configurationUpdate`` as ``Model.TrustedKeys``
    (inline PEM) with ``Model.RequireSignature: true``; every other component
    and setting of the group's deployment is kept. Production boxes should
    trust only this key: ``keep_bundled_key`` also keeps the key of the models
    bundled inside the runtime (development fleets).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from edge_runtime.signing import bundled_models_key_path, load_public_key, public_key_fingerprint

    public = serialization.load_der_public_key(clients.kms.get_public_key(KeyId=key_id)["PublicKey"])
    if not (isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"):
        raise ReleaseError(
            f"KMS key {key_id} is not an ECC_NIST_P256 key; bundles are signed with ECDSA P-256.",
            "Pass the pipeline's signing key (the artifacts stack's SigningKey output).",
        )
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    keys = [pem]
    if keep_bundled_key:
        keys.append(bundled_models_key_path().read_text(encoding="utf-8"))
    fingerprint = public_key_fingerprint(load_public_key(pem))

    def trust_keys(components: dict[str, dict[str, Any]]) -> None:
        if RUNTIME_COMPONENT not in components:
            raise ReleaseError(
                f"The deployment of {group!r} has no {RUNTIME_COMPONENT}, so there is no runtime to "
                "configure.",
                "Deploy the runtime component to the group first (components/build.py, "
                "docs/greengrass.md), then run 'trust' again.",
            )
        runtime = components[RUNTIME_COMPONENT]
        update = dict(runtime.get("configurationUpdate") or {})
        merge = json.loads(update.get("merge") or "{}")
        merge.setdefault("Model", {}).update({"TrustedKeys": keys, "RequireSignature": True})
        update["merge"] = json.dumps(merge, separators=(",", ":"), sort_keys=True)
        runtime["configurationUpdate"] = update

    _, _, created = revise_deployment(
        clients,
        group,
        trust_keys,
        name=f"{group}: trust signing key {fingerprint[:12]}",
        tag=f"trust {fingerprint[:16]}",
    )
    return {
        "group": group,
        "trusted_fingerprints": [public_key_fingerprint(load_public_key(k)) for k in keys],
        "deploymentId": created["deploymentId"],
    }


def status(clients: Clients, group: str) -> dict[str, Any]:
    """The group's current deployment and its IoT job's per-device counts."""
    current = _current_deployment(clients, _group_arn(clients, group))
    if current is None:
        raise ReleaseError(f"Thing group {group!r} has no deployment.", "Deploy a model version first.")
    out: dict[str, Any] = {
        "group": group,
        "deploymentId": current.get("deploymentId"),
        "deploymentStatus": current.get("deploymentStatus"),
        "model": current.get("components", {}).get(MODEL_COMPONENT, {}).get("componentVersion"),
    }
    job_id = current.get("iotJobId")
    if job_id:
        job = clients.iot.describe_job(jobId=job_id)["job"]
        out["job"] = {
            "jobId": job_id,
            "status": job.get("status"),
            "devices": job.get("jobProcessDetails", {}),
        }
    return out
