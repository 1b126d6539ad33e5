"""DICOM decoder plugin (pydicom 3 and its pixel plugins).

Display pipeline, following DICOM PS3.3 C.11 (grey-scale transforms):

1. Modality LUT: Rescale Slope/Intercept or the Modality LUT Sequence.
2. VOI: the VOI LUT Sequence, else the first Window Center/Width with its
   VOI LUT Function (LINEAR, LINEAR_EXACT, SIGMOID), else the image's own
   min-max range.
3. MONOCHROME1 is inverted so that 1 always means bright.

Colour images (RGB, YBR_*) are converted to grey with ITU-R BT.601 weights.
Multi-frame objects: the first frame is used.

When every pydicom pixel plugin fails on a JPEG, JPEG-LS or RLE file and
Debian's dcmtk is installed, the file is decompressed with dcmtk's
``dcmdjpeg``/``dcmdjpls``/``dcmdrle`` into a temporary uncompressed copy and
read from there. This rescues 12-bit JPEG Extended files whose scan headers
libjpeg rejects ("scan start must be zero") but dcmtk accepts with a warning.
"""

from __future__ import annotations

import io
import logging
import math
import re
import shutil
import struct
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..age import read_age
from ..errors import (
    CorruptImage,
    ImageTooLarge,
    NotAnImage,
    UnsupportedImage,
    UnsupportedTransferSyntax,
)
from .base import DecodedImage, DecodeLimits

__all__ = ["PREFERRED_PLUGINS", "DicomDecoder", "StoredFrame", "plugin_order"]

log = logging.getLogger(__name__)

_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# Groups a legacy (pre-Part 10, no preamble) file may start with.
_LEGACY_FIRST_GROUPS = (0x0002, 0x0008)
_GREY = ("MONOCHROME1", "MONOCHROME2")


_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")


def _looks_like_legacy(head: bytes) -> bool:
    if len(head) < 8:
        return False
    group = int.from_bytes(head[0:2], "little")
    element = int.from_bytes(head[2:4], "little")
    return group in _LEGACY_FIRST_GROUPS and element < 0x0100


@dataclass(frozen=True)
class StoredFrame:
    """One frame's stored values and what is needed to display them.

    Attributes:
        values: The pixel array as pydicom (or the dcmtk fallback) returns it:
            stored values, or RGB for colour images; no grey-scale transform.
        dataset: The pydicom dataset (for the Modality LUT and VOI modules).
        photometric: Photometric Interpretation, stripped.
        decoder: ``dicom`` or ``dicom+<dcmtk tool>``.
        metadata: As in :class:`DecodedImage`.
        header: As in :class:`DecodedImage` (None when decoded from ``path``).
    """

    values: np.ndarray
    dataset: Any
    photometric: str
    decoder: str
    metadata: dict[str, Any]
    header: bytes | None = None


