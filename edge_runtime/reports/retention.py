"""Keeps ``Reports.Path`` from filling the box: folders of delivered results go after ``KeepDays``.

Every result gets a folder of report files; a busy box writes thousands a
day. A folder is removed only when it is older than ``Reports.KeepDays``
*and* none of its result's outbox rows is still undelivered (the PACS and
FHIR sinks read the files when they send), so an outage never costs a
report. ``KeepDays: 0`` keeps everything (the site archives it itself).

An outage is bounded too: the folders one sink other than the results channel
(the PACS, the FHIR server) still has to send may take at most
``Reports.RetainMbPerSink``; :mod:`edge_runtime.sinks.backlog` measures them
with :class:`ReportSizes`, drops that sink's oldest undelivered results beyond
it and removes their folders with :func:`remove_report_folders` unless another
sink still needs them.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..config import RuntimeConfig
from ..journal import Journal

__all__ = ["ReportRetention", "ReportSizes", "folder_bytes", "prune_reports", "remove_report_folders"]

log = logging.getLogger(__name__)

#: How often the folder is looked at; the first look is at start-up.
INTERVAL_S = 3600.0


def prune_reports(root: Path, keep_days: float, undelivered: set[str], now: float | None = None) -> int:
    """Remove result folders under ``root`` older than ``keep_days`` and not in ``undelivered``."""
    if keep_days <= 0 or not root.is_dir():
        return 0
    cutoff = (time.time() if now is None else now) - keep_days * 86400
    removed = 0
    for folder in root.iterdir():
        try:
            if not folder.is_dir() or folder.is_symlink() or folder.name in undelivered:
                continue
            if folder.stat().st_mtime >= cutoff:
                continue
            shutil.rmtree(folder)
            removed += 1
        except OSError as exc:  # one folder's problem must not stop the rest
            log.warning("could not remove old reports %s: %s", folder.name[:16], exc.strerror or exc)
    return removed


def folder_bytes(folder: Path) -> int:
    """Bytes of the files in one result's report folder (0 when it has none)."""
    total = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
            elif entry.is_dir(follow_symlinks=False):
                total += folder_bytes(Path(entry.path))
        except OSError:
            continue
    return total


class ReportSizes:
    """The size of each result's report folder, measured once.

    A folder is complete before its result is committed (reports.writer), so its
    size does not change while a sink waits for it; a disk budget checked after
    every result then reads the disk only for the new folders.
    """

    def __init__(self) -> None:
        self._bytes: dict[tuple[Path, str], int] = {}

    def of(self, root: Path, message_id: str) -> int:
        key = (root, message_id)
        size = self._bytes.get(key)
        if size is None:
            size = self._bytes[key] = folder_bytes(root / message_id)
        return size

    def keep_only(self, message_ids: set[str]) -> None:
        """Forget folders no longer waited for (delivered, dropped, removed)."""
        self._bytes = {key: n for key, n in self._bytes.items() if key[1] in message_ids}

    def __len__(self) -> int:
        return len(self._bytes)


def remove_report_folders(root: Path, message_ids: list[str]) -> int:
    """Remove the report folders of ``message_ids`` under ``root``; returns how many were there."""
    removed = 0
    for message_id in message_ids:
        folder = root / message_id
        if folder.parent != root or folder.is_symlink() or not folder.is_dir():
            continue
        try:
            shutil.rmtree(folder)
            removed += 1
        except OSError as exc:  # one folder's problem must not stop the rest
            log.warning("could not remove the reports %s: %s", message_id[:16], exc.strerror or exc)
    return removed


class ReportRetention:
    """A background thread that prunes ``Reports.Path`` every hour."""

    def __init__(self, config: Callable[[], RuntimeConfig], journal: Journal, interval_s: float = INTERVAL_S):
        self._config = config
        self._journal = journal
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="report-retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def prune_once(self) -> int:
        config = self._config()
        removed = prune_reports(
            config.reports_path, config.reports.keep_days, self._journal.undelivered_message_ids()
        )
        if removed:
            log.info(
                "removed the reports of %d delivered results older than Reports.KeepDays = %g",
                removed,
                config.reports.keep_days,
            )
        return removed

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.prune_once()
            except Exception as exc:  # never stop the service over housekeeping
                log.warning("report retention failed (%s); trying again in an hour", exc)
            self._stop.wait(self._interval_s)
