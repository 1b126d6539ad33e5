"""Decoders on real files from ../shared/data, and the errors an admin sees."""

from __future__ import annotations

import gc
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from pixels_reference import DISPLAY_REFERENCE, PIXEL_REFERENCE

from edge_runtime import decode as decode_stage
from edge_runtime.decode import DecodeLimits, decode_file
from edge_runtime.decode.raster import image_dimensions
from edge_runtime.errors import (
    CorruptImage,
    ImageTooLarge,
    NotAnImage,
    UnsupportedImage,
    UnsupportedTransferSyntax,
)

SIIM = "dicom/siim_torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


def test_chest_dicom_metadata_and_range(shared_data):
    image = decode_file(shared_data / SIIM)
    assert image.kind == "dicom" and image.decoder == "dicom"
    assert image.pixels.shape == (1024, 1024) and image.pixels.dtype == np.float32
    assert 0.0 <= image.pixels.min() < 0.1 and 0.9 < image.pixels.max() <= 1.0
    meta = image.metadata
    assert meta["modality"] == "CR" and meta["body_part_examined"] == "CHEST"
    assert meta["view_position"] == "PA"
    assert meta["sop_instance_uid"] == ("1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819")
    assert "patient_name" not in meta and "patient_id" not in meta


@pytest.mark.parametrize(
    "name", ["siim_cxr_explicit_le", "siim_cxr_implicit_le", "siim_cxr_deflated_le", "siim_cxr_rle"]
)
def test_lossless_encodings_of_one_image_decode_identically(shared_data, name):
    reference = decode_file(shared_data / SIIM).pixels  # JPEG baseline, decoded once
    other = decode_file(shared_data / "dicom/derived" / f"{name}.dcm").pixels
    assert np.array_equal(reference, other)


