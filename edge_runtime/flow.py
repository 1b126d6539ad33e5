"""One scan's way from its source to its recorded outcome, read top to bottom in :meth:`ScanFlow.run`.

::

    read + hash       (files.read_scan)               unreadable, a FIFO, too large -> quarantined unread
    admit             (journal.admit)                 seen before -> the file is cleaned up, nothing more
    analyse           (pipeline.ScanAnalyzer)         decode, intake check, infer -> an Analysis
    place             (journal history)               message_id, supersedes
    decide            (results.Analysis.urgency)      priority
    reports           (reports.processes)             SR, FHIR, heat-map written before the commit
    result            (results.ScanResult)            built once, frozen, serialised once
    commit            (outcomes.OutcomeRecorder)      result + one outbox row per sink, one transaction

The sinks send the committed rows afterwards (:class:`~edge_runtime.sinks.OutboxDrainer`).
A scan's own fault is an :class:`~edge_runtime.errors.InputError` and quarantines it; any other
:class:`~edge_runtime.errors.EdgeRuntimeError` is the box's and is counted, then retried
(:meth:`~edge_runtime.outcomes.OutcomeRecorder.failure`). Threads, the back-pressure gate and
what happens to an unexpected exception live in :mod:`.workers`, not here.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .config import RuntimeConfig
from .drift_watch import SiteDrift
from .errors import EdgeRuntimeError, InputError, OutsideIntendedUse
from .files import ScanFile, file_key, read_scan
from .health import Health
from .journal import InputRecord, Journal, place_in_history
from .logs import event
from .outcomes import OutcomeRecorder
from .pipeline import ScanAnalyzer, ScanOutcome
from .privacy import REDACTOR, log_name, loggable_uid
from .reports.processes import ReportProcesses
from .results import ScanResult
from .sinks.base import Sink
from .sources.base import ScanItem

__all__ = ["INTERRUPTIONS_PER_ATTEMPT", "ScanFlow"]

log = logging.getLogger(__name__)

#: Starts without an outcome (the process died mid-scan) tolerated per Journal.MaxAttempts.
INTERRUPTIONS_PER_ATTEMPT = 5


@dataclass(frozen=True)
class _Read:
    """A scan read and hashed: what the later steps call it by, and how long it waited."""

    path: Path
    scan: ScanFile
    named: str
    queue_ms: float
    hash_ms: float


@dataclass
class ScanFlow:
    """Takes one scan through the steps; shared by the worker threads (each call is one scan)."""

    #: The running configuration and model (both may change live: read once per scan).
    config: Callable[[], RuntimeConfig]
    analyzer: Callable[[], ScanAnalyzer]
    journal: Journal
    recorder: OutcomeRecorder
    health: Health
    #: Builds each result's reports (SR, FHIR, heat-map) in a child process.
    reports: ReportProcesses
    sinks: Callable[[], list[Sink]]
    #: Per-site drift monitoring, fed each committed result and each intended-use refusal (None: off).
    drift: SiteDrift | None = None
    #: One decision at a time per SOP Instance UID (its place in the UID's history).
    _instances: _KeyedLocks = field(default_factory=lambda: _KeyedLocks(), init=False, repr=False)

    def run(self, item: ScanItem) -> None:
        """One scan from its bytes to its recorded outcome (every way out is recorded once)."""
        read = self._read(item)
        if read is None:
            return
        record = self._admit(item, read)
        if record is None:
            return
        config = self.config()
        try:
            outcome = self._analyze(config, read)
        except InputError as exc:
            self.recorder.quarantine(item, read.scan.sha256, record.id, record.attempts, exc.to_dict())
            if isinstance(exc, OutsideIntendedUse):
                self._observe(lambda drift: drift.observe_refused())
            return
        except EdgeRuntimeError as exc:
            self.recorder.failure(item, read.scan.sha256, record, exc, config.journal.max_attempts)
            return
        analysis = outcome.analysis
        sop_uid = analysis.input.sop_instance_uid
        # Two images of one SOP Instance UID finishing at once must not both read "nothing yet"
        # (or the same latest) and publish side by side: each decides its place in the UID's
        # history and commits its result before the next one of that UID may decide.
        with self._instances.hold(sop_uid):
            message_id, supersedes = self._place(outcome, sop_uid, record.id, read)
            unreported = ScanResult.of(
                analysis,
                message_id=message_id,
                supersedes=supersedes,
                priority=analysis.urgency(config.reports.urgent_threshold),
            )
            result = self._write_reports(config, unreported, outcome)
            deliveries = [d for sink in self.sinks() if (d := sink.delivery(config, result)) is not None]
            self.recorder.result(item, read.scan.sha256, record.id, result, deliveries)
        self._observe(lambda drift: drift.observe_result(result, outcome.manufacturer))

    def _observe(self, feed: Callable[[SiteDrift], object]) -> None:
        """Tell the drift monitor about a recorded outcome; its own fault never touches the scan's."""
        if self.drift is None:
            return
        try:
            feed(self.drift)
        except Exception:
            log.exception("drift monitoring failed on a scan (the scan's outcome is recorded)")

    # -- the steps, in order -----------------------------------------------------------
    def _read(self, item: ScanItem) -> _Read | None:
        """Read and hash the file; None when it is gone or was refused unread (recorded)."""
        path = item.path
        queue_ms = (time.monotonic() - item.ready_at) * 1000
        t0 = time.perf_counter()
        try:
            scan = read_scan(path, self.config().inbox)
        except FileNotFoundError:
            named = log_name(path.name, self.recorder.ref(file_key(path), path.name))
            log.info("%s disappeared from the inbox before it was read", named)
            return None
        except InputError as exc:  # a FIFO, a link, unreadable, too large: refused unread
            self.health.count("received")
            self.recorder.refuse_unread(item, exc.to_dict())
            return None
        ref = self.recorder.ref(scan.sha256, path.name)
        REDACTOR.register(path.name, ref)
        named = log_name(path.name, ref)
        hash_ms = (time.perf_counter() - t0) * 1000
        self.health.count("received")
        event(
            log,
            "received",
            "received %s (%d bytes)",
            named,
            scan.size_bytes,
            file=named,
            sha256=scan.sha256[:16],
            size_bytes=scan.size_bytes,
            queue_ms=round(queue_ms, 2),
        )
        return _Read(path, scan, named, queue_ms, hash_ms)

    def _admit(self, item: ScanItem, read: _Read) -> InputRecord | None:
        """The journal's record of this content, now processing; None when nothing is left to do."""
        sha256 = read.scan.sha256
        admission = self.journal.admit(sha256, item.path, read.scan.size_bytes)
        record = admission.record
        if admission.action == "finish_done":
            self.recorder.already_done(item, sha256, record, duplicate=admission.duplicate)
            return None
        if admission.action == "finish_quarantine":
            self.recorder.move_to_quarantine(item, record.error or {})
            return None
        if record.attempts > self.config().journal.max_attempts * INTERRUPTIONS_PER_ATTEMPT:
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
                    "error": f"Processing {self.recorder.ref(sha256, item.path.name)} was interrupted "
                    f"{interrupted} times (the service stopped or crashed while working on it).",
                    "action": "Check the service log and the system journal for crashes or the "
                    "OOM killer; resend the scan once fixed.",
                },
            )
            return None
        return record

    def _analyze(self, config: RuntimeConfig, read: _Read) -> ScanOutcome:
        """Decode, check intake, infer (raises InputError for the scan's fault, else EdgeRuntimeError)."""
        return self.analyzer().analyze(
            read.path,
            read.scan.sha256,
            {"queue": read.queue_ms, "hash": read.hash_ms},
            preview_side=config.reports.heatmap_max_side if config.reports.heatmap else 0,
            scan=read.scan,  # decoded only if its bytes still have this hash
        )

    def _place(
        self, outcome: ScanOutcome, sop_uid: str | None, input_id: int, read: _Read
    ) -> tuple[str, str | None]:
        """``(message_id, supersedes)`` from the SOP Instance UID's history (its own id without one).

        Subscribers must hold the latest image of every SOP Instance UID: a different one
        (new, or one seen before: A, B, A) supersedes what they hold; the same one repeats.
        """
        if not sop_uid:
            return outcome.message_id, None
        latest = self.journal.latest_result_of_instance(sop_uid, exclude_input=input_id)
        message_id, earlier = place_in_history(outcome.message_id, latest)
        if earlier is not None and latest is not None and latest.message_id == earlier:
            event(
                log,
                "supersedes",
                "%s carries SOP Instance UID %s with another image than the latest result; "
                "published as a new result that supersedes %s",
                read.named,
                loggable_uid(sop_uid),
                earlier[:16],
                level=logging.WARNING,
                file=read.named,
                sha256=read.scan.sha256[:16],
                message_id=message_id,
                supersedes=earlier,
            )
        return message_id, earlier

    def _write_reports(self, config: RuntimeConfig, result: ScanResult, outcome: ScanOutcome) -> ScanResult:
        """Write the result's reports before it is committed; the result with their links (and time)."""
        t_reports = time.perf_counter()
        links = self.reports.write(
            config, result, outcome.header, image=outcome.image, heatmap=outcome.heatmap
        )
        if links is not None and links.error is not None:
            self.health.report_code(result.message_id[:16], links.error_code or "report_failed")
        return result.with_reports(links, (time.perf_counter() - t_reports) * 1000)


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
