"""The backend seam: one small interface in front of every inference engine.

A backend loads the model file the bundle names for it, checks that the
model's declared input agrees with the manifest (a float64 or mis-shaped
input passes silently in some engines, so we refuse it at load), and maps a
float32 batch in the spec's layout to the model's raw output.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..bundle import ModelBundle

__all__ = ["Backend"]


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

    def close(self) -> None:
        """Release the engine's resources."""
        ...
