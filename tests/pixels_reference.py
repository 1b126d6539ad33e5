"""Known pixel values of the DICOM corpus, from sources other than our decoder.

Shaped after pydicom's ``tests/pixels/pixels_reference.py``: one entry per
file with its shape and values at fixed coordinates. Paths are relative to
``../shared/data/dicom``.

Where the values come from (none were copied from our decoder's output):

* ``dcmtk``: ``tests/make_pixels_reference.py`` (Debian dcmtk 3.6.7 + numpy)
  decompresses the file with ``dcmdjpeg``/``dcmdjpls``/``dcmdrle`` (or
  rewrites it with ``dcmconv +te``), dumps the raw Pixel Data with
  ``dcmdump +W`` and keeps the Bits Stored bits. Display values are
  ``dcm2pnm`` 8-bit renderings (first window ``+Wi 1``, first VOI LUT
  ``+Wl 1`` or min-max ``+Wm``) divided by 255.
* ``twin``: dcmtk has no JPEG 2000 codec, so a lossless J2K file takes the
  dcmtk values of its uncompressed twin in the corpus (the same WG04 or
  pydicom source image: ``RG1_UNCR.dcm``, ``RG2_UNC.zst``, ``MR_small.dcm``).
* ``gdcm``: lossy J2K (no twin can be exact) was decoded with GDCM's
  ``gdcmconv --raw`` (python-gdcm 3.2.6, GDCM's bundled OpenJPEG; our decoder
  goes through pydicom and pylibjpeg-openjpeg), then read as above.

Tolerances (``tol``, in stored-value units; 0 when absent):

* Lossless syntaxes and the uncompressed ones: 0, by definition.
* JPEG-LS near-lossless (``*_JLSN``): 0 against dcmtk's decode, since the
  JPEG-LS decoding process is exactly specified (ISO 14495-1 has no IDCT).
  ``NEAR`` is also kept: the standard bounds every sample's error against the
  original by it; the WG04 files' SOS headers say NEAR=4.
* JPEG baseline / extended (lossy DCT): 2. ISO 10918-2 lets a conforming
  IDCT differ by 1 per sample between implementations (dcmtk's IJG 6b vs
  libjpeg-turbo in pylibjpeg); YCbCr to RGB adds one more rounding.
  The 12-bit ``*_JPLY`` files are decoded by dcmtk on both sides (our decoder
  falls back to ``dcmdjpeg``), so they must match exactly.
* Irreversible JPEG 2000 (``*_J2KI``): 2. The 9/7 wavelet is computed in
  floating point; OpenJPEG builds may round a sample differently.
"""

from __future__ import annotations

from typing import TypedDict

__all__ = ["DISPLAY_REFERENCE", "PIXEL_REFERENCE", "PixelReference"]

SIIM = "siim_torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


class _Required(TypedDict):
    syntax: str
    shape: tuple[int, ...]
    values: dict[tuple[int, int], int | tuple[int, int, int]]
    source: str


class PixelReference(_Required, total=False):
    tol: int
    #: JPEG-LS NEAR: bound on the error against the lossless twin's ``values``.
    near: int
    lossless_twin: str


_MR = {(32, 32): 182, (21, 16): 467, (42, 48): 1414, (16, 42): 337, (55, 8): 314}
_SIIM = {(512, 512): 208, (341, 256): 124, (682, 768): 165, (256, 682): 69, (895, 128): 187}
_RG1 = {(977, 920): 3441, (651, 460): 14281, (1303, 1380): 9700, (488, 1227): 15791, (1710, 230): 3210}
_RG2 = {(1070, 880): 404, (713, 440): 473, (1426, 1320): 423, (535, 1173): 125, (1872, 220): 60}
_RG3 = {(880, 880): 306, (586, 440): 235, (1173, 1320): 116, (440, 1173): 1002, (1539, 220): 0}

