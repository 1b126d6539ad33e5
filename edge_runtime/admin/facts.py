"""What the admin page and the monitoring endpoints show, read from the running service.

:class:`BoxFacts` is handed the service's parts (by the service, which only
wires) and answers in plain dictionaries and rows: the page renders them,
``/api/status`` sends the same dictionary as JSON, ``/metrics`` turns it into
gauges. Nothing here names a patient or a file: scans are their references,
errors their codes, fixed texts and actions.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import RuntimeConfig
from ..cpu import int8_features
from ..errors import public_text
from ..health import Health
from ..journal import Journal, ScanRow
from ..pipeline import ScanAnalyzer
from ..sinks.drainer import OutboxDrainer
from .logbuffer import RecentLogs

__all__ = ["BoxFacts", "QuarantinedFile", "ScanView"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuarantinedFile:
    """One file in the quarantine folder, as its error file describes it."""

    ref: str
    #: The key its journal record has (the content's sha256, or a key for a file refused unread).
    key: str
    path: Path
    error_file: Path
    code: str
    text: str
    action: str
    quarantined_utc: str
    attempts: int
    #: The name on disk, shown only where Privacy.PublishFileNames allows names.
    name: str | None


@dataclass(frozen=True)
class ScanView:
    """One scan as the Recent scans list and the scan page show it."""

    row: ScanRow
    deliveries: dict[str, str | None] = field(default_factory=dict)

    @property
    def result(self) -> dict[str, Any]:
        return self.row.result or {}

    @property
    def kind(self) -> str:
        return str((self.result.get("input") or {}).get("kind") or "")

    @property
    def size(self) -> str:
        data = self.result.get("input") or {}
        rows, columns = data.get("rows"), data.get("columns")
        return f"{columns} x {rows}" if rows and columns else ""

    @property
    def finding(self) -> dict[str, Any] | None:
        findings = self.result.get("findings") or []
        return findings[0] if findings else None

    @property
    def decision(self) -> str:
        decision = self.result.get("decision")
        if not self.row.result:
            return ""
        if decision is None:
            return "no decision (outside intended use)"
        return f"{decision['label']}" + (" (positive)" if decision.get("positive") else "")

    @property
    def within_intended_use(self) -> bool:
        return bool((self.result.get("intended_use") or {}).get("within", True))

    @property
    def error(self) -> dict[str, Any]:
        return self.row.error or {}


def _int(value: object) -> int:
    """An error file's number as written, 0 when it is not one (a hand-edited or older file)."""
    if isinstance(value, int):
        return value
    try:
        return int(str(value))
    except ValueError:
        return 0


