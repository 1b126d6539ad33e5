"""Datasets from local paths: one opener for the chest X-ray sets, and the run's recorded split.

:func:`open_dataset` looks at a path and returns a :class:`Dataset`: the class
names, the training, validation and test items, and a sentence on how each
split was made. It recognises three kinds of path:

* ``folders``: a class-per-folder set ``root/{train,test}/<class>/``, such as
  ``cxr/kermany_pneumonia_224`` (``NORMAL``/``PNEUMONIA``) or
  ``cxr/nih1000_64`` (``0_normal``/``1_abnormal``). Class names are the sorted
  folder names, so label 0 is the first (the negative class) and label 1 the
  second; exactly two classes for now. ``train/`` plus ``valid/`` (or
  ``val/``) where present form the training pool, from which validation is
  carved by patient; the official ``test/`` stays the test split.
* ``pneumoniamnist``: the PneumoniaMNIST ``.npz`` (or the folder holding it).
  Items carry the 28x28 grey image in memory. Patient ids are unknown, so the
  npz's own ``val`` split is the validation split: MedMNIST carved it from
  Kermany's official training split (9:1), and its paper does not say whether
  by patient, so children may be shared between its train and val. The
  ``test`` split (Kermany's official 624 test images, cropped and shrunk) is
  for the final report only. The copy in ``shared/data`` has a modified train
  split: 826 of its 1 214 normals are missing (``PROVENANCE.md`` section 2).
* ``nih-subset``: the NIH ChestX-ray14 1024 px subset folder
  (``cxr/nih_chestxray14_1024_subset``, images in ``images/``), labelled
  from ``labels/Data_Entry_2017_v2020.csv.gz``, looked for next to the data
  folder and up to three folders above it (the subset's own ``labels.csv``,
  built from the same table, is the fallback). Binary: ``normal`` = "No
  Finding", ``abnormal`` = any finding; each item also keeps the 14 finding
  flags (:data:`NIH_FINDINGS`). The subset has no official test split, so
  test *and* validation are carved from it by patient.

Patients. Validation (and the NIH subset's test) are carved with
:func:`~training.data.split_by_patient`: patient-disjoint and stratified by
label. Patient ids come from Kermany file names (``person12_``,
``IM-0115``, ``NORMAL2-IM-1427``), NIH file names (``00000002_000.png`` ->
``00000002``) or the NIH table's ``Patient ID``; a file that follows no known
scheme is its own patient (a warning says how many). Where a set has an
official test split and patient ids that name the same person in every split
(NIH's numeric Patient ID), training-pool images of patients who also appear
in the test split are dropped, so no patient is in two splits:
``nih1000_64`` shares 16 patients (77 images) between its test and
train/valid folders. Kermany's ``personN`` / ``IM-xxxx`` numbers restart in
each official split (``person1`` is bacterial in ``train/`` but viral in
``test/``; ``person100`` the other way round), so they are compared only
between train and validation and nothing is dropped; the official test split
is the authors' own (``PROVENANCE.md``: patient-level independence between
train and test is not guaranteed by them). The test split itself is never changed.

Runs. :func:`split_record` is what ``training.train`` writes to
``split.json`` (dataset kind, path, class names, parameters and every item's
id), and :func:`items_from_split` rebuilds exactly those items from it, so
export, evaluation, reports and the TFLite export all score the same images.
An item's id is its path relative to the dataset root (POSIX), or
``<split>/<index>`` for an array file. Old ``split.json`` files (Kermany, no
``kind``) load as ``folders`` with the official test folder as the test split.

No torch here (numpy and the standard library only), so the edge-side
report and the TFLite environment can use it.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.preprocess import PreprocessSpec

from .data import _IMAGE_SUFFIXES, Item, label_counts, patient_id, split_by_patient
from .run_files import SPLIT_NAME, SUMMARY_NAME

__all__ = [
    "KINDS",
    "NIH_FINDINGS",
    "SPLIT_FILE",
    "Dataset",
    "describe",
    "items_from_split",
    "open_dataset",
    "patient_key",
    "patient_overlap",
    "read_split",
    "run_spec",
    "spec_for_size",
    "split_matches",
    "split_record",
    "write_split",
]

logger = logging.getLogger(__name__)

FOLDERS, NPZ, NIH_SUBSET = "folders", "pneumoniamnist", "nih-subset"
KINDS = (FOLDERS, NPZ, NIH_SUBSET)
#: Written by ``training.train`` into the run folder.
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


def _is_nih_subset(folder: Path) -> bool:
    images = folder / "images" if (folder / "images").is_dir() else folder
    return any(_NIH_NAME.match(p.name) for p in images.iterdir() if p.is_file())


def _detect(path: str | Path) -> tuple[str, Path]:
    """The kind of data at ``path`` and its root (the folder, or the ``.npz`` file)."""
    p = Path(path).expanduser().resolve()
    if p.is_file() and p.suffix.lower() == ".npz":
        return NPZ, p
    if not p.is_dir():
        raise FileNotFoundError(f"Dataset path {p} does not exist (pass --data).")
    if any((p / name).is_dir() for name in (*_POOL_FOLDERS, _TEST_FOLDER)):
        return FOLDERS, p
    npzs = sorted(p.glob("*.npz"))
    if len(npzs) == 1:
        return NPZ, npzs[0]
    if len(npzs) > 1:
        raise ValueError(
            f"{p} holds several .npz files ({', '.join(n.name for n in npzs)}); pass one of them."
        )
    if _is_nih_subset(p):
        return NIH_SUBSET, p
    raise ValueError(
        f"Cannot tell what {p} holds: expected train/ and test/ folders with one folder per class, "
        "a PneumoniaMNIST .npz, or NIH ChestX-ray14 PNGs (00000001_000.png) in images/."
    )


def _read_source(kind: str, root: Path) -> _Source:
    if kind == FOLDERS:
        return _read_folders(root)
    if kind == NPZ:
        return _read_npz(root)
    if kind == NIH_SUBSET:
        return _read_nih_subset(root)
    raise ValueError(f"Unknown dataset kind {kind!r}; known kinds are {KINDS}.")


def _read_folders(root: Path) -> _Source:
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


@lru_cache(maxsize=4)
def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _read_npz(root: Path) -> _Source:
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


def _read_nih_subset(root: Path) -> _Source:
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


def _limit(items: Sequence[Item], per_class: int | None) -> list[Item]:
    """The first ``per_class`` items of each label, in their order (smoke tests)."""
    if per_class is None:
        return list(items)
    taken: dict[int, int] = {}
    kept = []
    for item in items:
        if taken.get(item.label, 0) < per_class:
            taken[item.label] = taken.get(item.label, 0) + 1
            kept.append(item)
    return kept


def _pct(fraction: float) -> str:
    return f"{100 * fraction:g} %"


def open_dataset(
    path: str | Path,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = DEFAULT_SEED,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    limit_per_class: int | None = None,
) -> Dataset:
    """Recognise the data at ``path`` and split it (see the module docstring for each kind).

    Args:
        path: A class-per-folder root, a PneumoniaMNIST ``.npz`` (or its
            folder), or the NIH 1024 px subset folder.
        val_fraction: Share of the training pool's images carved off, by
            patient, as validation (not used for PneumoniaMNIST, which has its own).
        seed: Makes the carved splits reproducible.
        test_fraction: Share carved off as test where the set has no test
            split (the NIH subset); the test is carved before validation.
        limit_per_class: Keep only the first N images per class of the
            training pool before carving validation (PneumoniaMNIST: of its
            train and val); smoke tests only. The test split is never limited.

    Raises:
        FileNotFoundError: the path, or the NIH label table, does not exist.
        ValueError: unrecognised content, or not exactly two classes.
    """
    kind, root = _detect(path)
    source = _read_source(kind, root)
    notes = list(source.notes)
    params = {"seed": seed, "limit_per_class": limit_per_class}
    if kind == FOLDERS:
        pool_names = [name for name in _POOL_FOLDERS if name in source.splits]
        pool = [item for name in pool_names for item in source.splits[name]]
        test = source.splits.get(_TEST_FOLDER, [])
        test_patients = {item.patient for item in test if _GLOBAL_PATIENT.match(item.patient)}
        dropped = [item for item in pool if item.patient in test_patients]
        if any(not _GLOBAL_PATIENT.match(item.patient) for item in test):
            notes.append(
                "patient ids of the official test split are numbered separately from the training "
                "folders (Kermany naming), so train/test patient overlap cannot be checked"
            )
        if dropped:
            pool = [item for item in pool if item.patient not in test_patients]
            shared = len({item.patient for item in dropped})
            logger.warning(
                "%s: dropped %d training image(s) of %d patient(s) who also appear in %s/, so that no "
                "patient is in two splits (%s).",
                source.name,
                len(dropped),
                shared,
                _TEST_FOLDER,
                ", ".join(f"{k} {v}" for k, v in label_counts(dropped, source.classes).items()),
            )
            notes.append(
                f"{len(dropped)} images of {shared} patients who also appear in the official test split "
                f"were left out of training and validation"
            )
        pool = _limit(pool, limit_per_class)
        train, val = split_by_patient(pool, val_fraction, seed) if pool else ([], [])
        pool_text = " + ".join(f"{n}/" for n in pool_names) or "train/ (absent)"
        val_method = (
            f"patient-disjoint, stratified by label: {_pct(val_fraction)} of the images of the official "
            f"{pool_text} (seed {seed})"
        )
        test_method = f"the official {_TEST_FOLDER}/ folder"
        params.update(val_fraction=val_fraction, test_fraction=None)
    elif kind == NPZ:
        train = _limit(source.splits["train"], limit_per_class)
        val = _limit(source.splits["val"], limit_per_class)
        test = source.splits["test"]
        val_method = (
            "the npz's own val split (MedMNIST carved it 9:1 from Kermany's official train split; "
            "patient ids are unknown, so it may share children with train)"
        )
        test_method = "the npz's test split (Kermany's official test images)"
        notes.append("this copy's train split is modified: 826 of the official 1 214 normals are missing")
        params.update(val_fraction=None, test_fraction=None)
    else:
        pool, test = split_by_patient(source.splits["all"], test_fraction, seed)
        pool = _limit(pool, limit_per_class)
        train, val = split_by_patient(pool, val_fraction, seed) if pool else ([], [])
        val_method = (
            f"patient-disjoint, stratified by label: {_pct(val_fraction)} of the images left after "
            f"the test split (seed {seed})"
        )
        test_method = (
            f"patient-disjoint, stratified by label: {_pct(test_fraction)} of the subset's images "
            f"(seed {seed}); the subset has no official test split"
        )
        params.update(val_fraction=val_fraction, test_fraction=test_fraction)
    return Dataset(
        name=source.name,
        kind=kind,
        root=root,
        classes=source.classes,
        train=tuple(train),
        val=tuple(val),
        test=tuple(test),
        val_method=val_method,
        test_method=test_method,
        notes=tuple(notes),
        findings=source.findings,
        **params,  # type: ignore[arg-type]
    )


# ----------------------------------------------------------------------------- split.json


def split_record(dataset: Dataset, spec: PreprocessSpec | None = None) -> dict[str, Any]:
    """The JSON-safe ``split.json`` content: what the data are and every item's id.

    ``data_root``, ``seed``, ``val_fraction``, ``train`` and ``val`` keep the
    meaning they had in the first format; the rest is new.
    """
    return {
        "format": SPLIT_FORMAT,
        "kind": dataset.kind,
        "name": dataset.name,
        "data_root": str(dataset.root),
        "classes": list(dataset.classes),
        "seed": dataset.seed,
        "val_fraction": dataset.val_fraction,
        "test_fraction": dataset.test_fraction,
        "limit_per_class": dataset.limit_per_class,
        "val_method": dataset.val_method,
        "test_method": dataset.test_method,
        "notes": list(dataset.notes),
        "spec": spec.to_dict() if spec is not None else None,
        **{name: [dataset.item_id(item) for item in items] for name, items in dataset.splits().items()},
    }


def write_split(path: str | Path, dataset: Dataset, spec: PreprocessSpec | None = None) -> Path:
    """Write :func:`split_record` to ``path`` (a file, or a run folder for ``split.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / SPLIT_FILE
    path.write_text(json.dumps(split_record(dataset, spec), indent=1) + "\n", encoding="utf-8")
    return path


def read_split(path: str | Path) -> dict[str, Any]:
    """A ``split.json`` (or a run folder's) as a dict."""
    path = Path(path)
    if path.is_dir():
        path = path / SPLIT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run 'python -m training prepare' or 'train' first.")
    return json.loads(path.read_text(encoding="utf-8"))


def _dataset_root(path: str | Path) -> Path:
    return _detect(path)[1]


def split_matches(
    record: Mapping[str, Any],
    data: str | Path,
    *,
    seed: int,
    val_fraction: float,
    limit_per_class: int | None = None,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> bool:
    """Whether ``record`` is the split :func:`open_dataset` would make for these arguments."""
    try:
        same_root = _dataset_root(record["data_root"]) == _dataset_root(data)
    except (OSError, ValueError, KeyError):
        return False
    kind = record.get("kind", FOLDERS)
    recorded_val = record.get("val_fraction")
    same = (
        same_root
        and record.get("seed") == seed
        and record.get("limit_per_class") == limit_per_class
        and (kind == NPZ or (recorded_val is not None and float(recorded_val) == float(val_fraction)))
    )
    if kind == NIH_SUBSET:
        same = same and record.get("test_fraction") == test_fraction
    return bool(same)


def items_from_split(split: Mapping[str, Any] | str | Path, *, root: str | Path | None = None) -> Dataset:
    """Rebuild exactly the train/val/test items a ``split.json`` records.

    Args:
        split: The record (as read), a ``split.json`` path or a run folder.
        root: Where the data are now, if they moved (a folder, or the
            ``.npz``); default: the recorded ``data_root``.

    Returns:
        A :class:`Dataset` whose splits hold the recorded items in the
        recorded order. A first-format record (Kermany, no ``kind``) gets the
        official ``test/`` folder as its test split.

    Raises:
        FileNotFoundError: a recorded item is no longer in the data.
        ValueError: the data's class names differ from the recorded ones.
    """
    record = dict(split) if isinstance(split, Mapping) else read_split(split)
    kind = record.get("kind", FOLDERS)
    base = Path(root) if root is not None else Path(record["data_root"])
    if not base.exists():
        raise FileNotFoundError(f"The run's data {base} do not exist; pass the folder they moved to.")
    source = _read_source(kind, base.expanduser().resolve())
    classes = tuple(record.get("classes") or source.classes)
    if classes != source.classes:
        raise ValueError(f"{source.root} has classes {source.classes}; the split records {classes}.")
    index = source.index()

    def pick(ids: Sequence[str]) -> tuple[Item, ...]:
        missing = [i for i in ids if i not in index]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} item(s) recorded in the split are not in {source.root}, e.g. {missing[:3]}."
            )
        return tuple(index[i] for i in ids)

    test = pick(record["test"]) if "test" in record else tuple(source.splits.get(_TEST_FOLDER, []))
    first_format = "kind" not in record
    return Dataset(
        name=record.get("name", source.name),
        kind=kind,
        root=source.root,
        classes=classes,
        train=pick(record["train"]),
        val=pick(record["val"]),
        test=test,
        val_method=record.get(
            "val_method", "patient-disjoint, stratified by label, from the official train split"
        ),
        test_method=record.get("test_method", f"the official {_TEST_FOLDER}/ folder"),
        notes=tuple(record.get("notes", ())),
        findings=source.findings,
        seed=record.get("seed"),
        val_fraction=record.get("val_fraction"),
        test_fraction=record.get("test_fraction"),
        limit_per_class=None if first_format else record.get("limit_per_class"),
    )


