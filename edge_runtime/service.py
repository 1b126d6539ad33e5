"""The long-running service: wires sources -> workers -> journal/outbox -> sinks, and health.

Nothing here handles a scan: :mod:`.workers` hands each one to :mod:`.flow`,
which takes it through the stages and has :mod:`.outcomes` record how it ended;
:mod:`.sinks` drain the outbox; :mod:`.health` reports. This module builds
them from the configuration, starts and stops them in order, and applies
configuration updates from its host (the Greengrass nucleus, Azure IoT Edge:
:mod:`.hosts`) while scans keep flowing.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .config import RuntimeConfig
from .drift_watch import SiteDrift
from .errors import ConfigError, EdgeRuntimeError, public_code
from .flow import ScanFlow
from .greengrass import GreengrassIpc
from .health import Health, error_line
from .hosts import ConfigOutcome, Host, config_update_handler
from .journal import Journal
from .live_config import diff_config
from .manifest import DriftReference
from .outcomes import OutcomeRecorder
from .pipeline import ScanAnalyzer
from .remote_methods import RemoteMethods
from .reports.processes import ReportProcesses
from .reports.retention import ReportRetention
from .sinks import BoxState, OutboxDrainer, SinkBacklogs, create_sinks
from .sinks.mqtt import MqttSink
from .sources import create_sources
from .sources.dicom_scp import DicomScpSource
from .workers import WorkerPool

if TYPE_CHECKING:
    from .admin import AdminServer

__all__ = ["EdgeService"]

log = logging.getLogger(__name__)

#: Budget for a graceful stop after SIGTERM (the Greengrass nucleus waits about 5 s).
STOP_TIMEOUT_S = 4.0
#: How long a replaced model stays open for workers that still hold it.
_OLD_MODEL_GRACE_S = 30.0
#: How often an update that names a model folder not there yet is tried again.
BUNDLE_RETRY_S = 10.0


def watchdog_limit(config: RuntimeConfig) -> float:
    """How long one scan may take before the watchdog reports the worker stuck.

    Reading and decoding have their own limits (after which the file is
    quarantined); a worker past both, with margin, is not progressing.
    """
    if config.health.watchdog_seconds:
        return config.health.watchdog_seconds
    return max(120.0, config.inbox.read_timeout_seconds + 3 * config.decode.timeout_seconds)


class EdgeService:
    """Wires the stages together. ``start()``, then ``stop()`` (or ``run_forever()``)."""

    def __init__(
        self, config: RuntimeConfig, host: Host | None = None, *, journal: Journal | None = None
    ) -> None:
        self.config = config
        #: What started us and keeps our configuration (None: a configuration file does).
        self.host = host
        # The journal first: a second instance (its lock) or a lost journal is refused before
        # anything else is created (the reference key, the model's processes).
        self.journal = journal or Journal(config.journal.path)
        try:
            self._build(config, host)
        except BaseException:
            self.journal.close()  # frees the instance lock too
            raise

    def _build(self, config: RuntimeConfig, host: Host | None) -> None:
        self.analyzer = ScanAnalyzer.from_config(config)  # loads and verifies the model bundle
        # The sinks read the running model (it may be switched) and the outbox; nothing is set on
        # them after this.
        box = BoxState(model=lambda: self.analyzer.status_model(), pending=self.journal.outbox_pending)
        self.sinks = create_sinks(config, host, box)
        self.mqtt = next((s for s in self.sinks if isinstance(s, MqttSink)), None)
        self.sources = create_sources(config)
        self.drift = (
            SiteDrift(config.drift, config.drift_state_path, self._drift_reference)
            if config.drift.enabled
            else None
        )
        self.health = Health(
            lambda: self.config,
            outbox_pending=self.journal.outbox_pending,
            queued=lambda: self.workers.queue.qsize(),
            model=lambda: self.analyzer.status_model(),
            stalled=lambda: self.workers.stalled(watchdog_limit(self.config)),
            mqtt=self.mqtt,
            ipc=host if isinstance(host, GreengrassIpc) else None,
            host=host,
            journal_lost=self._journal_problem,
            sinks_behind=lambda: self.backlogs.behind(),
            dicom=self._dicom_state,
            drift=self.drift,
        )
        self.journal.on_lost = self._journal_lost
        #: The copy of a lost journal saved when it was noticed (refreshed at stop).
        self._rescued: Path | None = None
        self.drainers = [
            OutboxDrainer(self.journal, sink, on_error=self.health.report_error) for sink in self.sinks
        ]
        #: Each sink on its own: only the results channel holds intake; the others are capped.
        self.backlogs = SinkBacklogs(
            lambda: self.config,
            self.journal,
            self.drainers,
            on_dropped=lambda n: self.health.count("outbox_dropped", n),
        )
        # One report child: as fast as one per worker, at half the memory (docs/performance.md).
        self.reports = ReportProcesses(1)
        recorder = OutcomeRecorder(
            self.journal,
            self.health,
            quarantine_dir=config.inbox.quarantine_path,
            dispose=lambda item: self.sources[item.source].dispose(item),
            notify_sinks=self._notify_sinks,
            reference_key=self.analyzer.reference_key,
            log_reasons=config.privacy.log_file_names,
        )
        flow = ScanFlow(
            config=lambda: self.config,
            analyzer=lambda: self.analyzer,
            journal=self.journal,
            recorder=recorder,
            health=self.health,
            reports=self.reports,
            sinks=lambda: self.sinks,
            drift=self.drift,
        )
        self.workers = WorkerPool(
            config=lambda: self.config,
            analyzer=lambda: self.analyzer,
            journal=self.journal,
            sources=self.sources,
            flow=flow,
            recorder=recorder,
            health=self.health,
            primary_sinks=self.backlogs.primary,
        )
        self.retention = ReportRetention(lambda: self.config, self.journal)
        #: The admin page and monitoring endpoints (None: Admin.Enabled is false), and the last log
        #: lines it shows (attached to the package's logger while running).
        self.admin: AdminServer | None = None
        self.logs: logging.Handler | None = None
        if config.admin.enabled:
            # Imported only when on: its web stack (Starlette, uvicorn, Jinja2) is ~10 MB of a box's memory.
            from .admin import AdminServer, BoxFacts, RecentLogs

            self.logs = RecentLogs(config.admin.log_lines)
            facts = BoxFacts(
                config=lambda: self.config,
                health=self.health,
                journal=self.journal,
                analyzer=lambda: self.analyzer,
                drainers=lambda: self.drainers,
                logs=self.logs,
                lifecycle=self._not_serving,
            )
            self.admin = AdminServer(config.admin, facts)
        self._config_lock = threading.Lock()
        #: An update waiting for its model folder to appear (see _wait_for_bundle), and since when.
        self._waiting_config: RuntimeConfig | None = None
        self._announced_wait: RuntimeConfig | None = None
        self._waiting_since: float | None = None
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        #: Set once start() has every part running (for /health/ready).
        self._serving = False

    def _not_serving(self) -> str | None:
        """For /health/ready: why scans are not taken now (starting, stopping), or None."""
        if self._stopping.is_set():
            return "the service is stopping"
        if not self._serving:
            return "the service is starting (its sources are not taking scans yet)"
        return None

    # -- what tests and the CLI read ---------------------------------------------------
    @property
    def counters(self) -> dict[str, int]:
        return self.health.counters

    @property
    def last_error(self) -> str | None:
        return self.health.last_error

    def _drift_reference(self) -> DriftReference | None:
        """The running model's validation reference for drift monitoring (None: its bundle has none)."""
        monitoring = self.analyzer.bundle.manifest.monitoring
        return None if monitoring is None else monitoring.reference

    def _dicom_state(self) -> dict[str, Any] | None:
        """The DICOM receiver for the status and the health file; None when it is off."""
        receiver = self.sources.get("dicom")
        return receiver.state() if isinstance(receiver, DicomScpSource) else None

    def _notify_sinks(self) -> None:
        """After each result: wake the drainers, then keep every other sink within its limits."""
        for drainer in self.drainers:
            drainer.notify()
        self.backlogs.enforce()

    # -- a journal lost while running --------------------------------------------------
    def _journal_problem(self) -> str | None:
        """For every health snapshot (so every heartbeat): the journal check, as status reason."""
        problem = self.journal.verify_on_disk()
        if problem is None:
            return None
        return (
            f"journal lost: {problem}; no new scans are taken (they wait at their source) until "
            "the service is restarted with the journal restored (see the ERROR in the service log)"
        )

    def _journal_lost(self, problem: str) -> None:
        """Called once, on the thread that noticed (a heartbeat or a worker): pause elsewhere."""
        threading.Thread(
            target=self._pause_for_lost_journal, args=(problem,), name="journal-lost", daemon=True
        ).start()

    def _pause_for_lost_journal(self, problem: str) -> None:
        """Stop intake, save what the open connection holds, and tell the admin what to do.

        The sources stop (inbox files stay where they are, the DICOM receiver stops
        listening so senders retry later), queued scans are handed back, and the
        guarded journal writes already refuse anything that would let a scan leave
        its source. Results already made are still delivered (their delivery marks
        go to the saved copy at stop).
        """
        if self._stopping.is_set():
            return
        for source in self.sources.values():
            try:
                source.stop()
            except Exception:
                log.exception("stopping source %s after the journal was lost", source.name)
        while True:
            try:
                item = self.workers.queue.get_nowait()
            except queue.Empty:
                break
            self.sources[item.source].release(item)
        path = self.journal.path
        try:
            pending = self.journal.results_awaiting_delivery()
        except EdgeRuntimeError:
            pending = -1
        waiting = "an unknown number of" if pending < 0 else str(pending)
        self._rescued = self.journal.save_rescue_copy()
        if self._rescued is not None:
            todo = (
                f"The journal as this process still holds it ({waiting} results awaiting delivery) was "
                f"saved to {self._rescued}. To recover: stop the service, run 'mv {self._rescued} "
                f"{path}' (nothing else to restore: its id is inside it) and start it again"
            )
        else:
            todo = (
                f"No copy of it could be saved (see the error above), so its {waiting} results awaiting "
                f"delivery are lost unless you restore your latest backup: stop the service, copy the "
                f"backup (made with 'edge-runtime journal backup') to {path}, and start it again"
            )
        log.error(
            "journal lost: %s. Intake is paused: no new scans are taken (inbox files stay in the "
            "inbox, the DICOM receiver stopped listening and senders retry later) and nothing more "
            "is recorded; the service stays up and reports 'degraded'. %s. Only if you mean to start "
            "this box over: 'edge-runtime run --new-journal' (those results are then NOT sent).",
            problem,
            todo,
        )
        # A fixed text (details in the log), like every last error that leaves the box.
        self.health.report_error(
            "journal: journal_lost: the journal was deleted or replaced while the service ran; "
            "intake paused (details in the service log)"
        )

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        if self.logs is not None:
            logging.getLogger("edge_runtime").addHandler(self.logs)
        if self.admin is not None:
            # First: a port in use refuses the start before any scan is taken.
            self.admin.start()
        requeued = self.journal.requeue_unfinished()
        counts = self.journal.counts()
        bundle = self.analyzer.bundle
        log.info(
            "edge runtime %s starting: model %s %s (%s), %d workers, sources %s, sinks %s; journal: "
            "%d done, %d quarantined, %d interrupted scans requeued, %d results awaiting delivery",
            __version__,
            bundle.name,
            bundle.version,
            self.analyzer.backend.name,
            self.config.effective_workers,
            ", ".join(self.sources) or "none",
            ", ".join(d.name for d in self.drainers) or "none",
            counts["done"],
            counts["quarantined"],
            requeued,
            self.journal.results_awaiting_delivery(),
        )
        # A sink that fell behind before the stop (or whose limits were lowered) is capped first.
        self.backlogs.enforce()
        # Sources first (they create their folders), so that "online" means ready for scans;
        # results made before a sink connects wait in the outbox.
        self.workers.start(self.config.effective_workers)
        for source in self.sources.values():
            source.start(self.workers.offer)
        for drainer in self.drainers:
            drainer.start()
        self.health.start()
        self.reports.start(self.config.reports.child_idle_seconds)
        self.retention.start()
        if self.host is not None:
            self.host.subscribe_to_config_updates(
                config_update_handler(self.host, self.apply_config, self._reject_config)
            )
            self.host.serve_methods(
                RemoteMethods(
                    health=self.health.snapshot,
                    analyzer=lambda: self.analyzer,
                    journal_path=lambda: self.journal.path,
                    threads=lambda: self.config.model.threads,
                ).call
            )
            self.host.report_running()
            log.info("reported running to %s", self.host.name)
        self._serving = True

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish scans in progress, leave queued ones at their source, say offline."""
        if self._stopping.is_set():
            self._stopped.wait(timeout_s)
            return
        self._stopping.set()
        # A configuration update under way (a model being loaded) finishes first; none starts after.
        with self._config_lock:
            pass
        log.info("stopping: finishing scans in progress (up to %.0f s)", timeout_s)
        deadline = time.monotonic() + timeout_s
        for source in self.sources.values():
            source.stop()
        self.workers.stop(deadline)
        for drainer in self.drainers:
            drainer.stop(timeout_s=max(1.0, deadline - time.monotonic()))
        if self.host is not None:
            self.host.close()
        self.retention.stop()
        self.reports.close()
        self.health.stop()
        if self.admin is not None:
            self.admin.stop()
        if self.logs is not None:
            logging.getLogger("edge_runtime").removeHandler(self.logs)
        self.analyzer.close()
        if self._rescued is not None:
            # Delivery marks made since it was saved: results sent meanwhile are not sent again.
            self.journal.save_rescue_copy(self._rescued)
        self.journal.close()
        log.info("stopped")
        self._stopped.set()

    def run_forever(self) -> None:
        """Run until SIGTERM/SIGINT (what Greengrass and systemd send)."""
        stop = threading.Event()

        def _handle(signum: int, _frame: Any) -> None:
            log.info("received %s", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, _handle)
        signal.signal(signal.SIGINT, _handle)
        self.start()
        mqtt = self.mqtt
        deadline = time.monotonic() + self.config.mqtt.connect_timeout_seconds
        while mqtt is not None and not stop.is_set() and time.monotonic() < deadline:
            if mqtt.wait_connected(0.1):
                break
        if mqtt is not None and not stop.is_set() and not mqtt.connected:
            log.warning(
                "MQTT broker %s:%s not reachable yet; scans are still processed and their "
                "results kept in the journal until it is",
                self.config.mqtt.host,
                self.config.mqtt.port,
            )
        while not stop.wait(1.0):
            pass
        # Greengrass and systemd kill a component a few seconds after SIGTERM: scans not
        # finished by then stay 'processing' in the journal and are redone at the next start.
        self.stop(timeout_s=STOP_TIMEOUT_S)

    # -- live configuration ------------------------------------------------------------
    def apply_config(self, new: RuntimeConfig) -> None:
        """Apply a configuration update without a restart where that is safe.

        Threshold, results topics, intake policy, decode limits, heartbeat and the
        model bundle change live (a new bundle is loaded and verified while scans
        keep flowing; if it is bad the old model stays). Keys that need a restart
        (inbox/journal paths, workers, broker connection) are reported as such.
        """
        with self._config_lock:
            if self._stopping.is_set():
                return  # an update that arrives while stopping is read again at the next start
            # Any update supersedes one that waits for its model folder.
            self._waiting_config = None
            old = self.config
            if new == old:
                if self.host is not None:
                    self.host.config_outcome(ConfigOutcome(applied=True))
                return
            change = diff_config(old, new)
            folder = new.model.bundle_path
            if change.reload_model and folder is not None and not folder.exists():
                self._wait_for_bundle(new, folder)
                return
            self._announced_wait = None
            if change.reload_model:
                try:
                    analyzer = ScanAnalyzer.from_config(new)
                except EdgeRuntimeError as exc:
                    self._reject_config(
                        f"model bundle rejected, keeping {old.model.bundle_path or 'the bundled model'}: "
                        f"{exc.message}",
                        public_code(exc),
                    )
                    return
                # The sinks read the running model: the MQTT status and the next Last Will name it.
                previous, self.analyzer = self.analyzer, analyzer
                # Workers that already hold the old analyzer finish with it.
                threading.Timer(_OLD_MODEL_GRACE_S, previous.close).start()
                log.info(
                    "model switched to %s %s (%s)",
                    analyzer.bundle.name,
                    analyzer.bundle.version,
                    analyzer.bundle.path,
                )
            elif new.model.threshold != old.model.threshold:
                self.analyzer.threshold = (
                    self.analyzer.bundle.threshold if new.model.threshold is None else new.model.threshold
                )
            logging.getLogger("edge_runtime").setLevel(new.logging.level)
            self.config = change.effective
            self.health.last_error = None
            log.info("configuration updated live: %s", ", ".join(change.changed))
            if change.needs_restart:
                log.warning("these settings take effect after a restart: %s", ", ".join(change.needs_restart))
            self.health.publish_status()
            if self.host is not None:
                self.host.config_outcome(
                    ConfigOutcome(True, tuple(change.changed), tuple(change.needs_restart))
                )

    def _wait_for_bundle(self, new: RuntimeConfig, folder: Path) -> None:
        """An update names a model folder that is not there yet: keep the running one, try again.

        A rollout that ships the model separately (the Azure IoT Edge model module copies
        its bundle into a shared volume; a Greengrass model component unpacks its artifact)
        may deliver the configuration first. Refusing it for good would leave the box on the
        old model until someone noticed; it is tried every :data:`BUNDLE_RETRY_S` until the
        folder appears or a newer update replaces it.
        """
        first = self._announced_wait != new
        self._announced_wait = new
        if first:
            self._waiting_since = time.monotonic()
        self._waiting_config = new
        waited = time.monotonic() - (self._waiting_since or time.monotonic())
        text = (
            f"model bundle folder {folder} does not exist yet (a model module or component may "
            f"still be copying it): keeping model {self.analyzer.bundle.name} "
            f"{self.analyzer.bundle.version} and trying again every {BUNDLE_RETRY_S:.0f} s"
        )
        if first:
            log.warning("configuration update waits: %s", text)
        else:
            log.debug("still waiting %.0f s: %s", waited, text)
        if first and self.host is not None:
            self.host.config_outcome(ConfigOutcome(False, waiting=text))
        timer = threading.Timer(BUNDLE_RETRY_S, self._retry_waiting, args=(new,))
        timer.daemon = True
        timer.start()

    def _retry_waiting(self, new: RuntimeConfig) -> None:
        if self._stopping.is_set() or self._waiting_config is not new:
            return  # stopped, or a newer update came meanwhile
        self.apply_config(new)

    def _reject_config(self, reason: str, code: str = ConfigError.code) -> None:
        """A configuration update (or its model bundle) refused: the running one stays.

        ``reason`` (which names settings, values, paths and what the bundle check found)
        goes to the log and to the host that sent the update (the module twin's reported
        ``configuration``: it quotes only what the operator wrote there); the status'
        ``last_error`` says ``code`` and its fixed text. A newer update refused also
        cancels one still waiting for its model folder.
        """
        self._waiting_config = None
        self._announced_wait = None
        self.health.last_error = error_line("configuration update rejected", code)
        log.error("configuration update rejected (%s), keeping the running configuration: %s", code, reason)
        self.health.publish_status()
        if self.host is not None:
            self.host.config_outcome(ConfigOutcome(False, error=f"{code}: {reason}"))
