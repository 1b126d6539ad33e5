"""Azure IoT Edge deployment manifests and container images for the edge runtime.

The runtime also ships as two Azure IoT Edge modules, built from the same source of truth as
the Greengrass components (``recipes/`` and ``pyproject.toml``), so the two hosts can never
disagree about a default:

* ``HealthDiagEdgeInference``: the runtime image (``runtime.Dockerfile``); its module twin's desired
  properties are the Greengrass recipe's ``DefaultConfiguration`` (same keys, same validation).
* ``PneumoniaCXRModel``: one model version as its own image (``model.Dockerfile``), as the model is
  its own Greengrass component, so a model update never rebuilds the runtime image.

``python -m components.azure --out DIR`` writes ``DIR/deployment.json`` (a whole deployment) and
``DIR/model-<version>.layered.json`` (a model roll-out on its own), each checked before it is
written. Modules: :mod:`.manifest` builds, :mod:`.routes` and :mod:`.limits` make and check the
parts with rules of their own, :mod:`.checks` checks whole manifests. See docs/azure-iot-edge.md.
"""

from __future__ import annotations

from components.azure.checks import check_deployment, check_layered, load_schemas
from components.azure.manifest import ManifestOptions, Manifests, build_manifests
from components.azure.problems import ManifestError, Problem

__all__ = [
    "ManifestError",
    "ManifestOptions",
    "Manifests",
    "Problem",
    "build_manifests",
    "check_deployment",
    "check_layered",
    "load_schemas",
]
