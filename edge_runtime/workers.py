"""Workers: threads that take scans from the sources and run each through :mod:`.flow`.

A bad scan is quarantined and the workers carry on. A fault of the box itself
(backend crash, unexpected bug) leaves the file where it is for another
attempt; after ``Journal.MaxAttempts`` tries it is quarantined too, so one
poisonous file cannot loop forever. Before a worker takes a scan, the
back-pressure gate checks disk space and the results channel's outbox depth:
when either is short, scans wait at their source. Only the results channel
(MQTT) holds intake; every other sink (the PACS, FHIR) is capped on its own
(:mod:`edge_runtime.sinks.backlog`), so its outage never stops results.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path

from .config import RuntimeConfig
from .files import file_key
from .flow import ScanFlow
from .health import Health
from .journal import Journal
from .outcomes import OutcomeRecorder
from .pipeline import ScanAnalyzer
from .privacy import REDACTOR, log_name
from .sources.base import ScanItem, Source

__all__ = ["WorkerPool", "intake_blocked"]

log = logging.getLogger(__name__)

_STOP = ScanItem(float("inf"), Path("/"), 0, 0.0, "")


def intake_blocked(config: RuntimeConfig, journal: Journal, primary: Collection[str]) -> str | None:
    """Why new scans must wait at their source (disk space, results-channel depth), or None.

    ``primary``: the outbox names of the results channel (``mqtt``, ``mqtt-urgent``; see
    :mod:`edge_runtime.sinks.backlog`). Other sinks' rows never hold new scans.
    """
    journal_cfg = config.journal
    for folder in (journal.path.parent, config.inbox.path):
        try:
            free_mb = shutil.disk_usage(folder).free / (1024 * 1024)
        except OSError:
            continue
        if free_mb < journal_cfg.min_free_disk_mb:
            return (
                f"only {free_mb:.0f} MB free on the disk of {folder} (minimum "
                f"Journal.MinFreeDiskMb = {journal_cfg.min_free_disk_mb} MB)"
            )
    pending = journal.outbox_pending(primary)
    if pending >= journal_cfg.max_outbox_messages:
        names = ", ".join(sorted(primary))
        channel = "the MQTT broker" if "mqtt" in primary else f"the results channel ({names})"
        return (
            f"{pending} results are waiting for {channel} (limit "
            f"Journal.MaxOutboxMessages = {journal_cfg.max_outbox_messages})"
        )
    return None


class WorkerPool:
    """``workers`` threads over one priority queue (oldest scan first)."""

    def __init__(
        self,
        *,
        config: Callable[[], RuntimeConfig],
        analyzer: Callable[[], ScanAnalyzer],
        journal: Journal,
        sources: dict[str, Source],
        flow: ScanFlow,
        recorder: OutcomeRecorder,
        health: Health,
        primary_sinks: Collection[str] = frozenset({"mqtt", "mqtt-urgent"}),
    ) -> None:
        self._config = config
        #: The results channel's outbox names: only their backlog holds new scans (the gate).
        self.primary_sinks = frozenset(primary_sinks)
        self._analyzer = analyzer
        self.journal = journal
        self.sources = sources
        #: What each worker does with a scan it takes (:mod:`.flow`).
        self.flow = flow
        self.recorder = recorder
        self.health = health
        self.queue: queue.PriorityQueue[ScanItem] = queue.PriorityQueue()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        #: worker thread name -> (scan, time.monotonic() when it started on it): for the watchdog.
        self._busy: dict[str, tuple[ScanItem, float]] = {}
        #: Unexpected errors per file (before the journal could count them), by (path, size, mtime).
        self._errors: dict[tuple[Path, int, float], int] = {}
        #: Files given up on (even quarantine failed), with the stat they had: not offered again.
        self._parked: dict[Path, tuple[int, float]] = {}

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, workers: int) -> None:
        for i in range(workers):
            thread = threading.Thread(target=self._work, name=f"worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def offer(self, item: ScanItem) -> None:
        """A source found a complete scan (called on the source's thread)."""
        if self._parked.get(item.path) == (item.size_bytes, item.mtime):
            return  # reported once already; offered again only once it changes
        if not self._stopping.is_set() and self._gate(item):
            self.queue.put(item)

    def stalled(self, limit_s: float) -> str | None:
        """The watchdog's finding: a worker on one scan for longer than ``limit_s``, or None."""
        now = time.monotonic()
        for name, (_item, since) in list(self._busy.items()):
            if now - since > limit_s:
                return (
                    f"{name} has worked on one scan for {now - since:.0f} s (limit {limit_s:.0f} s) "
                    "without finishing; scans queue behind it"
                )
        return None

    def stop(self, deadline: float) -> None:
        """Finish scans in progress; queued ones stay at their source for the next start."""
        self._stopping.set()
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            self.queue.put(_STOP)
        for thread in self._threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))

    # -- per scan ----------------------------------------------------------------------
    def _gate(self, item: ScanItem) -> bool:
        """False leaves the scan at its source for a later offer.

        Checked when a scan is offered and again when a worker takes it, so the results
        channel's outbox exceeds Journal.MaxOutboxMessages by at most the number of workers.
        """
        blocked = intake_blocked(self._config(), self.journal, self.primary_sinks)
        self.health.set_blocked(blocked)
        if blocked:
            self.sources[item.source].release(item)
            return False
        return True

    def _work(self) -> None:
        try:
            self._analyzer().warm_up()
        except Exception:
            log.exception("could not start the decoder process in advance; it starts on demand")
        while True:
            item = self.queue.get()
            if item is _STOP:
                return
            if not self._gate(item):
                continue
            name = threading.current_thread().name
            self._busy[name] = (item, time.monotonic())
            # Until it is hashed, the file is called by a reference to its name; then by its scan's.
            REDACTOR.register(item.path.name, self.recorder.ref(file_key(item.path), item.path.name))
            try:
                self.flow.run(item)
            except Exception as exc:
                # Never let one scan kill a worker: count it, retry on a later offer, end it after
                # Journal.MaxAttempts (even when the journal could not record the attempt).
                self._unexpected(item, exc)
            finally:
                self._busy.pop(name, None)
                self.sources[item.source].release(item)
                REDACTOR.forget(item.path.name)

    def _unexpected(self, item: ScanItem, exc: Exception) -> None:
        key = (item.path, item.size_bytes, item.mtime)
        self._errors[key] = count = self._errors.get(key, 0) + 1
        max_attempts = self._config().journal.max_attempts
        name = log_name(item.path.name, self.recorder.ref(file_key(item.path), item.path.name))
        log.error(
            "unexpected error while handling %s (attempt %d/%d): %s: %s",
            name,
            count,
            max_attempts,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        if count < max_attempts:
            return
        self._errors.pop(key, None)
        error = {
            "code": "processing_failed_repeatedly",
            "error": f"Handling {name} failed {count} times with an unexpected error "
            f"({type(exc).__name__}: {exc}).",
            "action": "This is a fault of the runtime, not necessarily of the file: send the service "
            "log with this error file to support; resend the scan once fixed.",
        }
        try:
            self.recorder.refuse_unread(item, error, attempts=count)
        except Exception as again:
            # Even the quarantine failed (e.g. the quarantine folder is not writable): stop
            # offering this file until it changes, and say so where the admin looks.
            self._parked[item.path] = (item.size_bytes, item.mtime)
            log.error("cannot quarantine %s either (%s); it stays in the inbox, set aside", name, again)
            self.health.report_error(f"a scan could not be quarantined: {type(again).__name__}")
