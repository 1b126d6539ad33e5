"""The decoder seam: every input file becomes one :class:`DecodedImage`.

Decoders are plugins. Each one says cheaply whether it recognises a file
(:meth:`Decoder.sniff`, from the first bytes and the name) and then turns it
into a grey float32 image in [0, 1] (1 = bright) plus the metadata the
results and the intake policy need. Heavy libraries are imported inside the
plugin modules, so a missing optional dependency only disables one plugin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = ["DataDecoder", "DecodeLimits", "DecodedImage", "Decoder"]


@dataclass(frozen=True)
class DecodeLimits:
    """Guards applied before any pixel is decompressed."""

    max_pixels: int = 50_000_000


@dataclass
class DecodedImage:
    """One decoded scan.

    Attributes:
        pixels: 2-D float32, [0, 1], 1 = bright (MONOCHROME2 convention).
        kind: ``dicom`` or ``image``.
        decoder: Name of the plugin that produced it (for logs and results).
        metadata: Identifiers and acquisition facts; DICOM keys use DICOM
            keywords' snake_case (``sop_instance_uid``, ``modality``,
            ``body_part_examined``, ``view_position``, ``pixel_spacing_mm``).
            Never patient name, ID or birth date.
        header: For DICOM, the decoded bytes up to the pixel data (the header the
            reports are built from: the same bytes the decoder read, so a file
            changed since is never read for them); None for other images.
    """

    pixels: np.ndarray
    kind: str
    decoder: str
    metadata: dict[str, Any] = field(default_factory=dict)
    header: bytes | None = field(default=None, repr=False)


class Decoder(Protocol):
    """A decoder plugin."""

    #: Short plugin name, e.g. ``dicom`` or ``raster``.
    name: str

    def sniff(self, head: bytes, path: Path) -> bool:
        """True when this plugin should handle a file starting with ``head``."""
        ...

    def decode(self, path: Path, limits: DecodeLimits) -> DecodedImage:
        """Decode ``path`` or raise an :class:`~edge_runtime.errors.InputError`."""
        ...


class DataDecoder(Decoder, Protocol):
    """A decoder that also decodes content already in memory (the built-in ones do).

    The service hashes a scan, admits it under that hash, and hands the decoder
    the very bytes it hashed (:func:`~edge_runtime.files.read_verified`):
    a plugin with :meth:`decode_data` never opens the file again, so nothing
    swapped in after the hash is decoded. ``path`` then only names the scan in
    messages (it is the scan's reference in the service, not a file to open).
    """

    def decode_data(self, data: bytes, path: Path, limits: DecodeLimits) -> DecodedImage:
        """Decode ``data`` (the content of the scan called ``path.name``)."""
        ...
