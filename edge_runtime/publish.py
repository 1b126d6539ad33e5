"""Publish stage: the journal's outbox -> MQTT (paho-mqtt 2).

A result is already committed to the journal's outbox before it reaches this
module. The publisher hands outbox messages to paho at QoS 1 and marks each
one delivered only in paho's ``on_publish`` callback, i.e. when the broker
has sent PUBACK. paho keeps handed-over messages across reconnects and
re-sends them; after a process restart the outbox re-sends whatever was never
acknowledged. Subscribers therefore see every result at least once and drop
repeats by ``message_id``.

The status topic is retained and carries a last will, so a subscriber always
knows whether the box is ``online`` or ``offline``.
"""

from __future__ import annotations

import json
import logging
import queue
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from .config import MqttConfig
from .errors import ConfigError
from .journal import Journal, OutboxMessage
from .results import build_status

__all__ = ["MqttPublisher", "build_tls_context"]

log = logging.getLogger(__name__)


def _read_password(config: MqttConfig) -> str | None:
    if config.password_file is None:
        return config.password
    try:
        return config.password_file.read_text(encoding="utf-8").splitlines()[0]
    except (OSError, IndexError) as exc:
        raise ConfigError(
            f"Cannot read the MQTT password from {config.password_file}: "
            f"{getattr(exc, 'strerror', None) or 'the file is empty'}.",
            action="Fix Mqtt.PasswordFile (the file's first line is the password).",
        ) from exc


