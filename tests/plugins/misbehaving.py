"""Decoder plugins that misbehave on purpose, to test the decode sandbox.

Each recognises files that start with its own magic line, so real files are
unaffected when they are registered.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

from edge_runtime.decode import DecodedImage, DecodeLimits


class HangingDecoder:
    name = "hang"

    def sniff(self, head: bytes, path: Path) -> bool:
        return head.startswith(b"HANG\n")

    def decode(self, path: Path, limits: DecodeLimits) -> DecodedImage:
        while True:  # a decoder stuck in a loop
            time.sleep(0.05)


class GreedyDecoder:
    name = "greedy"

    def sniff(self, head: bytes, path: Path) -> bool:
        return head.startswith(b"GREEDY\n")

    def decode(self, path: Path, limits: DecodeLimits) -> DecodedImage:
        chunks = []
        while True:  # allocates until the memory cap stops it
            chunks.append(bytearray(256 * 1024 * 1024))


class CrashingDecoder:
    name = "crash"

    def sniff(self, head: bytes, path: Path) -> bool:
        return head.startswith(b"CRASH\n")

    def decode(self, path: Path, limits: DecodeLimits) -> DecodedImage:
        ctypes.string_at(0)  # segfault, as a buggy C decoder would
        raise AssertionError("unreachable")


class BuggyDecoder:
    """Fails inside the runtime's own code (a bug of ours), not on the file's content."""

    name = "buggy"

    def sniff(self, head: bytes, path: Path) -> bool:
        return head.startswith(b"BUGGY\n")

    def decode(self, path: Path, limits: DecodeLimits) -> DecodedImage:
        from edge_runtime.privacy import scan_ref

        scan_ref(None, key=None)  # type: ignore[arg-type]  # TypeError raised in edge_runtime/privacy.py
        raise AssertionError("unreachable")


class ChokingLibraryDecoder:
    """Fails the way a third-party library chokes on damaged data."""

    name = "choking"

    def sniff(self, head: bytes, path: Path) -> bool:
        return head.startswith(b"CHOKE\n")

    def decode(self, path: Path, limits: DecodeLimits) -> DecodedImage:
        import json

        json.loads(path.read_bytes()[6:])  # JSONDecodeError raised inside the json library
        raise AssertionError("unreachable")


class ColourDecoder:
    """Hands over a colour image, which preprocessing (2-D grey only) refuses."""

    name = "colour"

    def sniff(self, head: bytes, path: Path) -> bool:
        return head.startswith(b"COLOUR\n")

    def decode(self, path: Path, limits: DecodeLimits) -> DecodedImage:
        import numpy as np

        return DecodedImage(np.zeros((8, 8, 3), dtype=np.float32), "image", self.name)


class TextPixelsDecoder:
    """Hands over pixels no numeric code can use, so preprocessing fails inside numpy."""

    name = "text-pixels"

    def sniff(self, head: bytes, path: Path) -> bool:
        return head.startswith(b"TEXT\n")

    def decode(self, path: Path, limits: DecodeLimits) -> DecodedImage:
        import numpy as np

        return DecodedImage(np.full((8, 8), "grey", dtype=object), "image", self.name)
