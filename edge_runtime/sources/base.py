"""What a source hands the pipeline: one complete scan file, typed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

__all__ = ["ScanItem", "Source"]


@dataclass(order=True, frozen=True)
class ScanItem:
    """A complete scan file on local disk, ordered oldest first.

    Every source ends in a file (the inbox watcher finds one; a DICOM network
    receiver writes what it received to its spool folder), so the stages
    after it need not know where a scan came from.
    """

    mtime: float
    path: Path = field(compare=True)
    size_bytes: int = field(compare=False, default=0)
    #: time.monotonic() when the source found it complete (queue time starts here).
    ready_at: float = field(compare=False, default=0.0)
    #: The registry name of the source that found it (who releases and disposes of it).
    source: str = field(compare=False, default="inbox")


class Source(Protocol):
    """Finds complete scans and hands each to ``on_ready`` once until released."""

    name: str

    def start(self, on_ready: Callable[[ScanItem], None]) -> None:
        """Begin finding scans (own threads); ``on_ready`` may be called from any of them."""

    def stop(self) -> None:
        """Stop finding scans; files not yet handed on stay where they are."""

    def release(self, item: ScanItem) -> None:
        """Forget ``item``: its outcome is recorded, or it was left for a later offer."""

    def dispose(self, item: ScanItem) -> None:
        """Its result is committed: remove (or archive) the file. Missing files are fine."""
