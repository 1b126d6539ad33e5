"""Build the IoT Edge deployment manifests from the Greengrass recipe and ``pyproject.toml``.

Why generated rather than kept by hand: the runtime module reads its twin's desired properties with
the keys and validation of the Greengrass component's ``DefaultConfiguration``, and the images are
tagged with the versions the Greengrass components carry. A hand-kept manifest would drift from
both; this one is rebuilt from them (``recipes/com.healthdiag.EdgeInference.yaml``, the project
version, the model bundle's ``manifest.json``).

What differs from the recipe, and why (docs/azure-iot-edge.md repeats it):

* ``accessControl`` and ``Greengrass`` are dropped (Greengrass IPC only), ``Azure`` is added
  (edgeHub outputs; the recipe may omit it, see ``validate.OTHER_HOST_SECTIONS``).
* ``Model.BundlePath`` is ``/models/<bundle>-<version>``: the model module copies its bundle into the
  shared volume under that name.
* ``Mqtt.Enabled`` is false: results go through edgeHub (``--mqtt-host`` turns a local broker on), and
  ``Mqtt.ClientId`` is ``edge-runtime-{deviceId}`` (the module fills in ``IOTEDGE_DEVICEID``).
* ``Azure.FhirOutput`` is empty unless a local consumer is named: the FHIR Bundle names the study, so
  it is only ever sent where a route takes it to a module on this box, never to IoT Hub.
* ``Dicom.Enabled`` follows ``--dicom`` (which also publishes the receiver's port).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components import build, validate
from components.azure.limits import create_options_settings
from components.azure.problems import ManifestError
from components.azure.routes import STORE_AND_FORWARD_SECONDS, runtime_routes
from edge_runtime.config import RuntimeConfig

__all__ = [
    "DATA_MOUNT",
    "DEVICE_ID_PLACEHOLDER",
    "MODELS_MOUNT",
    "MODELS_VOLUME",
    "MODEL_MODULE",
    "RUNTIME_MODULE",
    "ManifestOptions",
    "Manifests",
    "build_manifests",
    "bundle_identity",
    "desired_properties",
    "recipe_defaults",
]

RUNTIME_MODULE = "HealthDiagEdgeInference"
MODEL_MODULE = "PneumoniaCXRModel"
DEFAULT_REGISTRY = "healthdiag.azurecr.io"
RUNTIME_REPOSITORY = "healthdiag/edge-runtime"
MODEL_REPOSITORY = "healthdiag/model-pneumonia-cxr"
EDGE_AGENT_IMAGE = "mcr.microsoft.com/azureiotedge-agent:1.5"
EDGE_HUB_IMAGE = "mcr.microsoft.com/azureiotedge-hub:1.5"
EDGE_HUB_PORTS = (8883, 5671, 443)
#: The named volume the model module fills and the runtime reads (read-only).
MODELS_VOLUME = "healthdiag-models"
MODELS_MOUNT = "/models"
#: Where the recipe's default paths live (inbox, quarantine, state, reports): a host folder.
DATA_MOUNT = "/var/lib/healthdiag"
DEFAULT_HOST_DATA = "/srv/healthdiag"
#: edgeAgent's and edgeHub's stores on the host: in their containers they die with them (and with
#: them every message edgeHub still holds for IoT Hub), which ``iotedge check`` warns about.
DEFAULT_IOTEDGE_STORAGE = "/srv/iotedge"
SYSTEM_STORAGE = "/iotedge/storage"
DEVICE_ID_PLACEHOLDER = "{deviceId}"
#: Keep container logs bounded on a box nobody logs into (Docker's default never rotates).
LOG_CONFIG = {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "5"}}
_MODULE_NAME = re.compile(r"[A-Za-z0-9_-]+")
_DOCKER_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
#: edgeHub starts at 0; the model is copied into the volume before the runtime starts.
_STARTUP_ORDER = {MODEL_MODULE: 1, RUNTIME_MODULE: 2}


@dataclass(frozen=True)
class ManifestOptions:
    """What a site chooses; everything else comes from the recipe, pyproject and the bundle."""

    registry: str = DEFAULT_REGISTRY
    bundle: Path = build.DEFAULT_BUNDLE
    host_data: str = DEFAULT_HOST_DATA
    iotedge_storage: str = DEFAULT_IOTEDGE_STORAGE
    dicom: bool = False
    mqtt_host: str | None = None
    #: A module on this box that takes results, urgent results and FHIR Bundles on its inputs.
    local_consumer: str | None = None
    #: Its image, to deploy it here too; without one it must come from another (layered) deployment.
    local_consumer_image: str | None = None


@dataclass(frozen=True)
class Manifests:
    """The manifests for one set of options, and what the operator needs to know about them."""

    deployment: dict[str, Any]
    layered: dict[str, Any]
    runtime_image: str
    model_image: str
    model_version: str
    #: Modules the routes name that this deployment does not deploy.
    external_modules: tuple[str, ...] = field(default=())


# --------------------------------------------------------------------------------------------------
# Inputs


def _image(registry: str, repository: str, tag: str) -> str:
    if not _DOCKER_TAG.fullmatch(tag):
        raise ManifestError(f"{tag!r} cannot be a container image tag (letters, digits, '_', '.', '-').")
    registry = registry.rstrip("/")
    if not registry or any(ch.isspace() for ch in registry):
        raise ManifestError(f"Registry {registry!r} must be a host name such as {DEFAULT_REGISTRY}.")
    return f"{registry}/{repository}:{tag}"


def _host_folder(path: str, option: str) -> str:
    """An absolute host path: Docker reads a relative bind source as a volume name, ':' splits it."""
    if not path.startswith("/") or ":" in path or any(ch.isspace() for ch in path):
        raise ManifestError(f"{option} {path!r} must be an absolute host path without ':' or spaces.")
    return path.rstrip("/") or "/"


def bundle_identity(bundle: Path) -> tuple[str, str]:
    """The bundle's name and version, from its ``manifest.json`` (the model image's build verifies it)."""
    manifest = bundle / "manifest.json"
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        name, version = str(data["name"]), str(data["version"])
    except (OSError, ValueError, KeyError) as exc:
        raise ManifestError(
            f"Cannot read the model bundle's name and version from {manifest}: {exc}"
        ) from None
    if not _MODULE_NAME.fullmatch(name):
        raise ManifestError(f"{manifest}: bundle name {name!r} must be letters, digits, '-' and '_'.")
    try:
        validate.parse_version(version)
    except ValueError as exc:
        raise ManifestError(f"{manifest}: {exc}") from None
    return name, version


def bundle_path(name: str, version: str) -> str:
    """Where the model module puts this bundle in the shared volume, as the runtime sees it."""
    return f"{MODELS_MOUNT}/{name}-{version}"


def recipe_defaults() -> dict[str, Any]:
    """The runtime recipe's ``DefaultConfiguration``, rendered as the Greengrass build renders it."""
    _, version, _ = build.project_metadata()
    text = build.render_recipe(build.RUNTIME, version, build.DEFAULT_BUCKET)
    recipe = validate.load_recipe_text(text)
    config = validate.get_key(validate.get_key(recipe, "ComponentConfiguration"), "DefaultConfiguration")
    return copy.deepcopy(config)


