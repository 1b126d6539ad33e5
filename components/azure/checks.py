"""Check IoT Edge manifests before IoT Hub sees them: the official schemas, then what they miss.

IoT Hub takes many deployments that only fail on the device (see :mod:`components.azure.limits`
and :mod:`components.azure.routes`); on top of those limits this checks what only this project
knows: the runtime accepts its twin, keeps its data on the host folder, and loads the bundle the
model module copies.

Schemas (``../shared/azure/schemas``, draft-04, read in place, never copied into the repository):

* a whole deployment: ``azure-iot-edge-deployment-2.0.json`` on the manifest, then
  ``azure-iot-edgeagent-deployment-1.1.json`` and ``azure-iot-edgehub-deployment-1.2.json`` on the
  ``$edgeAgent`` and ``$edgeHub`` twins (they pin schemaVersion 1.1 / 1.2 and know the hub's newer
  keys);
* a layered deployment: no schema covers one whole (its keys are twin *paths* such as
  ``properties.desired.modules.X``, which all of them refuse), so each module it sets is checked
  against the edgeAgent schema's definition of a module, and the runtime twin it changes is checked
  merged onto the base deployment's.

``azure-iot-edge-deployment-template-4.0.json`` is for deployment *templates* (``${MODULES.x}``
placeholders, createOptions as objects), which this project does not write.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from jsonschema import Draft4Validator

from components import validate
from components.azure.limits import create_options_problems, image_problems, twin_problems
from components.azure.manifest import (
    DATA_MOUNT,
    DEVICE_ID_PLACEHOLDER,
    MODEL_MODULE,
    MODELS_MOUNT,
    RUNTIME_MODULE,
)
from components.azure.problems import Problem
from components.azure.routes import route_problems
from edge_runtime.config import RuntimeConfig
from edge_runtime.errors import ConfigError

__all__ = [
    "SCHEMA_FILES",
    "Problem",
    "check_deployment",
    "check_layered",
    "default_schema_dir",
    "load_schemas",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILES = {
    "deployment": "azure-iot-edge-deployment-2.0.json",
    "edgeAgent": "azure-iot-edgeagent-deployment-1.1.json",
    "edgeHub": "azure-iot-edgehub-deployment-1.2.json",
}
#: Below this, results would not survive a weekend's outage in edgeHub's store.
MIN_STORE_AND_FORWARD_SECONDS = 3 * 24 * 3600
#: The runtime's FHIR output by default: refused upstream even while the twin turns it off.
DEFAULT_FHIR_OUTPUT = "fhir"
#: Settings whose paths must be on the host folder (else they vanish with the container).
_DATA_PATHS = (
    ("Inbox", "Path"),
    ("Inbox", "QuarantinePath"),
    ("Inbox", "ProcessedPath"),
    ("Journal", "Path"),
    ("Health", "File"),
    ("Reports", "Path"),
    ("Dicom", "SpoolPath"),
)
_MODULE_PATH = re.compile(r"properties\.desired\.modules\.(?P<name>[a-zA-Z0-9_-]+)")
_ROUTE_PATH = re.compile(r"properties\.desired\.routes\.(?P<name>[^.]+)")
_TWIN_PATH = re.compile(r"properties\.desired(?P<path>(?:\.[^.]+)*)")


def default_schema_dir() -> Path:
    """``../shared/azure/schemas`` beside the repository."""
    return REPO_ROOT.parent / "shared" / "azure" / "schemas"


def load_schemas(schema_dir: Path) -> dict[str, dict[str, Any]]:
    """The three schemas by label (``deployment``, ``edgeAgent``, ``edgeHub``).

    Raises:
        FileNotFoundError: naming the schema file that is missing.
    """
    return validate.read_schema_files(schema_dir, SCHEMA_FILES, "IoT Edge schema")


def _schema_problems(instance: Any, schema: Mapping[str, Any], manifest: str, label: str) -> list[Problem]:
    errors = sorted(
        Draft4Validator(schema).iter_errors(instance), key=lambda e: list(map(str, e.absolute_path))
    )
    return [
        Problem(manifest, "/".join(map(str, error.absolute_path)), error.message, f"schema:{label}")
        for error in errors
    ]


def module_schema(agent_schema: Mapping[str, Any]) -> dict[str, Any]:
    """The edgeAgent schema's definition of one module, standalone (its ``#/definitions`` kept)."""
    desired = agent_schema["properties"]["$edgeAgent"]["properties"]["properties.desired"]
    (module,) = desired["properties"]["modules"]["patternProperties"].values()
    return {**module, "definitions": agent_schema["definitions"]}