class DicomDecoder:
    """Decode DICOM Part 10 files and legacy headerless ACR-NEMA style files."""

    name = "dicom"

    def sniff(self, head: bytes, path: Path) -> bool:
        return head[128:132] == b"DICM" or _looks_like_legacy(head)

    # -- reading -----------------------------------------------------------------------
    def _read(self, path: Path, data: bytes | None = None) -> Any:
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.uid import ImplicitVRLittleEndian

        # pydicom's value-validation warnings quote the offending header value, and a name
        # typed into a code field would reach the log that way: we judge values ourselves.
        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path if data is None else io.BytesIO(data))
            except InvalidDicomError:
                # Legacy files without the 128-byte preamble and File Meta.
                try:
                    ds = pydicom.dcmread(path if data is None else io.BytesIO(data), force=True)
                except Exception as exc:
                    raise NotAnImage(
                        f"{path.name} is not a DICOM file (no 'DICM' marker and no valid header)."
                    ) from exc
                if len(ds) == 0:
                    raise NotAnImage(f"{path.name} is not a DICOM file (no data elements found).") from None
                if "TransferSyntaxUID" not in ds.file_meta:
                    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            except (EOFError, OSError) as exc:
                raise CorruptImage(f"{path.name} is truncated: the DICOM header ends early.") from exc
            except Exception as exc:
                raise CorruptImage(f"{path.name}: the DICOM header cannot be parsed ({exc}).") from exc
        return ds

    def decode(self, path: Path, limits: DecodeLimits) -> DecodedImage:
        return self.decode_data(None, path, limits)

    def decode_data(self, data: bytes | None, path: Path, limits: DecodeLimits) -> DecodedImage:
        """Decode DICOM already in memory (None: read ``path``); else ``path`` only names it."""
        if data is None:
            data = path.read_bytes()  # one read: the pixels and the header come from the same bytes
        frame = self.decode_stored(path, limits, data=data)
        grey = _to_display_grey(frame.values, frame.dataset, frame.photometric)
        return DecodedImage(
            pixels=grey,
            kind="dicom",
            decoder=frame.decoder,
            metadata=frame.metadata,
            header=frame.header,
        )

    def decode_stored(self, path: Path, limits: DecodeLimits, *, data: bytes | None = None) -> StoredFrame:
        """The first frame as decoded, before the Modality LUT, VOI and inversion.

        Exposed so that tests can compare the decoders' output with reference
        values obtained elsewhere (dcmtk), and for diagnostics. ``data``: the
        file's content, already read (``path`` then only names it).
        """
        ds = self._read(path, data)
        header = None if data is None else _header_bytes(ds, data)
        metadata = _metadata(ds)
        sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
        if sop_class == _DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
            raise UnsupportedImage(
                f"{path.name} is a DICOMDIR (a media index), not an image.",
                action="Copy the image files the DICOMDIR refers to into the inbox, not the index.",
            )
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            if "Rows" in ds or _is_image_storage(sop_class):
                raise CorruptImage(
                    f"{path.name} (SOP Instance {metadata.get('sop_instance_uid', '?')}) "
                    "is an image object but has no pixel data: the file is truncated."
                )
            raise UnsupportedImage(
                f"{path.name} has no pixel data (SOP Class {sop_class or 'unknown'}: e.g. a "
                "structured report or presentation state), so there is nothing to analyse."
            )
        rows, cols = _int_tag(ds, "Rows", 0) or 0, _int_tag(ds, "Columns", 0) or 0
        frames = _int_tag(ds, "NumberOfFrames", 1) or 1
        samples = _int_tag(ds, "SamplesPerPixel", 1) or 1
        if rows * cols * frames * samples > limits.max_pixels:
            raise ImageTooLarge(
                f"{path.name} declares {frames} frame(s) of {rows}x{cols}x{samples} "
                f"({rows * cols * frames * samples:,} samples), over the limit of "
                f"{limits.max_pixels:,}."
            )
        photometric = str(ds.get("PhotometricInterpretation", "")).strip()
        if photometric not in _GREY + _COLOUR:
            raise UnsupportedImage(
                f"{path.name} uses photometric interpretation {photometric or '(missing)'!r}, "
                "which this runtime cannot turn into a grey radiograph.",
                action="Configure the modality to send MONOCHROME1/2 or RGB images.",
            )
        decoder_name = self.name
        try:
            _check_decoder_available(ds, path)
            arr = _first_frame(ds, path, frames)
        except (CorruptImage, UnsupportedTransferSyntax) as exc:
            rescued = _dcmtk_fallback(ds, path, frames, data)
            if rescued is None:
                raise
            arr, tool = rescued
            decoder_name = f"{self.name}+{tool}"
            log.info(
                "%s: pydicom could not decode it (%s); decoded with dcmtk %s instead",
                path.name,
                exc.message.splitlines()[0],
                tool,
            )
        return StoredFrame(
            values=arr,
            dataset=ds,
            photometric=photometric,
            decoder=decoder_name,
            metadata=metadata,
            header=header,
        )


