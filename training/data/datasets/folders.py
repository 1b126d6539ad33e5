"""Reader for class-per-folder sets ``root/{train,valid,val,test}/<class>/`` (Kermany, ``nih1000_64``)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..images import _IMAGE_SUFFIXES, Item
from .base import _POOL_FOLDERS, _TEST_FOLDER, FOLDERS, _Source, patient_key

logger = logging.getLogger("training.data.datasets")


def read(root: Path) -> _Source:
    present = [name for name in (*_POOL_FOLDERS, _TEST_FOLDER) if (root / name).is_dir()]
    classes = tuple(sorted({c.name for s in present for c in (root / s).iterdir() if c.is_dir()}))
    if len(classes) != 2:
        raise ValueError(
            f"{root} must hold exactly two class folders in {'/, '.join(present)}/; found "
            f"{len(classes)}: {', '.join(classes) or 'none'}."
        )
    splits: dict[str, list[Item]] = {}
    per_file = 0
    for split in present:
        items = []
        for label, name in enumerate(classes):
            folder = root / split / name
            if not folder.is_dir():
                continue
            for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES):
                patient = patient_key(path.name)
                if patient is None:
                    per_file += 1
                    patient = path.relative_to(root).as_posix()
                items.append(Item(path=path, label=label, patient=patient))
        splits[split] = items
    notes = ()
    if per_file:
        logger.warning(
            "%d image(s) in %s have no recognisable patient id in their name (Kermany personN_/IM-xxxx "
            "or NIH 00000001_000); each counts as its own patient, so a patient with several images "
            "may end up in two splits.",
            per_file,
            root,
        )
        notes = (f"{per_file} images without a patient id in their file name: one patient per file",)
    return _Source(FOLDERS, root, root.name, classes, splits, notes=notes)
