"""Shifted validation: a run's INT8 model on its validation images under seeded augmentations.

The Kermany validation split is carved from the training pool and saturates (AUC >= 0.998 for
every run), while the official test split comes from other years and machines. To rank
candidates without the test split, every validation image is scored under ``--views`` seeded
draws of the ``standard`` augmentation (rotation, resized crop with aspect jitter, shift,
brightness, contrast, gamma: :class:`training.data.images.Augmentation` defaults), through the
edge's ONNX Runtime backend on the run's INT8 file. The rule that uses it is in
training/README.md ("Choosing bundle 0.4.0"). Torch-free.

    python -m benchmarks.bench_accuracy_shift runs/k128a runs/k128b
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from training.data.datasets import items_from_split, read_split, run_spec
from training.data.images import Augmentation, CXRDataset
from training.evaluate.metrics import roc_auc
from training.evaluate.scoring import file_scorer, run_head
from training.run_files import INT8_NAME, VAL_PREDICTIONS

#: Fixed before any candidate was scored (training/README.md, "Choosing bundle 0.4.0").
SEED = 26
VIEWS = (1, 2)


def shifted_validation(run: Path, views: tuple[int, ...] = VIEWS, seed: int = SEED) -> dict[str, float | int]:
    """INT8 AUC on plain and shifted validation for one run folder."""
    split = read_split(run)
    spec = run_spec(run)
    dataset = items_from_split(split)
    val = CXRDataset(list(dataset.val), spec, augment=True, seed=seed, augmentation=Augmentation())
    labels = val.labels
    y = np.concatenate([labels for _ in views])
    with file_scorer(run / INT8_NAME, spec, run_head(split)) as scorer:
        p = np.concatenate(
            [
                scorer(np.stack([val.sample(i, view) for i in range(start, min(len(val), start + 64))]))
                for view in views
                for start in range(0, len(val), 64)
            ]
        )
    with np.load(run / VAL_PREDICTIONS) as saved:
        plain = roc_auc(saved["y"], saved["int8"])
    return {"images": int(y.size), "auc_shifted_int8": roc_auc(y, p), "auc_plain_int8": plain}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (after their quantize stage)")
    args = parser.parse_args(argv)
    results = {}
    for run in args.runs:
        results[str(run)] = shifted_validation(run)
        (run / "shifted_validation.json").write_text(json.dumps(results[str(run)], indent=2) + "\n")
        print(f"{run}: {json.dumps(results[str(run)])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