PIXEL_REFERENCE: dict[str, PixelReference] = {
    # Uncompressed and deflated syntaxes.
    "pydicom_testfiles/MR_small.dcm": {
        "syntax": "Explicit VR LE",
        "shape": (64, 64),
        "values": _MR,
        "source": "dcmtk",
    },
    "pydicom_testfiles/MR_small_implicit.dcm": {
        "syntax": "Implicit VR LE",
        "shape": (64, 64),
        "values": _MR,
        "source": "dcmtk",
    },
    "pydicom_testfiles/MR_small_expb.dcm": {
        "syntax": "Explicit VR Big Endian",
        "shape": (64, 64),
        "values": _MR,
        "source": "dcmtk",
    },
    "pydicom_testfiles/image_dfl.dcm": {
        "syntax": "Deflated Explicit VR LE",
        "shape": (512, 512),
        "values": {(256, 256): 65, (170, 128): 41, (341, 384): 188, (128, 341): 164, (447, 64): 115},
        "source": "dcmtk",
    },
    "derived/siim_cxr_deflated_le.dcm": {
        "syntax": "Deflated Explicit VR LE",
        "shape": (1024, 1024),
        "values": _SIIM,
        "source": "dcmtk",
    },
    "fo_dicom_via_dcmfx/CR-MONO1-10-chest.dcm": {
        "syntax": "legacy, no File Meta (Implicit VR LE)",
        "shape": (440, 440),
        "values": {(220, 220): 285, (146, 110): 676, (293, 330): 629, (110, 293): 685, (384, 55): 523},
        "source": "dcmtk (dcmconv -f -ti +te)",
    },
    "pydicom_testfiles/CT_small.dcm": {
        "syntax": "Explicit VR LE, signed",
        "shape": (128, 128),
        "values": {(64, 64): 1928, (42, 32): 1136, (85, 96): 1048, (32, 85): 915, (111, 16): 1036},
        "source": "dcmtk",
    },
    "pydicom_testfiles/CR1_6154_cspine_16x16.dcm": {
        "syntax": "Explicit VR LE, 12-bit, Rescale",
        "shape": (16, 16),
        "values": {(8, 8): 2515, (5, 4): 2503, (10, 12): 2509, (4, 10): 2576, (13, 2): 2608},
        "source": "dcmtk",
    },
    "pydicom_data/mlut_18.dcm": {
        "syntax": "Explicit VR LE, signed 12-bit",
        "shape": (512, 512),
        "values": {(256, 256): -83, (170, 128): -820, (341, 384): 2047, (128, 341): -2048, (447, 64): -2048},
        "source": "dcmtk",
    },
    # RLE.
    "pydicom_testfiles/MR_small_RLE.dcm": {
        "syntax": "RLE Lossless",
        "shape": (64, 64),
        "values": _MR,
        "source": "dcmtk (dcmdrle)",
    },
    "wg04/RG2_RLE": {"syntax": "RLE Lossless", "shape": (2140, 1760), "values": _RG2, "source": "dcmtk"},
    "wg04/RG3_RLE": {"syntax": "RLE Lossless", "shape": (1760, 1760), "values": _RG3, "source": "dcmtk"},
    # JPEG (ISO 10918).
    SIIM: {
        "syntax": "JPEG Baseline 8-bit",
        "shape": (1024, 1024),
        "values": _SIIM,
        "source": "dcmtk (dcmdjpeg)",
        "tol": 2,
    },
    "pydicom_testfiles/SC_rgb_jpeg_dcmtk.dcm": {
        "syntax": "JPEG Baseline 8-bit, YBR_FULL",
        "shape": (100, 100, 3),
        "values": {
            (50, 50): (125, 130, 255),
            (33, 25): (129, 255, 129),
            (66, 75): (0, 0, 0),
            (25, 66): (0, 255, 5),
            (87, 12): (192, 192, 192),
        },
        "source": "dcmtk (dcmdjpeg, converted to RGB)",
        "tol": 2,
    },
    "pydicom_testfiles/JPGExtended.dcm": {
        "syntax": "JPEG Extended 12-bit",
        "shape": (1024, 256),
        "values": {(512, 128): 14, (341, 64): 14, (682, 192): 1, (256, 170): 46, (895, 32): 1},
        "source": "dcmtk (dcmdjpeg)",
        "tol": 2,
    },
    "wg04/RG2_JPLY": {
        "syntax": "JPEG Extended 12-bit (dcmtk fallback)",
        "shape": (2140, 1760),
        "values": {(1070, 880): 410, (713, 440): 478, (1426, 1320): 426, (535, 1173): 121, (1872, 220): 65},
        "source": "dcmtk (dcmdjpeg)",
    },
    "wg04/RG3_JPLY": {
        "syntax": "JPEG Extended 12-bit (dcmtk fallback)",
        "shape": (1760, 1760),
        "values": {(880, 880): 305, (586, 440): 238, (1173, 1320): 114, (440, 1173): 1002, (1539, 220): 1},
        "source": "dcmtk (dcmdjpeg)",
    },
    "wg04/RG2_JPLL": {
        "syntax": "JPEG Lossless SV1",
        "shape": (2140, 1760),
        "values": _RG2,
        "source": "dcmtk (dcmdjpeg)",
    },
    "wg04/RG3_JPLL": {
        "syntax": "JPEG Lossless SV1",
        "shape": (1760, 1760),
        "values": _RG3,
        "source": "dcmtk (dcmdjpeg)",
    },
    # JPEG-LS.
    "pydicom_testfiles/MR_small_jpeg_ls_lossless.dcm": {
        "syntax": "JPEG-LS Lossless",
        "shape": (64, 64),
        "values": _MR,
        "source": "dcmtk (dcmdjpls)",
    },
    "wg04/RG2_JLSL": {"syntax": "JPEG-LS Lossless", "shape": (2140, 1760), "values": _RG2, "source": "dcmtk"},
    "wg04/RG3_JLSL": {"syntax": "JPEG-LS Lossless", "shape": (1760, 1760), "values": _RG3, "source": "dcmtk"},
    "wg04/RG1_JLSN": {
        "syntax": "JPEG-LS Near-Lossless",
        "shape": (1955, 1841),
        "values": {
            (977, 920): 3442,
            (651, 460): 14278,
            (1303, 1380): 9699,
            (488, 1227): 15787,
            (1710, 230): 3206,
        },
        "source": "dcmtk (dcmdjpls)",
        "near": 4,
        "lossless_twin": "pydicom_data/RG1_UNCR.dcm",
    },
    "wg04/RG2_JLSN": {
        "syntax": "JPEG-LS Near-Lossless",
        "shape": (2140, 1760),
        "values": {(1070, 880): 402, (713, 440): 475, (1426, 1320): 420, (535, 1173): 129, (1872, 220): 60},
        "source": "dcmtk (dcmdjpls)",
        "near": 4,
        "lossless_twin": "wg04/RG2_JPLL",
    },
    "wg04/RG3_JLSN": {
        "syntax": "JPEG-LS Near-Lossless",
        "shape": (1760, 1760),
        "values": {(880, 880): 304, (586, 440): 232, (1173, 1320): 120, (440, 1173): 1000, (1539, 220): 0},
        "source": "dcmtk (dcmdjpls)",
        "near": 4,
        "lossless_twin": "wg04/RG3_JPLL",
    },
    # JPEG 2000.
    "pydicom_testfiles/MR_small_jp2klossless.dcm": {
        "syntax": "JPEG 2000 Lossless",
        "shape": (64, 64),
        "values": _MR,
        "source": "twin MR_small.dcm (dcmtk)",
    },
    "pydicom_data/RG1_UNCR.dcm": {
        "syntax": "Explicit VR LE, 15-bit",
        "shape": (1955, 1841),
        "values": _RG1,
        "source": "dcmtk",
    },
    "pydicom_data/RG1_J2KR.dcm": {
        "syntax": "JPEG 2000 Lossless",
        "shape": (1955, 1841),
        "values": _RG1,
        "source": "twin RG1_UNCR.dcm (dcmtk)",
    },
    "wg04/RG2_J2KR": {
        "syntax": "JPEG 2000 Lossless",
        "shape": (2140, 1760),
        "values": _RG2,
        "source": "twin RG2_UNC.zst (dcmtk)",
    },
    "wg04/RG1_J2KI": {
        "syntax": "JPEG 2000 (lossy, 10:1)",
        "shape": (1955, 1841),
        "values": {
            (977, 920): 3342,
            (651, 460): 14321,
            (1303, 1380): 9742,
            (488, 1227): 15836,
            (1710, 230): 3278,
        },
        "source": "gdcm (gdcmconv --raw)",
        "tol": 2,
    },
    "wg04/RG2_J2KI": {
        "syntax": "JPEG 2000 (lossy, 10:1)",
        "shape": (2140, 1760),
        "values": {(1070, 880): 406, (713, 440): 473, (1426, 1320): 423, (535, 1173): 124, (1872, 220): 67},
        "source": "gdcm (gdcmconv --raw)",
        "tol": 2,
    },
}

