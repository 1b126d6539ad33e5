"""The dataset record, patient keys and the constants every reader and the splitter share."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ...run_files import SPLIT_NAME
from ..images import Item, label_counts, patient_id

FOLDERS, NPZ, NIH_SUBSET = "folders", "pneumoniamnist", "nih-subset"
KINDS = (FOLDERS, NPZ, NIH_SUBSET)
#: Written by ``training.model.train`` into the run folder.
SPLIT_FILE = SPLIT_NAME
SPLIT_FORMAT = 2
DEFAULT_SEED = 2018
DEFAULT_VAL_FRACTION = 0.15
#: Share of the NIH subset's images (by patient) carved off as its test split.
DEFAULT_TEST_FRACTION = 0.2

#: Folders whose images form the training pool (validation is carved from it); ``test`` is the test.
_POOL_FOLDERS = ("train", "valid", "val")
_TEST_FOLDER = "test"
_NPZ_SPLITS = ("train", "val", "test")
_NPZ_CLASSES = ("normal", "pneumonia")  # MedMNIST's label names for PneumoniaMNIST
_NIH_CLASSES = ("normal", "abnormal")
_NIH_NAME = re.compile(r"^(\d{8})_\d{3}\.png$", re.IGNORECASE)
# NIH Patient IDs (from file names or the table) name one person across all splits.
_GLOBAL_PATIENT = re.compile(r"^\d+$")
_NIH_TABLE = Path("labels/Data_Entry_2017_v2020.csv.gz")
_NIH_LOCAL_TABLE = "labels.csv"
_NO_FINDING = "No Finding"
#: The 14 ChestX-ray14 findings, in the order of :attr:`Item.findings` for NIH items.
NIH_FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
)


@dataclass(frozen=True)
class Dataset:
    """A labelled chest X-ray set split into train, validation and test items.

    Attributes:
        name: Short name (the folder or npz file name), e.g. ``nih1000_64``.
        kind: ``folders``, ``pneumoniamnist`` or ``nih-subset`` (:data:`KINDS`).
        root: The dataset folder, or the ``.npz`` file; item ids are relative to it.
        classes: Class names in label order; label 1 is the positive class.
        train: Training items.
        val: Validation items, patient-disjoint from ``train`` where patients are known.
        test: Test items, for the final report only.
        val_method: How the validation split was made (for logs, manifests, model cards).
        test_method: Where the test split comes from.
        notes: Anything else a reader of the results must know (dropped images, caveats).
        findings: Names of the entries of :attr:`Item.findings` (NIH), else empty.
        seed: Seed of the carved splits.
        val_fraction: Share of the pool carved off as validation (None: the set's own).
        test_fraction: Share carved off as test (None: the set's own test split).
        limit_per_class: Training pool capped per class (smoke tests), or None.
    """

    name: str
    kind: str
    root: Path
    classes: tuple[str, ...]
    train: tuple[Item, ...]
    val: tuple[Item, ...]
    test: tuple[Item, ...]
    val_method: str
    test_method: str
    notes: tuple[str, ...] = ()
    findings: tuple[str, ...] = ()
    seed: int | None = None
    val_fraction: float | None = None
    test_fraction: float | None = None
    limit_per_class: int | None = None

    @property
    def patients_global(self) -> bool:
        """Whether a patient id names the same person in the test split as in training.

        True for NIH's numeric Patient IDs and for splits carved here; False for
        Kermany's official folders, whose ``personN`` numbering restarts per split.
        """
        return self.kind != FOLDERS or all(_GLOBAL_PATIENT.match(item.patient) for item in self.test)

    def splits(self) -> dict[str, tuple[Item, ...]]:
        """``{"train": ..., "val": ..., "test": ...}``."""
        return {"train": self.train, "val": self.val, "test": self.test}

    def item_id(self, item: Item) -> str:
        """The id ``split.json`` records for ``item``: its path relative to :attr:`root`."""
        return item.path.relative_to(self.root).as_posix()

    def counts(self, items: Iterable[Item]) -> dict[str, int]:
        """Images per class name."""
        return label_counts(items, self.classes)

    def image_shape(self) -> tuple[int, int]:
        """(rows, columns) of the first training image (test image when there is no training item)."""
        first = next(iter(self.train or self.val or self.test), None)
        if first is None:
            raise ValueError(f"Dataset {self.name} at {self.root} has no images.")
        rows, cols = first.pixels().shape
        return int(rows), int(cols)


# ----------------------------------------------------------------------------- patients


def patient_key(filename: str) -> str | None:
    """The patient id in a Kermany or NIH file name, or None for a name that follows neither scheme.

    ``person12_bacteria_3.jpeg`` -> ``person12``; ``IM-0115-0001.jpeg`` ->
    ``IM-0115``; ``00000002_000.png`` -> ``00000002`` (NIH: patient, then the
    follow-up number).
    """
    name = Path(filename).name
    try:
        return patient_id(name)
    except ValueError:
        pass
    match = _NIH_NAME.match(name)
    return match.group(1) if match else None


def patient_overlap(dataset: Dataset) -> dict[str, list[str]]:
    """Patient ids shared by each pair of splits, keyed ``train/val``, ``train/test`` and ``val/test``.

    Only ``train/val`` where test ids are numbered separately (see :attr:`Dataset.patients_global`).
    """
    sets = {name: {item.patient for item in items} for name, items in dataset.splits().items()}
    pairs: tuple[tuple[str, str], ...] = (("train", "val"),)
    if dataset.patients_global:
        pairs += (("train", "test"), ("val", "test"))
    return {f"{a}/{b}": sorted(sets[a] & sets[b]) for a, b in pairs}


# ----------------------------------------------------------------------------- raw sources


@dataclass(frozen=True)
class _Source:
    """What a path holds before any carving: its items by official split (``all`` if none)."""

    kind: str
    root: Path
    name: str
    classes: tuple[str, ...]
    splits: dict[str, list[Item]]
    findings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def index(self) -> dict[str, Item]:
        return {
            item.path.relative_to(self.root).as_posix(): item
            for items in self.splits.values()
            for item in items
        }
