"""Builds each result's reports in a child process, beside the workers instead of behind the GIL.

A DICOM scan's reports are about 75 ms of pure Python (highdicom building and
copying the SR's content tree, pydicom writing the SR and the Secondary
Capture, the PNG): in the service process the two workers took turns at the
GIL for it, so reports, not decoding, set the pace of a busy box. Here a
child process (forkserver, like the decoders) runs
:meth:`~edge_runtime.reports.writer.ReportWriter.build` and writes the files;
the worker waits for it (the files must exist before the result is
committed), while the other worker's decode, inference and journal work go
on in the parent.

Only DICOM scans' reports go to a child (an SR, a Secondary Capture, FHIR);
a PNG or JPEG gets only the heat-map PNG, a few ms, built in the worker. Only
small things cross: the result, the DICOM header bytes the decoder read (a
few KB: the child never opens the scan, which may have changed since), the
image already shrunk to the heat-map size and the 3x3 map. The child logs
nothing; the parent logs what it reports. If a child dies
or hangs (``REPORT_TIMEOUT_S``), the pool is replaced and the result is
published with ``reports.error_code`` ``report_timeout`` or
``report_process_crashed`` and its fixed text: a report never costs a result.

**A full disk pauses reports.** When writing a result's reports fails because
Reports.Path's file system is full, that result is published with
``reports.error_code`` ``disk_full`` and reports are *paused*: one WARNING
(``reports_paused``) says so, and each following result is published at once
with the same ``disk_full`` error, without building anything (no child, no
write, no further log line), until the file system has :func:`resume_bytes`
available again (checked with ``statvfs`` before each result: 64 MiB, or a
quarter of the file system if that is less); then one INFO line
(``reports_resumed``) and reports are built again.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from ..config import ReportsConfig, RuntimeConfig
from ..errors import ReportDiskFull, ReportError, ReportProcessCrashed, ReportTimeout
from ..logs import event
from ..procname import REPORTS, name_process
from ..results import Reports, ScanResult
from .writer import ReportOutcome, ReportWriter, failed_outcome, log_outcome

__all__ = [
    "REPORT_TIMEOUT_S",
    "RESUME_FREE_BYTES",
    "RESUME_FREE_SHARE",
    "ReportProcesses",
    "free_space",
    "resume_bytes",
]

log = logging.getLogger(__name__)

#: A result's reports taking longer than this are given up (the child is replaced).
REPORT_TIMEOUT_S = 120.0

#: After a full disk, reports resume once this much is available on Reports.Path's file system ...
RESUME_FREE_BYTES = 64 * 1024 * 1024
#: ... or this share of the file system's size, if that is less (a small volume of its own).
RESUME_FREE_SHARE = 0.25

_CTX = mp.get_context("forkserver")


def free_space(path: Path) -> tuple[int, int] | None:
    """``(available, size)`` in bytes of the file system ``path`` is on (or would be created on).

    Available is what an unprivileged user may still write (``f_bavail``); None
    when it cannot be asked.
    """
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        stats = os.statvfs(probe)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize, stats.f_blocks * stats.f_frsize


def resume_bytes(size: int) -> int:
    """Space available again at which paused reports resume, on a file system of ``size`` bytes."""
    return min(RESUME_FREE_BYTES, int(size * RESUME_FREE_SHARE))


def _build(
    config: ReportsConfig,
    path: Path,
    result: ScanResult,
    header: bytes | None,
    image: np.ndarray | None,
    heatmap: np.ndarray | None,
) -> ReportOutcome:
    """In the child: the same build the service would run in-process."""
    return ReportWriter(config, path).build(result, header, image=image, heatmap=heatmap)


def _follow_the_service(service_pid: int) -> None:
    """In the child: take its name (``edge-reports``); exit when the service is gone (SIGKILL, OOM killer).

    A pool's children wait on a queue whose other end they hold themselves, so
    they would not notice; an orphan would hold memory and the service's log
    stream for ever.
    """

    name_process(REPORTS)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(service_pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:  # alive (another user's process would be a reused pid)
                pass

    threading.Thread(target=watch, name="follow-service", daemon=True).start()


def _warm_up() -> None:
    """In the child: import the report libraries before the first result needs them."""
    from . import fhir, heatmap, sr  # noqa: F401


class ReportProcesses:
    """``processes`` report children, shared by the workers (the service uses one)."""

    def __init__(self, processes: int) -> None:
        self._processes = max(1, processes)
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None
        #: The reports folder whose file system was full: reports are paused while it is set.
        self._paused: Path | None = None
        #: Builds running in the children now, when the last one ended, and the idle exit's timer.
        self._in_flight = 0
        self._last_used = time.monotonic()
        self._idle_timer: threading.Timer | None = None

    def _pool_locked(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                self._processes,
                mp_context=_CTX,
                initializer=_follow_the_service,
                initargs=(os.getpid(),),
            )
            for _ in range(self._processes):
                self._executor.submit(_warm_up)
        return self._executor

    def _pool(self) -> ProcessPoolExecutor:
        with self._lock:
            return self._pool_locked()

    def start(self, idle_exit_s: float = 0.0) -> None:
        """Start the children and let them import the report libraries (not waited for).

        With ``idle_exit_s`` (``Reports.ChildIdleSeconds``) the children start when the first report
        is due instead, and exit after that long without one (:meth:`_exit_if_idle`).
        """
        if idle_exit_s <= 0:
            self._pool()

    def _acquire(self) -> ProcessPoolExecutor:
        """The pool, started if needed, with one more build counted in flight (never shut under it)."""
        with self._lock:
            self._in_flight += 1
            return self._pool_locked()

    def _release(self, idle_exit_s: float) -> None:
        with self._lock:
            self._in_flight -= 1
            self._last_used = time.monotonic()
            if idle_exit_s <= 0 or self._idle_timer is not None:
                return
            self._idle_timer = threading.Timer(idle_exit_s, self._exit_if_idle, (idle_exit_s,))
            self._idle_timer.daemon = True
            self._idle_timer.start()

    def _exit_if_idle(self, idle_exit_s: float) -> None:
        """Let the children exit once no report has been built for ``idle_exit_s``; else look again later.

        What that saves: the report child's memory between bursts (about 150 MB, most of it
        highdicom's table of the DICOM standard, docs/performance.md); what it costs: the next
        DICOM's reports wait for a new child (its imports and that table, about a second).
        """
        with self._lock:
            self._idle_timer = None
            if self._executor is None:
                return
            wait = self._last_used + idle_exit_s - time.monotonic()
            if self._in_flight or wait > 0:
                self._idle_timer = threading.Timer(max(wait, 0.1), self._exit_if_idle, (idle_exit_s,))
                self._idle_timer.daemon = True
                self._idle_timer.start()
                return
            executor, self._executor = self._executor, None
        log.debug("no report for %.0f s: the report child exits until the next one is due", idle_exit_s)
        executor.shutdown(wait=True)

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is not broken:
                return
            self._executor = None
        for process in list(getattr(broken, "_processes", {}).values()):
            process.kill()  # a hung child: shutdown() alone would wait for it
        broken.shutdown(wait=False, cancel_futures=True)

    def _still_full(self, path: Path) -> bool:
        """While paused: True if ``path``'s file system has not enough space back; else resume."""
        with self._lock:
            if self._paused is None:
                return False
        space = free_space(path)
        if space is not None and space[0] < resume_bytes(space[1]):
            return True
        with self._lock:
            was, self._paused = self._paused, None
        if was is not None:
            event(
                log,
                "reports_resumed",
                "space is free again on the file system of %s (%s bytes available): reports resumed",
                path,
                space[0] if space else "unknown",
                path=str(path),
                available_bytes=space[0] if space else None,
            )
        return False

    def _note(self, path: Path, outcome: ReportOutcome) -> None:
        """Pause reports (said once) when ``outcome`` failed for a full disk."""
        if outcome.links is None or outcome.links.get("error_code") != ReportDiskFull.code:
            return
        with self._lock:
            first, self._paused = self._paused is None, path
        if first:
            space = free_space(path)
            needed = resume_bytes(space[1]) if space else RESUME_FREE_BYTES
            event(
                log,
                "reports_paused",
                "the file system of %s is full (%s bytes available): reports are paused, results are "
                "published without them (reports.error_code disk_full) until %d bytes are free. %s",
                path,
                space[0] if space else "unknown",
                needed,
                ReportDiskFull.action,
                level=logging.WARNING,
                path=str(path),
                available_bytes=space[0] if space else None,
                resume_bytes=needed,
            )

    def write(
        self,
        config: RuntimeConfig,
        result: ScanResult,
        header: bytes | None,
        *,
        image: np.ndarray | None,
        heatmap: np.ndarray | None,
    ) -> Reports | None:
        """Write the reports of ``result`` (its reports not yet attached); returns their links (or None)."""
        reports = config.reports
        writer = ReportWriter(reports, config.reports_path)
        if not writer.enabled:
            return None
        path = config.reports_path
        if self._still_full(path):
            # Paused (said once, in _note): the same code and text as the result that found the disk full.
            log.debug("reports for %s skipped: the disk is still full", result.message_id[:16])
            paused = failed_outcome(result.message_id, ReportDiskFull("reports paused: disk full"))
            return Reports(**(paused.links or {"folder": result.message_id}))
        if result.input.kind != "dicom" or not (reports.dicom_sr or reports.fhir):
            # Only a heat-map PNG (a few ms): sending it to a child would cost more than it saves.
            outcome = writer.build(result, header, image=image, heatmap=heatmap)
            self._note(path, outcome)
            return log_outcome(result, outcome)
        if not reports.heatmap:
            image = None  # nothing to draw: not worth pickling
        pool = self._acquire()
        try:
            future: Future[ReportOutcome] = pool.submit(
                _build, reports, config.reports_path, result, header, image, heatmap
            )
            outcome = future.result(timeout=REPORT_TIMEOUT_S)
        except (BrokenProcessPool, FutureTimeout) as exc:
            self._replace(pool)
            error: ReportError = (
                ReportTimeout(f"the report process took longer than {REPORT_TIMEOUT_S:.0f} s")
                if isinstance(exc, FutureTimeout)
                else ReportProcessCrashed("the report process stopped unexpectedly (crashed or killed)")
            )
            outcome = failed_outcome(result.message_id, error)
        except Exception as exc:  # build() returns its own failures; this is whatever it did not foresee
            outcome = failed_outcome(result.message_id, exc)
        finally:
            self._release(reports.child_idle_seconds)
        self._note(path, outcome)
        return log_outcome(result, outcome)

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
            timer, self._idle_timer = self._idle_timer, None
        if timer is not None:
            timer.cancel()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
