"""Carving validation (and test) by patient, and recording/rebuilding a run's split (``split.json``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from edge_runtime.preprocess import PreprocessSpec

from ...run_files import SUMMARY_NAME
from ..images import Item, label_counts, split_by_patient
from .base import (
    _GLOBAL_PATIENT,
    _POOL_FOLDERS,
    _TEST_FOLDER,
    DEFAULT_SEED,
    DEFAULT_TEST_FRACTION,
    DEFAULT_VAL_FRACTION,
    FOLDERS,
    NIH_SUBSET,
    NPZ,
    SPLIT_FILE,
    SPLIT_FORMAT,
    Dataset,
    patient_overlap,
)
from .registry import _detect, _read_source

logger = logging.getLogger("training.data.datasets")


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


def open_run_split(
    out: str | Path,
    data_root: str | Path,
    spec: PreprocessSpec,
    *,
    size: int | None,
    seed: int,
    val_fraction: float,
    limit_per_class: int | None,
    say: Callable[[str], None] = print,
) -> tuple[Dataset, PreprocessSpec]:
    """The training step's data, as both training routes open it: ``(dataset, spec)``.

    An existing ``split.json`` in ``out`` for the same data, seed and fractions (e.g. from
    ``prepare``) is reused, else the data are opened and split; ``size`` sets the spec's input size
    (:func:`spec_for_size`). Empty training or validation splits are refused; the per-split counts
    are said, and ``split.json`` is (re)written with the spec.
    """
    out = Path(out)
    root = Path(data_root).resolve()
    dataset = None
    if (out / SPLIT_FILE).is_file():
        recorded = read_split(out / SPLIT_FILE)
        if split_matches(
            recorded, root, seed=seed, val_fraction=val_fraction, limit_per_class=limit_per_class
        ):
            dataset = items_from_split(recorded)
            say(f"data: reusing the split in {out / SPLIT_FILE}")
    if dataset is None:
        dataset = open_dataset(root, val_fraction=val_fraction, seed=seed, limit_per_class=limit_per_class)
    if size is not None:
        spec = spec_for_size(spec, size, dataset.image_shape())
    train_items, val_items = list(dataset.train), list(dataset.val)
    if not train_items or not val_items:
        raise ValueError(f"{dataset.name}: empty training or validation split; check {root}.")
    classes = dataset.classes
    say(
        f"data: {dataset.name} ({dataset.kind}): train {len(train_items)} "
        f"{label_counts(train_items, classes)}, val {len(val_items)} {label_counts(val_items, classes)}; "
        f"validation: {dataset.val_method}"
    )
    write_split(out / SPLIT_FILE, dataset, spec)
    return dataset, spec
