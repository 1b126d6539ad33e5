"""The backend seam: one small interface in front of every inference engine.

A backend loads the model file the bundle names for it, checks that the
model's declared input agrees with the manifest (a float64 or mis-shaped
input passes silently in some engines, so we refuse it at load), and maps a
float32 batch in the spec's layout to the model's raw output. Where the
model also computes a heat-map (``output.heatmap`` in the manifest, e.g. a
class-activation map), :meth:`Backend.infer_outputs` returns it from the
same engine run: a scan is never run twice to explain it. Likewise the pooled
features the out-of-distribution check reads (``output.features``) come from that run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..bundle import ModelBundle

__all__ = ["Backend", "BackendOutput"]


@dataclass(frozen=True)
class BackendOutput:
    """Everything one engine run returns for a batch."""

    #: ``(N, K)`` float32: the model's first output (probabilities or scores).
    scores: np.ndarray
    #: ``(N, K, h, w)`` float32 per-class maps on the model's grid, or None when the model
    #: file has no heat-map output.
    heatmap: np.ndarray | None = None
    #: ``(N, width)`` float32 pooled stage-end activations (``manifest.output.features``), or
    #: None when the manifest names no features output for this backend's file.
    features: np.ndarray | None = None


class Backend(Protocol):
    """An inference engine wrapped for the runtime."""

    #: Registry name, e.g. ``onnxruntime``.
    name: str

    def load(self, bundle: ModelBundle) -> None:
        """Load and check the bundle's model file for this backend."""
        ...

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch (N, ...) float32 and return the first output (N, K) float32."""
        ...

    def infer_outputs(self, batch: np.ndarray) -> BackendOutput:
        """Run one batch once: the scores and, where the model has them, the heat-map and features."""
        ...

    def close(self) -> None:
        """Release the engine's resources."""
        ...
