"""AWS IoT Greengrass v2 integration over the nucleus' IPC socket.

Used only when the nucleus started us (it sets
``AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT`` and ``SVCUID``):

* the configuration is read with ``GetConfiguration`` (the component's
  ``DefaultConfiguration`` merged with the deployment's updates; its keys
  are :class:`~edge_runtime.config.RuntimeConfig`'s, one to one);
* ``SubscribeToConfigurationUpdate`` delivers config-only deployments while
  we run: each update builds a new config object, which the service applies
  live (threshold, results topic, model bundle, limits) or rejects, keeping
  the old one and saying why;
* ``UpdateState(RUNNING)`` once the service is up;
* two extra outbox sinks: results to Greengrass local pub/sub
  (``PublishToTopic``, for other components and the MQTT bridge) and, if
  configured, to AWS IoT Core (``PublishToIoTCore``, QoS 1) with every
  identifier of the scan removed.

awsiotsdk is imported lazily: boxes without Greengrass do not need it.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from .config import RuntimeConfig
from .errors import ConfigError, EdgeRuntimeError, PublishError
from .journal import Journal, OutboxMessage

__all__ = [
    "CLOUD_INPUT_FIELDS",
    "GreengrassIpc",
    "IpcSink",
    "cloud_payload",
    "resolve_recipe_variables",
    "running_under_greengrass",
]

log = logging.getLogger(__name__)

SOCKET_ENV = "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT"
TOKEN_ENV = "SVCUID"  # noqa: S105 - the name of the variable, not a secret
#: Input fields that may leave the hospital: none identifies the patient or the study.
CLOUD_INPUT_FIELDS = (
    "kind",
    "decoder",
    "modality",
    "body_part_examined",
    "view_position",
    "rows",
    "columns",
    "bits_stored",
    "photometric_interpretation",
)


def running_under_greengrass(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return bool(env.get(SOCKET_ENV)) and bool(env.get(TOKEN_ENV))


def cloud_payload(result: dict[str, Any]) -> dict[str, Any]:
    """The result without patient or study identifiers, file names or content hashes.

    The ``message_id`` stays: it is a one-way hash that lets the cloud drop
    repeats, and lets the hospital (which has the full message) join the two.
    """
    redacted = copy.deepcopy(result)
    redacted["input"] = {k: v for k, v in result["input"].items() if k in CLOUD_INPUT_FIELDS}
    redacted["runtime"] = {"version": result["runtime"]["version"]}
    return redacted


def resolve_recipe_variables(config: dict[str, Any], environ: Any) -> dict[str, Any]:
    """Resolve the recipe variables a nucleus without interpolateComponentConfiguration leaves.

    ``Model.BundlePath`` names the model component's artifact folder and
    ``Mqtt.ClientId`` the thing name; the lifecycle script exports the first as
    ``EDGE_RUNTIME_MODEL_DIR`` and the nucleus always sets ``AWS_IOT_THING_NAME``.
    """
    config = copy.deepcopy(config)
    model = config.get("Model")
    model_dir = environ.get("EDGE_RUNTIME_MODEL_DIR")
    if isinstance(model, dict) and "{" in str(model.get("BundlePath", "")) and model_dir:
        model["BundlePath"] = model_dir
    mqtt = config.get("Mqtt")
    if isinstance(mqtt, dict) and "{iot:thingName}" in str(mqtt.get("ClientId", "")):
        thing = environ.get("AWS_IOT_THING_NAME")
        if thing:
            mqtt["ClientId"] = str(mqtt["ClientId"]).replace("{iot:thingName}", thing)
    return config


class GreengrassIpc:
    """A thin, typed wrapper around ``GreengrassCoreIPCClientV2``."""

    def __init__(self, client: Any = None) -> None:
        if client is None:
            try:
                from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
            except ImportError as exc:
                raise EdgeRuntimeError(
                    "The Greengrass IPC client (awsiotsdk) is not installed.",
                    action="Install the runtime with its 'greengrass' extra: "
                    "pip install 'healthdiag-edge[greengrass]'.",
                ) from exc
            client = GreengrassCoreIPCClientV2()
        self.client = client
        self._subscriptions: list[Any] = []

    def get_configuration(self) -> dict[str, Any]:
        """This component's whole configuration, without its accessControl policy."""
        response = self.client.get_configuration(key_path=[])
        value = dict(response.value or {})
        value.pop("accessControl", None)
        return value

    def load_config(self, environ: dict[str, str] | None = None) -> RuntimeConfig:
        config = resolve_recipe_variables(
            self.get_configuration(), os.environ if environ is None else environ
        )
        return RuntimeConfig.from_mapping(config, source="Greengrass component configuration")

    def subscribe_to_config_updates(self, on_update: Callable[[], None]) -> None:
        """Call ``on_update()`` (on the SDK's thread) whenever a deployment changes our config."""

        def on_event(event: Any) -> None:
            update = getattr(event, "configuration_update_event", None)
            key_path = list(getattr(update, "key_path", []) or [])
            log.info("Greengrass configuration update (key path %s)", "/".join(key_path) or "/")
            on_update()

        def on_error(error: Exception) -> bool:
            log.error("Greengrass configuration subscription error: %s", error)
            return False  # keep the stream open

        _, operation = self.client.subscribe_to_configuration_update(
            key_path=[],
            on_stream_event=on_event,
            on_stream_error=on_error,
            on_stream_closed=lambda: log.warning("Greengrass configuration stream closed"),
        )
        self._subscriptions.append(operation)

    def report_running(self) -> None:
        self.client.update_state(state="RUNNING")

    def report_errored(self) -> None:
        self.client.update_state(state="ERRORED")

    def publish_local(self, topic: str, payload: str) -> None:
        from awsiot.greengrasscoreipc.model import JsonMessage, PublishMessage

        message = PublishMessage(json_message=JsonMessage(message=json.loads(payload)))
        self.client.publish_to_topic(topic=topic, publish_message=message)

    def publish_iot_core(self, topic: str, payload: str, qos: int, *, retain: bool = False) -> None:
        from awsiot.greengrasscoreipc.model import QOS

        self.client.publish_to_iot_core(
            topic_name=topic,
            qos=QOS.AT_LEAST_ONCE if qos >= 1 else QOS.AT_MOST_ONCE,
            payload=payload.encode("utf-8"),
            retain=retain,
        )

    def close(self) -> None:
        for operation in self._subscriptions:
            try:
                operation.close().result(timeout=2)
            except Exception:
                log.debug("closing a subscription failed", exc_info=True)
        self._subscriptions.clear()
        try:
            self.client.close()
        except Exception:
            log.debug("closing the IPC client failed", exc_info=True)


