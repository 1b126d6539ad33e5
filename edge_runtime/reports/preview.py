"""The scan as a heat-map is drawn on it: shrunk once, where it is decoded.

Kept apart from :mod:`.heatmap` (which needs the conformance module's
scaling, and through it the backends and the bundle reader) so that the
decoder children can import it cheaply: they shrink each image here and hand
over the preview instead of the full-size pixels (:mod:`edge_runtime.prepare`).
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["fit_image"]


def fit_image(image: np.ndarray, max_side: int) -> np.ndarray:
    """The image as float32 [0, 1], shrunk (area filter) so its longer side is at most ``max_side``."""
    grey = np.asarray(image, dtype=np.float32)
    if grey.ndim != 2:
        raise ValueError(f"overlay needs a 2-D grey image, got shape {grey.shape}")
    # Decoders deliver [0, 1] already: clip (a full-size copy) only when something is outside.
    if grey.size and not (float(grey.min()) >= 0.0 and float(grey.max()) <= 1.0):
        grey = np.clip(grey, 0.0, 1.0)
    rows, cols = grey.shape
    scale = min(1.0, max_side / max(rows, cols))
    if scale < 1.0:
        size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
        grey = np.asarray(cv2.resize(grey, size, interpolation=cv2.INTER_AREA), dtype=np.float32)
        # The area filter's float sums can land one ulp outside [0, 1] (1.0000001, found by the fuzz
        # test); the shrunk copy is at most max_side square, so clipping it costs nothing.
        np.clip(grey, 0.0, 1.0, out=grey)
    return grey