def desired_properties(options: ManifestOptions, bundle_name: str, model_version: str) -> dict[str, Any]:
    """The runtime module twin's desired properties: the recipe's defaults with the documented changes."""
    desired = recipe_defaults()
    desired.pop(validate.ACCESS_CONTROL, None)
    desired.pop("Greengrass", None)
    desired["Azure"] = RuntimeConfig().to_pascal_dict()["Azure"]
    # Off by default in the runtime too; on only where a module on the box is routed to receive it.
    desired["Azure"]["FhirOutput"] = "fhir" if options.local_consumer else ""
    desired["Model"]["BundlePath"] = bundle_path(bundle_name, model_version)
    desired["Mqtt"]["Enabled"] = bool(options.mqtt_host)
    if options.mqtt_host:
        desired["Mqtt"]["Host"] = options.mqtt_host
    desired["Mqtt"]["ClientId"] = f"edge-runtime-{DEVICE_ID_PLACEHOLDER}"
    desired["Dicom"]["Enabled"] = options.dicom
    return desired


# --------------------------------------------------------------------------------------------------
# Pieces


def _hardened(host_config: dict[str, Any]) -> dict[str, Any]:
    """Docker host settings every module of ours gets: no capabilities, no privilege gain, bounded logs."""
    return {**host_config, "CapDrop": ["ALL"], "SecurityOpt": ["no-new-privileges"], "LogConfig": LOG_CONFIG}


def _runtime_module(options: ManifestOptions, image: str, version: str, dicom_port: int) -> dict[str, Any]:
    host_data = _host_folder(options.host_data, "--host-data")
    host: dict[str, Any] = {"Binds": [f"{MODELS_VOLUME}:{MODELS_MOUNT}:ro", f"{host_data}:{DATA_MOUNT}"]}
    create: dict[str, Any] = {}
    if options.dicom:
        port = f"{dicom_port}/tcp"
        host["PortBindings"] = {port: [{"HostPort": str(dicom_port)}]}
        create["ExposedPorts"] = {port: {}}
    create["HostConfig"] = _hardened(host)
    return _module(RUNTIME_MODULE, image, version, create)


def _model_module(image: str, version: str) -> dict[str, Any]:
    create = {"HostConfig": _hardened({"Binds": [f"{MODELS_VOLUME}:{MODELS_MOUNT}"]})}
    return _module(MODEL_MODULE, image, version, create)


