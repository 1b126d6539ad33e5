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