def _section(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = config.get(name)
    return section if isinstance(section, Mapping) else {}


def _config_problems(desired: Mapping[str, Any], where: str, manifest: str) -> list[Problem]:
    """The runtime accepts the twin as the module reads it, keeps its data on the host, finds its model."""
    config = copy.deepcopy(dict(desired))
    mqtt = config.get("Mqtt")
    if isinstance(mqtt, dict) and isinstance(mqtt.get("ClientId"), str):
        mqtt["ClientId"] = mqtt["ClientId"].replace(DEVICE_ID_PLACEHOLDER, "device-id")
    problems = []
    try:
        RuntimeConfig.from_mapping(config, source=f"{RUNTIME_MODULE}'s desired properties")
    except ConfigError as exc:
        message = f"the runtime would refuse it: {' '.join(str(exc).split())}"
        problems.append(Problem(manifest, where, message, "config"))
    for section, key in _DATA_PATHS:
        value = _section(config, section).get(key)
        if value and not PurePosixPath(str(value)).is_relative_to(DATA_MOUNT):
            message = f"{value} is not under {DATA_MOUNT} (the host folder): it would die with the container"
            problems.append(Problem(manifest, f"{where}.{section}.{key}", message, "config"))
    bundle = _section(config, "Model").get("BundlePath")
    if not bundle or PurePosixPath(str(bundle)).parent != PurePosixPath(MODELS_MOUNT):
        message = f"{bundle!r} is not a folder in {MODELS_MOUNT} (the model volume)"
        problems.append(Problem(manifest, f"{where}.Model.BundlePath", message, "config"))
    return problems


def _runtime_outputs(desired: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    """The runtime's outputs that are on, and the names its FHIR output has or has by default."""
    azure = _section(desired, "Azure")
    outputs = {str(azure[k]) for k in ("ResultsOutput", "UrgentOutput", "FhirOutput") if azure.get(k)}
    return outputs, {DEFAULT_FHIR_OUTPUT, *([str(azure["FhirOutput"])] if azure.get("FhirOutput") else [])}


def _model_version_problems(
    desired: Mapping[str, Any], model: Mapping[str, Any] | None, manifest: str
) -> list[Problem]:
    """The runtime's ``Model.BundlePath`` is the version the model module's image copies."""
    if model is None:
        return [
            Problem(manifest, f"$edgeAgent.modules.{MODEL_MODULE}", "the model module is missing", "layout")
        ]
    tag = str(model.get("settings", {}).get("image", "")).rsplit(":", 1)[-1]
    path = str(_section(desired, "Model").get("BundlePath", ""))
    if path.endswith(f"-{tag}"):
        return []
    message = f"{path} is not the version {MODEL_MODULE}'s image copies ({tag})"
    return [Problem(manifest, f"{RUNTIME_MODULE}.Model.BundlePath", message, "layered")]


def check_deployment(
    manifest: Mapping[str, Any],
    *,
    schemas: Mapping[str, Mapping[str, Any]] | None,
    external_modules: Iterable[str] = (),
    name: str = "deployment.json",
) -> list[Problem]:
    """Every problem in a whole deployment (``modulesContent`` with ``$edgeAgent``, ``$edgeHub``, twins).

    Args:
        manifest: the deployment.
        schemas: :func:`load_schemas`'s result; ``None`` skips the schema checks.
        external_modules: modules the routes may deliver to that another deployment provides.
        name: how problems name the manifest.
    """
    problems: list[Problem] = []
    content = manifest.get("modulesContent", {})
    if schemas:
        problems += _schema_problems(manifest, schemas["deployment"], name, "deployment")
        for twin in ("$edgeAgent", "$edgeHub"):
            problems += _schema_problems({twin: content.get(twin)}, schemas[twin[1:]], name, twin[1:])
    try:
        agent = content["$edgeAgent"]["properties.desired"]
        hub = content["$edgeHub"]["properties.desired"]
        desired = content[RUNTIME_MODULE]["properties.desired"]
        modules, system = dict(agent["modules"]), dict(agent["systemModules"])
    except (KeyError, TypeError) as exc:
        return [*problems, Problem(name, "modulesContent", f"missing {exc}", "layout")]

    for twin, body in content.items():
        problems += twin_problems(body.get("properties.desired"), f"{twin}.properties.desired", name)
    for module_name, module in [*system.items(), *modules.items()]:
        where = f"$edgeAgent.modules.{module_name}"
        problems += create_options_problems(module.get("settings", {}), f"{where}.settings", name)
        problems += image_problems(module, where, name)
    ttl = hub.get("storeAndForwardConfiguration", {}).get("timeToLiveSecs", 7200)
    if ttl < MIN_STORE_AND_FORWARD_SECONDS:
        message = f"timeToLiveSecs {ttl} would drop results during a multi-day IoT Hub outage"
        problems.append(Problem(name, "$edgeHub.storeAndForwardConfiguration", message, "route"))
    outputs, fhir = _runtime_outputs(desired)
    deployed = set(modules) | set(external_modules)
    problems += route_problems(
        hub.get("routes", {}),
        runtime=RUNTIME_MODULE,
        modules=deployed,
        outputs=outputs,
        fhir=fhir,
        manifest=name,
    )
    problems += _config_problems(desired, f"{RUNTIME_MODULE}.properties.desired", name)
    problems += _model_version_problems(desired, modules.get(MODEL_MODULE), name)
    return problems


def check_layered(
    layered: Mapping[str, Any],
    base: Mapping[str, Any],
    *,
    schemas: Mapping[str, Mapping[str, Any]] | None,
    external_modules: Iterable[str] = (),
    name: str = "layered.json",
) -> list[Problem]:
    """Every problem in a layered deployment of this project's kind, applied on top of ``base``.

    It may set whole modules (``properties.desired.modules.<Module>``), routes
    (``properties.desired.routes.<Name>``, checked merged with the base's: a layer must not be a way
    to send the FHIR output upstream) and paths in the runtime's twin
    (``properties.desired.<Section>.<Key>``); anything else is reported as not checkable.
    """
    content = layered.get("modulesContent")
    if not isinstance(content, Mapping):
        return [Problem(name, "modulesContent", "missing", "layout")]
    base_content = base["modulesContent"]
    modules = dict(base_content["$edgeAgent"]["properties.desired"]["modules"])
    desired = copy.deepcopy(base_content[RUNTIME_MODULE]["properties.desired"])
    routes = dict(base_content["$edgeHub"]["properties.desired"].get("routes", {}))
    schema = module_schema(schemas["edgeAgent"]) if schemas else None
    problems: list[Problem] = []
    for key, module in content.get("$edgeAgent", {}).items():
        where = f"$edgeAgent.{key}"
        match = _MODULE_PATH.fullmatch(key)
        if match is None:
            problems.append(Problem(name, where, "not a properties.desired.modules.<Module> path", "layered"))
            continue
        modules[match["name"]] = module
        if schema is not None:
            problems += [
                Problem(name, "/".join(filter(None, [where, p.where])), p.message, p.check)
                for p in _schema_problems(module, schema, name, "edgeAgent")
            ]
        problems += create_options_problems(module.get("settings", {}), f"{where}.settings", name)
        problems += image_problems(module, where, name)
    for key, value in content.get("$edgeHub", {}).items():
        match = _ROUTE_PATH.fullmatch(key)
        if match is None:
            problems.append(
                Problem(name, f"$edgeHub.{key}", "not a properties.desired.routes.<Name> path", "layered")
            )
            continue
        routes[match["name"]] = value
    for twin, body in content.items():
        if twin.startswith("$") and twin not in ("$edgeAgent", "$edgeHub"):
            problems.append(Problem(name, twin, "not a twin this check knows", "layered"))
        for key, value in body.items() if not twin.startswith("$") else ():
            match = _TWIN_PATH.fullmatch(key)
            if match is None or twin != RUNTIME_MODULE:
                message = f"only paths in {RUNTIME_MODULE}'s desired properties are checked"
                problems.append(Problem(name, f"{twin}.{key}", message, "layered"))
                continue
            desired = _with_path(desired, [p for p in match["path"].split(".") if p], value)
    outputs, fhir = _runtime_outputs(desired)
    deployed = set(modules) | set(external_modules)
    problems += route_problems(
        routes, runtime=RUNTIME_MODULE, modules=deployed, outputs=outputs, fhir=fhir, manifest=name
    )
    problems += twin_problems(desired, f"{RUNTIME_MODULE} (merged onto the base)", name)
    problems += _config_problems(desired, f"{RUNTIME_MODULE} (merged onto the base)", name)
    problems += _model_version_problems(desired, modules.get(MODEL_MODULE), name)
    return problems


def _with_path(document: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    """``document`` with ``value`` at ``path``, as IoT Hub merges a layered deployment's twin path."""
    if not path:
        return copy.deepcopy(value)
    node = document
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = copy.deepcopy(value)
    return document