class IpcSink:
    """Drains one outbox sink (``ipc-local`` or ``ipc-iotcore``) through the nucleus.

    IPC publishes are request/response: the nucleus' reply is the
    acknowledgement, after which the message is marked delivered. Failures
    are retried with back-off; messages are never dropped.
    """

    def __init__(self, name: str, journal: Journal, send: Callable[[OutboxMessage], None]) -> None:
        self.sink = name
        self.journal = journal
        self._send = send
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.delivered_count = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"sink-{self.sink}", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.journal.pending_messages(self.sink, limit=1):
            self._wake.set()
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _loop(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            try:
                for message in self.journal.pending_messages(self.sink, limit=100):
                    if self._stop.is_set():
                        return
                    self._send(message)
                    self.journal.mark_delivered(message.seq)
                    self.delivered_count += 1
                    log.info(
                        "delivered %s via %s",
                        message.message_id[:16],
                        self.sink,
                        extra={
                            "event": "published",
                            "fields": {
                                "message_id": message.message_id,
                                "sink": self.sink,
                                "topic": message.topic,
                            },
                        },
                    )
                backoff = 0.5
            except Exception as exc:
                log.warning(
                    "%s delivery failed (%s); retrying in %.1f s",
                    self.sink,
                    PublishError(str(exc)).message,
                    backoff,
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                self._wake.set()


def config_update_handler(
    ipc: GreengrassIpc, apply: Callable[[RuntimeConfig], None], reject: Callable[[str], None]
) -> Callable[[], None]:
    """Build the callback for configuration updates: re-read, validate, apply or reject."""

    def handle() -> None:
        try:
            new_config = ipc.load_config()
        except ConfigError as exc:
            reject(exc.message)
            return
        except Exception as exc:
            reject(f"could not read the updated configuration: {exc}")
            return
        apply(new_config)

    return handle