class BoxFacts:
    """Reads the running service for the admin app (every call answers from the live state)."""

    def __init__(
        self,
        *,
        config: Callable[[], RuntimeConfig],
        health: Health,
        journal: Journal,
        analyzer: Callable[[], ScanAnalyzer],
        drainers: Callable[[], Sequence[OutboxDrainer]],
        logs: RecentLogs,
        lifecycle: Callable[[], str | None] = lambda: None,
    ) -> None:
        #: Why the service is not serving scans now (starting, stopping), or None.
        self.lifecycle = lifecycle
        self.config = config
        self.health = health
        self.journal = journal
        self.analyzer = analyzer
        self.drainers = drainers
        self.logs = logs

    # -- readiness ---------------------------------------------------------------------
    def readiness(self) -> tuple[bool, dict[str, str | None]]:
        """Ready = a model loaded whose conformance check passed here, and the journal open and ours.

        Returns the verdict and each check's problem (None: passed).
        """
        checks: dict[str, str | None] = {
            "service": self.lifecycle(),
            "model": None,
            "conformance": None,
            "journal": None,
        }
        try:
            analyzer = self.analyzer()
            report = analyzer.conformance
            if report is not None and not report.passed:
                checks["conformance"] = "the model's conformance check failed on this CPU"
        except Exception as exc:  # no analyzer yet (starting) or a broken one
            checks["model"] = f"no model loaded ({type(exc).__name__})"
        problem = self.journal.verify_on_disk()
        if problem is not None:
            checks["journal"] = "journal lost: " + problem
        return all(value is None for value in checks.values()), checks

    # -- the overview and /api/status --------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Everything the overview shows, as JSON-ready values (``/api/status`` sends this).

        Each section is read on its own: one that fails (a journal read error on a box that
        is already unwell) is None with its error in ``errors``, and the rest still answers,
        so a scraper sees ``ready 0`` and the reason rather than a failed scrape.
        """
        config = self.config()
        errors: dict[str, str] = {}

        def section(name: str, read: Callable[[], Any], default: Any = None) -> Any:
            try:
                return read()
            except Exception as exc:  # reported in the answer; the other sections still answer
                errors[name] = f"{type(exc).__name__} reading {name}"
                log.warning("admin page: cannot read %s: %s", name, type(exc).__name__)
                return default

        snapshot = section("health", self.health.snapshot, {})
        started = self.health.started_at
        ready, checks = self.readiness()
        quarantined = section("quarantine", self._error_files, [])
        status: dict[str, Any] = {
            "state": snapshot.get("state", "unknown"),
            "reason": snapshot.get("reason"),
            "ready": ready,
            "readiness": checks,
            "runtime_version": __version__,
            "uptime_seconds": None if started is None else round(time.time() - started, 1),
            "counters": snapshot.get("counters", {}),
            "last_error": snapshot.get("last_error"),
            "disk": section("disk", lambda: self._disk(config), []),
            "sinks": section("sinks", self._sinks, []),
            "quarantine": {"files": len(quarantined)},
            "dicom_receiver": section(
                "dicom_receiver", lambda: self._receiver(config, snapshot.get("dicom"))
            ),
            "model": section("model", self._model),
            "intended_use": self._intended_use(),
            "drift": snapshot.get("drift"),
            "errors": errors,
        }
        return status

    def _disk(self, config: RuntimeConfig) -> list[dict[str, Any]]:
        """Free space where the journal and the inbox live, against Journal.MinFreeDiskMb."""
        by_device: dict[int, dict[str, Any]] = {}
        for what, folder in (("journal", config.journal.path.parent), ("inbox", config.inbox.path)):
            try:
                device = os.stat(folder).st_dev
                usage = shutil.disk_usage(folder)
            except OSError:
                continue
            if device in by_device:
                by_device[device]["for"] += f" and {what}"
                continue
            free_mb = usage.free / (1024 * 1024)
            by_device[device] = {
                "for": what,
                "free_mb": round(free_mb),
                "total_mb": round(usage.total / (1024 * 1024)),
                "used_percent": round(100 * (usage.total - usage.free) / usage.total, 1)
                if usage.total
                else 0.0,
                "min_free_mb": config.journal.min_free_disk_mb,
                "below_watermark": free_mb < config.journal.min_free_disk_mb,
            }
        return list(by_device.values())

    def _sinks(self) -> list[dict[str, Any]]:
        backlog = self.journal.backlog_by_sink()
        sinks = []
        for drainer in self.drainers():
            pending = backlog.get(drainer.name)
            sinks.append(
                {
                    "name": drainer.name,
                    "label": drainer.label,
                    "outbox_pending": pending.pending if pending else 0,
                    "oldest_pending_utc": pending.oldest_utc if pending else None,
                    "delivered_since_start": drainer.delivered_count,
                    "dropped_all_time": self.journal.dropped_count(drainer.name),
                    "last_error": drainer.failing,
                }
            )
        return sinks

    def _receiver(self, config: RuntimeConfig, state: dict[str, Any] | None) -> dict[str, Any] | None:
        if state is None:
            return None
        dicom = config.dicom
        return {
            **state,
            "bind_address": dicom.bind_address,
            "allowed_calling_ae_titles": list(dicom.allowed_calling_ae_titles) or ["any"],
            "allowed_addresses": list(dicom.allowed_addresses) or ["any"],
            "max_associations": dicom.max_associations,
        }

    def _model(self) -> dict[str, Any]:
        analyzer = self.analyzer()
        info = analyzer.model_info
        report = analyzer.conformance
        model: dict[str, Any] = {
            "name": info["name"],
            "version": info["version"],
            "sha256": info["sha256"],
            "backend": info["backend"],
            "backend_reason": analyzer.backend_reason,
            "quantization": info["quantization"],
            "signature": analyzer.bundle.signature.status,
            "threshold": analyzer.threshold,
            "cpu_int8_features": int8_features(),
        }
        if report is None:
            model["conformance"] = {"verdict": "not checked: the bundle has no reference set"}
        else:
            summary = report.summary()
            model["conformance"] = {
                "verdict": "passed" if report.passed else "FAILED",
                "images": summary["images"],
                "max_drift": summary["max_drift"],
                "max_drift_allowed": summary["max_drift_allowed"],
                "decisions_differing": summary["decisions_differing"],
                "cpu_int8_features": summary["cpu_int8_features"],
            }
        return model

    def _intended_use(self) -> dict[str, Any]:
        metrics = self.health.metrics
        share = metrics.outside_share()
        return {
            "results_since_start": metrics.results,
            "outside_since_start": metrics.outside_intended_use,
            "outside_share": None if share is None else round(share, 4),
        }

    # -- scans -------------------------------------------------------------------------
    def recent_scans(self) -> list[ScanView]:
        rows = [self._named(row) for row in self.journal.recent_scans(self.config().admin.recent_scans)]
        deliveries = self.journal.deliveries([r.message_id for r in rows if r.message_id])
        return [ScanView(row, deliveries.get(row.message_id or "", {})) for row in rows]

    def scan(self, ref: str) -> ScanView | None:
        row = self.journal.scan_by_ref(ref)
        if row is None:
            return None
        row = self._named(row)
        deliveries = self.journal.deliveries([row.message_id]) if row.message_id else {}
        return ScanView(row, deliveries.get(row.message_id or "", {}))

    def _named(self, row: ScanRow) -> ScanRow:
        """The row as the page may show it: a result made under Privacy.PublishFileNames names its file;
        unless that setting is on now, the page shows the scan's reference there instead."""
        if row.result is None or self.config().privacy.publish_file_names:
            return row
        data = row.result.get("input")
        if not isinstance(data, dict) or data.get("file_name") in (None, row.ref):
            return row
        return replace(row, result={**row.result, "input": {**data, "file_name": row.ref}})

    def heatmap_file(self, view: ScanView) -> Path | None:
        """The scan's heat-map PNG in its report folder, when one was written, is still there and
        the page may show images (Admin.ShowImages)."""
        if not self.config().admin.show_images:
            return None
        reports = view.result.get("reports") or {}
        name, folder = reports.get("heatmap_png"), reports.get("folder")
        if not name or not folder or "/" in str(name) or "/" in str(folder):
            return None
        path = self.config().reports_path / str(folder) / str(name)
        return path if path.is_file() else None

    # -- quarantine --------------------------------------------------------------------
    def _error_files(self) -> list[Path]:
        """The quarantine's error files (the overview counts them without reading each one)."""
        folder = self.config().inbox.quarantine_path
        # os.scandir, not Path.glob: a folder the service may not read is an error to report, not "empty".
        if not folder.is_dir():
            return []
        with os.scandir(folder) as entries:
            return sorted(folder / e.name for e in entries if e.name.endswith(".error.json"))

    def quarantined(self) -> list[QuarantinedFile]:
        """Each quarantined file that has an error file beside it, newest first."""
        names = self.config().privacy.publish_file_names
        found = []
        for error_file in self._error_files():
            try:
                document = json.loads(error_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if not isinstance(document, dict):
                continue
            path = error_file.with_name(error_file.name.removesuffix(".error.json"))
            code = str(document.get("code") or "input_invalid")
            found.append(
                QuarantinedFile(
                    ref=str(document.get("ref") or ""),
                    key=str(document.get("sha256") or document.get("file_key") or ""),
                    path=path,
                    error_file=error_file,
                    code=code,
                    text=public_text(code),
                    action=str(document.get("action") or ""),
                    quarantined_utc=str(document.get("quarantined_utc") or ""),
                    attempts=_int(document.get("attempts")),
                    name=path.name if names else None,
                )
            )
        found.sort(key=lambda q: q.quarantined_utc, reverse=True)
        return found

    def quarantined_file(self, ref: str) -> QuarantinedFile | None:
        return next((q for q in self.quarantined() if q.ref == ref and ref), None)
