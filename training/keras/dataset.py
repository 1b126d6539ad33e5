"""The Keras route's data step (MAIN environment): split + edge preprocessing -> ``keras-inputs.npz``.

TensorFlow and torch never share a process or a virtual environment, and ``.venv-keras`` has
neither OpenCV nor the edge runtime's decoder. So everything that touches images runs here, with
exactly the code the PyTorch trainer (:func:`training.model.train.train`) uses:

* the split: an existing ``split.json`` for the same data, seed, validation fraction and limit is
  reused, else :func:`~training.data.datasets.open_dataset` carves the patient-disjoint validation
  split from the official TRAINING split, and :func:`~training.data.datasets.write_split` writes it
  (the official test split is never read);
* the spec: :func:`~training.data.datasets.spec_for_size`, recorded in ``split.json`` as the
  PyTorch route records it (the bundle's spec; its ``layout`` is the edge model's, NCHW);
* the inputs: :class:`~training.data.images.CXRDataset` + :class:`~training.data.images.ImageCache`
  (decode with the edge's decoder, augment, ``edge_runtime.preprocess``; every cached image is
  checked to rebuild bit-identically), written as uint8 levels + the lookup table
  (:mod:`training.keras.inputs`), which :mod:`training.keras.train` turns into NHWC float32.

    .venv/bin/python -m training.keras.dataset --data ../shared/data/cxr/kermany_pneumonia_224 \\
        --out runs/keras --size 224
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.preprocess import PreprocessSpec

from ..data.datasets import open_run_split
from ..data.images import Augmentation, CXRDataset, ImageCache
from ..run_files import KERAS_INPUTS_NAME
from .inputs import INPUTS_FORMAT

__all__ = ["write_keras_inputs"]


def write_keras_inputs(
    data_root: str | Path,
    out_dir: str | Path,
    *,
    size: int | None = None,
    spec: PreprocessSpec | None = None,
    val_fraction: float = 0.15,
    seed: int = 2018,
    aug_views: int = 1,
    augmentation: Augmentation | None = None,
    limit_per_class: int | None = None,
) -> dict[str, Any]:
    """Write ``split.json`` and ``keras-inputs.npz`` into ``out_dir``; returns a short description.

    The arguments mean what :class:`training.model.train.TrainConfig`'s do.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset, spec = open_run_split(
        out,
        data_root,
        spec or PreprocessSpec(),
        size=size,
        seed=seed,
        val_fraction=val_fraction,
        limit_per_class=limit_per_class,
    )
    train_items, val_items = list(dataset.train), list(dataset.val)
    classes = dataset.classes

    t0 = time.monotonic()
    train_ds = CXRDataset(train_items, spec, augment=True, seed=seed, augmentation=augmentation)
    val_ds = CXRDataset(val_items, spec)
    train_cache = ImageCache.build(train_ds, 1 + aug_views)
    val_cache = ImageCache.build(val_ds, 1)
    arrays: dict[str, np.ndarray] = {
        "format": np.array(INPUTS_FORMAT),
        "layout": np.array("NHWC"),
        "spec": np.array(json.dumps(spec.to_dict())),
        "classes": np.array(list(classes)),
        "train_ids": np.array([dataset.item_id(item) for item in train_items]),
        "val_ids": np.array([dataset.item_id(item) for item in val_items]),
        "train_labels": train_cache.labels,
        "val_labels": val_cache.labels,
    }
    storage = "uint8 levels + lookup table"
    if train_cache.levels is not None and val_cache.levels is not None and train_cache.lut is not None:
        arrays.update(train_levels=train_cache.levels, val_levels=val_cache.levels, lut=train_cache.lut)
    else:  # no 8-bit quantization: the samples themselves, float32 (float16 would not be exact)
        storage = "float32 samples"
        nhwc = replace(spec, layout="NHWC")
        for name, cache in (("train", train_cache), ("val", val_cache)):
            views = [cache.batch(np.arange(len(cache)), view) for view in range(cache.views)]
            stacked = np.stack(views)
            if spec.layout == "NCHW":
                stacked = stacked.transpose(0, 1, 3, 4, 2)
            arrays[f"{name}_inputs"] = np.ascontiguousarray(stacked, dtype=np.float32)
        assert arrays["train_inputs"].shape[2:] == nhwc.sample_shape
    path = out / KERAS_INPUTS_NAME
    with path.open("wb") as handle:  # a file object: np.savez would append ".npz" to a bare name
        np.savez_compressed(handle, **arrays)
    seconds = time.monotonic() - t0
    print(
        f"keras inputs: {len(train_items)} train x {1 + aug_views} views, {len(val_items)} val, "
        f"{spec.height}x{spec.width}x{spec.channels} NHWC ({storage}) -> {path} "
        f"({path.stat().st_size / 2**20:.1f} MiB, {seconds:.0f} s)"
    )
    return {"path": str(path), "storage": storage, "seconds": seconds, "spec": spec.to_dict()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.keras.dataset",
        description="Write a run's split.json and keras-inputs.npz (the edge-preprocessed NHWC inputs).",
    )
    parser.add_argument("--data", type=Path, required=True, help="dataset, as for 'python -m training train'")
    parser.add_argument("--out", type=Path, required=True, help="run folder")
    parser.add_argument("--size", type=int, default=224, help="square input in px (default: %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=2018)
    parser.add_argument("--aug-views", type=int, default=1)
    parser.add_argument("--limit-per-class", type=int, default=None)
    args = parser.parse_args(argv)
    write_keras_inputs(
        args.data,
        args.out,
        size=args.size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        aug_views=args.aug_views,
        limit_per_class=args.limit_per_class,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
