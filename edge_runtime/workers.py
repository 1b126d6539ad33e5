"""Workers: take scans from the sources, run them through the stages, record the outcome.

Per scan::

    source hands a complete file  -> hashed -> journal.admit
      -> decode -> preprocess -> infer           (pipeline.ScanAnalyzer)
      -> outcome recorded                        (outcomes.OutcomeRecorder)
      -> the sinks' drainers send it             (sinks.OutboxDrainer)

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

import contextlib
import json
import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

from .config import RuntimeConfig
from .errors import EdgeRuntimeError, InputError
from .health import Health
from .journal import Journal, place_in_history
from .logs import event
from .outcomes import OutcomeRecorder
from .pipeline import ScanAnalyzer
from .privacy import REDACTOR, log_name, loggable_uid
from .reports.processes import ReportProcesses
from .sinks import Sink
from .sources import ScanItem, Source
from .sources.files import file_key, read_scan

__all__ = ["WorkerPool", "intake_blocked"]

log = logging.getLogger(__name__)

#: Starts without an outcome (the process died mid-scan) tolerated per Journal.MaxAttempts.
INTERRUPTIONS_PER_ATTEMPT = 5
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


class _KeyedLocks:
    """A lock per key, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextlib.contextmanager
    def hold(self, key: str | None) -> Iterator[None]:
        """Hold ``key``'s lock for the ``with`` block (nothing to hold for None or "")."""
        if not key:
            yield
            return
        with self._lock:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


