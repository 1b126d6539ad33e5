"""Every file of the real DICOM corpus (../shared/data/dicom/INVENTORY.tsv) decodes.

Lossless encodings of one image must give identical arrays; lossy ones must
stay within a stated tolerance of their lossless twin (in display units,
i.e. after the VOI window, where 1.0 is the full grey range):
mean absolute difference < 0.005 and 99th percentile < 0.02.

Every transfer syntax in the corpus also has files with known pixel values at
fixed coordinates in ``tests/pixels_reference.py``: the decoder's stored
values (before Modality LUT and VOI) and, for some files, the display values.
That module says where each value came from (dcmtk, an uncompressed twin,
GDCM: never our own decoder) and why each tolerance is what it is.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from pixels_reference import DISPLAY_REFERENCE, PIXEL_REFERENCE

from edge_runtime.decode import DecodeLimits, decode_file
from edge_runtime.decode.dicom import DicomDecoder

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


def _row(rel: str) -> dict[str, str]:
    return next(row for row in ROWS if row["file"] == rel)


def test_every_transfer_syntax_has_reference_values():
    if not ROWS:
        pytest.skip(f"corpus inventory not found at {INVENTORY}")
    in_corpus = {row["transfer_syntax"] for row in ROWS}
    covered = {_row(rel)["transfer_syntax"] for rel in PIXEL_REFERENCE}
    assert in_corpus - covered == set()


@pytest.mark.parametrize("rel", PIXEL_REFERENCE)
def test_stored_values_match_reference(shared_data, rel):
    ref = PIXEL_REFERENCE[rel]
    _needs_dcmtk(rel)
    frame = DicomDecoder().decode_stored(shared_data / "dicom" / rel, DecodeLimits())
    arr = frame.values
    assert arr.shape == ref["shape"]
    # The dtype follows from the header (PS3.5 8.1.1), as listed in the inventory.
    # Byte order is not compared: pydicom hands Explicit VR Big Endian back as '>i2'.
    row = _row(rel)
    if frame.photometric.startswith("MONO"):
        kind = "i" if row["pixel_rep"] == "1" else "u"
        assert (arr.dtype.kind, arr.dtype.itemsize) == (kind, int(row["bits_alloc"]) // 8)
    tol = ref.get("tol", 0)
    for point, expected in ref["values"].items():
        got = np.asarray(arr[point], dtype=np.int64)
        assert np.all(np.abs(got - np.asarray(expected)) <= tol), (point, got.tolist(), expected)
    if "near" in ref:
        # ISO 14495-1: near-lossless keeps every sample within NEAR of the original.
        original = PIXEL_REFERENCE[ref["lossless_twin"]]["values"]
        for point, value in original.items():
            assert isinstance(value, int)
            assert abs(int(arr[point]) - value) <= ref["near"], point


@pytest.mark.parametrize("rel", DISPLAY_REFERENCE)
def test_display_values_match_dcmtk(shared_data, rel):
    label, grey_levels = DISPLAY_REFERENCE[rel]
    px = decode_file(shared_data / "dicom" / rel).pixels
    for point, level in grey_levels.items():
        # dcmtk rounds to 8 bits (0.5/255) and windows in its own arithmetic (1/255 more).
        assert abs(float(px[point]) - level / 255) <= 1.5 / 255, (label, point, float(px[point]) * 255)


def _rows_with_preferred_plugin() -> list[str]:
    from edge_runtime.decode.dicom import PREFERRED_PLUGINS

    syntaxes = {uid: f"({uid})" for uid in PREFERRED_PLUGINS}
    return [r["file"] for r in ROWS if any(s in r["transfer_syntax"] for s in syntaxes.values())]


@pytest.mark.parametrize("rel", _rows_with_preferred_plugin())
def test_preferred_plugin_gives_pydicoms_pixels(shared_data, rel):
    """A plugin is preferred for speed only: its pixels are those of pydicom's own first choice."""
    import warnings

    import pydicom
    from pydicom.pixels import pixel_array
    from pydicom.pixels.decoders.base import get_decoder

    from edge_runtime.decode.dicom import PREFERRED_PLUGINS, _preferred_frame, plugin_order

    path = shared_data / "dicom" / rel
    ds = pydicom.dcmread(path)
    syntax = ds.file_meta.TransferSyntaxUID
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if ds.PhotometricInterpretation not in ("MONOCHROME1", "MONOCHROME2"):
        assert _preferred_frame(ds, frames) is None  # colour keeps pydicom's order
        return
    preferred = PREFERRED_PLUGINS[str(syntax)]
    decoder = get_decoder(syntax)
    if preferred not in decoder.available_plugins:
        pytest.skip(f"{preferred} is not installed: pydicom's order decodes {syntax.name}")
    others = [p for p in plugin_order(syntax) if p != preferred]  # pydicom's own order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = pixel_array(path, decoding_plugin=preferred)
        reference = None
        for plugin in others:  # the first other plugin that can decode it is the reference
            try:
                reference = pixel_array(path, decoding_plugin=plugin)
                break
            except Exception:
                continue
    if reference is None:
        pytest.skip(f"no other plugin decodes {rel} to compare with")
    assert fast.dtype == reference.dtype and np.array_equal(fast, reference)
    taken = _preferred_frame(pydicom.dcmread(path), frames)
    assert taken is not None, f"the runtime did not decode {rel} with {preferred}"
    assert np.array_equal(taken, fast if fast.ndim == taken.ndim else fast[0])
