"""Feeding a LiteRT interpreter and reading it back: numpy only, for both LiteRT exports.

The PyTorch route's export runs in ``.venv-tflite`` (torch, litert-torch), the Keras route's in
``.venv-keras`` (TensorFlow); both check their INT8 file by running it, and must quantize its input
as the edge's LiteRT backend does (round to nearest, clip to the integer type) and dequantize its
outputs the same way, or the check would judge a different computation from the one boxes run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["dequantized", "quantized_input"]


def quantized_input(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """``x`` (float32) as the input tensor ``detail`` takes it: quantized when the tensor is integer."""
    if np.issubdtype(detail["dtype"], np.integer):
        scale, zero = detail["quantization"]
        info = np.iinfo(detail["dtype"])
        x = np.clip(np.rint(x / scale + zero), info.min, info.max).astype(detail["dtype"])
    return np.ascontiguousarray(x)


def dequantized(interpreter: Any, detail: dict[str, Any]) -> np.ndarray:
    """The output tensor ``detail`` after ``invoke()``, as float32 (dequantized when it is integer)."""
    y = interpreter.get_tensor(detail["index"]).copy()
    if np.issubdtype(y.dtype, np.integer):
        scale, zero = detail["quantization"]
        y = (y.astype(np.float32) - zero) * scale
    return np.asarray(y, dtype=np.float32)
