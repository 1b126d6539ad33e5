#!/usr/bin/env python3
"""Check built Greengrass recipes before they reach a device.

``greengrass-cli deployment create`` and the Greengrass cloud accept many broken recipes and only
fail later, on the device: an artifact file that was never built, a ``{configuration:/...}`` pointer
that does not exist (the nucleus leaves the text as is), a dependency range that no built version
satisfies, a configuration key the runtime rejects at start-up. This module catches those at
build time, so a deployment only fails for reasons that really are on the device.

Two kinds of checks:

1. **Both official JSON schemas** (read from ``../shared/greengrass/schemas``), applied the way
   their own test suites apply them: every *key* is lower-cased recursively first (recipe keys are
   case-insensitive; both schemas spell their property names in lower case), values are left as
   written (the component-common schema's enums are upper case, e.g. ``Unarchive: ZIP``). The GDK
   schema's ``setenv`` uses a lower-case ``anyof`` (a typo JSON Schema ignores), so it accepts any
   Setenv value; the component-common schema checks those properly.
2. **Project checks** (:func:`project_problems`), each reported as ``recipe: where: what``:

   * every recipe variable resolves: ``{configuration:/A/B}`` points into the recipe's own
     ``DefaultConfiguration``; ``{Dep:artifacts:decompressedPath}`` and friends name a *direct*
     dependency (and, for ``{Dep:configuration:/X}``, a key of that dependency's configuration when
     it is built too); namespaces and keys are ones the nucleus knows; no build placeholder such
     as ``{COMPONENT_VERSION}`` is left unfilled;
   * every artifact URI is ``s3://BUCKET/KEY`` and its file name (the last segment: all that
     greengrass-cli matches) exists under ``artifacts/<Name>/<Version>/``; ``Unarchive: ZIP``
     files are zip archives; no unreferenced file or recipe-less artifact folder lies around;
   * every dependency's version requirement (npm style, as Greengrass reads it:
     ``>=0.1.0 <0.2.0``, ``^0.1.0``, ``~0.1.0``, ``0.1.x``, ``1.2.3 - 1.4``, ``||``) is satisfied by
     the version of that component in the same build (``semantic_version.NpmSpec``, plus npm's
     pre-release rule where NpmSpec is looser);
   * for the runtime component, the ``DefaultConfiguration`` keys (minus ``accessControl``) equal
     ``RuntimeConfig().to_pascal_dict()``'s keys, recursively, and ``RuntimeConfig`` accepts the
     values; every ``EDGE_RUNTIME__...`` Setenv names a real setting and takes its value from the
     matching configuration key;
   * no null anywhere (the nucleus cannot store one; use ``""``), ``RecipeFormatVersion`` not an
     unquoted YAML date (PyYAML-based tools such as the GDK read it as a date), component versions
     are semantic versions, no duplicate name/version, no wildcard IPC grant in ``accessControl``.

Usage: ``python -m components.validate [greengrass-build]`` (exit 1 when anything is wrong).

Why one module over 500 lines: every check reads the same parsed build (recipes, artifact
tree, the runtime's configuration model) and reports in one format; the schema checks and the
project rules are separate functions, and a split would only move that shared state around.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import semantic_version
import yaml
from jsonschema import Draft7Validator
from jsonschema.exceptions import ValidationError, best_match
from semantic_version import Version

from components.names import RUNTIME_COMPONENT

__all__ = [
    "ENV_PREFIX",
    "RUNTIME_COMPONENT",
    "SCHEMA_FILES",
    "Problem",
    "Version",
    "default_schema_dir",
    "get_key",
    "load_recipe",
    "load_recipe_text",
    "load_schemas",
    "lower_keys",
    "main",
    "parse_requirement",
    "parse_version",
    "project_problems",
    "resolve_schemas",
    "runtime_config_error",
    "runtime_config_keys",
    "satisfies",
    "schema_problems",
    "validate_build",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV_PREFIX = "EDGE_RUNTIME__"
SCHEMA_FILES = {
    "gdk": "gdk_recipe_schema.json",
    "common": "component_common_recipe_schema.json",
}
RECIPE_SUFFIXES = (".yaml", ".yml", ".json")
ACCESS_CONTROL = "accessControl"
#: RuntimeConfig sections read only under another host (Azure IoT Edge): a recipe may leave them out.
OTHER_HOST_SECTIONS = ("Azure",)


# --------------------------------------------------------------------------------------------------
# Problems


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a build, phrased for the person who has to fix it.

    ``check`` groups problems by kind (``schema:gdk``, ``schema:common``, ``variable``, ``artifact``,
    ``dependency``, ``config``, ``setenv``, ``access``, ``recipe``, ``layout``) so tests and tools can
    filter without parsing the message.
    """

    recipe: str
    where: str
    message: str
    check: str

    def __str__(self) -> str:
        location = f"{self.recipe}: {self.where}" if self.where else self.recipe
        return f"{location}: {self.message} [{self.check}]"


