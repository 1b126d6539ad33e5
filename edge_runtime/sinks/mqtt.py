"""The MQTT sink: results and the box's status to the hospital's broker (paho-mqtt 2).

A result is already committed to the journal's outbox before it reaches this
module. The drainer hands outbox messages to paho at QoS 1 and marks each
one delivered only when paho's ``on_publish`` callback says the broker has
sent PUBACK. paho keeps handed-over messages across reconnects and re-sends
them; after a process restart the outbox re-sends whatever was never
acknowledged. Subscribers therefore see every result at least once and drop
repeats by ``message_id``.

The status topic is retained and carries a last will, so a subscriber always
knows whether the box is ``online`` or ``offline``.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from ..config import MqttConfig, RuntimeConfig, read_secret_file
from ..errors import (
    MQTT_AUTH_FAILED,
    MQTT_CLIENT_ID_CONFLICT,
    MQTT_CONNECTION_REFUSED,
    MQTT_TLS_HANDSHAKE_FAILED,
    MQTT_TLS_VERIFY_FAILED,
    ConfigError,
    PublishError,
    public_text,
)
from ..journal import Delivery, OutboxMessage
from ..results import ScanResult, build_status, utc_now
from .base import Acknowledge, BoxState, Sink

__all__ = [
    "MqttSink",
    "MqttTopicSink",
    "build_tls_context",
    "fhir_document",
    "fhir_topic",
    "from_config",
    "priority_topic",
]

log = logging.getLogger(__name__)


def _read_password(config: MqttConfig) -> str | None:
    if config.password_file is None:
        return config.password
    return read_secret_file(config.password_file, "MQTT password", "Mqtt.PasswordFile")


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


#: A session shorter than this counts towards a suspected ClientId takeover ...
_SHORT_SESSION_S = 3.0
#: ... once this many happen in a row.
_TAKEOVER_SESSIONS = 3


def from_config(config: RuntimeConfig, ipc: Any = None, state: BoxState | None = None) -> list[Sink]:
    """The broker connection and its two extra topics (urgent results, FHIR reports)."""
    if not config.mqtt.enabled:
        return []
    box = state or BoxState()
    channel = frozenset({MqttSink.name, "mqtt-urgent"})
    broker = MqttSink(config.mqtt, model=box.model, backlog=lambda: box.pending(channel))
    return [
        broker,
        # Urgent results are the results channel too: never dropped, like the results topic.
        MqttTopicSink(broker, "mqtt-urgent", _urgent_row, label="MQTT priority topic", primary=True),
        MqttTopicSink(broker, "mqtt-fhir", _fhir_row, label="MQTT FHIR topic"),
    ]


def priority_topic(config: RuntimeConfig) -> str:
    return config.reports.priority_topic or f"{config.mqtt.results_topic}/urgent"


def fhir_topic(config: RuntimeConfig) -> str:
    return config.reports.fhir_topic or f"{config.mqtt.topic_prefix}/fhir"


def _urgent_row(config: RuntimeConfig, result: ScanResult) -> tuple[str, str] | None:
    """Urgent results again, on the priority topic a worklist watches to move a study up."""
    return (priority_topic(config), result.payload) if result.priority == "urgent" else None


def fhir_document(config: RuntimeConfig, result: ScanResult) -> str | None:
    """The result's FHIR Bundle (written by reports.writer beside the SR); None when it has none.

    Every sink that carries FHIR (this broker's FHIR topic, Greengrass local pub/sub) sends
    this file as written, so they all carry the same document.
    """
    reports = result.reports
    if not config.reports.fhir or reports is None or reports.fhir is None:
        return None
    path: Path = config.reports_path / reports.folder / reports.fhir
    return path.read_text(encoding="utf-8")


def _fhir_row(config: RuntimeConfig, result: ScanResult) -> tuple[str, str] | None:
    """The result's FHIR Bundle on its own topic."""
    bundle = fhir_document(config, result)
    return None if bundle is None else (fhir_topic(config), bundle)


class MqttTopicSink:
    """Another topic on the same broker connection, with its own outbox rows and drainer.

    Each row in the outbox is one (message, sink); a result that also goes to
    the priority topic or as FHIR needs rows of its own, so that each is
    delivered (and retried) on its own. Acknowledgements are paho message ids,
    unique among the messages in flight on the one connection, so the broker's
    PUBACKs are handed to every drainer and each takes its own.
    """

    def __init__(
        self,
        broker: MqttSink,
        name: str,
        row: Callable[[RuntimeConfig, ScanResult], tuple[str, str] | None],
        *,
        label: str = "",
        primary: bool = False,
    ) -> None:
        self.broker = broker
        self.name = name
        self.label = label or name
        #: Whether its backlog holds new scans (the urgent topic) or is capped (the FHIR topic).
        self.primary = primary
        self._row = row

    def delivery(self, config: RuntimeConfig, result: ScanResult) -> Delivery | None:
        row = self._row(config, result)
        return None if row is None else Delivery(self.name, row[0], row[1], config.mqtt.qos)

    def start(self, acknowledge: Acknowledge) -> None:
        self.broker.add_listener(acknowledge)

    def ready(self) -> bool:
        return self.broker.ready()

    def send(self, message: OutboxMessage) -> int:
        return self.broker.send(message)

    def stop(self, timeout_s: float) -> None:
        """The broker connection is closed by the ``mqtt`` sink."""


class MqttSink:
    """Owns the MQTT connection: results from the outbox, the retained status, the last will."""

    name = "mqtt"
    label = "MQTT results"
    #: The results channel: its backlog holds new scans (Journal.MaxOutboxMessages).
    primary = True

    def __init__(
        self,
        config: MqttConfig,
        *,
        model: Callable[[], dict[str, Any]] = dict,
        max_in_flight: int = 100,
        backlog: Callable[[], int] | None = None,
    ) -> None:
        self.config = config
        #: The running model (it may be switched live): status messages and the Last Will name it.
        self._model = model
        #: How many results wait in the outbox (said in the log after a reconnect).
        self.backlog = backlog
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
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
        self._set_will()
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_publish = self._on_publish
        self._failures = 0
        self.last_refusal: str | None = None
        #: Why the broker is not reachable, as an error code (authentication, TLS, a ClientId taken
        #: over; see :mod:`edge_runtime.errors`); None while connected or unknown. The status says the
        #: code and its fixed text (:attr:`problem`); the details (the broker's or OpenSSL's words,
        #: hosts, user names) are in the log only.
        self._problem: str | None = None
        self._lost_at: float | None = None
        self._connected_at = 0.0
        self._short_sessions = 0
        self._listeners: list[Acknowledge] = []
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._started = False

    # -- paho callbacks (network thread) ---------------------------------------------
    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            self.last_refusal = str(reason)
            if reason.value in (4, 5, 134, 135):  # bad user name or password / not authorized
                self._problem = MQTT_AUTH_FAILED
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
                self._problem = MQTT_CONNECTION_REFUSED
                log.error(
                    "MQTT broker %s:%s refused the connection: %s", self.config.host, self.config.port, reason
                )
            return
        self.last_refusal = None
        self._connected_at = time.monotonic()
        if self._short_sessions < _TAKEOVER_SESSIONS:
            self._problem = None
        log.info("MQTT connected to %s:%s as %s", self.config.host, self.config.port, self.config.client_id)
        self._connected.set()
        self._failures = 0
        reason = None
        if self._lost_at is not None:
            outage = time.monotonic() - self._lost_at
            queued = f"{self.backlog()} results" if self.backlog is not None else "results"
            reason = (
                f"reconnected after {outage:.0f} s without the broker; {queued} queued meanwhile are "
                "being delivered"
            )
            log.info("MQTT %s", reason)
            self._lost_at = None
        self.publish_status("online", reason=reason)
        self._broadcast(-1)  # wake the drainers: they may send again

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
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._set_will()  # the next CONNECT names the model running then
        if was_connected and not self._stopping.is_set():
            # The broker closing each new session at once is what a second client with our
            # ClientId causes (each connect takes the session over from the other box).
            if time.monotonic() - self._connected_at < _SHORT_SESSION_S:
                self._short_sessions += 1
            else:
                self._short_sessions = 0
            if self._short_sessions >= _TAKEOVER_SESSIONS:
                self._problem = MQTT_CLIENT_ID_CONFLICT
                if self._short_sessions == _TAKEOVER_SESSIONS:
                    log.error(
                        "MQTT: the broker closed %d sessions in a row right after they opened: another "
                        "client probably uses the same Mqtt.ClientId (%s); give every box its own",
                        self._short_sessions,
                        self.config.client_id,
                    )
        if self._lost_at is None:
            self._lost_at = time.monotonic()
        if not self._stopping.is_set():
            log.warning(
                "MQTT connection to %s:%s lost (%s); reconnecting with back-off",
                self.config.host,
                self.config.port,
                reason,
            )

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        # Runs inside paho's message mutex: the drainers only queue the token.
        self._broadcast(mid)

    def _broadcast(self, token: int) -> None:
        for listener in self._listeners:
            listener(token)

    def add_listener(self, acknowledge: Acknowledge) -> None:
        """Another drainer (of a topic on this connection) wants the PUBACKs."""
        self._listeners.append(acknowledge)

    # -- Sink --------------------------------------------------------------------------
    def delivery(self, config: RuntimeConfig, result: ScanResult) -> Delivery | None:
        return Delivery(self.name, config.mqtt.results_topic, result.payload, config.mqtt.qos)

    @property
    def problem_code(self) -> str | None:
        """What keeps us from the broker, as an error code; None once a session has lasted a while."""
        if self.connected and time.monotonic() - self._connected_at >= _SHORT_SESSION_S:
            return None
        return self._problem

    @property
    def problem(self) -> str | None:
        """:attr:`problem_code` as published (status reason and last_error): ``MQTT: <code>: <fixed text>``.

        Never the broker's, paho's or OpenSSL's words (they may name hosts, users or
        certificates): those are in the service log.
        """
        code = self.problem_code
        return None if code is None else f"MQTT: {code}: {public_text(code)} (details in the service log)"

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def ready(self) -> bool:
        return self.connected

    @property
    def model_info(self) -> dict[str, Any]:
        """The model the status messages name: the one running now."""
        return self._model() or {}

    def _set_will(self) -> None:
        """The Last Will the broker publishes if this box vanishes: offline, naming the model it ran.

        Set at construction (the model is loaded before the sinks are built) and again each
        time the connection is lost: paho sends the will with each CONNECT, so a reconnect
        after a model switch names the new model. It used to be built before any model was known.
        """
        offline = build_status(
            "offline", self.config.client_id, reason="connection lost", model=self.model_info
        )
        self._client.will_set(self.config.status_topic, json.dumps(offline), qos=1, retain=True)

    def start(self, acknowledge: Acknowledge | None = None) -> None:
        """Connect in the background; the service runs even while the broker is down."""
        if acknowledge is not None:
            self.add_listener(acknowledge)
        self._started = True
        host, port = self.config.host, self.config.port
        try:
            # One synchronous attempt first, so that a TLS or DNS problem is reported in
            # words at start-up; afterwards paho's loop reconnects with back-off.
            self._client.connect(host, port, keepalive=self.config.keepalive_seconds)
        except ssl.SSLCertVerificationError as exc:
            self._problem = MQTT_TLS_VERIFY_FAILED
            log.error(
                "TLS verification of the MQTT broker %s:%s failed: %s. Check that Mqtt.Host "
                "matches the broker certificate and Mqtt.Tls.CaFile is the CA that signed it.",
                host,
                port,
                exc.verify_message or exc,
            )
            self._client.connect_async(host, port, keepalive=self.config.keepalive_seconds)
        except ssl.SSLError as exc:
            self._problem = MQTT_TLS_HANDSHAKE_FAILED
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

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def send(self, message: OutboxMessage) -> int:
        # paho keeps a QoS 1 message it has accepted and re-sends it after a reconnect,
        # so once handed over it is the drainer's until its PUBACK.
        info = self._client.publish(message.topic, message.payload, qos=message.qos)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise PublishError(f"paho refused the message: {mqtt.error_string(info.rc)}")
        return int(info.mid)

    def publish_status(
        self,
        state: str,
        reason: str | None = None,
        counters: dict[str, int] | None = None,
        last_error: str | None = None,
        dicom: dict[str, Any] | None = None,
        drift: dict[str, Any] | None = None,
    ) -> mqtt.MQTTMessageInfo:
        """The retained status; ``dicom``: the DICOM receiver's state, when it runs; ``drift``: the
        drift monitor's state and reasons, when it runs."""
        status = build_status(
            state,
            self.config.client_id,
            reason=reason,
            model=self.model_info,
            counters=counters,
            last_error=last_error,
        )
        if dicom is not None:
            status["dicom"] = dicom
        if drift is not None:
            status["drift"] = drift
        return self._client.publish(self.config.status_topic, json.dumps(status), qos=1, retain=True)

    def publish_drift(self, report: dict[str, Any]) -> mqtt.MQTTMessageInfo:
        """The drift monitor's full report (:class:`~edge_runtime.drift.DriftReport`), retained.

        Framed like every other message (schema version, type, time, client), so a subscriber
        to the whole prefix tells it from results and status by ``message_type``.
        """
        message = {
            "schema_version": "1.0",
            "message_type": "drift",
            "timestamp_utc": utc_now(),
            "client_id": self.config.client_id,
            "report": report,
        }
        return self._client.publish(self.config.drift_topic, json.dumps(message), qos=1, retain=True)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Say offline (retained), disconnect."""
        if not self._started:
            return
        self._stopping.set()
        deadline = time.monotonic() + timeout_s
        if self.connected:
            info = self.publish_status("offline", reason="service stopped")
            try:
                info.wait_for_publish(timeout=max(0.5, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                log.warning("offline status could not be published before disconnect")
        self._client.disconnect()
        self._client.loop_stop()
