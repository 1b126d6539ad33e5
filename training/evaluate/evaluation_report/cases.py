"""The evaluated images: which split, their labels, subtypes and sha256."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .common import _SUBTYPE_IN_NAME, DEFAULT_DATA, SPLITS

if TYPE_CHECKING:
    from ...data.datasets import Dataset


@dataclass(frozen=True)
class Case:
    """One evaluated image.

    Attributes:
        path: Image file (a virtual path for an image held in memory).
        relpath: Path relative to the data root (POSIX), as in ``manifest.csv``;
            the item id of :mod:`training.data.datasets` (``test/17`` in an npz).
        label: 0 = NORMAL, 1 = PNEUMONIA (the dataset's negative and positive class).
        group: ``normal``, ``bacteria``, ``virus`` or ``unknown`` (positive without a subtype).
        sha256: Of the file's bytes (of the decoded pixels for an in-memory
            image), for the report's data fingerprint.
        image: The decoded image for a set held in memory (PneumoniaMNIST), else None.
    """

    path: Path
    relpath: str
    label: int
    group: str
    sha256: str
    image: np.ndarray | None = field(default=None, compare=False, repr=False)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_data_manifest(root: Path) -> dict[str, dict[str, str]]:
    """``manifest.csv`` rows by path, or ``{}`` when the folder has none (e.g. a test subset)."""
    path = root / "manifest.csv"
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["path"]: row for row in csv.DictReader(fh)}


def _dataset(data_root: str | Path | None, split: str, split_file: str | Path | None) -> Dataset:
    """The data to report on: the run's recorded split when ``split_file`` is given, else ``data_root``'s."""
    from ...data.datasets import items_from_split, open_dataset, read_split

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if split_file is not None:
        if not Path(split_file).is_file():
            raise FileNotFoundError(
                f"The training run's split file {split_file} does not exist; "
                "pass --split-file runs/<run>/split.json."
            )
        return items_from_split(read_split(split_file), root=data_root)
    if split == "val":
        raise FileNotFoundError(
            "--split val needs the training run's split.json; pass --split-file runs/<run>/split.json."
        )
    return open_dataset(data_root if data_root is not None else DEFAULT_DATA)


def list_cases(data_root: str | Path | None, split: str, split_file: str | Path | None = None) -> list[Case]:
    """The images of ``split`` with labels and subtypes, in the order the training code lists them.

    With ``split_file`` (a training run's ``split.json``), the run's recorded
    ``val`` or ``test`` items (:func:`training.data.datasets.items_from_split`;
    ``data_root``, if given, is where those data are now). Without it, ``test``
    is the test split of ``data_root`` as :func:`training.data.datasets.open_dataset`
    makes it (the official ``test/`` folder for Kermany), and ``val`` is
    refused: the validation split the threshold was chosen on only exists
    in a ``split.json``. The pneumonia subtype comes from ``manifest.csv``
    when the data folder has one and from the file name (``personN_bacteria_M``)
    otherwise; a file whose bytes disagree with the manifest's sha256 is
    refused, so a report never silently describes different images than it says.

    Raises:
        ValueError: unknown split, or a subtype/sha256 conflicting with ``manifest.csv``.
        FileNotFoundError: a missing folder, ``split.json`` or image.
    """
    return _cases(_dataset(data_root, split, split_file), split)


def _cases(dataset: Dataset, split: str) -> list[Case]:
    root = dataset.root
    items = dataset.val if split == "val" else dataset.test
    rows = _read_data_manifest(root) if root.is_dir() else {}
    cases = []
    for item in items:
        relpath = dataset.item_id(item)
        if item.image is not None:
            digest = hashlib.sha256(np.ascontiguousarray(item.image).tobytes()).hexdigest()
        elif item.path.is_file():
            digest = _sha256(item.path)
        else:
            raise FileNotFoundError(f"Image {item.path} listed for split {split!r} does not exist.")
        match = _SUBTYPE_IN_NAME.search(item.path.name)
        from_name = match.group(1).lower() if match else ""
        row = rows.get(relpath)
        if row is not None:
            if row.get("sha256") and row["sha256"] != digest:
                raise ValueError(f"{item.path} does not match the sha256 in {root / 'manifest.csv'}.")
            subtype = row.get("pneumonia_subtype", "") or from_name
            if from_name and subtype != from_name:
                raise ValueError(f"{relpath}: manifest subtype {subtype!r} but file name says {from_name!r}.")
        else:
            subtype = from_name
        group = "normal" if item.label == 0 else (subtype or "unknown")
        cases.append(
            Case(
                path=item.path,
                relpath=relpath,
                label=item.label,
                group=group,
                sha256=digest,
                image=item.image,
            )
        )
    return cases


def _split_title(dataset: Dataset, split: str) -> str:
    if split == "val":
        return "patient-disjoint validation split"
    if dataset.kind == "folders" and dataset.classes == ("NORMAL", "PNEUMONIA"):
        return "official Kermany test split"
    return f"{dataset.name} test split ({dataset.test_method})"


def data_fingerprint(cases: Sequence[Case]) -> str:
    """sha256 over the sorted ``relpath sha256`` lines: the same value means the same images."""
    lines = sorted(f"{c.relpath} {c.sha256}\n" for c in cases)
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()
