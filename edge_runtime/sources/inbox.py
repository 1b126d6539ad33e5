"""The inbox source: a watched folder that devices (or storescp) write scans into.

A file is handed on only once it is complete:

* names ending in ``.part`` (dcm4che/storescp convention), ``.tmp`` etc. are
  ignored; when such a file is renamed to its final name it is complete by
  that convention and is taken at once;
* any other file must keep its size and mtime unchanged for ``SettleSeconds``.

Files are discovered two ways, because either alone can miss one: inotify
events via watchdog (fast), and a periodic full rescan (catches files that
were there before start-up, and filesystems without inotify such as some
network mounts). Ready files are handed on oldest first.

Log lines about a file not yet handed on name it by a reference to the file
(:func:`~edge_runtime.files.file_key` under the box's key, the one a
worker calls it by until it is hashed), never by its name: no worker has told
the log redactor about it yet.
"""

from __future__ import annotations

import heapq
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import InboxConfig, RuntimeConfig
from ..files import file_key, safe_file_name, unique_target
from ..privacy import load_or_create_key, log_name, scan_ref
from .base import ScanItem

if TYPE_CHECKING:  # watchdog is imported lazily (rescans still work without it)
    from watchdog.observers.api import BaseObserver

__all__ = ["InboxSource", "from_config", "unique_target"]

log = logging.getLogger(__name__)


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    stable_since: float
    complete: bool = False


def from_config(config: RuntimeConfig) -> InboxSource:
    return InboxSource(config.inbox, key_path=config.reference_key_path)