def build_tls_context(config: MqttConfig) -> ssl.SSLContext:
    """A verifying TLS context; a missing or bad file stops start-up, naming the file."""
    tls = config.tls

    def fail(path: Path | None, what: str, exc: Exception) -> ConfigError:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        return ConfigError(
            f"MQTT TLS {what} {path}: {reason}.",
            action=f"Fix Mqtt.Tls ({what}) so it names a readable PEM file, then restart.",
        )

    for path, what in (
        (tls.ca_file, "CA file"),
        (tls.cert_file, "client certificate"),
        (tls.key_file, "client key"),
    ):
        if path is not None and not path.is_file():
            raise ConfigError(
                f"MQTT TLS {what} {path} does not exist.",
                action=f"Install the {what} there or fix Mqtt.Tls, then restart.",
            )
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
        )
    except (ssl.SSLError, OSError) as exc:
        raise fail(tls.ca_file, "CA file", exc) from exc
    if tls.cert_file is not None and tls.key_file is not None:
        try:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        except (ssl.SSLError, OSError) as exc:
            raise fail(tls.cert_file, "client certificate/key", exc) from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class MqttPublisher:
    """Owns the MQTT connection and drains the journal's outbox."""

    def __init__(
        self,
        config: MqttConfig,
        journal: Journal,
        *,
        model_info: dict[str, Any] | None = None,
        max_in_flight: int = 100,
        sink: str = "mqtt",
    ) -> None:
        self.config = config
        self.sink = sink
        self.journal = journal
        self.model_info = model_info or {}
        self.max_in_flight = max_in_flight
        self._client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=config.client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        self._client.enable_logger(logging.getLogger("edge_runtime.mqtt"))
        self._client.max_inflight_messages_set(max_in_flight)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        if config.username:
            self._client.username_pw_set(config.username, _read_password(config))
        if config.tls.enabled:
            self._client.tls_set_context(build_tls_context(config))
        offline = build_status("offline", config.client_id, reason="connection lost", model=self.model_info)
        self._client.will_set(config.status_topic, json.dumps(offline), qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_connect_fail = self._on_connect_fail
        self._failures = 0
        self.last_refusal: str | None = None
        self._lost_at: float | None = None
        self._client.on_publish = self._on_publish
        self._acks: queue.SimpleQueue[int] = queue.SimpleQueue()
        # Only the drain thread touches these two:
        self._in_flight: dict[int, OutboxMessage] = {}  # paho mid -> message
        self._handed_seq = 0  # highest outbox seq handed to paho in this process
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self.delivered_count = 0
        self.on_delivered: Any = None  # optional callback(OutboxMessage, latency_s)
        self._handed_at: dict[int, float] = {}

    # -- paho callbacks (network thread) ---------------------------------------------
    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            self.last_refusal = str(reason)
            if reason.value in (4, 5, 134, 135):  # bad user name or password / not authorized
                log.error(
                    "MQTT broker %s:%s rejected our credentials (%s): authentication failed for "
                    "user %r. Check Mqtt.Username and Mqtt.Password/PasswordFile against the "
                    "broker's password file.",
                    self.config.host,
                    self.config.port,
                    reason,
                    self.config.username,
                )
            else:
                log.error(
                    "MQTT broker %s:%s refused the connection: %s", self.config.host, self.config.port, reason
                )
            return
        self.last_refusal = None
        log.info("MQTT connected to %s:%s as %s", self.config.host, self.config.port, self.config.client_id)
        self._connected.set()
        self._failures = 0
        reason = None
        if self._lost_at is not None:
            outage = time.monotonic() - self._lost_at
            reason = (
                f"reconnected after {outage:.0f} s without the broker; "
                f"{self.journal.outbox_pending()} results queued meanwhile are "
                "being delivered"
            )
            log.info("MQTT %s", reason)
            self._lost_at = None
        self.publish_status("online", reason=reason)
        self._wake.set()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._failures += 1
        if self._failures in (1, 10) or self._failures % 100 == 0:
            log.warning(
                "cannot reach the MQTT broker at %s:%s (attempt %d); results are kept in the "
                "journal and sent once it is reachable. Check Mqtt.Host/Mqtt.Port and that the "
                "broker is running.",
                self.config.host,
                self.config.port,
                self._failures,
            )

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self._connected.clear()
        if self._lost_at is None:
            self._lost_at = time.monotonic()
        if not self._stop.is_set():
            log.warning(
                "MQTT connection to %s:%s lost (%s); reconnecting with back-off",
                self.config.host,
                self.config.port,
                reason,
            )

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        # Runs inside paho's message mutex: only hand the ack to the drain thread
        # (taking our own locks here could deadlock against publish()).
        self._acks.put(mid)
        self._wake.set()

    # -- public API --------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        """Connect in the background; the service runs even while the broker is down."""
        host, port = self.config.host, self.config.port
        try:
            # One synchronous attempt first, so that a TLS or DNS problem is reported in
            # words at start-up; afterwards paho's loop reconnects with back-off.
            self._client.connect(host, port, keepalive=self.config.keepalive_seconds)
        except ssl.SSLCertVerificationError as exc:
            log.error(
                "TLS verification of the MQTT broker %s:%s failed: %s. Check that Mqtt.Host "
                "matches the broker certificate and Mqtt.Tls.CaFile is the CA that signed it.",
                host,
                port,
                exc.verify_message or exc,
            )
            self._client.connect_async(host, port, keepalive=self.config.keepalive_seconds)
        except ssl.SSLError as exc:
            log.error(
                "TLS handshake with the MQTT broker %s:%s failed: %s. If the broker "
                "requires a client certificate, set Mqtt.Tls.CertFile/KeyFile.",
                host,
                port,
                exc,
            )
            self._client.connect_async(host, port, keepalive=self.config.keepalive_seconds)
        except OSError as exc:
            self._on_connect_fail(self._client, None)
            log.debug("first connect attempt: %s", exc)
            self._client.connect_async(host, port, keepalive=self.config.keepalive_seconds)
        self._client.loop_start()
        self._thread = threading.Thread(target=self._drain_loop, name="outbox", daemon=True)
        self._thread.start()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def notify(self) -> None:
        """Tell the drain loop that the outbox has something new."""
        self._wake.set()

    def publish_status(
        self,
        state: str,
        reason: str | None = None,
        counters: dict[str, int] | None = None,
        last_error: str | None = None,
    ) -> mqtt.MQTTMessageInfo:
        status = build_status(
            state,
            self.config.client_id,
            reason=reason,
            model=self.model_info,
            counters=counters,
            last_error=last_error,
        )
        return self._client.publish(self.config.status_topic, json.dumps(status), qos=1, retain=True)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Drain what can be drained within ``timeout_s``, say offline, disconnect."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.connected:
            pending = self.journal.pending_messages(self.sink, self._handed_seq, limit=1)
            if not self._in_flight and not pending:
                break
            self._wake.set()
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self.connected:
            info = self.publish_status("offline", reason="service stopped")
            try:
                info.wait_for_publish(timeout=max(0.5, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                log.warning("offline status could not be published before disconnect")
        self._client.disconnect()
        self._client.loop_stop()

    # -- outbox drain (own thread) ---------------------------------------------------
    def _drain_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            try:
                self._process_acks()
                if self.connected:
                    self._hand_over()
            except Exception:
                log.exception("outbox drain failed; will retry")
                time.sleep(1.0)
        self._process_acks()

    def _process_acks(self) -> None:
        acked: list[tuple[OutboxMessage, float]] = []
        while True:
            try:
                mid = self._acks.get_nowait()
            except queue.Empty:
                break
            message = self._in_flight.pop(mid, None)
            handed_at = self._handed_at.pop(mid, None)
            if message is None:
                continue  # a status message
            latency = time.perf_counter() - handed_at if handed_at else 0.0
            acked.append((message, latency))
        if not acked:
            return
        # One transaction (one fsync) for every PUBACK that arrived meanwhile.
        self.journal.mark_delivered(*(message.seq for message, _ in acked))
        for message, latency in acked:
            self.delivered_count += 1
            log.info(
                "published %s",
                message.message_id[:16],
                extra={
                    "event": "published",
                    "fields": {
                        "message_id": message.message_id,
                        "seq": message.seq,
                        "puback_ms": round(latency * 1000, 2),
                    },
                },
            )
            if self.on_delivered is not None:
                self.on_delivered(message, latency)

    def _hand_over(self) -> None:
        while not self._stop.is_set() and self.connected:
            room = self.max_in_flight - len(self._in_flight)
            if room <= 0:
                return
            batch = self.journal.pending_messages(self.sink, self._handed_seq, limit=room)
            if not batch:
                return
            for message in batch:
                # paho keeps a QoS 1 message it has accepted and re-sends it after a
                # reconnect, so once handed over it is tracked until its PUBACK.
                info = self._client.publish(message.topic, message.payload, qos=message.qos)
                self._in_flight[info.mid] = message
                self._handed_at[info.mid] = time.perf_counter()
                self._handed_seq = max(self._handed_seq, message.seq)
            self._process_acks()
