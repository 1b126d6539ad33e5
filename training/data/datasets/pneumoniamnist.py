"""Reader for the PneumoniaMNIST ``.npz`` (images held in memory; its own train/val/test)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from ..images import Item
from .base import _NPZ_CLASSES, _NPZ_SPLITS, NPZ, _Source
from .registry import _detect


@lru_cache(maxsize=4)
def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def read(root: Path) -> _Source:
    if root.is_dir():
        kind, root = _detect(root)
        if kind != NPZ:
            raise ValueError(f"{root} holds no .npz file.")
    arrays = _npz_arrays(root)
    missing = [f"{s}_{k}" for s in _NPZ_SPLITS for k in ("images", "labels") if f"{s}_{k}" not in arrays]
    if missing:
        raise ValueError(f"{root} lacks the PneumoniaMNIST arrays {', '.join(missing)}.")
    splits: dict[str, list[Item]] = {}
    for split in _NPZ_SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].reshape(-1)
        if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
            raise ValueError(f"{root}: {split}_images must be (N, H, W) uint8 matching {split}_labels.")
        items = []
        for index in range(len(images)):
            # Exactly what decode_file gives for an 8-bit grey PNG of the same pixels.
            grey = images[index].astype(np.float32) / np.float32(255.0)
            grey.setflags(write=False)
            key = f"{split}/{index}"
            items.append(Item(path=root / key, label=int(labels[index]), patient=key, image=grey))
        splits[split] = items
    return _Source(NPZ, root, root.stem, _NPZ_CLASSES, splits)
