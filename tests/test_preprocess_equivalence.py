"""Training builds exactly the tensors the edge builds.

For a Kermany JPEG, the SIIM chest DICOM and an NIH 1024 px PNG, the sample
the training dataset yields (eval mode, no augmentation), and the sample the
training cache rebuilds, must be bit-identical to the edge's
``preprocess(decode_file(path).pixels, spec)``. Any difference would mean the
model is trained on inputs it never sees in the field.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_runtime.decode import decode_file
from edge_runtime.preprocess import PreprocessSpec, preprocess
from training.data.images import CXRDataset, ImageCache, Item

torch = pytest.importorskip("torch")

SIIM = "dicom/siim_torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
KERMANY = "cxr/kermany_pneumonia_224/train/PNEUMONIA/person1_bacteria_1.jpeg"
NIH_DIR = "cxr/nih_chestxray14_1024_subset/images"


def _nih_png(shared_data: Path) -> Path:
    folder = shared_data / NIH_DIR
    pngs = sorted(folder.glob("*.png"))
    if not pngs:
        pytest.skip(f"no NIH PNGs in {folder}")
    return pngs[0]


@pytest.fixture(params=["kermany-jpeg", "siim-dicom", "nih-png"])
def real_file(request: pytest.FixtureRequest, shared_data: Path) -> Path:
    if request.param == "nih-png":
        return _nih_png(shared_data)
    path = shared_data / (KERMANY if request.param == "kermany-jpeg" else SIIM)
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.mark.parametrize("spec", [PreprocessSpec(), PreprocessSpec(layout="NHWC", mean=(0.4,))])
def test_dataset_sample_is_bit_identical_to_edge_preprocess(real_file: Path, spec: PreprocessSpec) -> None:
    edge = preprocess(decode_file(real_file).pixels, spec)
    dataset = CXRDataset([Item(real_file, 1, "p")], spec, augment=False)
    sample, label = dataset[0]
    tensor = torch.from_numpy(sample)
    assert label == 1
    assert tensor.dtype == torch.float32
    assert tuple(tensor.shape) == spec.sample_shape
    assert np.array_equal(tensor.numpy(), edge)


def test_training_cache_rebuilds_bit_identical_samples(real_file: Path) -> None:
    spec = PreprocessSpec()
    edge = preprocess(decode_file(real_file).pixels, spec)
    cache = ImageCache.build(CXRDataset([Item(real_file, 0, "p")], spec), views=1)
    assert np.array_equal(cache.batch([0])[0], edge)


def test_augmented_view_differs_but_view_zero_does_not(real_file: Path) -> None:
    spec = PreprocessSpec()
    dataset = CXRDataset([Item(real_file, 0, "p")], spec, augment=True, seed=5)
    edge = preprocess(decode_file(real_file).pixels, spec)
    assert np.array_equal(dataset.sample(0, view=0), edge)
    augmented = dataset[0][0]
    assert augmented.shape == edge.shape and not np.array_equal(augmented, edge)
    assert np.array_equal(augmented, dataset.sample(0, view=1))  # deterministic per view