# Storage SOP classes under 1.2.840.10008.5.1.4.1.1. that carry no pixel data (PS3.4 B.5):
# presentation states (11.x), structured reports and KOS (88.x), waveforms (9.x),
# raw data (66), spatial registration/fiducials (66.x), encapsulated documents (104.x),
# RT plans/structure sets/doses-as-data (481.2-481.9 and higher).
_NON_IMAGE_PREFIXES = tuple(
    f"1.2.840.10008.5.1.4.1.1.{suffix}"
    for suffix in (
        "11.",
        "88.",
        "9.",
        "66",
        "104.",
        "481.2",
        "481.3",
        "481.4",
        "481.5",
        "481.6",
        "481.7",
        "481.8",
        "481.9",
        "78.",
        "79.",
        "80.",
        "81.",
        "82.",
    )
)


def _is_image_storage(sop_class: str) -> bool:
    """An image storage SOP class: missing pixel data means the file was cut short."""
    return sop_class.startswith("1.2.840.10008.5.1.4.1.1.") and not sop_class.startswith(_NON_IMAGE_PREFIXES)


def _check_decoder_available(ds: Any, path: Path) -> None:
    from pydicom.pixels.decoders.base import get_decoder

    tsyntax = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise UnsupportedTransferSyntax(
            f"Cannot decode {path.name}: transfer syntax {tsyntax.name} ({tsyntax}) is not "
            "supported by any installed decoder.",
            action="Configure the sender to use an uncompressed or JPEG 2000/JPEG-LS/RLE syntax.",
        ) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise UnsupportedTransferSyntax(
            f"Cannot decode {path.name}: transfer syntax {tsyntax.name} needs {missing}, "
            "which this installation lacks.",
            action="Install the named package in the runtime's environment and restart.",
        )


#: Transfer syntax UID -> the pydicom plugin tried first, where another than pydicom's first
#: choice is faster and gave bit-identical pixels on every file of the shared corpus
#: (``python -m benchmarks.bench_dicom_plugins`` measures both; numbers in
#: docs/performance.md). The pixels are the result's identity (``message_id``) and the
#: model's input, so a plugin that rounds differently is never preferred for speed. Only
#: grey images take it (the corpus's colour evidence is one small file); if the preferred
#: plugin is missing or fails, pydicom's own order takes over. RLE is not listed: pydicom
#: already tries pylibjpeg-rle first.
PREFERRED_PLUGINS: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "pillow",  # JPEG baseline: libjpeg-turbo, ~0.3x GDCM's time
    "1.2.840.10008.1.2.4.80": "pyjpegls",  # JPEG-LS lossless: CharLS, ~0.7x GDCM's time
    "1.2.840.10008.1.2.4.81": "pyjpegls",  # JPEG-LS near-lossless (decoding is exact), ~0.6x
}


def plugin_order(syntax: str) -> list[str]:
    """pydicom's installed pixel plugins for ``syntax``, in the order it tries them.

    ``available_plugins`` is sorted by name; the order of preference is only in the
    decoder's ``_available``. The benchmark and the identity test compare with its first.
    """
    from pydicom.pixels.decoders.base import get_decoder

    decoder = get_decoder(syntax)
    return list(getattr(decoder, "_available", None) or decoder.available_plugins)


def _preferred_frame(ds: Any, frames: int) -> np.ndarray | None:
    """The first frame by the syntax's preferred plugin; None: no preference, or it failed."""
    plugin = PREFERRED_PLUGINS.get(str(ds.file_meta.TransferSyntaxUID))
    if plugin is None or str(ds.get("PhotometricInterpretation", "")).strip() not in _GREY:
        return None
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.pixels.utils import pixel_array

    if plugin not in get_decoder(ds.file_meta.TransferSyntaxUID).available_plugins:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(pixel_array(ds, index=0 if frames > 1 else None, decoding_plugin=plugin))
    except Exception as exc:  # pydicom's order (and then dcmtk) will say what is wrong with the file
        log.info("preferred pixel plugin %s failed, trying the others: %s", plugin, str(exc)[:200])
        return None


