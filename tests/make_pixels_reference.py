"""Print reference pixel values for ``tests/pixels_reference.py`` using dcmtk only.

The values in the reference table must not come from our decoder (nor from
pydicom, which our decoder wraps). This script obtains them with Debian's
dcmtk and numpy, and prints them so a person can paste and review them:

* stored values: each file is turned into an uncompressed Explicit VR Little
  Endian twin by the dcmtk tool for its transfer syntax (``dcmdjpeg``,
  ``dcmdjpls``, ``dcmdrle``; ``dcmconv +te`` for the uncompressed and deflated
  syntaxes and for the legacy file without File Meta, read with ``-f -ti``).
  ``dcmdump +W`` writes the twin's Pixel Data as a raw file; numpy reads it
  as little-endian words and keeps the Bits Stored low bits (sign-extended
  when Pixel Representation is 1), which is the stored value (PS3.5 8.1.1).
  dcmtk has no JPEG 2000 codec: the J2K files take their values from their
  uncompressed twin in the corpus (same WG04 / pydicom source image).
* display values: ``dcm2pnm`` renders the uncompressed twin to an 8-bit PGM
  with the file's first VOI window (``+Wi 1``), first VOI LUT (``+Wl 1``) or
  min-max window (``+Wm``), applying the Modality LUT and MONOCHROME1
  inversion itself; the grey level / 255 is the reference.

Usage (from the repository root, dcmtk and zstd installed)::

    python3 tests/make_pixels_reference.py ../shared/data/dicom
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# file -> dcmtk tool that makes an uncompressed Explicit VR LE twin.
TOOLS = {
    "pydicom_testfiles/MR_small.dcm": ["dcmconv", "+te"],
    "pydicom_testfiles/MR_small_implicit.dcm": ["dcmconv", "+te"],
    "pydicom_testfiles/MR_small_expb.dcm": ["dcmconv", "+te"],
    "pydicom_testfiles/MR_small_RLE.dcm": ["dcmdrle"],
    "pydicom_testfiles/MR_small_jpeg_ls_lossless.dcm": ["dcmdjpls"],
    "pydicom_testfiles/image_dfl.dcm": ["dcmconv", "+te"],
    "pydicom_testfiles/JPGExtended.dcm": ["dcmdjpeg"],
    "pydicom_testfiles/SC_rgb_jpeg_dcmtk.dcm": ["dcmdjpeg"],
    "pydicom_testfiles/CT_small.dcm": ["dcmconv", "+te"],
    "pydicom_testfiles/CR1_6154_cspine_16x16.dcm": ["dcmconv", "+te"],
    "pydicom_data/RG1_UNCR.dcm": ["dcmconv", "+te"],
    "pydicom_data/vlut_04.dcm": ["dcmconv", "+te"],
    "pydicom_data/mlut_18.dcm": ["dcmconv", "+te"],
    "fo_dicom_via_dcmfx/CR-MONO1-10-chest.dcm": ["dcmconv", "-f", "-ti", "+te"],
    "derived/siim_cxr_explicit_le.dcm": ["dcmconv", "+te"],
    "derived/siim_cxr_implicit_le.dcm": ["dcmconv", "+te"],
    "derived/siim_cxr_deflated_le.dcm": ["dcmconv", "+te"],
    "derived/siim_cxr_rle.dcm": ["dcmdrle"],
    "siim_torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm": ["dcmdjpeg"],
    "wg04/RG2_UNC": ["dcmconv", "+te"],  # after zstd -d of RG2_UNC.zst
    "wg04/RG2_JPLL": ["dcmdjpeg"],
    "wg04/RG2_JPLY": ["dcmdjpeg"],
    "wg04/RG2_JLSL": ["dcmdjpls"],
    "wg04/RG2_JLSN": ["dcmdjpls"],
    "wg04/RG2_RLE": ["dcmdrle"],
    "wg04/RG3_JPLL": ["dcmdjpeg"],
    "wg04/RG3_JPLY": ["dcmdjpeg"],
    "wg04/RG3_JLSL": ["dcmdjpls"],
    "wg04/RG3_JLSN": ["dcmdjpls"],
    "wg04/RG3_RLE": ["dcmdrle"],
    "wg04/RG1_JLSN": ["dcmdjpls"],
}
# file -> dcm2pnm VOI option for the display reference.
DISPLAY = {
    "pydicom_data/RG1_UNCR.dcm": "+Wi",
    "wg04/RG2_JPLL": "+Wi",
    "fo_dicom_via_dcmfx/CR-MONO1-10-chest.dcm": "+Wi",
    "pydicom_data/vlut_04.dcm": "+Wl",
    "pydicom_data/mlut_18.dcm": "+Wm",
    "pydicom_testfiles/CT_small.dcm": "+Wm",
}


def coordinates(rows: int, cols: int) -> list[tuple[int, int]]:
    """Fixed sample points spread over the image (same rule for every file)."""
    return [
        (rows // 2, cols // 2),
        (rows // 3, cols // 4),
        (2 * rows // 3, 3 * cols // 4),
        (rows // 4, 2 * cols // 3),
        (rows - 1 - rows // 8, cols // 8),
    ]


def _tag(dump: str, keyword: str) -> int:
    match = re.search(rf"^\(\w+,\w+\) US (\d+)\s+#.*\b{keyword}$", dump, re.MULTILINE)
    if match is None:
        raise LookupError(keyword)
    return int(match.group(1))


def stored_values(twin: Path, tmp: Path) -> np.ndarray:
    """Pixel Data of an uncompressed Explicit VR LE file, as stored values."""
    raw_dir = tmp / "raw"
    raw_dir.mkdir(exist_ok=True)
    dump = subprocess.run(
        ["dcmdump", "+W", str(raw_dir), str(twin)], capture_output=True, text=True, check=True
    ).stdout
    rows, cols = _tag(dump, "Rows"), _tag(dump, "Columns")
    samples = _tag(dump, "SamplesPerPixel")
    allocated, stored = _tag(dump, "BitsAllocated"), _tag(dump, "BitsStored")
    signed = _tag(dump, "PixelRepresentation") == 1
    (raw,) = sorted(raw_dir.glob(f"{twin.name}.*.raw"))
    words = np.fromfile(raw, dtype="<u2" if allocated == 16 else "u1")[: rows * cols * samples]
    raw.unlink()
    values = (words & ((1 << stored) - 1)).astype(np.int64)
    if signed:
        values = np.where(values >= 1 << (stored - 1), values - (1 << stored), values)
    return values.reshape((rows, cols, samples) if samples > 1 else (rows, cols))


def display_values(twin: Path, option: str, tmp: Path) -> np.ndarray:
    pgm = tmp / "display.pgm"
    args = ["dcm2pnm", option, *(["1"] if option in ("+Wi", "+Wl") else []), str(twin), str(pgm)]
    subprocess.run(args, check=True, capture_output=True)
    data = pgm.read_bytes()
    header = data.split(b"\n", 3)  # P5, "cols rows", maxval, pixels
    cols, rows = (int(v) for v in header[1].split())
    return np.frombuffer(header[3], dtype=np.uint8).reshape(rows, cols)


def main(corpus: Path) -> None:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        for rel, tool in TOOLS.items():
            src = corpus / rel
            if rel == "wg04/RG2_UNC":
                src = tmp / "RG2_UNC.dcm"
                subprocess.run(["zstd", "-q", "-d", "-f", str(corpus / "wg04/RG2_UNC.zst"), "-o", str(src)])
            twin = tmp / "twin.dcm"
            subprocess.run([*tool, str(src), str(twin)], check=True, capture_output=True)
            values = stored_values(twin, tmp)
            points = coordinates(*values.shape[:2])
            table = {p: values[p].tolist() for p in points}
            print(f"{rel!r}: shape={values.shape} {table}")
            if rel in DISPLAY:
                grey = display_values(twin, DISPLAY[rel], tmp)
                print(f"    display {DISPLAY[rel]}: {{{', '.join(f'{p}: {grey[p]}' for p in points)}}}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
