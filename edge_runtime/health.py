"""Health: counters, the last error, and the heartbeat that reports them.

One snapshot feeds three readers: the health file (``edge-runtime health``,
systemd or the nucleus' health check), the retained MQTT status topic
(hospital systems), and the retained health report in AWS IoT Core (the
fleet's operators and the release pipeline's canary check). The DICOM
receiver's state (``dicom``) goes to the first two only: it is about the
hospital's network. None of them carries a file name or a header value:
scans are named by reference only, and an error by its code and that code's
fixed text (:func:`edge_runtime.errors.public_text`), never by an
exception's text.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import __version__
from .config import RuntimeConfig
from .drift_watch import SiteDrift
from .errors import public_text
from .hosts import Host
from .metrics import ScanMetrics
from .results import build_status, utc_now

__all__ = ["COUNTERS", "DISK_FULL_BYTES", "Health", "disk_full_reason", "error_line"]

log = logging.getLogger(__name__)

#: What the counters count (since start): scans received, with a result, quarantined, repeats, and
#: outbox rows a sink other than the results channel fell too far behind on (dropped, oldest first).
COUNTERS = ("received", "processed", "quarantined", "duplicates", "outbox_dropped")


def error_line(subject: str, code: str, details: str = "the service log") -> str:
    """``<subject>: <code>: <fixed text> (details in <details>)``: a last error fit to publish.

    ``subject`` is a scan reference, a message id or a sink's name; the text is
    the code's fixed one, so nothing the scan or an exception said is in it.
    """
    return f"{subject}: {code}: {public_text(code)} (details in {details})"


class Health:
    """Thread-safe counters and state; a heartbeat thread publishes snapshots."""

    def __init__(
        self,
        config: Callable[[], RuntimeConfig],
        *,
        outbox_pending: Callable[[], int],
        queued: Callable[[], int],
        model: Callable[[], dict[str, Any]],
        stalled: Callable[[], str | None] = lambda: None,
        mqtt: Any = None,
        ipc: Any = None,
        host: Host | None = None,
        journal_lost: Callable[[], str | None] = lambda: None,
        sinks_behind: Callable[[], list[str]] = list,
        dicom: Callable[[], dict[str, Any] | None] = lambda: None,
        drift: SiteDrift | None = None,
    ) -> None:
        self._config = config
        #: Per-site drift monitoring (None: Drift.Enabled is false): its verdict goes in every
        #: snapshot, and the heartbeat saves its windows.
        self.drift = drift
        #: The drift state last sent to AWS IoT Core (its report goes when the state changes).
        self._drift_sent: str | None = None
        #: What the last IoT Core health report said (its meaningful part) and when it was sent.
        self._cloud_sent: tuple[str, float] | None = None
        self._outbox_pending = outbox_pending
        self._queued = queued
        self._model = model
        #: The watchdog: why a worker makes no progress, or None.
        self._stalled = stalled
        #: The journal check, run at every snapshot (so every heartbeat): why it is lost, or None.
        self._journal_lost = journal_lost
        #: Sinks other than the results channel that are behind, each named ("PACS (dicom-store)
        #: behind: ..."): the status names them, never the MQTT broker, for their backlog.
        self._sinks_behind = sinks_behind
        #: The DICOM receiver's state (AE title, port, listening, associations, refusals by reason,
        #: objects), or None when it is off.
        self._dicom = dicom
        #: The MQTT sink (retained status topic), when MQTT is on.
        self.mqtt = mqtt
        self.ipc = ipc
        #: What started the service (Greengrass, Azure IoT Edge): told each heartbeat's snapshot.
        self.host = host
        self.counters = dict.fromkeys(COUNTERS, 0)
        #: Latency histograms and intended-use counts (the admin page's /metrics).
        self.metrics = ScanMetrics()
        #: When the heartbeat started (the service's uptime), as time.time(); None before.
        self.started_at: float | None = None
        self._lock = threading.Lock()
        #: The latest error an admin should see: a scan reference and an error code, never a name.
        self.last_error: str | None = None
        #: Why new scans wait in the inbox (back-pressure), or None.
        self.blocked_reason: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def count(self, key: str, amount: int = 1) -> None:
        with self._lock:
            self.counters[key] += amount

    def report_error(self, text: str) -> None:
        """A new last error: on the status topic now, not only at the next heartbeat."""
        self.last_error = text
        self.publish_status()

    def report_code(self, subject: str, code: str, details: str = "the service log") -> None:
        """A new last error named by its code and fixed text (:func:`error_line`)."""
        self.report_error(error_line(subject, code, details))

    def set_blocked(self, reason: str | None) -> None:
        """Intake stopped (reason) or resumed (None); said in the log and on the status topic."""
        if reason == self.blocked_reason:
            return
        self.blocked_reason = reason
        if reason:
            log.warning("not taking new scans: %s; they wait in the inbox", reason)
        else:
            log.info("taking new scans again")
        self.publish_status()

    # -- snapshot ----------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """For the heartbeat, the health file and ``edge-runtime health``."""
        config = self._config()
        with self._lock:
            counters = dict(self.counters)
        counters["queued"] = self._queued()
        counters["outbox_pending"] = self._outbox_pending()
        mqtt_connected = bool(self.mqtt is not None and self.mqtt.connected)
        state, reason = "online", None
        stalled = self._stalled()
        journal_lost = self._journal_lost()
        if journal_lost:
            state, reason = "degraded", journal_lost
        elif stalled:
            state, reason = "degraded", f"a worker is stuck: {stalled}"
        elif self.blocked_reason:
            state, reason = "degraded", f"not taking new scans: {self.blocked_reason}"
        elif self.mqtt is not None and self.mqtt.problem:
            state, reason = "degraded", f"{self.mqtt.problem}; results kept in the journal"
        elif self.mqtt is not None and not mqtt_connected:
            state, reason = "degraded", "MQTT broker not reachable; results kept in the journal"
        elif self.host is not None and (host_problem := self.host.problem()):
            state, reason = "degraded", f"{host_problem}; results kept in the journal"
        elif self.last_error and self.last_error.startswith("configuration update rejected"):
            state, reason = "degraded", self.last_error
        behind = self._sinks_behind()
        if behind:
            # Another sink's outage pauses only that sink: new scans are taken and published.
            lagging = "; ".join(behind) + " (new scans are still taken and published)"
            state, reason = "degraded", f"{reason}; also {lagging}" if reason else lagging
        snapshot: dict[str, Any] = {
            "state": state,
            "reason": reason,
            "timestamp_utc": utc_now(),
            "mqtt_connected": mqtt_connected,
            "model": self._model(),
            "counters": counters,
            "last_error": self.last_error or (self.mqtt.problem if self.mqtt is not None else None),
            "runtime_version": __version__,
            "heartbeat_seconds": config.health.heartbeat_seconds,
        }
        dicom = self._dicom()
        if dicom is not None:
            snapshot["dicom"] = dicom
        if self.drift is not None:
            report = self.drift.report()
            snapshot["drift"] = {
                "state": report.state,
                "reasons": list(report.reasons),
                "summary": report.summary(),
            }
        return snapshot

    # -- reporting ---------------------------------------------------------------------
    def publish_status(self, snapshot: dict[str, Any] | None = None) -> None:
        """The retained MQTT status, now (when connected; the heartbeat repeats it anyway)."""
        if self.mqtt is None or not self.mqtt.connected:
            return
        if snapshot is None or not snapshot["mqtt_connected"]:
            # Taken before the broker came back: it would say "not reachable" over the connection.
            snapshot = self.snapshot()
        drift = snapshot.get("drift")
        self.mqtt.publish_status(
            snapshot["state"],
            snapshot["reason"],
            snapshot["counters"],
            snapshot["last_error"],
            dicom=snapshot.get("dicom"),
            drift=None if drift is None else {"state": drift["state"], "reasons": drift["reasons"]},
        )
        if self.drift is not None:
            self.mqtt.publish_drift(self.drift.report().model_dump(mode="json"))

    def write_file(self, snapshot: dict[str, Any]) -> None:
        path: Path = self._config().health.file
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(snapshot, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write health file %s: %s", path, exc)

    def report_to_cloud(self, snapshot: dict[str, Any]) -> None:
        """The health report for the fleet's operators and the release pipeline's canary check.

        Retained on ``<Greengrass.StatusTopic>/<thing name>`` in AWS IoT Core: the
        model version this box runs, the conformance check it ran on it, the
        counters. Like the local status, it carries no scan identifier. Sent when
        its meaning changes and at least every ``Greengrass.StatusEverySeconds``.
        """
        topic = self._config().greengrass.status_topic
        thing = os.environ.get("AWS_IOT_THING_NAME", "")
        if self.ipc is None or not topic or not thing:
            return
        report = build_status(
            snapshot["state"],
            thing,
            reason=snapshot["reason"],
            model=snapshot["model"],
            counters=snapshot["counters"],
        )
        drift = snapshot.get("drift")
        if drift is not None:
            report["drift"] = {"state": drift["state"], "reasons": drift["reasons"]}
            self._report_drift_to_cloud(thing, drift["state"])
        # Sent on change and every StatusEverySeconds, not every heartbeat: each report is a
        # metered IoT Core message, and a fleet's worth every 30 s costs more than the boxes' work.
        counters = report.get("counters") or {}
        meaning = json.dumps(
            [
                report["state"],
                report.get("reason"),
                report.get("model"),
                counters.get("quarantined"),
                (report.get("drift") or {}).get("state"),
            ],
            sort_keys=True,
        )
        now = time.monotonic()
        every = self._config().greengrass.status_every_seconds
        if self._cloud_sent is not None:
            last_meaning, last_time = self._cloud_sent
            if meaning == last_meaning and now - last_time < every:
                return
        try:
            self.ipc.publish_iot_core(f"{topic}/{thing}", json.dumps(report), 1, retain=True)
        except Exception as exc:  # the report is best effort; scans go on (and it is tried again)
            log.warning("cannot publish the health report to AWS IoT Core: %s", exc)
            return
        self._cloud_sent = (meaning, now)

    def _report_drift_to_cloud(self, thing: str, state: str) -> None:
        """The full drift report, retained on ``<Drift.IotCoreTopic>/<thing>``, when its state changes."""
        topic = self._config().drift.iot_core_topic
        if self.ipc is None or self.drift is None or not topic or state == self._drift_sent:
            return
        try:
            self.ipc.publish_iot_core(f"{topic}/{thing}", self.drift.report().to_json(), 1, retain=True)
        except Exception as exc:  # best effort, like the health report; tried again next time
            log.warning("cannot publish the drift report to AWS IoT Core: %s", exc)
            return
        self._drift_sent = state

    # -- heartbeat ---------------------------------------------------------------------
    def start(self) -> None:
        self.started_at = time.time()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        last_beat = float("-inf")
        while not self._stop.is_set():
            if time.monotonic() - last_beat >= self._config().health.heartbeat_seconds:
                last_beat = time.monotonic()
                try:
                    snapshot = self.snapshot()
                    self.write_file(snapshot)
                    self.publish_status(snapshot)
                    self.report_to_cloud(snapshot)
                    if self.host is not None:
                        self.host.report_status(snapshot)
                    if self.drift is not None:
                        self.drift.save()
                except Exception:
                    log.exception("heartbeat failed")
            self._stop.wait(0.5)

    def stop(self, reason: str = "service stopped") -> None:
        """Stop the heartbeat and leave an ``offline`` health file behind."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        snapshot = self.snapshot()
        snapshot.update(state="offline", reason=reason)
        self.write_file(snapshot)
        if self.drift is not None:
            self.drift.save()


#: Less than this available to the service's user, and a file system counts as full for the health file.
DISK_FULL_BYTES = 1024 * 1024


def disk_full_reason(path: Path) -> str | None:
    """Why ``path`` (the health file) cannot be rewritten, when its file system is full; else None.

    For ``edge-runtime health``: a heartbeat that stopped because the file
    cannot be written (``ENOSPC``) is not a hung service. "Full" is less than
    :data:`DISK_FULL_BYTES` available (``statvfs`` ``f_bavail``: what a user
    other than root may still write) on the file system of ``path``'s folder,
    or of its nearest folder that exists.
    """
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    available = stats.f_bavail * stats.f_frsize
    if available >= DISK_FULL_BYTES:
        return None
    return (
        f"disk full: the file system of {folder} has {available} bytes available "
        f"({stats.f_blocks * stats.f_frsize} in all), so the service cannot rewrite {path.name} there"
    )