def _first_frame(ds: Any, path: Path, frames: int) -> np.ndarray:
    from pydicom.pixels.utils import pixel_array

    preferred = _preferred_frame(ds, frames)
    if preferred is not None:
        return preferred
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = pixel_array(ds, index=0) if frames > 1 else ds.pixel_array
    except Exception as exc:
        tsyntax = ds.file_meta.TransferSyntaxUID
        short = _short_native_pixel_data(ds, frames)
        if short is not None:
            raise CorruptImage(
                f"{path.name} is truncated: its pixel data has {short[0]:,} of the {short[1]:,} bytes "
                "its header declares."
            ) from exc
        raise CorruptImage(
            f"Cannot decode the pixel data of {path.name} ({tsyntax.name}): {exc}",
        ) from exc
    return np.asarray(arr)


def _short_native_pixel_data(ds: Any, frames: int) -> tuple[int, int] | None:
    """``(have, declared)`` bytes when uncompressed pixel data is shorter than its header says."""
    if ds.file_meta.TransferSyntaxUID.is_compressed or "PixelData" not in ds:
        return None
    rows, cols = _int_tag(ds, "Rows", 0) or 0, _int_tag(ds, "Columns", 0) or 0
    samples, bits = _int_tag(ds, "SamplesPerPixel", 1) or 1, _int_tag(ds, "BitsAllocated", 0) or 0
    declared = (rows * cols * samples * frames * bits + 7) // 8
    have = len(ds.PixelData or b"")
    return (have, declared) if declared > 0 and have < declared else None


# Transfer syntax UID prefix -> dcmtk tool that decompresses it.
_DCMTK_TOOLS = {
    "1.2.840.10008.1.2.4.5": "dcmdjpeg",  # .50 baseline, .51 extended, .57 lossless
    "1.2.840.10008.1.2.4.70": "dcmdjpeg",  # lossless SV1
    "1.2.840.10008.1.2.4.8": "dcmdjpls",  # .80 JPEG-LS lossless, .81 near-lossless
    "1.2.840.10008.1.2.5": "dcmdrle",
}
DCMTK_TIMEOUT_S = 60.0