class WorkerPool:
    """``workers`` threads over one priority queue (oldest scan first)."""

    def __init__(
        self,
        *,
        config: Callable[[], RuntimeConfig],
        analyzer: Callable[[], ScanAnalyzer],
        journal: Journal,
        sources: dict[str, Source],
        sinks: Callable[[], list[Sink]],
        recorder: OutcomeRecorder,
        health: Health,
        reports: ReportProcesses,
        primary_sinks: Collection[str] = frozenset({"mqtt", "mqtt-urgent"}),
    ) -> None:
        self._config = config
        #: The results channel's outbox names: only their backlog holds new scans (the gate).
        self.primary_sinks = frozenset(primary_sinks)
        self._analyzer = analyzer
        self.journal = journal
        self.sources = sources
        self._sinks = sinks
        self.recorder = recorder
        self.health = health
        #: Builds each result's reports (SR, FHIR, heat-map) in a child process.
        self.reports = reports
        self.queue: queue.PriorityQueue[ScanItem] = queue.PriorityQueue()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        #: worker thread name -> (scan, time.monotonic() when it started on it): for the watchdog.
        self._busy: dict[str, tuple[ScanItem, float]] = {}
        #: Unexpected errors per file (before the journal could count them), by (path, size, mtime).
        self._errors: dict[tuple[Path, int, float], int] = {}
        #: Files given up on (even quarantine failed), with the stat they had: not offered again.
        self._parked: dict[Path, tuple[int, float]] = {}
        #: One decision at a time per SOP Instance UID (its place in the UID's history).
        self._instances = _KeyedLocks()

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
                self.handle(item)
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

    def handle(self, item: ScanItem) -> None:
        """One scan from hash to recorded outcome."""
        path = item.path
        queue_ms = (time.monotonic() - item.ready_at) * 1000
        t0 = time.perf_counter()
        try:
            scan = read_scan(path, self._config().inbox)
        except FileNotFoundError:
            named = log_name(path.name, self.recorder.ref(file_key(path), path.name))
            log.info("%s disappeared from the inbox before it was read", named)
            return
        except InputError as exc:  # a FIFO, a link, unreadable, too large: refused unread
            self.health.count("received")
            self.recorder.refuse_unread(item, exc.to_dict())
            return
        sha256, size = scan.sha256, scan.size_bytes
        ref = self.recorder.ref(sha256, path.name)
        REDACTOR.register(path.name, ref)
        named = log_name(path.name, ref)
        hash_ms = (time.perf_counter() - t0) * 1000
        self.health.count("received")
        event(
            log,
            "received",
            "received %s (%d bytes)",
            named,
            size,
            file=named,
            sha256=sha256[:16],
            size_bytes=size,
            queue_ms=round(queue_ms, 2),
        )
        admission = self.journal.admit(sha256, path, size)
        record = admission.record
        if admission.action == "finish_done":
            self.recorder.already_done(item, sha256, record, duplicate=admission.duplicate)
            return
        if admission.action == "finish_quarantine":
            self.recorder.move_to_quarantine(item, record.error or {})
            return
        config = self._config()
        max_attempts = config.journal.max_attempts
        if record.attempts > max_attempts * INTERRUPTIONS_PER_ATTEMPT:
            # Started this often and never finished: the service died each time (power,
            # OOM killer, a crash in the inference engine). Stop the loop.
            interrupted = record.attempts - 1
            self.recorder.quarantine(
                item,
                sha256,
                record.id,
                interrupted,
                {
                    "code": "processing_interrupted_repeatedly",
                    "error": f"Processing {ref} was interrupted {interrupted} times (the "
                    "service stopped or crashed while working on it).",
                    "action": "Check the service log and the system journal for crashes or the "
                    "OOM killer; resend the scan once fixed.",
                },
            )
            return
        try:
            outcome = self._analyzer().analyze(
                path,
                sha256,
                {"queue": queue_ms, "hash": hash_ms},
                preview_side=config.reports.heatmap_max_side if config.reports.heatmap else 0,
                scan=scan,  # decoded only if its bytes still have this hash
            )
        except InputError as exc:
            self.recorder.quarantine(item, sha256, record.id, record.attempts, exc.to_dict())
            return
        except EdgeRuntimeError as exc:
            self.recorder.failure(item, sha256, record, exc, max_attempts)
            return
        result = outcome.result
        sop_uid = result["input"].get("sop_instance_uid")
        # Two images of one SOP Instance UID finishing at once must not both read "nothing yet"
        # (or the same latest) and publish side by side: each decides its place in the UID's
        # history and commits its result before the next one of that UID may decide.
        with self._instances.hold(sop_uid):
            if sop_uid:
                self._place_in_history(result, sop_uid, record.id, named, sha256)
            t_reports = time.perf_counter()
            links = self.reports.write(
                config, result, outcome.header, image=outcome.image, heatmap=outcome.heatmap
            )
            if links is not None:
                result["reports"] = links
                if "error" in links:
                    code = links.get("error_code", "report_failed")
                    self.health.report_code(result["message_id"][:16], code)
            result["timings_ms"]["reports"] = round((time.perf_counter() - t_reports) * 1000, 3)
            payload = json.dumps(result, separators=(",", ":"), sort_keys=True)
            deliveries = [d for s in self._sinks() if (d := s.delivery(config, result, payload)) is not None]
            self.recorder.result(item, sha256, record.id, result, deliveries)

    def _place_in_history(
        self, result: dict[str, Any], sop_uid: str, input_id: int, named: str, sha256: str
    ) -> None:
        """Set the result's ``message_id`` and ``supersedes`` from its SOP Instance UID's history.

        Subscribers must hold the latest image of every SOP Instance UID: a different one
        (new, or one seen before: A, B, A) supersedes what they hold; the same one repeats.
        """
        latest = self.journal.latest_result_of_instance(sop_uid, exclude_input=input_id)
        result["message_id"], earlier = place_in_history(result["message_id"], latest)
        if earlier is None:
            return
        result["supersedes"] = earlier
        if latest is not None and latest.message_id == earlier:
            event(
                log,
                "supersedes",
                "%s carries SOP Instance UID %s with another image than the latest result; "
                "published as a new result that supersedes %s",
                named,
                loggable_uid(sop_uid),
                earlier[:16],
                level=logging.WARNING,
                file=named,
                sha256=sha256[:16],
                message_id=result["message_id"],
                supersedes=earlier,
            )