def test_monochrome1_is_inverted_and_window_applied(shared_data):
    """RG1 is MONOCHROME1: after inversion the lungs (air) are dark, bone/mediastinum bright."""
    uncompressed = decode_file(shared_data / "dicom/pydicom_data/RG1_UNCR.dcm")
    j2k = decode_file(shared_data / "dicom/pydicom_data/RG1_J2KR.dcm")
    assert np.array_equal(uncompressed.pixels, j2k.pixels)
    px = uncompressed.pixels
    rows, cols = px.shape
    lung = px[rows // 3 : rows // 2, cols // 5 : cols // 3].mean()
    mediastinum = px[rows // 3 : rows // 2, cols // 2 - 50 : cols // 2 + 50].mean()
    assert lung < mediastinum, (lung, mediastinum)


def test_legacy_file_without_preamble_decodes(shared_data):
    image = decode_file(shared_data / "dicom/fo_dicom_via_dcmfx/CR-MONO1-10-chest.dcm")
    assert image.pixels.shape == (440, 440)
    assert image.metadata["modality"] == "CR"


def test_voi_lut_sequence_and_modality_lut_sequence(shared_data):
    for name in ("vlut_04.dcm", "mlut_18.dcm"):
        px = decode_file(shared_data / "dicom/pydicom_data" / name).pixels
        assert px.dtype == np.float32 and px.min() >= 0.0 and px.max() <= 1.0
        assert px.std() > 0.05, f"{name} decoded flat"


def _dcm2pnm(path: Path, *options: str) -> np.ndarray:
    """dcmtk's own rendering of ``path`` as 8-bit grey / 255 (an independent reference)."""
    binary = shutil.which("dcm2pnm")
    if binary is None:
        pytest.skip("the reference rendering needs dcmtk's dcm2pnm: apt-get install dcmtk")
    out = path.with_suffix(".pgm")
    subprocess.run([binary, *options, str(path), str(out)], check=True, capture_output=True)
    magic, size, _maxval, data = out.read_bytes().split(b"\n", 3)
    assert magic == b"P5"
    cols, rows = (int(v) for v in size.split())
    return np.frombuffer(data, dtype=np.uint8).reshape(rows, cols) / 255.0


# dcmtk rounds to 8 bits and windows in its own arithmetic: within 1.5 grey levels.
DCMTK_TOLERANCE = 1.5 / 255
# Far above that: a LUT that was skipped cannot pass for one that was applied.
SKIPPED_LUT_MARGIN = 0.1


def test_voi_lut_sequence_is_applied(shared_data, tmp_path: Path):
    """vlut_04's own VOI LUT is the identity (i * 257), so it cannot tell applied from
    ignored; a non-linear LUT (a square curve) in a copy of the real file can."""
    import pydicom

    ds = pydicom.dcmread(shared_data / "dicom/pydicom_data/vlut_04.dcm")
    lut = ds.VOILUTSequence[0]
    assert list(lut.LUTDescriptor) == [256, 0, 16]
    lut.LUTData = [round(65535 * (i / 255) ** 2) for i in range(256)]
    ds.save_as(tmp_path / "vlut_square.dcm")
    stored = ds.pixel_array
    expected = _dcm2pnm(tmp_path / "vlut_square.dcm", "+Wl", "1")
    px = decode_file(tmp_path / "vlut_square.dcm").pixels
    assert np.abs(px - expected).max() <= DCMTK_TOLERANCE
    ignored = stored / 255.0  # the linear ramp the image would get without its LUT
    assert np.abs(ignored - expected).max() > SKIPPED_LUT_MARGIN


def test_modality_lut_sequence_is_applied(shared_data, tmp_path: Path):
    """mlut_18's Modality LUT is linear and the image has no window, so min-max scaling
    would hide a skipped LUT; a square-curve LUT in a copy of the real file does not."""
    import pydicom

    ds = pydicom.dcmread(shared_data / "dicom/pydicom_data/mlut_18.dcm")
    lut = ds.ModalityLUTSequence[0]
    assert list(lut.LUTDescriptor) == [4096, -2048, 16] and "WindowCenter" not in ds
    lut.LUTData = [(i * i) >> 8 for i in range(4096)]  # at most 65 504: 16-bit output
    ds.save_as(tmp_path / "mlut_square.dcm")
    stored = ds.pixel_array.astype(np.float64)
    expected = _dcm2pnm(tmp_path / "mlut_square.dcm", "+Wm")
    px = decode_file(tmp_path / "mlut_square.dcm").pixels
    assert np.abs(px - expected).max() <= DCMTK_TOLERANCE
    ignored = (stored - stored.min()) / (stored.max() - stored.min())
    assert np.abs(ignored - expected).max() > SKIPPED_LUT_MARGIN


def test_rescale_is_applied_before_the_window(shared_data):
    """CR1_6154 (MONOCHROME1) has Rescale 0.684/200 and Window 1600/2800: windowing
    the stored values instead of the rescaled ones shifts them by about 0.2."""
    rel = "pydicom_testfiles/CR1_6154_cspine_16x16.dcm"
    px = decode_file(shared_data / "dicom" / rel).pixels
    label, grey_levels = DISPLAY_REFERENCE[rel]
    stored = PIXEL_REFERENCE[rel]["values"]
    for point, level in grey_levels.items():
        assert abs(float(px[point]) - level / 255) <= DCMTK_TOLERANCE, (label, point)
        value = stored[point]
        assert isinstance(value, int)
        ignored = 1.0 - ((value - 1599.5) / 2799 + 0.5)  # PS3.3 C.11.2.1.2.1, then MONOCHROME1
        assert abs(ignored - level / 255) > SKIPPED_LUT_MARGIN, point


def test_png_8_and_16_bit_grey_rgb_rgba_agree(shared_data, tmp_path: Path):
    src = shared_data / "cxr/nih_chestxray14_1024_subset/images/00000075_000.png"
    grey8 = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
    variants = {
        "grey8.png": grey8,
        "grey16.png": grey8.astype(np.uint16) * 257,
        "rgb.png": cv2.cvtColor(grey8, cv2.COLOR_GRAY2BGR),
        "rgba.png": cv2.cvtColor(grey8, cv2.COLOR_GRAY2BGRA),
    }
    reference = decode_file(src).pixels
    for name, arr in variants.items():
        cv2.imwrite(str(tmp_path / name), arr)
        decoded = decode_file(tmp_path / name)
        assert decoded.kind == "image"
        np.testing.assert_allclose(decoded.pixels, reference, atol=1e-6, err_msg=name)


def test_jpeg_header_dimensions(shared_data):
    data = (shared_data / "cxr/kermany_pneumonia_224/test/NORMAL/IM-0001-0001.jpeg").read_bytes()
    assert image_dimensions(data) == (224, 224)


def test_errors_name_the_file_and_the_problem(shared_data, tmp_path: Path):
    rg1 = (shared_data / "dicom/pydicom_data/RG1_UNCR.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(rg1[:5000])
    (tmp_path / "half.dcm").write_bytes(rg1[: len(rg1) // 2])
    (tmp_path / "notes.dcm").write_text("not an image at all\n" * 40)
    (tmp_path / "zero.png").write_bytes(b"")
    jpeg = (shared_data / "cxr/kermany_pneumonia_224/test/NORMAL/IM-0001-0001.jpeg").read_bytes()
    (tmp_path / "cut.jpeg").write_bytes(jpeg[: len(jpeg) // 2])
    cases = {
        "cut.dcm": CorruptImage,
        "half.dcm": CorruptImage,
        "notes.dcm": NotAnImage,
        "zero.png": CorruptImage,
        "cut.jpeg": CorruptImage,
    }
    for name, expected in cases.items():
        with pytest.raises(expected) as info:
            decode_file(tmp_path / name)
        assert name in str(info.value)
        assert info.value.action


@pytest.fixture
def refusing_plugin_first() -> Iterator[None]:
    """A plugin that claims every DICOM file and fails, ahead of the real ones."""
    saved = decode_stage.registered_decoders()
    decode_stage.register_decoder("refusing", "plugins.refusing:RefusingDicomDecoder", first=True)
    yield
    decode_stage.use_registry(saved)


def test_next_decoder_is_tried_when_one_fails(shared_data, refusing_plugin_first):
    image = decode_file(shared_data / SIIM)
    assert image.decoder == "dicom" and image.pixels.shape == (1024, 1024)


def test_one_error_names_every_decoder_failure(shared_data, tmp_path: Path, refusing_plugin_first):
    rg1 = (shared_data / "dicom/pydicom_data/RG1_UNCR.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(rg1[:5000])
    # The first plugin's class, code and advice; every plugin's reason.
    with pytest.raises(UnsupportedTransferSyntax) as info:
        decode_file(tmp_path / "cut.dcm")
    message = info.value.message
    assert "cut.dcm" in message
    assert "refusing: Cannot decode cut.dcm: this plugin needs libexample" in message
    assert "dicom: " in message and "pixel data" in message
    assert info.value.action == "Install libexample."
    assert info.value.to_dict()["code"] == "unsupported_transfer_syntax"


def test_pixel_cap_is_checked_before_decoding(shared_data):
    limits = DecodeLimits(max_pixels=1_000_000)
    with pytest.raises(ImageTooLarge, match="over the limit"):
        decode_file(shared_data / "dicom/pydicom_data/RG1_UNCR.dcm", limits)
    with pytest.raises(ImageTooLarge):
        decode_file(shared_data / "cxr/nih_chestxray14_1024_subset/images/00000075_000.png", limits)


def test_png_bomb_header_is_refused_without_allocating(tmp_path: Path):
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data = (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + b"\x00\x00\x00\x00IEND\xaeB`\x82"
    )
    (tmp_path / "bomb.png").write_bytes(data)
    with pytest.raises(ImageTooLarge, match="10,000,000,000"):
        decode_file(tmp_path / "bomb.png")


def test_dicom_without_pixels_is_unsupported(shared_data, tmp_path: Path):
    import pydicom

    ds = pydicom.dcmread(shared_data / "dicom/pydicom_testfiles/MR_small.dcm")
    for keyword in ("PixelData", "Rows", "Columns"):
        delattr(ds, keyword)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.save_as(tmp_path / "report.dcm")
    with pytest.raises(UnsupportedImage, match="no pixel data"):
        decode_file(tmp_path / "report.dcm")


def test_dicomdir_is_refused_with_advice(shared_data, tmp_path: Path):
    import pydicom
    from pydicom.fileset import FileSet

    fs = FileSet()
    fs.add(pydicom.dcmread(shared_data / "dicom/pydicom_testfiles/CT_small.dcm"))
    fs.write(tmp_path / "media")
    with pytest.raises(UnsupportedImage, match="DICOMDIR") as info:
        decode_file(tmp_path / "media" / "DICOMDIR")
    assert "image files the DICOMDIR refers to" in info.value.action
    # pydicom 3.0's FileSet stages files in a TemporaryDirectory it never cleans up, so the
    # garbage collector would warn (ResourceWarning) during some later test. Collect it here,
    # ignoring exactly that warning.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Implicitly cleaning up <TemporaryDirectory", ResourceWarning)
        del fs
        gc.collect()


def test_unsupported_photometric_interpretation(shared_data, tmp_path: Path):
    import pydicom

    ds = pydicom.dcmread(shared_data / "dicom/pydicom_testfiles/CT_small.dcm")
    ds.PhotometricInterpretation = "HSV"  # retired, nothing decodes it to grey
    ds.save_as(tmp_path / "hsv.dcm")
    with pytest.raises(UnsupportedImage, match="'HSV'") as info:
        decode_file(tmp_path / "hsv.dcm")
    assert "MONOCHROME1/2" in info.value.action


def test_display_grey_in_bands_equals_the_whole_image_at_once(shared_data, tmp_path, monkeypatch):
    """Bands keep the float64 temporaries small; every step is element-wise, so the pixels are the same.

    Covers each path: the window (RG1, with a SIGMOID variant), MONOCHROME1, and no window at
    all (min/max over the whole image, not per band); files with a lookup table (vlut_04,
    mlut_18) take one band (pydicom unpacks the table per call) and must come out the same too.
    """
    import pydicom

    from edge_runtime.decode import dicom

    base = shared_data / "dicom"
    files = [
        base / "pydicom_data/vlut_04.dcm",
        base / "pydicom_data/mlut_18.dcm",
        base / "pydicom_data/RG1_UNCR.dcm",
        base / "fo_dicom_via_dcmfx/CR-MONO1-10-chest.dcm",
    ]
    ds = pydicom.dcmread(base / "pydicom_data/RG1_UNCR.dcm")
    ds.VOILUTFunction = "SIGMOID"
    ds.save_as(tmp_path / "sigmoid.dcm")
    ds = pydicom.dcmread(base / "pydicom_data/RG1_UNCR.dcm")
    del ds.WindowCenter, ds.WindowWidth
    ds.save_as(tmp_path / "no_window.dcm")
    files += [tmp_path / "sigmoid.dcm", tmp_path / "no_window.dcm"]
    for path in files:
        monkeypatch.setattr(dicom, "_BAND_ROWS", 10**6)
        whole = decode_file(path).pixels
        monkeypatch.setattr(dicom, "_BAND_ROWS", 7)  # bands of every size, and a short last one
        banded = decode_file(path).pixels
        assert whole.shape == banded.shape and whole.shape[0] > 7, path.name
        assert np.array_equal(whole, banded), path.name
        assert whole.dtype == np.float32 and 0.0 <= whole.min() <= whole.max() <= 1.0
