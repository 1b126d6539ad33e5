"""Every file of the real DICOM corpus (../shared/data/dicom/INVENTORY.tsv) decodes.

Lossless encodings of one image must give identical arrays; lossy ones must
stay within a stated tolerance of their lossless twin (in display units,
i.e. after the VOI window, where 1.0 is the full grey range):
mean absolute difference < 0.005 and 99th percentile < 0.02.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.decode import decode_file

REPO = Path(__file__).resolve().parents[1]
INVENTORY = REPO.parent / "shared" / "data" / "dicom" / "INVENTORY.tsv"


def _inventory() -> list[dict[str, str]]:
    if not INVENTORY.is_file():
        return []
    with open(INVENTORY, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


ROWS = _inventory()
LOSSLESS_GROUPS = {
    "RG1 chest": ["pydicom_data/RG1_UNCR.dcm", "pydicom_data/RG1_J2KR.dcm"],
    "RG2 hip": ["wg04/RG2_JPLL", "wg04/RG2_J2KR", "wg04/RG2_JLSL", "wg04/RG2_RLE"],
    "RG3 extremity": ["wg04/RG3_JPLL", "wg04/RG3_JLSL", "wg04/RG3_RLE"],
    "MR small": [
        "pydicom_testfiles/MR_small.dcm",
        "pydicom_testfiles/MR_small_implicit.dcm",
        "pydicom_testfiles/MR_small_expb.dcm",
        "pydicom_testfiles/MR_small_RLE.dcm",
        "pydicom_testfiles/MR_small_jp2klossless.dcm",
        "pydicom_testfiles/MR_small_jpeg_ls_lossless.dcm",
    ],
}
LOSSY_TWINS = {
    "wg04/RG1_J2KI": "pydicom_data/RG1_UNCR.dcm",
    "wg04/RG1_JLSN": "pydicom_data/RG1_UNCR.dcm",
    "wg04/RG2_J2KI": "wg04/RG2_JPLL",
    "wg04/RG2_JLSN": "wg04/RG2_JPLL",
    "wg04/RG2_JPLY": "wg04/RG2_JPLL",
    "wg04/RG3_JLSN": "wg04/RG3_JPLL",
    "wg04/RG3_JPLY": "wg04/RG3_JPLL",
}
NEEDS_DCMTK = {"wg04/RG2_JPLY", "wg04/RG3_JPLY"}


def _needs_dcmtk(rel: str) -> None:
    if rel in NEEDS_DCMTK and shutil.which("dcmdjpeg") is None:
        pytest.skip(f"{rel} (12-bit JPEG Extended) needs dcmtk's dcmdjpeg: apt-get install dcmtk")


@pytest.mark.parametrize("row", ROWS, ids=[r["file"] for r in ROWS])
def test_every_corpus_file_decodes(shared_data, row):
    rel = row["file"]
    _needs_dcmtk(rel)
    image = decode_file(shared_data / "dicom" / rel)
    assert image.pixels.shape == (int(row["rows"]), int(row["cols"]))
    assert image.pixels.dtype == np.float32
    assert float(image.pixels.min()) >= 0.0 and float(image.pixels.max()) <= 1.0
    assert float(image.pixels.std()) > 0.0, "decoded to a flat image"
    if row["modality"]:
        assert image.metadata.get("modality") == row["modality"]
    if rel in NEEDS_DCMTK:
        assert image.decoder == "dicom+dcmdjpeg"


@pytest.mark.parametrize("group", LOSSLESS_GROUPS)
def test_lossless_encodings_decode_identically(shared_data, group):
    files = LOSSLESS_GROUPS[group]
    reference = decode_file(shared_data / "dicom" / files[0]).pixels
    for rel in files[1:]:
        assert np.array_equal(decode_file(shared_data / "dicom" / rel).pixels, reference), rel


@pytest.mark.parametrize("lossy", LOSSY_TWINS)
def test_lossy_encodings_stay_close_to_their_lossless_twin(shared_data, lossy):
    _needs_dcmtk(lossy)
    reference = decode_file(shared_data / "dicom" / LOSSY_TWINS[lossy]).pixels
    diff = np.abs(decode_file(shared_data / "dicom" / lossy).pixels - reference)
    assert float(diff.mean()) < 0.005
    assert float(np.percentile(diff, 99)) < 0.02
