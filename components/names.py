"""The Greengrass component names and their artifacts' file names: defined here once.

Imported by the build and its checks (``components/``), the release command and the CDK stacks
(``cdk/``); a leaf, so any of them may import it without pulling in the others' dependencies.
"""

from __future__ import annotations

__all__ = ["MODEL_ARTIFACT", "MODEL_COMPONENT", "RUNTIME_ARTIFACT", "RUNTIME_COMPONENT"]

#: The runtime: the wheels of edge_runtime and its dependencies, and the service's lifecycle.
RUNTIME_COMPONENT = "com.healthdiag.EdgeInference"
#: One model version: the signed bundle, separately versioned from the runtime.
MODEL_COMPONENT = "com.healthdiag.model.PneumoniaCXR"
RUNTIME_ARTIFACT = "edge-runtime-wheels.zip"
MODEL_ARTIFACT = "pneumonia-cxr.zip"
