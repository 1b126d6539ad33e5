"""The patient-disjoint, stratified validation split (training/data/images.py).

A validation set that shares children with the training set rewards
memorising patients, and the operating threshold is chosen on it: these
tests pin down that no patient crosses the split on the real Kermany list.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from training.data.images import LABELS, Item, label_counts, list_items, patient_id, split_by_patient

KERMANY = Path("cxr/kermany_pneumonia_224")


@pytest.fixture(scope="module")
def kermany_train(shared_data: Path) -> list[Item]:
    root = shared_data / KERMANY
    if not (root / "train").is_dir():
        pytest.skip(f"Kermany training split not found at {root / 'train'}")
    return list_items(root, "train")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("person1_bacteria_1.jpeg", "person1"),
        ("person1000_virus_1681.jpeg", "person1000"),
        ("person447_virus_921_1.jpeg", "person447"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("IM-0429-0001-0002.jpeg", "IM-0429"),
        ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
    ],
)
def test_patient_id_from_kermany_names(name: str, expected: str) -> None:
    assert patient_id(name) == expected


def test_patient_id_rejects_foreign_names() -> None:
    with pytest.raises(ValueError, match="Cannot parse a patient id"):
        patient_id("scan_0001.png")


def test_real_train_list_matches_the_published_counts(kermany_train: list[Item]) -> None:
    assert label_counts(kermany_train) == {"NORMAL": 1341, "PNEUMONIA": 3875}
    assert all(LABELS[item.label] == item.path.parent.name for item in kermany_train)


def test_no_patient_in_both_splits(kermany_train: list[Item]) -> None:
    train, val = split_by_patient(kermany_train, 0.15, seed=2018)
    assert {i.patient for i in train}.isdisjoint({i.patient for i in val})
    assert sorted(i.path for i in train + val) == sorted(i.path for i in kermany_train)
    assert len(set(i.path for i in train + val)) == len(kermany_train)


def test_split_is_stratified_by_label(kermany_train: list[Item]) -> None:
    _, val = split_by_patient(kermany_train, 0.15, seed=2018)
    total = Counter(i.label for i in kermany_train)
    in_val = Counter(i.label for i in val)
    for label in range(len(LABELS)):
        share = in_val[label] / total[label]
        assert 0.13 <= share <= 0.17, (LABELS[label], share)
    assert abs(len(val) / len(kermany_train) - 0.15) < 0.01


def test_split_is_reproducible_and_seed_dependent(kermany_train: list[Item]) -> None:
    first = split_by_patient(kermany_train, 0.15, seed=7)[1]
    again = split_by_patient(kermany_train, 0.15, seed=7)[1]
    other = split_by_patient(kermany_train, 0.15, seed=8)[1]
    assert [i.path for i in first] == [i.path for i in again]
    assert {i.patient for i in first} != {i.patient for i in other}


def test_patient_with_several_images_stays_together() -> None:
    items = [Item(Path(f"p{p}_{k}.jpeg"), p % 2, f"p{p}") for p in range(40) for k in range(3)]
    train, val = split_by_patient(items, 0.25, seed=1)
    for patient in {i.patient for i in val}:
        assert sum(i.patient == patient for i in val) == 3
        assert not any(i.patient == patient for i in train)


def test_bad_fraction_is_refused() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        split_by_patient([], 1.0, seed=0)
