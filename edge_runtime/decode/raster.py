"""PNG and JPEG decoder plugin (OpenCV).

8- and 16-bit, grey, RGB and RGBA. Dimensions are read from the header
before decoding so a decompression bomb is refused without allocating it,
and a JPEG/PNG without its end marker is reported as truncated (OpenCV
would otherwise silently return a half-grey image).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from ..errors import CorruptImage, ImageTooLarge, UnsupportedImage
from .base import DecodedImage, DecodeLimits

__all__ = ["RasterDecoder", "image_dimensions"]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
# SOF markers carrying frame dimensions (not DHT C4, JPG C8, DAC CC).
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _SOF_MARKERS:
            if pos + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return height, width
        pos += 2 + length
    return None


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a PNG or JPEG header without decoding, or None."""
    if data.startswith(_PNG_MAGIC) and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return height, width
    if data.startswith(_JPEG_MAGIC):
        return _jpeg_dimensions(data)
    return None


class RasterDecoder:
    """Decode PNG and JPEG files with OpenCV."""

    name = "raster"

    def sniff(self, head: bytes, path: Path) -> bool:
        return head.startswith(_PNG_MAGIC) or head.startswith(_JPEG_MAGIC)

    def decode(self, path: Path, limits: DecodeLimits) -> DecodedImage:
        return self.decode_data(path.read_bytes(), path, limits)

    def decode_data(self, data: bytes, path: Path, limits: DecodeLimits) -> DecodedImage:
        """Decode a PNG/JPEG already in memory; ``path`` only names it in messages."""
        import cv2

        kind = "PNG" if data.startswith(_PNG_MAGIC) else "JPEG"
        dims = image_dimensions(data)
        if dims is None:
            raise CorruptImage(f"{path.name}: the {kind} header is damaged or truncated.")
        rows, cols = dims
        if rows * cols > limits.max_pixels:
            raise ImageTooLarge(
                f"{path.name} declares {rows}x{cols} pixels ({rows * cols:,}), over the limit "
                f"of {limits.max_pixels:,}."
            )
        if kind == "JPEG" and b"\xff\xd9" not in data[-64:]:
            raise CorruptImage(f"{path.name} is truncated: the JPEG end-of-image marker is missing.")
        if kind == "PNG" and b"IEND" not in data[-64:]:
            raise CorruptImage(f"{path.name} is truncated: the PNG end chunk is missing.")
        arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise CorruptImage(f"{path.name}: OpenCV cannot decode this {kind} file.")
        if arr.dtype == np.uint8:
            scale = 255.0
        elif arr.dtype == np.uint16:
            scale = 65535.0
        else:
            raise UnsupportedImage(f"{path.name}: unsupported {kind} sample type {arr.dtype}.")
        channels = 1 if arr.ndim == 2 else arr.shape[2]
        if channels == 1:
            grey = arr.reshape(arr.shape[0], arr.shape[1])
        elif channels == 3:
            grey = cv2.cvtColor(arr, cv2.COLOR_BGR2GRAY)
        elif channels == 4:
            grey = cv2.cvtColor(arr, cv2.COLOR_BGRA2GRAY)
        else:
            raise UnsupportedImage(f"{path.name}: {channels}-channel images are not supported.")
        pixels = grey.astype(np.float32) / np.float32(scale)
        metadata = {
            "format": kind,
            "rows": int(grey.shape[0]),
            "columns": int(grey.shape[1]),
            "bits_stored": 16 if scale > 255 else 8,
            "channels": int(channels),
        }
        return DecodedImage(pixels=pixels, kind="image", decoder=self.name, metadata=metadata)
