"""Reader for the NIH ChestX-ray14 1024 px subset, labelled from the NIH table."""

from __future__ import annotations

import csv
import gzip
from functools import lru_cache
from pathlib import Path

from ..images import Item
from .base import (
    _NIH_CLASSES,
    _NIH_LOCAL_TABLE,
    _NIH_NAME,
    _NIH_TABLE,
    _NO_FINDING,
    NIH_FINDINGS,
    NIH_SUBSET,
    _Source,
)


def _is_nih_subset(folder: Path) -> bool:
    images = folder / "images" if (folder / "images").is_dir() else folder
    return any(_NIH_NAME.match(p.name) for p in images.iterdir() if p.is_file())


def _nih_table_path(folder: Path) -> Path | None:
    for parent in [folder, *folder.parents][:4]:
        candidate = parent / _NIH_TABLE
        if candidate.is_file():
            return candidate
    local = folder / _NIH_LOCAL_TABLE
    return local if local.is_file() else None


@lru_cache(maxsize=2)
def _nih_labels(table: Path) -> dict[str, tuple[str, str]]:
    """``{image name: (finding labels, patient id as 8 digits)}`` from the NIH table or the subset's copy."""
    opener = gzip.open if table.suffix == ".gz" else open
    with opener(table, "rt", newline="", encoding="utf-8") as fh:
        rows = csv.DictReader(fh)
        if rows.fieldnames and "Image Index" in rows.fieldnames:
            keys = ("Image Index", "Finding Labels", "Patient ID")
        else:
            keys = ("image", "finding_labels", "patient_id")
        return {row[keys[0]]: (row[keys[1]], f"{int(row[keys[2]]):08d}") for row in rows}


def _findings(labels: str, image: str) -> tuple[int, ...]:
    names = set(labels.split("|"))
    unknown = names - set(NIH_FINDINGS) - {_NO_FINDING}
    if unknown or (_NO_FINDING in names and len(names) > 1):
        raise ValueError(f"{image}: unexpected NIH finding labels {labels!r}.")
    return tuple(int(name in names) for name in NIH_FINDINGS)


def read(root: Path) -> _Source:
    table = _nih_table_path(root)
    if table is None:
        raise FileNotFoundError(
            f"No NIH label table for {root}: looked for {_NIH_TABLE} beside it and up to three "
            f"folders above, and for {root / _NIH_LOCAL_TABLE}."
        )
    labels = _nih_labels(table)
    folder = root / "images" if (root / "images").is_dir() else root
    items = []
    for path in sorted(p for p in folder.iterdir() if _NIH_NAME.match(p.name)):
        if path.name not in labels:
            raise ValueError(f"{path.name} is not in the NIH label table {table}.")
        finding_labels, patient = labels[path.name]
        findings = _findings(finding_labels, path.name)
        items.append(Item(path=path, label=int(any(findings)), patient=patient, findings=findings))
    note = f"labels: {table.name} (binary: normal = No Finding, abnormal = any of the 14 findings)"
    return _Source(NIH_SUBSET, root, root.name, _NIH_CLASSES, {"all": items}, NIH_FINDINGS, (note,))


# ----------------------------------------------------------------------------- carving
