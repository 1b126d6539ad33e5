"""The ``keras-inputs.npz`` file: the model inputs handed from the main environment to ``.venv-keras``.

numpy only, so BOTH environments import it: :mod:`training.keras.dataset` (main environment: the
edge's decoder and OpenCV preprocessing) writes the file, :mod:`training.keras.train` (``.venv-keras``:
TensorFlow, no OpenCV, no torch) reads it.

Storage: with the spec's ``quantize_8bit`` (every shipped spec) a preprocessed sample is a
per-channel function of ONE 8-bit grey plane, so the file holds that plane as uint8 (``*_levels``,
``(views, N, H, W)``) plus the ``(channels, 256)`` float32 lookup table (``lut``) of
:class:`training.data.images.ImageCache`. ``lut[c][level]`` is bit for bit what
:func:`edge_runtime.preprocess.preprocess` writes (``ImageCache.build`` checks every image), so the
rebuilt float32 inputs are exact, at 1/12 of float32's size (1/6 of float16's, which would NOT be
exact: (level/255 - 0.5)/0.5 needs more than float16's 11 significant bits). Without
``quantize_8bit`` the samples are stored as float32 NHWC (``*_inputs``).

Keys: ``format``, ``layout`` (``NHWC``), ``spec`` (the JSON of the PreprocessSpec the split records),
``classes``, ``train_ids``/``val_ids`` (``split.json``'s item ids, row order), ``train_labels``/
``val_labels`` (int64), ``train_levels``/``val_levels`` + ``lut``, or ``train_inputs``/``val_inputs``.
View 0 of the training images is unaugmented, views 1.. are :class:`CXRDataset`'s augmented views.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["INPUTS_FORMAT", "KerasInputs", "read_inputs", "rebuild_nhwc"]

INPUTS_FORMAT = 1


def rebuild_nhwc(lut: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """``(..., H, W)`` uint8 grey levels -> ``(..., H, W, channels)`` float32 through the lookup table."""
    return np.stack([lut[c][levels] for c in range(lut.shape[0])], axis=-1)


class KerasInputs:
    """The arrays of a ``keras-inputs.npz`` (all loaded; they are small at training sizes)."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        if int(arrays["format"]) != INPUTS_FORMAT:
            raise ValueError(f"keras inputs format {int(arrays['format'])}, expected {INPUTS_FORMAT}")
        self.arrays = arrays
        self.spec: dict[str, Any] = json.loads(str(arrays["spec"]))
        self.classes = [str(c) for c in arrays["classes"]]
        self.train_labels = arrays["train_labels"].astype(np.int64)
        self.val_labels = arrays["val_labels"].astype(np.int64)

    @property
    def views(self) -> int:
        store = self.arrays.get("train_levels", self.arrays.get("train_inputs"))
        assert store is not None
        return int(store.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (int(self.spec["height"]), int(self.spec["width"]), int(self.spec["channels"]))

    def samples(self, split: str, view: int = 0, index: np.ndarray | slice | None = None) -> np.ndarray:
        """NHWC float32 model inputs of ``split`` (``train``/``val``), ``view``, rows ``index``."""
        rows = slice(None) if index is None else index
        if "lut" in self.arrays:
            return rebuild_nhwc(self.arrays["lut"], self.arrays[f"{split}_levels"][view][rows])
        return np.asarray(self.arrays[f"{split}_inputs"][view][rows], dtype=np.float32)


def read_inputs(path: str | Path) -> KerasInputs:
    """Load a ``keras-inputs.npz``."""
    with np.load(path, allow_pickle=False) as archive:
        return KerasInputs({name: archive[name] for name in archive.files})