def run_spec(run_dir: str | Path) -> PreprocessSpec:
    """The preprocessing spec a run was trained with.

    From the run's ``split.json`` (``spec``), else its ``train_summary.json``
    (``config.spec``); a folder with neither gets the default
    :class:`~edge_runtime.preprocess.PreprocessSpec` with a warning.
    """
    run = Path(run_dir)
    split = run / SPLIT_FILE
    if split.is_file():
        recorded = json.loads(split.read_text(encoding="utf-8")).get("spec")
        if recorded:
            return PreprocessSpec.from_dict(recorded)
    summary = run / SUMMARY_NAME
    if summary.is_file():
        recorded = json.loads(summary.read_text(encoding="utf-8")).get("config", {}).get("spec")
        if recorded:
            return PreprocessSpec.from_dict(recorded)
    logger.warning("%s records no preprocessing spec; using the default %s.", run, PreprocessSpec())
    return PreprocessSpec()


def spec_for_size(
    base: PreprocessSpec, size: int, image_shape: tuple[int, int] | None = None
) -> PreprocessSpec:
    """``base`` resized to a ``size`` x ``size`` input, with an interpolation that fits the images.

    ``area`` (the default) is right for shrinking; when the training images
    are smaller than ``size`` (PneumoniaMNIST's 28 px at ``--size 64``), an
    ``area`` spec becomes ``linear``, since OpenCV's area filter enlarges like
    nearest-neighbour. An interpolation other than ``area`` is kept. The spec
    travels in the bundle, so the edge resizes its (usually larger) images
    with the same interpolation.
    """
    interpolation = base.interpolation
    if interpolation == "area" and image_shape is not None and min(image_shape) < size:
        interpolation = "linear"
    return replace(base, height=size, width=size, interpolation=interpolation)


