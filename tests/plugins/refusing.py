"""A decoder plugin that claims every DICOM file and always fails, as a decoder
without its codec library would, to test that the next plugin gets its turn."""

from __future__ import annotations

from pathlib import Path

from edge_runtime.decode import DecodedImage, DecodeLimits
from edge_runtime.errors import UnsupportedTransferSyntax


class RefusingDicomDecoder:
    name = "refusing"

    def sniff(self, head: bytes, path: Path) -> bool:
        return head[128:132] == b"DICM"

    def decode(self, path: Path, limits: DecodeLimits) -> DecodedImage:
        raise UnsupportedTransferSyntax(
            f"Cannot decode {path.name}: this plugin needs libexample, which is not installed.",
            action="Install libexample.",
        )
