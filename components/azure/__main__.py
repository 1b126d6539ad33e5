"""``python -m components.azure --out DIR``: write the IoT Edge deployment manifests, checked.

Nothing is written unless every manifest passes :mod:`components.azure.checks`: a manifest that IoT
Hub accepts but the device cannot run costs a site visit, a refused one costs a rerun.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components import build
from components.azure.checks import (
    SCHEMA_FILES,
    check_deployment,
    check_layered,
    default_schema_dir,
    load_schemas,
)
from components.azure.manifest import (
    DEFAULT_HOST_DATA,
    DEFAULT_IOTEDGE_STORAGE,
    DEFAULT_REGISTRY,
    MODEL_MODULE,
    RUNTIME_MODULE,
    ManifestOptions,
    build_manifests,
)
from components.azure.problems import ManifestError
from components.azure.routes import STORE_AND_FORWARD_SECONDS

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.azure",
        description=(
            "Write Azure IoT Edge deployment manifests for the edge runtime, generated from the same "
            "sources as the Greengrass components (the runtime recipe's DefaultConfiguration, the "
            "version in pyproject.toml, the model bundle's manifest.json): DIR/deployment.json (a whole "
            f"deployment: edgeAgent, edgeHub, the modules {RUNTIME_MODULE} and {MODEL_MODULE}, the "
            "routes and the runtime's desired properties) and DIR/model-<version>.layered.json (a "
            "layered deployment that rolls that model version out on its own). Both are checked against "
            "the IoT Edge JSON schemas and the limits the schemas lack before anything is written."
        ),
        epilog=(
            "Deploy: az iot edge set-modules --hub-name HUB --device-id DEVICE --content DIR/deployment.json "
            "(after filling in $CONTAINER_REGISTRY_USERNAME/$CONTAINER_REGISTRY_PASSWORD, e.g. with "
            "envsubst). See docs/azure-iot-edge.md. Exit status: 0 written, 1 problems found (one per "
            "line, nothing written), 2 cannot run."
        ),
    )
    parser.add_argument("--out", type=Path, metavar="DIR", help="folder to write the manifests to")
    parser.add_argument(
        "--registry",
        default=DEFAULT_REGISTRY,
        help="container registry the images are pushed to (default: %(default)s, a placeholder)",
    )
    parser.add_argument(
        "--bundle",
        type=Path,
        default=build.DEFAULT_BUNDLE,
        metavar="DIR",
        help="model bundle whose name and version the model module carries (default: the bundled model)",
    )
    parser.add_argument(
        "--host-data",
        default=DEFAULT_HOST_DATA,
        metavar="DIR",
        help="host folder mounted at /var/lib/healthdiag: inbox, quarantine, state, reports "
        "(default: %(default)s; it must exist and belong to uid 10001)",
    )
    parser.add_argument(
        "--iotedge-storage",
        default=DEFAULT_IOTEDGE_STORAGE,
        metavar="DIR",
        help="host folder for edgeAgent's and edgeHub's stores, DIR/edgeAgent and DIR/edgeHub, so "
        "messages waiting for IoT Hub survive a container update (default: %(default)s)",
    )
    parser.add_argument(
        "--dicom",
        action="store_true",
        help="turn the DICOM receiver on (Dicom.Enabled) and publish its port (Dicom.Port, 11112)",
    )
    parser.add_argument(
        "--mqtt-host",
        metavar="HOST",
        help="also publish results to the MQTT broker at HOST (Mqtt.Enabled; default: off, results "
        "go through edgeHub only)",
    )
    parser.add_argument(
        "--local-consumer",
        metavar="MODULE[=IMAGE]",
        help="route results, urgent results and FHIR Bundles to MODULE's inputs of the same names on "
        "this device (the FHIR output is off without it: it never goes to IoT Hub); with =IMAGE the "
        "module is deployed too, without it another deployment must provide it",
    )
    parser.add_argument(
        "--schemas",
        type=Path,
        metavar="DIR",
        help=f"folder with {', '.join(SCHEMA_FILES.values())} (default: ../shared/azure/schemas "
        "beside the repository; the schema checks are skipped with a note when it is absent)",
    )
    parser.add_argument(
        "--require-schemas", action="store_true", help="fail instead of skipping the schema checks"
    )
    parser.add_argument(
        "--print-images",
        action="store_true",
        help="print RUNTIME_IMAGE=... and MODEL_IMAGE=... (the tags to build and push) and exit",
    )
    return parser


def _options(args: argparse.Namespace) -> ManifestOptions:
    consumer, _, image = (args.local_consumer or "").partition("=")
    return ManifestOptions(
        registry=args.registry,
        bundle=args.bundle,
        host_data=args.host_data,
        iotedge_storage=args.iotedge_storage,
        dicom=args.dicom,
        mqtt_host=args.mqtt_host,
        local_consumer=consumer or None,
        local_consumer_image=image or None,
    )


def _schemas(args: argparse.Namespace) -> dict[str, dict[str, Any]] | None:
    """The schemas, or None with a note when the default folder is absent (a named one must exist)."""
    try:
        return load_schemas(args.schemas or default_schema_dir())
    except FileNotFoundError as exc:
        if args.require_schemas or args.schemas is not None:
            raise
        print(f"note: {exc}; schema checks skipped (the other checks still run)", file=sys.stderr)
        return None


def _write(path: Path, manifest: dict[str, Any]) -> None:
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Build, check and write the manifests; print one line per problem."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.out is None and not args.print_images:
        parser.error("--out DIR is required (or --print-images)")
    try:
        manifests = build_manifests(_options(args))
        if args.print_images:
            print(f"RUNTIME_IMAGE={manifests.runtime_image}\nMODEL_IMAGE={manifests.model_image}")
            return 0
        schemas = _schemas(args)
    except (ManifestError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    layered_name = f"model-{manifests.model_version}.layered.json"
    problems = check_deployment(
        manifests.deployment, schemas=schemas, external_modules=manifests.external_modules
    )
    problems += check_layered(
        manifests.layered,
        manifests.deployment,
        schemas=schemas,
        external_modules=manifests.external_modules,
        name=layered_name,
    )
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s); nothing written", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    _write(args.out / "deployment.json", manifests.deployment)
    _write(args.out / layered_name, manifests.layered)
    checked = "schemas and checks" if schemas else "checks (no schemas)"
    print(f"{args.out / 'deployment.json'}: OK ({checked})")
    print(f"{args.out / layered_name}: OK ({checked})")
    print(f"images: {manifests.runtime_image} {manifests.model_image}")
    print(f"edgeHub keeps undelivered messages {STORE_AND_FORWARD_SECONDS // 86400} days")
    for module in manifests.external_modules:
        print(
            f"note: the routes deliver to {module}, which this deployment does not deploy: deploy it "
            f"here (--local-consumer {module}=IMAGE) or in a layered deployment"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