def _module(name: str, image: str, version: str, create: dict[str, Any]) -> dict[str, Any]:
    """A module edgeAgent keeps running, in the order the runtime needs (model before runtime)."""
    module: dict[str, Any] = {
        "version": version,
        "type": "docker",
        "status": "running",
        "restartPolicy": "always",
        "settings": {"image": image, **create_options_settings(create, name)},
    }
    if name in _STARTUP_ORDER:
        module["startupOrder"] = _STARTUP_ORDER[name]
    return module


def _system_modules(storage: str) -> dict[str, Any]:
    env = {"storageFolder": {"value": SYSTEM_STORAGE}}
    ports = {f"{p}/tcp": [{"HostPort": str(p)}] for p in EDGE_HUB_PORTS}
    agent = {"HostConfig": {"Binds": [f"{storage}/edgeAgent:{SYSTEM_STORAGE}"]}}
    hub = {"HostConfig": {"PortBindings": ports, "Binds": [f"{storage}/edgeHub:{SYSTEM_STORAGE}"]}}
    return {
        "edgeAgent": {
            "type": "docker",
            "settings": {"image": EDGE_AGENT_IMAGE, **create_options_settings(agent, "edgeAgent")},
            "env": env,
        },
        "edgeHub": {
            "type": "docker",
            "status": "running",
            "restartPolicy": "always",
            "startupOrder": 0,
            "settings": {"image": EDGE_HUB_IMAGE, **create_options_settings(hub, "edgeHub")},
            "env": env,
        },
    }


def _registry_credentials(registry: str) -> dict[str, Any]:
    """Placeholders, filled at deploy time (envsubst): credentials never live in the repository."""
    name = re.sub(r"[^A-Za-z0-9]", "", registry.split("/")[0]) or "registry"
    return {
        name: {
            "username": "$CONTAINER_REGISTRY_USERNAME",
            "password": "$CONTAINER_REGISTRY_PASSWORD",
            "address": registry.split("/")[0],
        }
    }


def _local_consumer(options: ManifestOptions) -> str | None:
    consumer = options.local_consumer
    if consumer is None:
        if options.local_consumer_image:
            raise ManifestError("A local consumer image needs the consumer's module name (--local-consumer).")
        return None
    if not _MODULE_NAME.fullmatch(consumer) or consumer in (RUNTIME_MODULE, MODEL_MODULE):
        raise ManifestError(
            f"--local-consumer {consumer!r}: name another module (letters, digits, '-' and '_')."
        )
    return consumer


# --------------------------------------------------------------------------------------------------
# Manifests


def build_manifests(options: ManifestOptions) -> Manifests:
    """The whole deployment and the layered model roll-out for ``options`` (not yet checked).

    Raises:
        ManifestError: an input that cannot make a manifest (bundle, registry, names, sizes).
    """
    _, runtime_version, _ = build.project_metadata()
    bundle_name, model_version = bundle_identity(options.bundle)
    runtime_image = _image(options.registry, RUNTIME_REPOSITORY, runtime_version)
    model_image = _image(options.registry, MODEL_REPOSITORY, model_version)
    consumer = _local_consumer(options)
    desired = desired_properties(options, bundle_name, model_version)

    modules = {
        MODEL_MODULE: _model_module(model_image, model_version),
        RUNTIME_MODULE: _runtime_module(options, runtime_image, runtime_version, desired["Dicom"]["Port"]),
    }
    external: tuple[str, ...] = ()
    if consumer and options.local_consumer_image:
        modules[consumer] = _module(consumer, options.local_consumer_image, "1.0", {})
    elif consumer:
        external = (consumer,)

    agent = {
        "schemaVersion": "1.1",
        "runtime": {
            "type": "docker",
            "settings": {"registryCredentials": _registry_credentials(options.registry)},
        },
        "systemModules": _system_modules(_host_folder(options.iotedge_storage, "--iotedge-storage")),
        "modules": modules,
    }
    hub = {
        "schemaVersion": "1.2",
        "routes": runtime_routes(RUNTIME_MODULE, desired["Azure"], consumer),
        "storeAndForwardConfiguration": {"timeToLiveSecs": STORE_AND_FORWARD_SECONDS},
    }
    deployment = {
        "modulesContent": {
            "$edgeAgent": {"properties.desired": agent},
            "$edgeHub": {"properties.desired": hub},
            RUNTIME_MODULE: {"properties.desired": desired},
        }
    }
    layered = {
        "modulesContent": {
            "$edgeAgent": {f"properties.desired.modules.{MODEL_MODULE}": modules[MODEL_MODULE]},
            RUNTIME_MODULE: {"properties.desired.Model.BundlePath": desired["Model"]["BundlePath"]},
        }
    }
    return Manifests(deployment, layered, runtime_image, model_image, model_version, external)
