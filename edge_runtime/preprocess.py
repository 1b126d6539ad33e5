"""The one preprocessing definition shared by training and the edge.

A model only works on the device if the device feeds it tensors built exactly
as in training. So there is one serialisable :class:`PreprocessSpec` (stored
in every model bundle's manifest) and one numpy/OpenCV implementation,
:func:`preprocess`, which ``training/`` imports instead of re-implementing it.
No torch here: this module runs on the edge box.

Input is the decoder's output: a 2-D float32 grey image scaled to [0, 1] with
1 = bright (MONOCHROME2 convention). Output is one sample (no batch axis) in
the spec's layout and dtype.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import cv2
import numpy as np

from .errors import ModelBundleError, UnsupportedImage

__all__ = ["PreprocessSpec", "preprocess", "resize_grey"]

ResizeMode = Literal["stretch", "letterbox", "center_crop"]
Interpolation = Literal["area", "linear", "cubic", "nearest"]
Layout = Literal["NCHW", "NHWC"]

_CV2_INTERP = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}


@dataclass(frozen=True)
class PreprocessSpec:
    """How a decoded grey image becomes a model input tensor.

    Attributes:
        height: Output rows.
        width: Output columns.
        resize: ``stretch`` ignores the aspect ratio (what the Kermany 224 px
            training set did), ``letterbox`` keeps it and pads with black,
            ``center_crop`` scales the short side and crops the long one.
        interpolation: OpenCV interpolation; ``area`` is right for shrinking.
        quantize_8bit: Round intensities to 256 levels after resizing, so a
            12/16-bit DICOM looks like the 8-bit JPEGs a model was trained on.
        mean: Per-channel mean subtracted from [0, 1] intensities (one value
            is broadcast to every channel).
        std: Per-channel divisor applied after the mean.
        channels: 1, or 3 (the grey plane repeated, for ImageNet backbones).
        layout: ``NCHW`` (ONNX/PyTorch) or ``NHWC`` (TFLite).
        dtype: Output dtype; the backend quantizes if its model wants integers.
    """

    height: int = 224
    width: int = 224
    resize: ResizeMode = "stretch"
    interpolation: Interpolation = "area"
    quantize_8bit: bool = True
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    channels: int = 3
    layout: Layout = "NCHW"
    dtype: Literal["float32"] = "float32"
    version: int = field(default=1)

    def __post_init__(self) -> None:
        # Keep the dataclass hashable and its hash stable whatever sequence type was passed.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        problems = []
        if self.height < 1 or self.width < 1:
            problems.append(f"size must be positive, got {self.height}x{self.width}")
        if self.resize not in ("stretch", "letterbox", "center_crop"):
            problems.append(f"unknown resize mode {self.resize!r}")
        if self.interpolation not in _CV2_INTERP:
            problems.append(f"unknown interpolation {self.interpolation!r}")
        if self.channels not in (1, 3):
            problems.append(f"channels must be 1 or 3, got {self.channels}")
        if self.layout not in ("NCHW", "NHWC"):
            problems.append(f"layout must be NCHW or NHWC, got {self.layout!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, self.channels):
                problems.append(f"{name} needs 1 or {self.channels} values, got {len(values)}")
        if any(s == 0 for s in self.std):
            problems.append("std must not contain 0")
        if problems:
            raise ModelBundleError(
                "Invalid preprocessing spec: " + "; ".join(problems),
                action="Repackage the model bundle with a valid preprocessing section.",
            )

    # -- serialisation ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelBundleError(
                f"Unknown preprocessing keys {unknown}; known keys are {sorted(known)}.",
                action="The bundle was made by a newer trainer; update the edge runtime.",
            )
        values = dict(data)
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    @property
    def sha256(self) -> str:
        """Hash of the canonical JSON form: results say which preprocessing produced them."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        if self.layout == "NCHW":
            return (self.channels, self.height, self.width)
        return (self.height, self.width, self.channels)


def resize_grey(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Resize a 2-D float32 image to the spec's size with its resize mode."""
    rows, cols = image.shape
    interp = _CV2_INTERP[spec.interpolation]
    if spec.resize == "stretch":
        return cv2.resize(image, (spec.width, spec.height), interpolation=interp)
    if spec.resize == "letterbox":
        scale = min(spec.height / rows, spec.width / cols)
    else:  # center_crop
        scale = max(spec.height / rows, spec.width / cols)
    new_rows = max(1, round(rows * scale))
    new_cols = max(1, round(cols * scale))
    scaled = cv2.resize(image, (new_cols, new_rows), interpolation=interp)
    out = np.zeros((spec.height, spec.width), dtype=np.float32)
    if spec.resize == "letterbox":
        top, left = (spec.height - new_rows) // 2, (spec.width - new_cols) // 2
        out[top : top + new_rows, left : left + new_cols] = scaled
    else:
        top, left = (new_rows - spec.height) // 2, (new_cols - spec.width) // 2
        out[:] = scaled[top : top + spec.height, left : left + spec.width]
    return out


def preprocess(image: np.ndarray, spec: PreprocessSpec, out: np.ndarray | None = None) -> np.ndarray:
    """Turn one decoded grey image into one model input sample.

    Args:
        image: 2-D array, intensities in [0, 1], 1 = bright.
        spec: The model bundle's preprocessing spec.
        out: Optional preallocated array of ``spec.sample_shape`` to fill.

    Returns:
        ``spec.sample_shape`` float32 array (``out`` when given).
    """
    if image.ndim != 2:
        raise UnsupportedImage(f"Preprocessing expects a 2-D grey image, got shape {image.shape}.")
    if image.size == 0:
        raise UnsupportedImage("The image has no pixels.")
    grey = np.asarray(image, dtype=np.float32)
    grey = resize_grey(grey, spec)
    # NaN/inf can come from float DICOM pixel data; they must not reach the model.
    np.nan_to_num(grey, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
    np.clip(grey, 0.0, 1.0, out=grey)
    if spec.quantize_8bit:
        np.multiply(grey, 255.0, out=grey)
        np.rint(grey, out=grey)
        np.divide(grey, 255.0, out=grey)
    if out is None:
        out = np.empty(spec.sample_shape, dtype=np.float32)
    mean = np.broadcast_to(np.asarray(spec.mean, dtype=np.float32), (spec.channels,))
    std = np.broadcast_to(np.asarray(spec.std, dtype=np.float32), (spec.channels,))
    for c in range(spec.channels):
        plane = out[c] if spec.layout == "NCHW" else out[..., c]
        np.subtract(grey, mean[c], out=plane)
        np.divide(plane, std[c], out=plane)
    return out