# --------------------------------------------------------------------------------------------------
# Loading


class _RecipeLoader(yaml.SafeLoader):
    """Safe YAML without implicit timestamps: ``2020-01-25`` stays a string, as the nucleus reads it."""


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_recipe_text(text: str, *, json_format: bool = False) -> dict[str, Any]:
    """Parse recipe text safely, keeping every scalar the nucleus would see as a string a string.

    Raises:
        ValueError: the text is not valid YAML/JSON or does not hold a mapping.
    """
    try:
        # _RecipeLoader is a SafeLoader subclass (no arbitrary objects), hence the S506 exemption.
        data = json.loads(text) if json_format else yaml.load(text, Loader=_RecipeLoader)  # noqa: S506
    except (ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"not valid {'JSON' if json_format else 'YAML'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError("a recipe must be a mapping at the top level")
    return data


def load_recipe(path: Path) -> dict[str, Any]:
    """Read a ``.yaml``/``.yml``/``.json`` recipe file (see :func:`load_recipe_text`)."""
    return load_recipe_text(path.read_text(encoding="utf-8"), json_format=path.suffix == ".json")


def _format_version_is_date(path: Path) -> bool:
    """True when plain PyYAML (what the GDK uses) reads ``RecipeFormatVersion`` as a date."""
    if path.suffix == ".json":
        return False
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return False
    value = get_key(data, "RecipeFormatVersion")
    return value is not None and not isinstance(value, str)


def default_schema_dir() -> Path:
    """``../shared/greengrass/schemas`` beside the repository (data files, never copied in)."""
    return REPO_ROOT.parent / "shared" / "greengrass" / "schemas"


def load_schemas(schema_dir: Path) -> dict[str, dict[str, Any]]:
    """Both recipe schemas by label (``gdk``, ``common``).

    Raises:
        FileNotFoundError: naming the schema file that is missing.
    """
    return read_schema_files(schema_dir, SCHEMA_FILES, "recipe schema")


def read_schema_files(schema_dir: Path, files: Mapping[str, str], what: str) -> dict[str, dict[str, Any]]:
    """JSON schemas by label from ``schema_dir`` (the Greengrass recipe and IoT Edge manifest checks).

    Raises:
        FileNotFoundError: naming the schema file that is missing.
    """
    schemas = {}
    for label, name in files.items():
        path = schema_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{what} {name} not found in {schema_dir}")
        schemas[label] = json.loads(path.read_text(encoding="utf-8"))
    return schemas


def runtime_config_keys() -> dict[str, Any]:
    """``RuntimeConfig().to_pascal_dict()``: the configuration the runtime component must expose."""
    from edge_runtime.config import RuntimeConfig

    return RuntimeConfig().to_pascal_dict()


# --------------------------------------------------------------------------------------------------
# Small helpers


def get_key(mapping: Any, key: str, default: Any = None) -> Any:
    """Case-insensitive lookup: Greengrass reads recipe keys case-insensitively."""
    if not isinstance(mapping, Mapping):
        return default
    if key in mapping:
        return mapping[key]
    wanted = key.lower()
    for name, value in mapping.items():
        if isinstance(name, str) and name.lower() == wanted:
            return value
    return default


def lower_keys(value: Any) -> Any:
    """Lower-case every mapping key recursively (values untouched), as both schemas expect."""
    if isinstance(value, Mapping):
        return {str(k).lower(): lower_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [lower_keys(item) for item in value]
    return value


def _display_path(original: Any, path: Sequence[Any]) -> str:
    """Turn a path into the lower-cased document back into the recipe's own spelling."""
    parts: list[str] = []
    node = original
    for segment in path:
        if isinstance(segment, int):
            parts.append(f"[{segment}]")
            node = node[segment] if isinstance(node, list) and segment < len(node) else None
            continue
        name = str(segment)
        if isinstance(node, Mapping):
            name = next((k for k in node if str(k).lower() == name), name)
            node = node.get(name)
        else:
            node = None
        parts.append(f".{name}" if parts else name)
    return "".join(parts)


def _walk_strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _walk_strings(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk_strings(item, f"{path}[{index}]")


def _walk_nulls(value: Any, path: str) -> Iterator[str]:
    if value is None:
        yield path or "(top level)"
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _walk_nulls(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk_nulls(item, f"{path}[{index}]")


# --------------------------------------------------------------------------------------------------
# Semantic versions and npm-style requirements (what Greengrass uses for VersionRequirement)

# npm allows blanks between an operator and its version (">= 1.0.0"); NpmSpec does not.
_OPERATOR_BLANK = re.compile(r"(<=|>=|<|>|=|\^|~>|~)\s+")
# NpmSpec reads "1.x.3" as "1.x"; npm rejects a number after a wildcard, and so do we.
_WILDCARD_THEN_NUMBER = re.compile(r"(?:^|[\s=<>^~])[vV]?\d+\.[xX*]\.\d")
_PRERELEASE_CORE = re.compile(r"(\d+)\.(\d+)\.(\d+)-[0-9A-Za-z.-]+")


def parse_version(text: str) -> Version:
    """Parse ``MAJOR.MINOR.PATCH[-pre][+build]`` with ``semantic_version``.

    Raises:
        ValueError: when ``text`` is not a semantic version (Greengrass rejects those too).
    """
    try:
        return Version(str(text).strip())
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a semantic version (MAJOR.MINOR.PATCH): {exc}") from exc


def parse_requirement(requirement: str) -> semantic_version.NpmSpec:
    """Parse an npm-style range (what Greengrass reads as ``VersionRequirement``).

    Raises:
        ValueError: saying which part of the requirement is not understood.
    """
    text = _OPERATOR_BLANK.sub(r"\1", str(requirement).strip())
    if _WILDCARD_THEN_NUMBER.search(text):
        raise ValueError(f"{requirement!r}: a wildcard can only be followed by wildcards")
    return semantic_version.NpmSpec(text)


def satisfies(version: str | Version, requirement: str) -> bool:
    """Whether ``version`` meets an npm-style ``requirement``, as Greengrass resolves dependencies.

    A pre-release version only matches when the requirement names a pre-release of the same
    ``MAJOR.MINOR.PATCH`` (npm's rule), so ``>=0.1.0`` does not pull in ``0.2.0-beta``.
    ``NpmSpec`` applies that rule to ``>=`` but lets ``0.2.0-beta.1`` satisfy ``<0.2.0``, hence the
    extra check (npm applies it per ``||`` alternative; here it is per requirement, which is
    stricter only for mixed requirements such as ``<0.2.0 || >=0.2.0-rc.1``).

    Raises:
        ValueError: if either argument cannot be parsed.
    """
    parsed = version if isinstance(version, Version) else parse_version(version)
    if parsed not in parse_requirement(requirement):
        return False
    if parsed.prerelease:
        core = (parsed.major, parsed.minor, parsed.patch)
        named = {tuple(int(n) for n in m.groups()) for m in _PRERELEASE_CORE.finditer(str(requirement))}
        return core in named
    return True


# --------------------------------------------------------------------------------------------------
# Schema checks


def _schema_message(error: ValidationError) -> tuple[list[Any], str]:
    """The most specific reason behind an error (anyOf/oneOf errors hide it in their context)."""
    detail = best_match(error.context) if error.context else None
    if detail is not None:
        path = list(error.absolute_path) + list(detail.relative_path)
        return path, detail.message
    return list(error.absolute_path), error.message


def schema_problems(
    recipe: Mapping[str, Any], schema: Mapping[str, Any], *, recipe_name: str, label: str
) -> list[Problem]:
    """Validate ``recipe`` (keys lower-cased, values as written) against one official schema."""
    validator = Draft7Validator(schema)
    problems = []
    for error in sorted(validator.iter_errors(lower_keys(recipe)), key=lambda e: list(map(str, e.path))):
        path, message = _schema_message(error)
        if len(message) > 300:
            message = message[:300] + "…"
        problems.append(Problem(recipe_name, _display_path(recipe, path), message, f"schema:{label}"))
    return problems


# --------------------------------------------------------------------------------------------------
# Project checks

# `${VAR}` is shell syntax, JSON text such as `{"a":1}` does not start with a name: neither is a variable.
_VARIABLE = re.compile(r"(?<!\$)\{([A-Za-z0-9_.\-]+(?::[^{}\s]*)?)\}")
_PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")
_OWN_KEYS = {"artifacts": ("path", "decompressedPath"), "work": ("path",)}
_DEVICE_KEYS = {"iot": ("thingName",), "kernel": ("rootPath",)}


@dataclass
class _Recipe:
    file: str
    data: dict[str, Any]
    name: str
    version: str

    @property
    def default_configuration(self) -> Any:
        return get_key(get_key(self.data, "ComponentConfiguration"), "DefaultConfiguration")

    @property
    def dependencies(self) -> dict[str, Any]:
        deps = get_key(self.data, "ComponentDependencies")
        return deps if isinstance(deps, dict) else {}

    def manifests(self) -> list[Any]:
        manifests = get_key(self.data, "Manifests")
        return manifests if isinstance(manifests, list) else []


def _pointer_problem(config: Any, pointer: str, owner: str) -> str | None:
    """Why a JSON pointer does not resolve in ``config`` (``None`` when it does)."""
    if not pointer.startswith("/"):
        return f"configuration pointer {pointer!r} must start with '/'"
    node = config
    walked = ""
    for raw in pointer[1:].split("/"):
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            hint = ""
            if isinstance(node, Mapping):
                same = [k for k in node if str(k).lower() == token.lower()]
                close = same or difflib.get_close_matches(token, [str(k) for k in node], n=1)
                if close:
                    hint = f" (did you mean {walked}/{close[0]}?)"
            return (
                f"{pointer} is not in {owner}'s DefaultConfiguration: "
                f"no key {token!r} at {walked or '/'}{hint}"
            )
        walked += "/" + raw
    return None


def _variable_problems(recipe: _Recipe, recipes: Mapping[str, _Recipe]) -> list[Problem]:
    problems = []
    sources: list[tuple[str, Any]] = [("Lifecycle", get_key(recipe.data, "Lifecycle"))]
    sources += [
        (f"Manifests[{i}].Lifecycle", get_key(m, "Lifecycle")) for i, m in enumerate(recipe.manifests())
    ]
    sources.append(("ComponentConfiguration.DefaultConfiguration", recipe.default_configuration))
    own_config = recipe.default_configuration if isinstance(recipe.default_configuration, Mapping) else {}
    for base, value in sources:
        for where, text in _walk_strings(value, base):
            for match in _VARIABLE.finditer(text):
                message = _variable_problem(match.group(1), recipe, own_config, recipes)
                if message:
                    problems.append(Problem(recipe.file, where, message, "variable"))
    return problems


def _variable_problem(
    inner: str, recipe: _Recipe, own_config: Any, recipes: Mapping[str, _Recipe]
) -> str | None:
    """Why ``{inner}`` would not be replaced by the nucleus (``None`` when it would)."""
    parts = inner.split(":")
    if len(parts) == 1:
        if _PLACEHOLDER.fullmatch(inner):
            return f"{{{inner}}} is a build placeholder that was not filled (run components/build.py)"
        return None  # not variable syntax at all (e.g. shell brace expansion)
    if parts[0] == "configuration":
        return _pointer_problem(own_config, inner[len("configuration:") :], recipe.name)
    if len(parts) == 2:
        namespace, key = parts
        known = {**_OWN_KEYS, **_DEVICE_KEYS}
        if namespace not in known:
            return (
                f"{{{inner}}}: unknown recipe variable namespace {namespace!r} "
                f"(known: artifacts, configuration, work, iot, kernel, or <DependencyName>:...)"
            )
        if key not in known[namespace]:
            return f"{{{inner}}}: {namespace} has no key {key!r} (known: {', '.join(known[namespace])})"
        return None
    component, namespace, key = parts[0], parts[1], ":".join(parts[2:])
    if component not in recipe.dependencies:
        declared = ", ".join(recipe.dependencies) or "none"
        return (
            f"{{{inner}}} refers to {component}, which is not a direct dependency of {recipe.name} "
            f"(ComponentDependencies: {declared}); Greengrass only resolves direct dependencies"
        )
    if namespace in _DEVICE_KEYS:
        return f"{{{inner}}}: {namespace} variables cannot name a component; use {{{namespace}:{key}}}"
    if namespace == "configuration":
        dependency = recipes.get(component)
        if dependency is None:
            return None  # not part of this build: nothing to check against
        return _pointer_problem(dependency.default_configuration or {}, key, component)
    if namespace not in _OWN_KEYS:
        return f"{{{inner}}}: unknown namespace {namespace!r} (known: artifacts, configuration, work)"
    if key not in _OWN_KEYS[namespace]:
        return f"{{{inner}}}: {namespace} has no key {key!r} (known: {', '.join(_OWN_KEYS[namespace])})"
    return None


def _artifact_problems(recipe: _Recipe, build_dir: Path) -> list[Problem]:
    problems = []
    folder = build_dir / "artifacts" / recipe.name / recipe.version
    referenced: set[str] = set()
    for i, manifest in enumerate(recipe.manifests()):
        artifacts = get_key(manifest, "Artifacts") or []
        for j, artifact in enumerate(artifacts if isinstance(artifacts, list) else []):
            where = f"Manifests[{i}].Artifacts[{j}].Uri"
            uri = get_key(artifact, "Uri")
            if not isinstance(uri, str):
                continue  # the schemas report a missing Uri
            if uri.startswith("docker:"):
                continue  # pulled from a registry, not from the artifact folder
            if not uri.startswith("s3://"):
                problems.append(
                    Problem(recipe.file, where, f"{uri!r} is not an s3://BUCKET/KEY URI", "artifact")
                )
                continue
            bucket, _, key = uri[len("s3://") :].partition("/")
            file_name = key.rsplit("/", 1)[-1]
            if not bucket or not file_name:
                problems.append(
                    Problem(recipe.file, where, f"{uri!r} must be s3://BUCKET/.../FILE", "artifact")
                )
                continue
            referenced.add(file_name)
            path = folder / file_name
            rel = path.relative_to(build_dir).as_posix()
            if not path.is_file():
                problems.append(
                    Problem(
                        recipe.file,
                        where,
                        f"artifact {file_name} (from {uri}) not found: expected {rel}",
                        "artifact",
                    )
                )
            elif str(get_key(artifact, "Unarchive", "NONE")).upper() == "ZIP" and not zipfile.is_zipfile(
                path
            ):
                problems.append(
                    Problem(
                        recipe.file,
                        where,
                        f"{rel} is marked Unarchive: ZIP but is not a zip file",
                        "artifact",
                    )
                )
    if folder.is_dir():
        for extra in sorted(p.name for p in folder.iterdir() if p.name not in referenced):
            problems.append(
                Problem(
                    recipe.file,
                    "Manifests",
                    f"artifacts/{recipe.name}/{recipe.version}/{extra} is not referenced by "
                    "any artifact URI (stale build output?)",
                    "artifact",
                )
            )
    return problems


def _dependency_problems(recipe: _Recipe, recipes: Mapping[str, _Recipe]) -> list[Problem]:
    problems = []
    for name, spec in recipe.dependencies.items():
        where = f"ComponentDependencies.{name}.VersionRequirement"
        requirement = get_key(spec, "VersionRequirement")
        if not isinstance(requirement, str):
            continue  # the schemas report it
        try:
            parse_requirement(requirement)
        except ValueError as exc:
            problems.append(Problem(recipe.file, where, f"cannot read {requirement!r}: {exc}", "dependency"))
            continue
        built = recipes.get(name)
        if built is None:
            continue  # provided by the device or the cloud (e.g. aws.greengrass.Nucleus)
        try:
            ok = satisfies(built.version, requirement)
        except ValueError:
            continue  # the dependency's own version problem is reported on its recipe
        if not ok:
            problems.append(
                Problem(
                    recipe.file,
                    where,
                    f"{recipe.name} requires {name} {requirement!r}, but this build has {name} "
                    f"{built.version}: the deployment would fail to resolve "
                    "(bump the requirement or the model version)",
                    "dependency",
                )
            )
    return problems


def _compare_keys(actual: Any, expected: Any, path: str) -> Iterator[str]:
    if not isinstance(actual, Mapping):
        yield f"{path or 'DefaultConfiguration'} must be a section (mapping), like RuntimeConfig's"
        return
    for key in expected:
        where = f"{path}.{key}" if path else key
        if key not in actual:
            same_case = [k for k in actual if str(k).lower() == key.lower()]
            hint = f" (found {same_case[0]!r}: keys are case-sensitive PascalCase)" if same_case else ""
            yield f"missing key {where}: RuntimeConfig has this setting{hint}"
        elif isinstance(expected[key], Mapping):
            yield from _compare_keys(actual[key], expected[key], where)
        elif isinstance(actual[key], Mapping):
            yield f"{where} is a section here but a single value in RuntimeConfig"
    for key in actual:
        if key not in expected:
            where = f"{path}.{key}" if path else str(key)
            close = difflib.get_close_matches(str(key), [str(k) for k in expected], n=1)
            hint = f" (did you mean {path + '.' if path else ''}{close[0]}?)" if close else ""
            yield f"unknown key {where}: RuntimeConfig has no such setting, the runtime would reject it{hint}"


def _config_problems(recipe: _Recipe, expected: Mapping[str, Any]) -> list[Problem]:
    config = recipe.default_configuration
    if not isinstance(config, Mapping):
        return [
            Problem(
                recipe.file,
                "ComponentConfiguration.DefaultConfiguration",
                "missing: the runtime component must expose every RuntimeConfig key",
                "config",
            )
        ]
    actual = {k: v for k, v in config.items() if k != ACCESS_CONTROL}
    expected = {k: v for k, v in expected.items() if k not in OTHER_HOST_SECTIONS or k in actual}
    where = "ComponentConfiguration.DefaultConfiguration"
    problems = [
        Problem(recipe.file, where, message, "config") for message in _compare_keys(actual, expected, "")
    ]
    if not problems:
        error = runtime_config_error(actual)
        if error:
            problems.append(
                Problem(recipe.file, where, f"the runtime would refuse these values: {error}", "config")
            )
    return problems


def runtime_config_error(config: Mapping[str, Any]) -> str | None:
    """Why ``RuntimeConfig`` rejects ``config`` (``None`` if it accepts it).

    Recipe variables stay unresolved strings here; that is fine for the path and name settings
    that use them, and every other value must already be one the runtime accepts at start-up.
    """
    from edge_runtime.config import RuntimeConfig
    from edge_runtime.errors import ConfigError

    try:
        RuntimeConfig.from_mapping(config, source="DefaultConfiguration")
    except ConfigError as exc:
        return " ".join(str(exc).split())
    return None


def _env_path(name: str, expected: Mapping[str, Any]) -> list[str] | None:
    """The RuntimeConfig key path of ``EDGE_RUNTIME__A__B`` (the loader's matching rules)."""
    node: Any = expected
    path = []
    for segment in name[len(ENV_PREFIX) :].split("__"):
        flat = segment.replace("_", "").lower()
        if not isinstance(node, Mapping):
            return None
        key = next((k for k in node if k.replace("_", "").lower() == flat), None)
        if key is None:
            return None
        path.append(key)
        node = node[key]
    return None if isinstance(node, Mapping) else path


def _setenv_problems(recipe: _Recipe, expected: Mapping[str, Any]) -> list[Problem]:
    problems = []
    blocks: list[tuple[str, Any]] = []
    for i, manifest in enumerate(recipe.manifests()):
        lifecycle = get_key(manifest, "Lifecycle")
        blocks.append((f"Manifests[{i}].Lifecycle.Setenv", get_key(lifecycle, "Setenv")))
        if isinstance(lifecycle, Mapping):
            blocks += [
                (f"Manifests[{i}].Lifecycle.{step}.Setenv", get_key(body, "Setenv"))
                for step, body in lifecycle.items()
                if isinstance(body, Mapping)
            ]
    for base, env in blocks:
        if not isinstance(env, Mapping):
            continue
        for name, value in env.items():
            if not str(name).upper().startswith(ENV_PREFIX):
                continue
            where = f"{base}.{name}"
            path = _env_path(str(name).upper(), expected)
            if path is None:
                problems.append(
                    Problem(recipe.file, where, f"{name} does not name a RuntimeConfig setting", "setenv")
                )
                continue
            source = re.fullmatch(r"\{configuration:(/[^{}]*)\}", str(value))
            if source and source.group(1) != "/" + "/".join(path):
                problems.append(
                    Problem(
                        recipe.file,
                        where,
                        f"{name} sets {'.'.join(path)} but takes its value from {source.group(1)}",
                        "setenv",
                    )
                )
    return problems


def _access_problems(recipe: _Recipe) -> list[Problem]:
    access = get_key(recipe.default_configuration, ACCESS_CONTROL)
    problems: list[Problem] = []
    if not isinstance(access, Mapping):
        return problems
    for service, policies in access.items():
        for policy_id, policy in policies.items() if isinstance(policies, Mapping) else []:
            where = f"ComponentConfiguration.DefaultConfiguration.accessControl.{service}.{policy_id}"
            if "*" in (get_key(policy, "operations") or []):
                problems.append(
                    Problem(
                        recipe.file, where, "grants every IPC operation ('*'): list the ones used", "access"
                    )
                )
            if {"*", "#"} & set(get_key(policy, "resources") or []):
                problems.append(
                    Problem(
                        recipe.file, where, "grants every resource ('*' or '#'): name the topics", "access"
                    )
                )
    return problems + _topic_grant_problems(recipe, access)


#: Greengrass topic setting -> (IPC service, operation) the nucleus checks when the runtime publishes.
_TOPIC_GRANTS = {
    "LocalTopic": ("aws.greengrass.ipc.pubsub", "aws.greengrass#PublishToTopic"),
    "LocalPriorityTopic": ("aws.greengrass.ipc.pubsub", "aws.greengrass#PublishToTopic"),
    "LocalFhirTopic": ("aws.greengrass.ipc.pubsub", "aws.greengrass#PublishToTopic"),
    "StatusTopic": ("aws.greengrass.ipc.pubsub", "aws.greengrass#PublishToTopic"),
    "IotCoreTopic": ("aws.greengrass.ipc.mqttproxy", "aws.greengrass#PublishToIoTCore"),
    "IotCorePriorityTopic": ("aws.greengrass.ipc.mqttproxy", "aws.greengrass#PublishToIoTCore"),
}


def _resource_matches(resource: str, topic: str) -> bool:
    """Greengrass authorization: ``*`` matches any characters; ``+`` one MQTT level, ``#`` the rest."""
    pattern = ""
    for char in resource:
        pattern += {"*": ".*", "+": "[^/]*", "#": ".*"}.get(char) or re.escape(char)
    return re.fullmatch(pattern, topic) is not None


def _topic_grant_problems(recipe: _Recipe, access: Any) -> list[Problem]:
    """Each default Greengrass topic is one the recipe's accessControl lets the runtime publish to.

    The fake nucleus the tests use accepts any topic; the real one answers UnauthorizedError,
    and results would wait in the outbox for ever.
    """
    greengrass = get_key(recipe.default_configuration, "Greengrass")
    if not isinstance(greengrass, Mapping):
        return []
    problems: list[Problem] = []
    for setting, (service, operation) in _TOPIC_GRANTS.items():
        topic = get_key(greengrass, setting)
        if not topic:
            continue  # "" turns that channel off
        policies = get_key(access, service) if isinstance(access, Mapping) else None
        granted = [
            resource
            for policy in (policies.values() if isinstance(policies, Mapping) else [])
            if operation in (get_key(policy, "operations") or [])
            for resource in get_key(policy, "resources") or []
        ]
        if not any(_resource_matches(str(r), str(topic)) for r in granted):
            problems.append(
                Problem(
                    recipe.file,
                    f"ComponentConfiguration.DefaultConfiguration.Greengrass.{setting}",
                    f"publishes to {topic!r}, which accessControl.{service} does not grant for "
                    f"{operation} (the nucleus would refuse it): add the topic to its resources",
                    "access",
                )
            )
    return problems


def project_problems(
    build_dir: Path,
    recipes: Sequence[tuple[str, dict[str, Any]]],
    *,
    config_keys: Mapping[str, Any] | None,
    runtime_component: str = RUNTIME_COMPONENT,
) -> list[Problem]:
    """Checks the schemas cannot express: variables, artifacts, dependency ranges, configuration keys.

    Args:
        build_dir: the folder holding ``recipes/`` and ``artifacts/``.
        recipes: ``(file name, parsed recipe)`` pairs.
        config_keys: ``RuntimeConfig().to_pascal_dict()`` (``None`` skips the configuration checks).
        runtime_component: the component whose configuration must match ``config_keys``.
    """
    problems: list[Problem] = []
    by_name: dict[str, _Recipe] = {}
    parsed: list[_Recipe] = []
    for file, data in recipes:
        name, version = get_key(data, "ComponentName"), get_key(data, "ComponentVersion")
        if not isinstance(name, str) or not isinstance(version, str):
            problems.append(Problem(file, "", "ComponentName and ComponentVersion must be strings", "recipe"))
            continue
        try:
            parse_version(version)
        except ValueError as exc:
            problems.append(Problem(file, "ComponentVersion", str(exc), "recipe"))
        for where in _walk_nulls(data, ""):
            problems.append(
                Problem(file, where, 'null value: recipes cannot hold null, use "" for empty', "recipe")
            )
        if _format_version_is_date(build_dir / "recipes" / file):
            problems.append(
                Problem(
                    file,
                    "RecipeFormatVersion",
                    "unquoted date: PyYAML-based tools (GDK) read it as a date, quote it",
                    "recipe",
                )
            )
        recipe = _Recipe(file, data, name, version)
        if name in by_name and by_name[name].version == version:
            problems.append(
                Problem(
                    file,
                    "ComponentVersion",
                    f"{name} {version} is also defined by {by_name[name].file}",
                    "layout",
                )
            )
        by_name[name] = recipe
        parsed.append(recipe)

    for recipe in parsed:
        problems += _variable_problems(recipe, by_name)
        problems += _artifact_problems(recipe, build_dir)
        problems += _dependency_problems(recipe, by_name)
        problems += _access_problems(recipe)
        if recipe.name == runtime_component and config_keys is not None:
            problems += _config_problems(recipe, config_keys)
            problems += _setenv_problems(recipe, config_keys)

    artifacts_dir = build_dir / "artifacts"
    if artifacts_dir.is_dir():
        known = {(r.name, r.version) for r in parsed}
        for version_dir in sorted(p for p in artifacts_dir.glob("*/*") if p.is_dir()):
            if (version_dir.parent.name, version_dir.name) not in known:
                problems.append(
                    Problem(
                        "(build)",
                        version_dir.relative_to(build_dir).as_posix(),
                        "artifact folder without a recipe of that component and version",
                        "layout",
                    )
                )
    return problems


def validate_build(
    build_dir: Path,
    *,
    schemas: Mapping[str, Mapping[str, Any]] | None,
    config_keys: Mapping[str, Any] | None = None,
    runtime_component: str = RUNTIME_COMPONENT,
) -> list[Problem]:
    """Every problem in a greengrass-cli build folder (``recipes/`` + ``artifacts/<Name>/<Version>/``).

    Args:
        build_dir: the build output (``greengrass-build``).
        schemas: :func:`load_schemas` output; ``None`` skips the schema checks.
        config_keys: the keys the runtime's configuration must have; default :func:`runtime_config_keys`.
        runtime_component: the component whose configuration mirrors ``RuntimeConfig``.
    """
    recipes_dir = build_dir / "recipes"
    if not recipes_dir.is_dir():
        return [
            Problem(
                "(build)",
                str(recipes_dir),
                "no recipes folder: run components/build.py first",
                "layout",
            )
        ]
    files = sorted(p for p in recipes_dir.iterdir() if p.suffix in RECIPE_SUFFIXES and p.is_file())
    if not files:
        return [Problem("(build)", str(recipes_dir), "no recipe files", "layout")]
    problems: list[Problem] = []
    loaded: list[tuple[str, dict[str, Any]]] = []
    for path in files:
        try:
            data = load_recipe(path)
        except ValueError as exc:
            problems.append(Problem(path.name, "", str(exc), "recipe"))
            continue
        loaded.append((path.name, data))
        for label, schema in (schemas or {}).items():
            problems += schema_problems(data, schema, recipe_name=path.name, label=label)
    keys = runtime_config_keys() if config_keys is None else config_keys
    problems += project_problems(build_dir, loaded, config_keys=keys, runtime_component=runtime_component)
    return problems


# --------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.validate",
        description="Check a Greengrass build folder (recipes/ + artifacts/<Name>/<Version>/) against "
        "both official recipe schemas and the project's own rules: recipe variables resolve, artifact "
        "files exist, dependency ranges are met, the runtime's configuration keys match RuntimeConfig.",
        epilog="Exit status: 0 no problems, 1 problems found (one per line), 2 cannot run.",
    )
    parser.add_argument(
        "build_dir",
        nargs="?",
        type=Path,
        default=Path("greengrass-build"),
        help="build output folder (default: %(default)s)",
    )
    parser.add_argument(
        "--schemas",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"folder with {' and '.join(SCHEMA_FILES.values())} "
        "(default: ../shared/greengrass/schemas beside the repository)",
    )
    parser.add_argument(
        "--require-schemas",
        action="store_true",
        help="fail instead of skipping the schema checks when the schemas are absent",
    )
    parser.add_argument(
        "--runtime-component",
        default=RUNTIME_COMPONENT,
        metavar="NAME",
        help="component whose DefaultConfiguration must mirror RuntimeConfig (default: %(default)s)",
    )
    return parser


def resolve_schemas(schema_dir: Path | None, *, required: bool) -> dict[str, dict[str, Any]] | None:
    """Load the schemas, or ``None`` (with a note on stderr) when they are absent and not required.

    Raises:
        FileNotFoundError: when ``required`` and a schema file is missing.
    """
    folder = schema_dir or default_schema_dir()
    try:
        return load_schemas(folder)
    except FileNotFoundError as exc:
        if required or schema_dir is not None:
            raise
        print(f"note: {exc}; schema checks skipped (project checks still run)", file=sys.stderr)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Validate a build folder; print one line per problem."""
    args = _parser().parse_args(argv)
    try:
        schemas = resolve_schemas(args.schemas, required=args.require_schemas)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problems = validate_build(args.build_dir, schemas=schemas, runtime_component=args.runtime_component)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) in {args.build_dir}", file=sys.stderr)
        return 1
    checked = "both schemas and project checks" if schemas else "project checks"
    print(f"{args.build_dir}: OK ({checked})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
