"""The long-running service: inbox -> workers -> journal -> MQTT.

Per scan::

    ingest (complete file)  -> received (sha256)  -> journal.admit
      -> decode -> preprocess -> infer            (pipeline.ScanAnalyzer)
      -> journal.record_result (result + outbox, one transaction)
      -> inbox file removed / moved                (only now)
      -> publisher sends, PUBACK marks delivered

A bad scan ends in ``quarantine/`` with ``NAME.error.json`` and the service
carries on. A fault of the box itself (backend crash, unexpected bug) leaves
the file in the inbox for another attempt; after ``Journal.MaxAttempts``
tries it is quarantined too, so one poisonous file cannot loop forever.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

from . import __version__
from .config import RuntimeConfig
from .errors import EdgeRuntimeError, InputError
from .greengrass import GreengrassIpc, IpcSink, cloud_payload, config_update_handler
from .ingest import InboxWatcher, ReadyFile
from .journal import Delivery, Journal
from .logs import event
from .pipeline import ScanAnalyzer, file_sha256
from .publish import MqttPublisher
from .results import build_status, scan_ref, utc_now

__all__ = ["EdgeService"]

log = logging.getLogger(__name__)

#: Budget for a graceful stop after SIGTERM (the Greengrass nucleus waits about 5 s).
STOP_TIMEOUT_S = 4.0
#: Starts without an outcome (the process died mid-scan) tolerated per Journal.MaxAttempts.
_INTERRUPTIONS_PER_ATTEMPT = 5
_STOP = ReadyFile(float("inf"), Path("/"), 0, 0.0)


class EdgeService:
    """Wires the stages together. ``start()``, then ``stop()`` (or ``run_forever()``)."""

    def __init__(self, config: RuntimeConfig, ipc: GreengrassIpc | None = None) -> None:
        self.config = config
        self.ipc = ipc
        self.analyzer = self._build_analyzer(config)
        self.journal = Journal(config.journal.path)
        self.publisher = MqttPublisher(
            config.mqtt,
            self.journal,
            model_info=_status_model(self.analyzer),
        )
        self.quarantine_dir = config.inbox.quarantine_path
        self.processed_dir = config.inbox.processed_path
        self.watcher = InboxWatcher(config.inbox, self._enqueue)
        self.sinks: list[IpcSink] = []
        if ipc is not None:
            self.sinks = [
                IpcSink("ipc-local", self.journal, lambda m: ipc.publish_local(m.topic, m.payload)),
                IpcSink(
                    "ipc-iotcore", self.journal, lambda m: ipc.publish_iot_core(m.topic, m.payload, m.qos)
                ),
            ]
        self._config_lock = threading.Lock()
        self._queue: queue.PriorityQueue[ReadyFile] = queue.PriorityQueue()
        self._workers: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self.counters = {"received": 0, "processed": 0, "quarantined": 0, "duplicates": 0}
        self._counter_lock = threading.Lock()
        self.last_error: str | None = None
        self._blocked_reason: str | None = None
        self._heartbeat: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self.config.inbox.path.mkdir(parents=True, exist_ok=True)
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        if self.processed_dir is not None:
            self.processed_dir.mkdir(parents=True, exist_ok=True)
        requeued = self.journal.requeue_unfinished()
        counts = self.journal.counts()
        bundle = self.analyzer.bundle
        log.info(
            "edge runtime %s starting: model %s %s (%s), %d workers, inbox %s; journal: %d done, "
            "%d quarantined, %d interrupted scans requeued, %d results awaiting delivery",
            __version__,
            bundle.name,
            bundle.version,
            self.analyzer.backend.name,
            self.config.effective_workers,
            self.config.inbox.path.resolve(),
            counts["done"],
            counts["quarantined"],
            requeued,
            counts["outbox_pending"],
        )
        if self.config.mqtt.enabled:
            self.publisher.start()
        for sink in self.sinks:
            sink.start()
        for i in range(self.config.effective_workers):
            worker = threading.Thread(target=self._work, name=f"worker-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)
        self.watcher.start()
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._heartbeat.start()
        if self.ipc is not None:
            self.ipc.subscribe_to_config_updates(
                config_update_handler(self.ipc, self.apply_config, self._reject_config)
            )
            self.ipc.report_running()
            log.info("reported RUNNING to the Greengrass nucleus")

    @staticmethod
    def _build_analyzer(config: RuntimeConfig) -> ScanAnalyzer:
        """Load and verify the model bundle (raises ModelBundleError/BackendError)."""
        return ScanAnalyzer.from_config(config)

    # -- live configuration ------------------------------------------------------------
    _RESTART_SECTIONS = ("inbox", "journal", "workers")
    _RESTART_MQTT_KEYS = (
        "enabled",
        "host",
        "port",
        "client_id",
        "username",
        "password",
        "password_file",
        "tls",
        "keepalive_seconds",
    )

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
            changed = _changed_keys(old.to_pascal_dict(), new.to_pascal_dict())
            needs_restart = [
                k
                for k in changed
                if k.split(".")[0].lower() in self._RESTART_SECTIONS
                or (k.startswith("Mqtt.") and _snake(k.split(".")[1]) in self._RESTART_MQTT_KEYS)
            ]
            model_keys = ("model.bundle_path", "model.backend", "model.threads", "decode", "intake")
            reload_model = any(_snake_path(k).startswith(model_keys) for k in changed)
            if reload_model:
                try:
                    analyzer = self._build_analyzer(new)
                except EdgeRuntimeError as exc:
                    self._reject_config(
                        f"model bundle rejected, keeping "
                        f"{old.model.bundle_path or 'the bundled model'}: "
                        f"{exc.message}"
                    )
                    return
                previous, self.analyzer = self.analyzer, analyzer
                self.publisher.model_info = _status_model(analyzer)
                # Workers that already hold the old analyzer finish with it.
                threading.Timer(30.0, previous.close).start()
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
            # Restart-only settings keep their running values until the next start.
            self.config = new.model_copy(
                update={
                    "inbox": old.inbox,
                    "journal": old.journal,
                    "workers": old.workers,
                    "mqtt": old.mqtt.model_copy(
                        update={"topic_prefix": new.mqtt.topic_prefix, "qos": new.mqtt.qos}
                    ),
                }
            )
            self.last_error = None
            log.info("configuration updated live: %s", ", ".join(changed))
            if needs_restart:
                log.warning("these settings take effect after a restart: %s", ", ".join(needs_restart))
            self._publish_status_now()

    def _reject_config(self, reason: str) -> None:
        self.last_error = f"configuration update rejected: {reason}"
        log.error("configuration update rejected, keeping the running configuration: %s", reason)
        self._publish_status_now()

    def _publish_status_now(self) -> None:
        if self.config.mqtt.enabled and self.publisher.connected:
            snapshot = self.health()
            self.publisher.publish_status(
                snapshot["state"], snapshot["reason"], snapshot["counters"], snapshot["last_error"]
            )

    # -- health ------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """A snapshot for the heartbeat, the health file and ``edge-runtime health``."""
        counts = self.journal.counts()
        with self._counter_lock:
            counters = dict(self.counters)
        counters["queued"] = self._queue.qsize()
        counters["outbox_pending"] = counts["outbox_pending"]
        state, reason = "online", None
        if self._blocked_reason:
            state, reason = "degraded", f"not taking new scans: {self._blocked_reason}"
        elif self.config.mqtt.enabled and not self.publisher.connected:
            state, reason = "degraded", "MQTT broker not reachable; results kept in the journal"
        elif self.last_error and self.last_error.startswith("configuration update rejected"):
            state, reason = "degraded", self.last_error
        return {
            "state": state,
            "reason": reason,
            "timestamp_utc": utc_now(),
            "mqtt_connected": self.publisher.connected,
            "model": _status_model(self.analyzer),
            "counters": counters,
            "last_error": self.last_error,
            "runtime_version": __version__,
            "heartbeat_seconds": self.config.health.heartbeat_seconds,
        }

    def _write_health(self, snapshot: dict[str, Any]) -> None:
        path = self.config.health.file
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(snapshot, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write health file %s: %s", path, exc)

    def _heartbeat_loop(self) -> None:
        last_beat = float("-inf")
        while not self._stopping.is_set():
            if time.monotonic() - last_beat >= self.config.health.heartbeat_seconds:
                last_beat = time.monotonic()
                try:
                    snapshot = self.health()
                    self._write_health(snapshot)
                    if self.publisher.connected:
                        self.publisher.publish_status(
                            snapshot["state"],
                            snapshot["reason"],
                            snapshot["counters"],
                            snapshot["last_error"],
                        )
                    self._report_to_cloud(snapshot)
                except Exception:
                    log.exception("heartbeat failed")
            self._stopping.wait(0.5)

    def _report_to_cloud(self, snapshot: dict[str, Any]) -> None:
        """The health report for the fleet's operators and the release pipeline's canary check.

        Retained on ``<Greengrass.StatusTopic>/<thing name>`` in AWS IoT Core: the
        model version this box runs, the conformance check it ran on it, the
        counters. Like the local status, it carries no scan identifier.
        """
        topic = self.config.greengrass.status_topic
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
        try:
            self.ipc.publish_iot_core(f"{topic}/{thing}", json.dumps(report), 1, retain=True)
        except Exception as exc:  # the report is best effort; scans go on
            log.warning("cannot publish the health report to AWS IoT Core: %s", exc)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish scans in progress, leave queued ones in the inbox, say offline."""
        if self._stopping.is_set():
            self._stopped.wait(timeout_s)
            return
        self._stopping.set()
        log.info("stopping: finishing scans in progress (up to %.0f s)", timeout_s)
        self.watcher.stop()
        deadline = time.monotonic() + timeout_s
        # Queued-but-unstarted files stay in the inbox; the next start picks them up.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        for _ in self._workers:
            self._queue.put(_STOP)
        for worker in self._workers:
            worker.join(timeout=max(0.1, deadline - time.monotonic()))
        if self.config.mqtt.enabled:
            self.publisher.stop(timeout_s=max(1.0, deadline - time.monotonic()))
        for sink in self.sinks:
            sink.stop(timeout_s=max(0.5, deadline - time.monotonic()))
        if self.ipc is not None:
            self.ipc.close()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=2)
        snapshot = self.health()
        snapshot.update(state="offline", reason="service stopped")
        self._write_health(snapshot)
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
        deadline = time.monotonic() + self.config.mqtt.connect_timeout_seconds
        while (
            self.config.mqtt.enabled
            and not stop.is_set()
            and not self.publisher.connected
            and time.monotonic() < deadline
        ):
            stop.wait(0.1)
        if self.config.mqtt.enabled and not stop.is_set() and not self.publisher.connected:
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

    # -- work --------------------------------------------------------------------------
    def _enqueue(self, item: ReadyFile) -> None:
        if self._stopping.is_set():
            return
        if self._gate(item):
            self._queue.put(item)

    def _gate(self, item: ReadyFile) -> bool:
        """Check disk space and outbox depth; False leaves the file in the inbox for later.

        Checked when a file is offered and again when a worker takes it, so the outbox
        exceeds Journal.MaxOutboxMessages by at most the number of workers.
        """
        blocked = self._intake_blocked()
        if blocked != self._blocked_reason:
            self._blocked_reason = blocked
            if blocked:
                log.warning("not taking new scans: %s; they wait in the inbox", blocked)
            else:
                log.info("taking new scans again")
            if self.publisher.connected:
                snapshot = self.health()
                self.publisher.publish_status(
                    snapshot["state"], snapshot["reason"], snapshot["counters"], snapshot["last_error"]
                )
        if blocked:
            self.watcher.release(item.path)  # stays in the inbox; the next rescan offers it again
            return False
        return True

    def _intake_blocked(self) -> str | None:
        """Why new scans must wait in the inbox, or None."""
        journal_cfg = self.config.journal
        for folder in (self.journal.path.parent, self.config.inbox.path):
            try:
                free_mb = shutil.disk_usage(folder).free / (1024 * 1024)
            except OSError:
                continue
            if free_mb < journal_cfg.min_free_disk_mb:
                return (
                    f"only {free_mb:.0f} MB free on the disk of {folder} (minimum "
                    f"Journal.MinFreeDiskMb = {journal_cfg.min_free_disk_mb} MB)"
                )
        pending = self.journal.outbox_pending()
        if pending >= journal_cfg.max_outbox_messages:
            return (
                f"{pending} results are waiting for the MQTT broker (limit "
                f"Journal.MaxOutboxMessages = {journal_cfg.max_outbox_messages})"
            )
        return None

    def _count(self, key: str) -> None:
        with self._counter_lock:
            self.counters[key] += 1

    def _work(self) -> None:
        try:
            self.analyzer.warm_up()
        except Exception:
            log.exception("could not start the decoder process in advance; it starts on demand")
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if not self._gate(item):
                continue
            try:
                self._handle(item)
            except Exception:
                # Never let one scan kill a worker: log it, retry on a later rescan.
                log.exception("unexpected error while handling %s; it will be retried", item.path.name)
            finally:
                self.watcher.release(item.path)

    def _handle(self, item: ReadyFile) -> None:
        path = item.path
        queue_ms = (time.monotonic() - item.ready_at) * 1000
        t0 = time.perf_counter()
        try:
            sha256 = file_sha256(path)
            size = path.stat().st_size
        except FileNotFoundError:
            log.info("%s disappeared from the inbox before it was read", path.name)
            return
        hash_ms = (time.perf_counter() - t0) * 1000
        self._count("received")
        event(
            log,
            "received",
            "received %s (%d bytes)",
            path.name,
            size,
            file=path.name,
            sha256=sha256[:16],
            size_bytes=size,
            queue_ms=round(queue_ms, 2),
        )
        admission = self.journal.admit(sha256, path, size)
        record = admission.record
        if admission.action == "finish_done":
            self._count("duplicates")
            what = "duplicate of" if admission.duplicate else "already processed as"
            event(
                log,
                "duplicate",
                "%s is a %s %s; not processed again",
                path.name,
                what,
                record.file_name,
                file=path.name,
                sha256=sha256[:16],
                original=record.file_name,
                message_id=record.message_id,
            )
            self._dispose_done(path)
            return
        if admission.action == "finish_quarantine":
            self._move_to_quarantine(path, record.error or {})
            return
        attempt = record.attempts
        max_attempts = self.config.journal.max_attempts
        if attempt > max_attempts * _INTERRUPTIONS_PER_ATTEMPT:
            # Started this often and never finished: the service died each time (power,
            # OOM killer, a crash in the inference engine). Stop the loop.
            self._quarantine(
                path,
                sha256,
                record.id,
                attempt - 1,
                {
                    "code": "processing_interrupted_repeatedly",
                    "error": f"Processing {path.name} was interrupted {attempt - 1} times (the "
                    "service stopped or crashed while working on it).",
                    "action": "Check the service log and the system journal for crashes or the "
                    "OOM killer; resend the scan once fixed.",
                },
            )
            return
        try:
            outcome = self.analyzer.analyze(path, sha256, {"queue": queue_ms, "hash": hash_ms})
        except InputError as exc:
            self._quarantine(path, sha256, record.id, attempt, exc.to_dict())
            return
        except EdgeRuntimeError as exc:
            failures = self.journal.record_failure(record.id)
            # No file name or free text on the status topic: the reference and the error's code.
            self.last_error = f"{scan_ref(sha256, path.name)}: {exc.code} (details in the service log)"
            log.error(
                "attempt %d/%d on %s failed: %s (%s)",
                failures,
                max_attempts,
                path.name,
                exc.message,
                exc.action,
            )
            if failures >= max_attempts:
                self._quarantine(
                    path,
                    sha256,
                    record.id,
                    attempt,
                    {
                        "code": "processing_failed_repeatedly",
                        "error": f"{path.name} failed {failures} times without a usable result; "
                        f"last error: {exc.message}",
                        "action": exc.action,
                    },
                )
            return
        created = self.journal.record_result(record.id, outcome.result, self._deliveries(outcome.result))
        if not created:
            # Same message id as an earlier result: the same SOP Instance UID sent again
            # with different bytes (e.g. another transfer syntax). Published once only.
            self._count("duplicates")
            event(
                log,
                "duplicate",
                "%s repeats an earlier instance (%s); result not published again",
                path.name,
                outcome.result["input"].get("sop_instance_uid"),
                file=path.name,
                sha256=sha256[:16],
                message_id=outcome.result["message_id"],
            )
        self._count("processed")
        self.publisher.notify()
        for sink in self.sinks:
            sink.notify()
        self._dispose_done(path)

    def _deliveries(self, result: dict[str, Any]) -> list[Delivery]:
        """One outbox row per sink; each sink drains its rows independently."""
        payload = json.dumps(result, separators=(",", ":"), sort_keys=True)
        config = self.config
        deliveries = []
        if config.mqtt.enabled:
            deliveries.append(Delivery("mqtt", config.mqtt.results_topic, payload, config.mqtt.qos))
        if self.ipc is not None and config.greengrass.local_topic:
            deliveries.append(Delivery("ipc-local", config.greengrass.local_topic, payload, 1))
        if self.ipc is not None and config.greengrass.iot_core_topic:
            cloud = json.dumps(cloud_payload(result), separators=(",", ":"), sort_keys=True)
            deliveries.append(Delivery("ipc-iotcore", config.greengrass.iot_core_topic, cloud, 1))
        return deliveries

    # -- outcomes on disk ---------------------------------------------------------------
    def _quarantine(
        self, path: Path, sha256: str, input_id: int, attempts: int, error: dict[str, str]
    ) -> None:
        document = self._error_doc(path, sha256, attempts, error)
        self.journal.record_quarantine(input_id, document)
        self._move_to_quarantine(path, document)

    @staticmethod
    def _error_doc(path: Path, sha256: str, attempts: int, error: dict[str, str]) -> dict[str, Any]:
        return {
            "file": path.name,
            "sha256": sha256,
            **error,
            "attempts": attempts,
            "quarantined_utc": utc_now(),
            "runtime_version": __version__,
        }

    @staticmethod
    def _same_input(error_file: Path, sha256: str | None) -> bool:
        """An earlier, interrupted quarantine of this very input left this error file."""
        try:
            return sha256 is not None and json.loads(error_file.read_text())["sha256"] == sha256
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def _unique_target(self, folder: Path, name: str, sha256: str | None = None) -> Path:
        target = folder / name
        n = 1
        while target.exists() or (folder / f"{target.name}.error.json").exists():
            if self._same_input(folder / f"{target.name}.error.json", sha256):
                return target  # finish what a crash interrupted, do not duplicate it
            target = folder / f"{Path(name).stem}.{n}{Path(name).suffix}"
            n += 1
        return target

    def _move_to_quarantine(self, path: Path, error: dict[str, Any]) -> None:
        target = self._unique_target(self.quarantine_dir, path.name, error.get("sha256"))
        error_file = target.with_name(target.name + ".error.json")
        tmp = error_file.with_name(error_file.name + ".tmp")
        tmp.write_text(json.dumps(error, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, error_file)
        with contextlib.suppress(FileNotFoundError):
            shutil.move(str(path), target)
        self._count("quarantined")
        self.last_error = (
            f"{scan_ref(str(error.get('sha256') or ''), path.name)}: {error.get('code')} "
            "(details in the quarantine error file)"
        )
        event(
            log,
            "quarantined",
            "quarantined %s: %s",
            path.name,
            error.get("error"),
            level=logging.WARNING,
            file=path.name,
            sha256=str(error.get("sha256", ""))[:16],
            code=error.get("code"),
            reason=error.get("error"),
            action=error.get("action"),
            moved_to=str(target),
        )

    def _dispose_done(self, path: Path) -> None:
        try:
            if self.processed_dir is None:
                path.unlink()
            else:
                shutil.move(str(path), self._unique_target(self.processed_dir, path.name))
        except FileNotFoundError:
            pass


def _status_model(analyzer: ScanAnalyzer) -> dict[str, Any]:
    """The model as the status topic and health file name it, with its last conformance check.

    The reference image's name is left out (it stays in the log): status
    messages carry no file names.
    """
    model: dict[str, Any] = {
        "name": analyzer.bundle.name,
        "version": analyzer.bundle.version,
        "backend": analyzer.backend.name,
    }
    if analyzer.conformance is not None:
        summary = analyzer.conformance.summary()
        summary.pop("worst", None)
        summary.pop("model", None)
        model["conformance"] = summary
    return model


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def _snake_path(dotted: str) -> str:
    return ".".join(_snake(part) for part in dotted.split("."))


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted PascalCase paths whose values differ."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, path + ".")
        elif a != b:
            changed.append(path)
    return changed