#: Display values (after Modality LUT, VOI and MONOCHROME1 inversion, 1 = bright):
#: dcmtk ``dcm2pnm`` 8-bit grey levels at the same coordinates as above, / 255.
#: The tolerance is 1.5/255: dcmtk rounds to 8 bits (±0.5/255) and computes the
#: window in its own arithmetic (±1/255 at a rounding edge).
DISPLAY_REFERENCE: dict[str, tuple[str, dict[tuple[int, int], int]]] = {
    "pydicom_data/RG1_UNCR.dcm": (
        "+Wi 1 (window 1, MONOCHROME1)",
        {(977, 920): 225, (651, 460): 133, (1303, 1380): 172, (488, 1227): 120, (1710, 230): 227},
    ),
    "wg04/RG2_JPLL": (
        "+Wi 1 (window 1)",
        {(1070, 880): 100, (713, 440): 118, (1426, 1320): 105, (535, 1173): 31, (1872, 220): 15},
    ),
    "fo_dicom_via_dcmfx/CR-MONO1-10-chest.dcm": (
        "+Wi 1 (window 1, MONOCHROME1)",
        {(220, 220): 193, (146, 110): 95, (293, 330): 107, (110, 293): 93, (384, 55): 134},
    ),
    "pydicom_testfiles/CR1_6154_cspine_16x16.dcm": (
        "+Wi 1 (rescale then window 1, MONOCHROME1)",
        {(8, 8): 98, (5, 4): 99, (10, 12): 98, (4, 10): 94, (13, 2): 92},
    ),
    "pydicom_testfiles/CT_small.dcm": (
        "+Wm (min-max after rescale)",
        {(64, 64): 222, (42, 32): 124, (85, 96): 113, (32, 85): 97, (111, 16): 112},
    ),
}
