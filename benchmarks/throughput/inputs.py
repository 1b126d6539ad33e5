"""The inputs: which kinds of scan are measured, their template files, and distinct copies of them.

Apart because every part drops copies (the service deduplicates by content, so each copy must
differ) and the throughput N of each kind is chosen here; derived inputs (the 16-bit PNG, the RLE
file) are made once, outside any timed part.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.throughput.common import say

KERMANY = "cxr/kermany_pneumonia_224/test/PNEUMONIA/person1_virus_6.jpeg"
RG1_UNCR = "dicom/pydicom_data/RG1_UNCR.dcm"
RG1_J2KR = "dicom/pydicom_data/RG1_J2KR.dcm"
RG1_JLSN = "dicom/wg04/RG1_JLSN"


@dataclasses.dataclass(frozen=True)
class Kind:
    key: str
    label: str
    n_quick: int  # copies per throughput measurement with --quick
    n_full: int


KINDS = (
    Kind("jpeg", "JPEG Kermany 224 px", 60, 300),
    Kind("png16", "PNG 16-bit 1955x1841", 12, 40),
    Kind("uncompressed", "DICOM uncompressed RG1_UNCR", 12, 40),
    Kind("rle", "DICOM RLE (RG1 re-encoded)", 12, 40),
    Kind("jpegls", "DICOM JPEG-LS near-lossless", 6, 24),
    Kind("j2k", "DICOM JPEG 2000 lossless", 4, 12),
)
KIND = {k.key: k for k in KINDS}
RASTER = {"jpeg", "png16"}


def prepare_sources(data: Path, work: Path, kinds: list[str]) -> dict[str, Path]:
    """One template file per kind (derived ones made here, outside any timing); skips what is missing."""
    work.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    plain = {"jpeg": KERMANY, "uncompressed": RG1_UNCR, "jpegls": RG1_JLSN, "j2k": RG1_J2KR}
    for key in kinds:
        if key in plain:
            path = data / plain[key]
            if path.is_file():
                found[key] = path
            else:
                say(f"skipped {key}: {path} not found")
            continue
        source = data / RG1_UNCR
        if not source.is_file():
            say(f"skipped {key}: {source} (its source) not found")
            continue
        try:
            found[key] = _derive(key, source, work)
        except Exception as exc:  # an encoder missing: say so, measure the rest
            say(f"skipped {key}: cannot derive it from RG1_UNCR ({type(exc).__name__}: {exc})")
    return found


def _derive(key: str, source: Path, work: Path) -> Path:
    import pydicom

    ds = pydicom.dcmread(source)
    if key == "png16":
        import cv2

        pixels = ds.pixel_array.astype(np.uint32)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            pixels = pixels.max() - pixels
        shift = max(0, 16 - int(ds.BitsStored))
        out = work / "rg1_16bit.png"
        if not cv2.imwrite(str(out), (pixels << shift).astype(np.uint16)):
            raise RuntimeError("cv2.imwrite failed")
        return out
    from pydicom.uid import RLELossless

    try:
        ds.compress(RLELossless, encoding_plugin="pylibjpeg")
    except Exception:
        ds = pydicom.dcmread(source)
        ds.compress(RLELossless)  # pydicom's own (slower) encoder
    out = work / "rg1_rle.dcm"
    ds.save_as(out)
    return out


class CopyMaker:
    """Distinct copies (where identity lives: bytes after the end marker, a new SOP Instance UID)."""

    def __init__(self, sources: dict[str, Path]) -> None:
        self.sources = sources
        self._serial = itertools.count()
        self._raw: dict[str, bytes] = {}
        self._datasets: dict[str, Any] = {}

    def make(self, kind: str) -> tuple[str, bytes, str]:
        """(file name, bytes, sha256) of a new copy."""
        import hashlib

        i = next(self._serial)
        src = self.sources[kind]
        if kind in RASTER:
            if kind not in self._raw:
                self._raw[kind] = src.read_bytes()
            data = self._raw[kind] + i.to_bytes(4, "big")  # after EOI / IEND: ignored by decoders
            name = f"{kind}-{i:06d}{src.suffix}"
        else:
            import pydicom
            from pydicom.uid import generate_uid

            ds = self._datasets.get(kind)
            if ds is None:
                ds = self._datasets[kind] = pydicom.dcmread(src)
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            buf = io.BytesIO()
            ds.save_as(buf)
            data = buf.getvalue()
            name = f"{kind}-{i:06d}.dcm"
        return name, data, hashlib.sha256(data).hexdigest()

    def many(self, kind: str, n: int) -> list[tuple[str, bytes, str]]:
        return [self.make(kind) for _ in range(n)]


def n_for(args: argparse.Namespace, key: str) -> int:
    base = KIND[key].n_quick if args.quick else KIND[key].n_full
    return max(2, round(base * args.scale_n))