class InboxSource:
    """Watches ``config.path`` and calls ``on_ready(ScanItem)`` for each complete file.

    A path is handed on at most once until :meth:`release` is called for it
    (the worker calls that after recording the file's outcome), so a file
    being processed is not picked up again by the next rescan.
    """

    name = "inbox"

    def __init__(self, config: InboxConfig, *, key_path: Path | None = None) -> None:
        self.config = config
        #: The box's scan-reference key file (loaded at start); None: unkeyed references.
        self._key_path = key_path
        self._key: bytes | None = None
        self.root = config.path.resolve()
        self.on_ready: Callable[[ScanItem], None] = lambda item: None
        excluded = [config.quarantine_path]
        if config.processed_path is not None:
            excluded.append(config.processed_path)
        self._excluded = [p.resolve() for p in excluded]
        self._candidates: dict[Path, _Candidate] = {}
        self._claimed: set[Path] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poke = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: BaseObserver | None = None
        self._last_rescan = 0.0

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, on_ready: Callable[[ScanItem], None]) -> None:
        self.on_ready = on_ready
        if self._key_path is not None:
            self._key = load_or_create_key(self._key_path)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config.quarantine_path.mkdir(parents=True, exist_ok=True)
        if self.config.processed_path is not None:
            self.config.processed_path.mkdir(parents=True, exist_ok=True)
        if self.config.use_inotify:
            self._start_observer()
        self._thread = threading.Thread(target=self._loop, name="inbox", daemon=True)
        self._thread.start()
        log.info(
            "watching inbox %s (settle %.1fs, rescan every %.1fs, inotify %s)",
            self.root,
            self.config.settle_seconds,
            self.config.rescan_interval_seconds,
            "on" if self._observer is not None else "off",
        )

    def stop(self) -> None:
        self._stop.set()
        self._poke.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def release(self, item: ScanItem) -> None:
        """The outcome of ``item`` is recorded (or it waits); a file of that name is new work."""
        with self._lock:
            self._claimed.discard(item.path)
            self._candidates.pop(item.path, None)

    def dispose(self, item: ScanItem) -> None:
        """Delete the file, or move it to ``Inbox.ProcessedPath`` when one is set."""
        processed = self.config.processed_path
        try:
            if processed is None:
                item.path.unlink()
            else:
                shutil.move(str(item.path), unique_target(processed, safe_file_name(item.path.name)))
        except FileNotFoundError:
            pass

    # -- discovery ---------------------------------------------------------------------
    def _start_observer(self) -> None:
        try:
            from watchdog.events import FileSystemEvent, FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            log.warning("watchdog is not installed; relying on periodic rescans only")
            return
        watcher = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.is_directory:
                    return
                dest = os.fsdecode(getattr(event, "dest_path", "") or "")
                if dest:
                    # NAME.part renamed to NAME: the sender says the file is complete.
                    src = os.fsdecode(event.src_path)
                    renamed_part = any(src.endswith(s) for s in watcher.config.ignore_suffixes)
                    watcher._note(Path(dest), complete=renamed_part)
                else:
                    watcher._note(Path(os.fsdecode(event.src_path)))

        observer = Observer()
        try:
            observer.schedule(_Handler(), str(self.root), recursive=True)
            observer.start()
        except OSError as exc:
            log.warning("inotify unavailable for %s (%s); relying on periodic rescans", self.root, exc)
            return
        self._observer = observer

    def _wanted(self, path: Path) -> bool:
        """Not hidden, not an ignored suffix, not excluded: the name *and every folder above it*.

        inotify reports files inside hidden folders too (a sender's ``.store/`` staging
        area); judging only the file's own name let them in, where the rescan, which
        prunes such folders, did not.
        """
        try:
            parts = path.relative_to(self.root).parts
        except ValueError:
            parts = (path.name,)
        for part in parts:
            if part.startswith(".") or any(part.endswith(s) for s in self.config.ignore_suffixes):
                return False
        return not any(path.is_relative_to(ex) for ex in self._excluded)

    def _note(self, path: Path, *, complete: bool = False) -> None:
        """A filesystem event mentioned ``path``: (re)start its settle timer.

        ``complete`` marks a file renamed from ``NAME.part``: by that convention
        it is finished, so it need not wait out the settle time.
        """
        if not self._wanted(path):
            return
        with self._lock:
            if path in self._claimed:
                return
            previous = self._candidates.pop(path, None)
            if previous is not None and previous.complete and not complete:
                complete = True  # a close/modify event right after the rename
            self._candidates[path] = _Candidate(-1, -1, time.monotonic(), complete)
        self._poke.set()

    def _rescan(self) -> None:
        for dirpath, dirnames, filenames in os.walk(self.root):
            base = Path(dirpath)
            dirnames[:] = [d for d in dirnames if self._wanted(base / d)]
            for name in filenames:
                path = base / name
                if not self._wanted(path):
                    continue
                with self._lock:
                    if path not in self._claimed and path not in self._candidates:
                        self._candidates[path] = _Candidate(-1, -1, time.monotonic())

    # -- settle check ------------------------------------------------------------------
    def _check_candidates(self) -> list[ScanItem]:
        now = time.monotonic()
        ready: list[ScanItem] = []
        with self._lock:
            items = list(self._candidates.items())
        for path, cand in items:
            try:
                st = path.lstat()  # the entry itself: a link or FIFO is refused by the worker, unread
            except FileNotFoundError:
                with self._lock:
                    self._candidates.pop(path, None)
                continue
            except OSError as exc:
                # Named by reference, and the error without its text (which quotes the path).
                ref = scan_ref(file_key(path), path.name, key=self._key)
                log.warning("cannot stat %s: %s", log_name(path.name, ref), exc.strerror)
                continue
            if cand.complete:
                ready.append(ScanItem(st.st_mtime, path, st.st_size, now, self.name))
                continue
            if st.st_size != cand.size or st.st_mtime_ns != cand.mtime_ns:
                cand.size, cand.mtime_ns, cand.stable_since = st.st_size, st.st_mtime_ns, now
                continue
            # mtime must also be settle_seconds in the past: catches writers whose
            # pauses are longer than our polling interval.
            age = time.time() - st.st_mtime
            if now - cand.stable_since >= self.config.settle_seconds and (age >= self.config.settle_seconds):
                ready.append(ScanItem(st.st_mtime, path, st.st_size, now, self.name))
        with self._lock:
            for item in ready:
                self._candidates.pop(item.path, None)
                self._claimed.add(item.path)
        heapq.heapify(ready)
        return [heapq.heappop(ready) for _ in range(len(ready))]

    def _loop(self) -> None:
        interval = max(0.05, min(0.25, self.config.settle_seconds / 4 or 0.05))
        while not self._stop.is_set():
            now = time.monotonic()
            if now - self._last_rescan >= self.config.rescan_interval_seconds:
                self._last_rescan = now
                try:
                    self._rescan()
                except OSError as exc:
                    log.error("cannot list inbox %s: %s", self.root, exc)
            for item in self._check_candidates():
                self.on_ready(item)
            with self._lock:
                idle = not self._candidates
            idle_wait = min(1.0, self.config.rescan_interval_seconds)
            self._poke.wait(timeout=idle_wait if idle else interval)
            self._poke.clear()