# ----------------------------------------------------------------------------- reporting


def describe(dataset: Dataset) -> str:
    """A per-split table (images, patients, images per class), the split methods and the overlap check."""
    header = ["split", "images", "patients", *dataset.classes]
    rows = [header]
    for name, items in dataset.splits().items():
        counts = dataset.counts(items)
        patients = len({item.patient for item in items})
        rows.append([name, str(len(items)), str(patients), *(str(counts[c]) for c in dataset.classes)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        f"dataset {dataset.name} ({dataset.kind}) at {dataset.root}",
        "classes: " + ", ".join(f"{i} = {name}" for i, name in enumerate(dataset.classes)),
        "",
    ]
    for row in rows:
        lines.append(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    lines += ["", f"validation: {dataset.val_method}", f"test: {dataset.test_method}"]
    lines += [f"note: {note}" for note in dataset.notes]
    overlap = patient_overlap(dataset)
    if dataset.kind == NPZ:
        lines.append("patient overlap: not checkable (PneumoniaMNIST has no patient ids)")
    else:
        shared = ", ".join(f"{pair} {len(ids)}" for pair, ids in overlap.items())
        verdict = "OK" if not any(overlap.values()) else "PATIENTS SHARED BETWEEN SPLITS"
        lines.append(f"patients in two splits: {shared} -> {verdict}")
    return "\n".join(lines)