def _dcmtk_fallback(
    ds: Any, path: Path, frames: int, data: bytes | None = None
) -> tuple[np.ndarray, str] | None:
    """Decompress with dcmtk into a temporary file; None when no tool applies.

    ``data``: the content already read and hashed; it is written to the temporary
    folder and dcmtk reads that copy, never ``path`` again (only this rare fallback
    pays for the copy).
    """
    import pydicom

    tsyntax = str(ds.file_meta.TransferSyntaxUID)
    tool = next((t for prefix, t in _DCMTK_TOOLS.items() if tsyntax.startswith(prefix)), None)
    binary = shutil.which(tool) if tool else None
    if tool is None or binary is None:
        return None
    with tempfile.TemporaryDirectory(prefix="edge-dcmtk-") as tmp:
        out = Path(tmp) / "decompressed.dcm"
        source = path
        if data is not None:
            source = Path(tmp) / "input.dcm"
            source.write_bytes(data)
        try:
            proc = subprocess.run(
                [binary, str(source), str(out)],
                capture_output=True,
                text=True,
                timeout=DCMTK_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise CorruptImage(
                f"{path.name}: dcmtk {tool} did not finish within {DCMTK_TIMEOUT_S:.0f} s."
            ) from exc
        if proc.returncode != 0 or not out.is_file():
            log.info(
                "dcmtk %s could not decode %s either: %s",
                tool,
                path.name,
                (proc.stderr or proc.stdout).strip()[:300],
            )
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain = pydicom.dcmread(out)
            arr = _first_frame(plain, path, frames)
    return arr, tool


#: Rows converted to display grey at a time. The modality and VOI transforms work in
#: float64 with several full-size temporaries (pydicom's windowing: ~30 MB each for a
#: 1955x1841 CR, ~100 MB at the peak); a band of rows keeps them to a few MB. Every step
#: is element-wise, so the pixels are exactly those of the whole image at once.
_BAND_ROWS = 128


def _bands(rows: int, size: int) -> Iterator[slice]:
    for start in range(0, rows, size):
        yield slice(start, min(start + size, rows))


_T = TypeVar("_T")


def _damaged_window_is_corrupt(step: Callable[..., _T], *args: Any) -> _T:
    """``step(*args)``, a VOI window step; a damaged Window Center/Width becomes CorruptImage."""
    try:
        return step(*args)
    except (ValueError, TypeError, OverflowError, IndexError) as exc:
        # The image cannot be shown as the modality meant.
        raise CorruptImage(
            f"The VOI window (Window Center/Width) in the DICOM header is damaged "
            f"({type(exc).__name__}: {exc})."
        ) from exc


def _to_display_grey(arr: np.ndarray, ds: Any, photometric: str) -> np.ndarray:
    from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

    if photometric in _COLOUR:
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise UnsupportedImage(f"Colour image with unexpected shape {arr.shape}.")
        rgb = arr.astype(np.float32)
        luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        max_value = float(2 ** (_int_tag(ds, "BitsStored", 8) or 8) - 1)
        colour_grey: np.ndarray = np.clip(luma / max_value, 0.0, 1.0).astype(np.float32)
        return colour_grey

    if arr.ndim != 2:
        raise UnsupportedImage(f"Expected a single grey frame, got pixel array shape {arr.shape}.")

    def values(band: slice) -> np.ndarray:
        return np.asarray(apply_modality_lut(arr[band], ds)).astype(np.float32, copy=False)

    voi_lut = "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0
    # pydicom unpacks a lookup table's data on every call: a file with one takes a single band.
    rows = arr.shape[0] if voi_lut or "ModalityLUTSequence" in ds else _BAND_ROWS
    grey = np.empty(arr.shape, dtype=np.float32)
    if voi_lut:
        lut = ds.VOILUTSequence[0]
        bits = int(lut.LUTDescriptor[2]) if "LUTDescriptor" in lut else 16
        for band in _bands(arr.shape[0], rows):
            # The LUT is indexed by stored values after the modality transform; it
            # wants integers (a float array makes pydicom guess).
            out = apply_voi_lut(np.rint(values(band)).astype(np.int64), ds, prefer_lut=True)
            grey[band] = out.astype(np.float32) / float(2**bits - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        window = _damaged_window_is_corrupt(_Window.of, ds)
        for band in _bands(arr.shape[0], rows):
            grey[band] = _damaged_window_is_corrupt(window.apply, values(band), ds)
    else:
        for band in _bands(arr.shape[0], rows):
            grey[band] = values(band)
        lo, hi = float(grey.min()), float(grey.max())
        if hi > lo:
            np.subtract(grey, lo, out=grey)
            np.divide(grey, hi - lo, out=grey)
        else:
            grey.fill(0.0)
    np.clip(grey, 0.0, 1.0, out=grey)
    if photometric == "MONOCHROME1":
        np.subtract(1.0, grey, out=grey)
    return grey


def _first_value(value: Any) -> float:
    try:
        number = float(value[0])
    except TypeError:
        number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{number} is not a finite number")
    return number


@dataclass(frozen=True)
class _Window:
    """The first VOI window (PS3.3 C.11.2.1.2) with pydicom, scaled to [0, 1].

    ``apply_windowing`` maps onto the range the Modality LUT module allows
    (PS3.3 C.11.1.1.1), which depends on Bits Stored, the pixel sign and the
    rescale. Rather than repeat that rule here, the range is read back from
    pydicom by windowing two values far outside the window: LINEAR and
    LINEAR_EXACT clip them to the ends exactly, SIGMOID comes within 1e-80.
    """

    lo: float
    hi: float

    @classmethod
    def of(cls, ds: Any) -> _Window:
        from pydicom.pixels.processing import apply_windowing

        # A width under 1 is invalid for LINEAR (pydicom raises); such files exist,
        # and earlier releases treated them as width 1 (a threshold at the centre).
        width = _first_value(ds.WindowWidth)
        if width < 1.0:
            log.info("window width %s is under 1; using 1", width)
            ds.WindowWidth = 1.0
            width = 1.0
        center = _first_value(ds.WindowCenter)
        with np.errstate(over="ignore"):
            lo, hi = apply_windowing(np.array([center - 50 * width, center + 50 * width]), ds, index=0)
        return cls(float(lo), float(hi))

    def apply(self, values: np.ndarray, ds: Any) -> np.ndarray:
        """``values`` (after the modality transform) windowed to [0, 1], float64."""
        from pydicom.pixels.processing import apply_windowing

        if self.hi <= self.lo:
            return np.zeros(values.shape)
        # SIGMOID: exp() overflows to inf far below the centre, which correctly gives 0.
        with np.errstate(over="ignore"):
            out = apply_windowing(values, ds, index=0)
        scaled: np.ndarray = (out - self.lo) / (self.hi - self.lo)
        return scaled


#: Pixel Data, Float Pixel Data, Double Float Pixel Data: where a header ends.
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


def _header_bytes(ds: Any, data: bytes) -> bytes:
    """``data`` up to its pixel data element: what the reports are built from.

    Found from where pydicom read the pixel data's value (its element header,
    8 or 12 bytes before, must hold the tag); where that cannot be trusted (a
    deflated data set, whose offsets are in the inflated stream) all of ``data``.
    Either way these are the bytes that were decoded, never the file read again.
    """
    for tag in _PIXEL_TAGS:
        if tag not in ds:
            continue
        value_tell = getattr(ds.get_item(tag), "value_tell", None)
        if not isinstance(value_tell, int):
            break
        group, element = tag >> 16, tag & 0xFFFF
        marks = (struct.pack("<HH", group, element), struct.pack(">HH", group, element))
        implicit = bool(getattr(ds, "original_encoding", (False,))[0])
        for start in (value_tell - 8,) if implicit else (value_tell - 12, value_tell - 8):
            if start > 0 and data[start : start + 4] in marks:
                return data[:start]
        break
    return data


def _int_tag(ds: Any, keyword: str, default: int | None) -> int | None:
    """An integer header value, or ``default`` when it is absent, empty or not a number.

    Damaged files carry empty or garbled values in required tags; the caller
    decides whether that makes the image unusable (a typed error), never int(None).
    """
    try:
        value = ds.get(keyword)
        return default if value is None or value == "" else int(value)
    except (TypeError, ValueError, OverflowError):
        return default


def _metadata(ds: Any) -> dict[str, Any]:
    """Identifiers and acquisition facts. Deliberately no patient name/ID/birth date.

    The patient's age (``patient_age_years``, from Patient's Age or the birth date against the
    study date; ``age_source`` says which, or ``missing``/``unreadable``) is here for the intake
    check only: it never reaches a message, a log line or a report (``results`` publishes the
    fields its schema names, and the age is not one).
    """

    def text(keyword: str) -> str | None:
        value = ds.get(keyword)
        return str(value).strip() or None if value is not None else None

    meta: dict[str, Any] = {
        "study_instance_uid": text("StudyInstanceUID"),
        "series_instance_uid": text("SeriesInstanceUID"),
        "sop_instance_uid": text("SOPInstanceUID"),
        "sop_class_uid": text("SOPClassUID"),
        "modality": text("Modality"),
        "body_part_examined": text("BodyPartExamined"),
        "view_position": text("ViewPosition"),
        "photometric_interpretation": text("PhotometricInterpretation"),
        "transfer_syntax_uid": str(ds.file_meta.get("TransferSyntaxUID", "")) or None,
        "rows": _int_tag(ds, "Rows", None),
        "columns": _int_tag(ds, "Columns", None),
        "number_of_frames": _int_tag(ds, "NumberOfFrames", 1) or 1,
        "bits_stored": _int_tag(ds, "BitsStored", None),
    }
    age = read_age(text("PatientAge"), text("PatientBirthDate"), text("StudyDate"), text("AcquisitionDate"))
    meta["age_source"] = age.source
    meta["patient_age_years"] = age.years
    manufacturer = text("Manufacturer")
    if manufacturer:
        # For drift monitoring (a new device at the site); a code-like copy, bounded.
        meta["manufacturer"] = re.sub(r"[^A-Za-z0-9 ._-]", "", manufacturer)[:32].strip() or None
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if spacing is not None:
        try:
            meta["pixel_spacing_mm"] = [float(spacing[0]), float(spacing[1])]
        except (TypeError, ValueError, IndexError):
            log.debug("ignoring malformed pixel spacing %r", spacing)
    return {k: v for k, v in meta.items() if v is not None}
