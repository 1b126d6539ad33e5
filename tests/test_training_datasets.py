"""Datasets beyond Kermany (training/data/datasets/) on the real files in ``../shared/data``.

The rule these tests hold every set to: no patient is in two of train,
validation and test (a validation or test split that shares patients with
training scores memorised patients). Then: PneumoniaMNIST loads with the
published counts, an in-memory image is exactly what the edge decoder makes
of the same pixels, ``split.json`` rebuilds the very same items (old files
included), ``prepare`` prints its table, and the real trainer reaches a
checkpoint on the 64 px NIH set and on PneumoniaMNIST at ``--size 64``.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_runtime.decode import decode_file
from edge_runtime.preprocess import PreprocessSpec, preprocess
from training.data.datasets import (
    NIH_FINDINGS,
    Dataset,
    describe,
    items_from_split,
    open_dataset,
    patient_key,
    patient_overlap,
    read_split,
    run_spec,
    spec_for_size,
    split_matches,
    split_record,
    write_split,
)
from training.data.images import (
    LABELS,
    CXRDataset,
    ImageCache,
    Item,
    list_items,
    patient_id,
    split_by_patient,
)

KERMANY = Path("cxr/kermany_pneumonia_224")
NIH64 = Path("cxr/nih1000_64")
NIH_SUBSET = Path("cxr/nih_chestxray14_1024_subset")
MNIST = Path("cxr/pneumoniamnist_28")
MNIST_FILE = MNIST / "pneumoniamnist.npz"
EFFNET_WEIGHTS = Path("weights/efficientnet-lite0-57934424.pth")


def _data(shared_data: Path, rel: Path) -> Path:
    path = shared_data / rel
    if not path.exists():
        pytest.skip(f"{rel} not found under {shared_data}")
    return path


@pytest.fixture(scope="module")
def kermany(shared_data: Path) -> Dataset:
    return open_dataset(_data(shared_data, KERMANY))


@pytest.fixture(scope="module")
def nih64(shared_data: Path) -> Dataset:
    return open_dataset(_data(shared_data, NIH64))


@pytest.fixture(scope="module")
def nih_subset(shared_data: Path) -> Dataset:
    return open_dataset(_data(shared_data, NIH_SUBSET))


@pytest.fixture(scope="module")
def mnist(shared_data: Path) -> Dataset:
    return open_dataset(_data(shared_data, MNIST))


def _assert_patient_disjoint(dataset: Dataset) -> None:
    for pair, shared in patient_overlap(dataset).items():
        assert not shared, f"{dataset.name}: {len(shared)} patients in {pair}, e.g. {shared[:5]}"
    ids = [dataset.item_id(i) for items in dataset.splits().values() for i in items]
    assert len(ids) == len(set(ids)), "an image is in two splits"
    assert dataset.train and dataset.val and dataset.test


# -- patient-disjointness ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("person1_bacteria_1.jpeg", "person1"),
        ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
        ("00000002_000.png", "00000002"),
        ("00030805_012.png", "00030805"),
        ("scan_0001.png", None),
    ],
)
def test_patient_key_knows_kermany_and_nih_names(name: str, expected: str | None) -> None:
    assert patient_key(name) == expected


def test_kermany_no_patient_in_train_and_val(kermany: Dataset, shared_data: Path) -> None:
    _assert_patient_disjoint(kermany)
    root = shared_data / KERMANY
    assert kermany.kind == "folders" and kermany.classes == LABELS
    # personN numbers restart per official split (person1: bacterial in train/, viral in test/),
    # so only train/val can be compared and nothing is dropped from the training pool.
    assert not kermany.patients_global
    assert list(patient_overlap(kermany)) == ["train/val"]
    train_kinds = {i.path.name.split("_")[1] for i in list_items(root, "train") if i.patient == "person1"}
    test_kinds = {i.path.name.split("_")[1] for i in list_items(root, "test") if i.patient == "person1"}
    assert train_kinds == {"bacteria"} and test_kinds == {"virus"}
    assert list(kermany.test) == list_items(root, "test")
    official = list_items(root, "train")
    assert sorted(i.path for i in kermany.train + kermany.val) == sorted(i.path for i in official)
    assert len(kermany.train) == 4432 and len(kermany.val) == 784  # the bundled model's split
    assert any("numbered separately" in note for note in kermany.notes)


def test_nih1000_64_pools_train_and_valid_and_keeps_test(nih64: Dataset, shared_data: Path) -> None:
    _assert_patient_disjoint(nih64)
    assert nih64.classes == ("0_normal", "1_abnormal")
    assert nih64.counts(nih64.test) == {"0_normal": 100, "1_abnormal": 100}
    folders = {i.path.parent.parent.name for i in nih64.train + nih64.val}
    assert folders == {"train", "valid"}
    with open(shared_data / NIH64 / "manifest.csv", newline="") as fh:
        manifest = {row["path"]: row for row in csv.DictReader(fh)}
    for item in nih64.train + nih64.val + nih64.test:
        row = manifest[nih64.item_id(item)]
        assert item.label == int(row["label_id"])
        assert item.patient == item.path.name.split("_")[0]
    # 16 patients of the official test split also have train/valid images: those are left out.
    assert len(nih64.train) + len(nih64.val) == 800 - 77


def test_nih_subset_carves_test_and_val_by_patient(nih_subset: Dataset, shared_data: Path) -> None:
    _assert_patient_disjoint(nih_subset)
    every = nih_subset.train + nih_subset.val + nih_subset.test
    assert len(every) == 156 and nih_subset.classes == ("normal", "abnormal")
    assert nih_subset.findings == NIH_FINDINGS
    assert 0.15 <= len(nih_subset.test) / len(every) <= 0.25
    for split in (nih_subset.test, nih_subset.val):
        assert set(i.label for i in split) == {0, 1}, "each carved split holds both classes"
    # Labels from the NIH table agree with the subset's own labels.csv (built from the same table).
    with open(shared_data / NIH_SUBSET / "labels.csv", newline="") as fh:
        rows = {row["image"]: row for row in csv.DictReader(fh)}
    for item in every:
        row = rows[item.path.name]
        assert item.findings == tuple(int(row[name]) for name in NIH_FINDINGS)
        assert item.label == 1 - int(row["No_Finding"]) == int(any(item.findings))
        assert item.patient == f"{int(row['patient_id']):08d}"
    assert "no official test split" in nih_subset.test_method


def test_split_is_reproducible_and_seed_dependent(shared_data: Path) -> None:
    root = _data(shared_data, NIH_SUBSET)
    first, again = open_dataset(root, seed=3), open_dataset(root, seed=3)
    other = open_dataset(root, seed=4)
    assert first == again
    assert {i.patient for i in first.test} != {i.patient for i in other.test}


def test_unknown_names_count_one_patient_per_file_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    grey = np.full((16, 16), 128, dtype=np.uint8)
    for split in ("train", "test"):
        for label in ("cats", "dogs"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for k in range(4):
                cv2.imwrite(str(folder / f"scan_{k}.png"), grey)
    with caplog.at_level(logging.WARNING, logger="training.data.datasets"):
        dataset = open_dataset(tmp_path, val_fraction=0.25, seed=0)
    assert "no recognisable patient id" in caplog.text
    assert dataset.classes == ("cats", "dogs")
    assert len({i.patient for i in dataset.train + dataset.val + dataset.test}) == 16
    _assert_patient_disjoint(dataset)


def test_more_than_two_classes_is_refused(tmp_path: Path) -> None:
    for label in ("a", "b", "c"):
        (tmp_path / "train" / label).mkdir(parents=True)
    with pytest.raises(ValueError, match="exactly two class folders"):
        open_dataset(tmp_path)


def test_unrecognised_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(ValueError, match="Cannot tell what"):
        open_dataset(tmp_path)


# -- PneumoniaMNIST ------------------------------------------------------------------------------


def test_pneumoniamnist_loads_with_the_published_counts(mnist: Dataset, shared_data: Path) -> None:
    assert mnist.kind == "pneumoniamnist" and mnist.classes == ("normal", "pneumonia")
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (3882, 524, 624)
    assert mnist.counts(mnist.train) == {"normal": 388, "pneumonia": 3494}
    assert mnist.counts(mnist.val) == {"normal": 135, "pneumonia": 389}
    assert mnist.counts(mnist.test) == {"normal": 234, "pneumonia": 390}
    arrays = np.load(shared_data / MNIST_FILE)
    for split, items in mnist.splits().items():
        labels = arrays[f"{split}_labels"].reshape(-1)
        assert [i.label for i in items] == labels.tolist()
        for index in (0, len(items) - 1):
            item = items[index]
            assert mnist.item_id(item) == f"{split}/{index}"
            assert item.image is not None and item.image.dtype == np.float32 and item.image.shape == (28, 28)
            assert np.array_equal(np.rint(item.image * 255), arrays[f"{split}_images"][index])
    assert "own val split" in mnist.val_method
    # The npz file itself opens to the same dataset as its folder.
    assert open_dataset(shared_data / MNIST_FILE) == mnist


def test_in_memory_image_is_what_the_decoder_makes_of_the_same_pixels(mnist: Dataset, tmp_path: Path) -> None:
    item = mnist.test[5]
    assert item.image is not None
    png = tmp_path / "same.png"
    cv2.imwrite(str(png), np.rint(item.image * 255).astype(np.uint8))
    decoded = decode_file(png).pixels
    assert np.array_equal(decoded, item.image)
    spec = spec_for_size(PreprocessSpec(), 64, (28, 28))
    dataset = CXRDataset([item], spec)
    assert np.array_equal(dataset.sample(0), preprocess(decoded, spec))
    assert np.array_equal(ImageCache.build(dataset).batch([0])[0], preprocess(decoded, spec))
    assert "image" not in repr(item) and item == Item(item.path, item.label, item.patient)


def test_spec_for_size_picks_an_interpolation_that_fits() -> None:
    base = PreprocessSpec()
    assert spec_for_size(base, 224, (224, 224)) == base
    up = spec_for_size(base, 64, (28, 28))
    assert (up.height, up.width, up.interpolation) == (64, 64, "linear")
    down = spec_for_size(base, 64, (1024, 1024))
    assert (down.height, down.width, down.interpolation) == (64, 64, "area")
    cubic = PreprocessSpec(interpolation="cubic")
    assert spec_for_size(cubic, 64, (28, 28)).interpolation == "cubic"


# -- split.json ----------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["kermany", "nih64", "nih_subset", "mnist"])
def test_items_from_split_round_trips(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    dataset: Dataset = request.getfixturevalue(which)
    path = write_split(tmp_path, dataset, PreprocessSpec(height=64, width=64))
    record = read_split(tmp_path)
    assert record["kind"] == dataset.kind and record["classes"] == list(dataset.classes)
    assert record["data_root"] == str(dataset.root) and path.name == "split.json"
    rebuilt = items_from_split(path)
    assert rebuilt == dataset
    for a, b in zip(rebuilt.test[:3], dataset.test[:3], strict=True):
        assert np.array_equal(a.pixels(), b.pixels())
    assert run_spec(tmp_path) == PreprocessSpec(height=64, width=64)
    assert split_matches(record, dataset.root, seed=2018, val_fraction=0.15)
    assert not split_matches(record, dataset.root, seed=2019, val_fraction=0.15)
    assert not split_matches(record, dataset.root, seed=2018, val_fraction=0.15, limit_per_class=4)


def test_a_first_format_split_still_loads(shared_data: Path) -> None:
    """A split.json written before this module (Kermany; no kind, classes or test) rebuilds as before."""
    root = _data(shared_data, KERMANY)
    official = list_items(root, "train")
    train, val = split_by_patient(official, 0.15, seed=2018)
    record = {
        "data_root": str(root),
        "seed": 2018,
        "val_fraction": 0.15,
        "train": [i.path.relative_to(root).as_posix() for i in train],
        "val": [i.path.relative_to(root).as_posix() for i in val],
    }
    rebuilt = items_from_split(json.loads(json.dumps(record)))
    # What export.py and report.py derived from such a file before: LABELS.index(folder name).
    legacy = [Item(root / rel, LABELS.index(Path(rel).parent.name), patient_id(rel)) for rel in record["val"]]
    assert list(rebuilt.val) == legacy and list(rebuilt.train) == train
    assert list(rebuilt.test) == list_items(root, "test")
    assert rebuilt.classes == LABELS and rebuilt.kind == "folders"
    assert split_matches(record, root, seed=2018, val_fraction=0.15)


def test_a_split_naming_missing_images_is_refused(nih64: Dataset) -> None:
    record = split_record(nih64)
    record["val"] = [*record["val"], "valid/0_normal/99999999_000.png"]
    with pytest.raises(FileNotFoundError, match="not in"):
        items_from_split(record)


def test_prepare_writes_the_split_and_prints_the_table(
    nih64: Dataset, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torch")  # python -m training's parser lists the torch model registry
    from training.cli import main

    out = tmp_path / "run"
    assert main(["prepare", "--data", str(nih64.root), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert items_from_split(out) == nih64
    assert describe(nih64) in text
    assert "train/val 0, train/test 0, val/test 0 -> OK" in text
    for line in ("train", "val", "test"):
        assert any(row.split()[:1] == [line] for row in text.splitlines())
    assert main(["prepare", "--data", str(nih64.root), "--out", str(out)]) == 0
    assert "already holds this split" in capsys.readouterr().out


# -- tiny real training runs ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(
    shared_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[Path], tuple[Path, dict]]:
    """``tiny_run(dataset)``: the real trainer on 4 images per class at 64 px, once per dataset."""
    torch = pytest.importorskip("torch")
    from training.model.train import TrainConfig, train

    runs: dict[Path, tuple[Path, dict]] = {}

    def get(which: Path) -> tuple[Path, dict]:
        if which not in runs:
            weights = shared_data / EFFNET_WEIGHTS
            cfg = TrainConfig(
                data_root=_data(shared_data, which),
                out_dir=tmp_path_factory.mktemp(which.name) / "run",
                weights=weights if weights.is_file() else None,
                model="efficientnet-lite0",
                size=64,
                limit_per_class=4,
                val_fraction=0.25,
                aug_views=0,
                batch_size=4,
                eval_batch_size=8,
                head_epochs=1,
                epochs=1,
                patience=1,
                warmup_steps=0,
                threads=1,
                time_budget_s=60.0,
            )
            before = torch.get_num_threads()
            t0 = time.perf_counter()
            try:
                summary = train(cfg)
            finally:
                torch.set_num_threads(before)
            seconds = time.perf_counter() - t0
            assert seconds < 60, f"tiny run on {which.name} took {seconds:.0f} s"
            runs[which] = (cfg.out_dir, summary)
        return runs[which]

    return get


@pytest.mark.parametrize("which", [NIH64, MNIST], ids=["nih1000_64", "pneumoniamnist"])
def test_tiny_training_run_reaches_a_checkpoint(
    which: Path, tiny_run: Callable[[Path], tuple[Path, dict]]
) -> None:
    torch = pytest.importorskip("torch")
    from training.export.onnx_export import load_split
    from training.model.train import CHECKPOINT_NAME, load_checkpoint
    from training.run_files import SPLIT_NAME

    run, summary = tiny_run(which)
    assert (run / CHECKPOINT_NAME).is_file()
    model, ckpt = load_checkpoint(run)
    record = read_split(run / SPLIT_NAME)
    assert ckpt["labels"] == record["classes"] and ckpt["num_classes"] == 2
    spec = run_spec(run)
    assert (spec.height, spec.width) == (64, 64)
    assert spec.interpolation == ("linear" if which == MNIST else "area")  # 28 px up, 64 px as is
    assert PreprocessSpec.from_dict(summary["config"]["spec"]) == spec
    _, train_items, val_items = load_split(run)
    # Four images per class: the training pool (nih1000_64), or train and its own val (PneumoniaMNIST).
    if which == NIH64:
        assert len(train_items) + len(val_items) == 8
    else:
        assert (len(train_items), len(val_items)) == (8, 8)
    assert set(record["classes"]) <= set(summary["data"]["train"])
    x = torch.from_numpy(np.stack([CXRDataset(val_items, spec).sample(i) for i in range(len(val_items))]))
    with torch.no_grad():
        assert model(x).shape == (len(val_items), 2)


def test_export_evaluate_and_package_use_the_runs_data_and_spec(
    tiny_run: Callable[[Path], tuple[Path, dict]], tmp_path: Path
) -> None:
    """The later stages take the 64 px spec, the classes and the test split from the run, not Kermany's."""
    pytest.importorskip("onnxruntime")
    from helpers import TEST_SIGNING_KEY

    from edge_runtime.bundle import load_bundle
    from training.bundle.package import MODEL_CARD_NAME, package_bundle
    from training.cli import main
    from training.evaluate.report import TEST_PREDICTIONS, run_evaluation
    from training.export.onnx_export import EXPORT_SUMMARY, VAL_PREDICTIONS

    run, _ = tiny_run(NIH64)
    # The export and quantize stages as the CLI runs them, one after the other.
    assert main(["export", "--out", str(run), "--threads", "1"]) == 0
    assert set(np.load(run / VAL_PREDICTIONS).files) == {"y", "torch", "fp32"}
    assert main(["quantize", "--out", str(run), "--calibration-images", "4", "--threads", "1"]) == 0
    assert set(np.load(run / VAL_PREDICTIONS).files) == {"y", "torch", "fp32", "int8"}
    summary = json.loads((run / EXPORT_SUMMARY).read_text())
    assert summary["fp32_vs_torch"]["max_abs_diff"] < 1e-4
    assert 0.0 <= summary["int8_vs_fp32"]["decision_agreement"] <= 1.0
    assert set(summary["sizes_bytes"]) == {"fp32", "int8"}
    evaluation = run_evaluation(run, threads=1)
    dataset = items_from_split(run)
    assert evaluation["test"]["counts"] == {"0_normal": 100, "1_abnormal": 100}
    assert np.load(run / TEST_PREDICTIONS)["y"].tolist() == [i.label for i in dataset.test]
    bundle = load_bundle(package_bundle(run, tmp_path / "bundle", signing_key=TEST_SIGNING_KEY))
    assert bundle.labels == ["0_normal", "1_abnormal"] and bundle.positive_label == "1_abnormal"
    assert bundle.preprocessing == run_spec(run)
    assert bundle.manifest.input.shape == ["batch", 3, 64, 64]
    assert "Clinical Center" in bundle.intended_use["population"]
    card = (tmp_path / "bundle" / MODEL_CARD_NAME).read_text()
    assert "`[batch, 3, 64, 64]`" in card and "NIH ChestX-ray14" in card
    assert "Kermany" not in card and "paediatric" not in card
