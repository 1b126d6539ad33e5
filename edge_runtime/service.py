"""The long-running service: wires sources -> workers -> journal/outbox -> sinks, and health.

Nothing here handles a scan: :mod:`.workers` takes each one through the
stages (:mod:`.pipeline`) and :mod:`.outcomes` records how it ended;
:mod:`.sinks` drain the outbox; :mod:`.health` reports. This module builds
them from the configuration, starts and stops them in order, and applies
configuration updates from the Greengrass nucleus while scans keep flowing.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from . import __version__
from .config import RuntimeConfig
from .errors import EdgeRuntimeError
from .greengrass import GreengrassIpc, config_update_handler
from .health import Health
from .journal import Journal
from .live_config import diff_config
from .outcomes import OutcomeRecorder
from .pipeline import ScanAnalyzer
from .reports.processes import ReportProcesses
from .reports.retention import ReportRetention
from .sinks import OutboxDrainer, create_sinks
from .sinks.mqtt import MqttSink
from .sources import create_sources
from .workers import WorkerPool

__all__ = ["EdgeService"]

log = logging.getLogger(__name__)

#: Budget for a graceful stop after SIGTERM (the Greengrass nucleus waits about 5 s).
STOP_TIMEOUT_S = 4.0
#: How long a replaced model stays open for workers that still hold it.
_OLD_MODEL_GRACE_S = 30.0


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
        self, config: RuntimeConfig, ipc: GreengrassIpc | None = None, *, journal: Journal | None = None
    ) -> None:
        self.config = config
        self.ipc = ipc
        self.analyzer = ScanAnalyzer.from_config(config)  # loads and verifies the model bundle
        self.journal = journal or Journal(config.journal.path)
        self.sinks = create_sinks(config, ipc)
        self.mqtt = next((s for s in self.sinks if isinstance(s, MqttSink)), None)
        self.sources = create_sources(config)
        self.health = Health(
            lambda: self.config,
            outbox_pending=self.journal.outbox_pending,
            queued=lambda: self.workers.queue.qsize(),
            model=lambda: self.analyzer.status_model(),
            stalled=lambda: self.workers.stalled(watchdog_limit(self.config)),
            mqtt=self.mqtt,
            ipc=ipc,
        )
        self.drainers = [
            OutboxDrainer(self.journal, sink, on_error=self.health.report_error) for sink in self.sinks
        ]
        if self.mqtt is not None:
            self.mqtt.model_info = self.analyzer.status_model()
            self.mqtt.backlog = self.journal.outbox_pending
        # One report child: as fast as one per worker here (0.99x on 2 cores) at half the memory
        # (~225 MB RSS each, the report libraries).
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
        self.workers = WorkerPool(
            config=lambda: self.config,
            analyzer=lambda: self.analyzer,
            journal=self.journal,
            sources=self.sources,
            sinks=lambda: self.sinks,
            recorder=recorder,
            health=self.health,
            reports=self.reports,
        )
        self.retention = ReportRetention(lambda: self.config, self.journal)
        self._config_lock = threading.Lock()
        self._stopping = threading.Event()
        self._stopped = threading.Event()

    # -- what tests and the CLI read ---------------------------------------------------
    @property
    def counters(self) -> dict[str, int]:
        return self.health.counters

    @property
    def last_error(self) -> str | None:
        return self.health.last_error

    def _notify_sinks(self) -> None:
        for drainer in self.drainers:
            drainer.notify()

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
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
        # Sources first (they create their folders), so that "online" means ready for scans;
        # results made before a sink connects wait in the outbox.
        self.workers.start(self.config.effective_workers)
        for source in self.sources.values():
            source.start(self.workers.offer)
        for drainer in self.drainers:
            drainer.start()
        self.health.start()
        self.reports.start()
        self.retention.start()
        if self.ipc is not None:
            self.ipc.subscribe_to_config_updates(
                config_update_handler(self.ipc, self.apply_config, self._reject_config)
            )
            self.ipc.report_running()
            log.info("reported RUNNING to the Greengrass nucleus")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish scans in progress, leave queued ones at their source, say offline."""
        if self._stopping.is_set():
            self._stopped.wait(timeout_s)
            return
        self._stopping.set()
        log.info("stopping: finishing scans in progress (up to %.0f s)", timeout_s)
        deadline = time.monotonic() + timeout_s
        for source in self.sources.values():
            source.stop()
        self.workers.stop(deadline)
        for drainer in self.drainers:
            drainer.stop(timeout_s=max(1.0, deadline - time.monotonic()))
        if self.ipc is not None:
            self.ipc.close()
        self.retention.stop()
        self.reports.close()
        self.health.stop()
        self.analyzer.close()
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
            old = self.config
            if new == old:
                return
            change = diff_config(old, new)
            if change.reload_model:
                try:
                    analyzer = ScanAnalyzer.from_config(new)
                except EdgeRuntimeError as exc:
                    self._reject_config(
                        f"model bundle rejected, keeping {old.model.bundle_path or 'the bundled model'}: "
                        f"{exc.message}"
                    )
                    return
                previous, self.analyzer = self.analyzer, analyzer
                if self.mqtt is not None:
                    self.mqtt.model_info = analyzer.status_model()
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

    def _reject_config(self, reason: str) -> None:
        self.health.last_error = f"configuration update rejected: {reason}"
        log.error("configuration update rejected, keeping the running configuration: %s", reason)
        self.health.publish_status()
