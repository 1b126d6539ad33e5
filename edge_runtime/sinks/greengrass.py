"""Greengrass sinks: results to local pub/sub and, without identifiers, to AWS IoT Core.

Like the MQTT sink's topics, each channel is an outbox sink of its own:

* ``ipc-local``: every result on ``Greengrass.LocalTopic``;
* ``ipc-local-urgent``: urgent results again on ``Greengrass.LocalPriorityTopic``;
* ``ipc-local-fhir``: each result's FHIR Bundle on ``Greengrass.LocalFhirTopic``;
* ``ipc-iotcore``: every result, de-identified, on ``Greengrass.IotCoreTopic``;
* ``ipc-iotcore-urgent``: urgent results again, de-identified, on
  ``Greengrass.IotCorePriorityTopic``.

FHIR reports do not go to AWS IoT Core: the Bundle references the study by
its Study Instance UID, and nothing identifying a scan leaves the hospital.

IPC publishes are request/response: the nucleus' reply is the confirmation,
after which the drainer marks the message delivered. Errors are retried
with back-off by the drainer.
"""

from __future__ import annotations

from ..config import RuntimeConfig
from ..greengrass import GreengrassIpc
from ..journal import Delivery, OutboxMessage
from ..results import ScanResult
from .base import Acknowledge, BoxState
from .cloud import CLOUD_INPUT_FIELDS, CLOUD_REPORT_FIELDS, cloud_json, cloud_payload
from .mqtt import fhir_document

__all__ = [
    "CLOUD_INPUT_FIELDS",
    "CLOUD_REPORT_FIELDS",
    "IotCoreSink",
    "IotCoreUrgentSink",
    "LocalFhirSink",
    "LocalPubSubSink",
    "LocalUrgentSink",
    "cloud_payload",
    "iot_core_from_config",
    "local_from_config",
]


class _IpcSink:
    """Shared by both IPC sinks: always ready (the nucleus is local); send waits for its reply."""

    name = ""
    #: The ``Greengrass`` setting that names the topic (unset: this sink sends nothing).
    topic_setting = ""
    #: Only urgent results (the priority topics).
    urgent_only = False

    def __init__(self, ipc: GreengrassIpc) -> None:
        self.ipc = ipc

    def delivery(self, config: RuntimeConfig, result: ScanResult) -> Delivery | None:
        topic = getattr(config.greengrass, self.topic_setting)
        if not topic or (self.urgent_only and result.priority != "urgent"):
            return None
        return Delivery(self.name, topic, self.body(result), 1)

    def body(self, result: ScanResult) -> str:
        """What the topic carries for ``result``: the result message itself."""
        return result.payload

    def start(self, acknowledge: Acknowledge) -> None:
        """Nothing to connect: the IPC client is connected when the service starts."""

    def ready(self) -> bool:
        return True

    def stop(self, timeout_s: float) -> None:
        """The IPC client is closed by the service, after every sink has stopped."""


class LocalPubSubSink(_IpcSink):
    """Greengrass local pub/sub (``PublishToTopic``): other components and the MQTT bridge."""

    name = "ipc-local"
    label = "Greengrass local pub/sub"
    topic_setting = "local_topic"

    def __init__(self, ipc: GreengrassIpc, *, primary: bool = False) -> None:
        super().__init__(ipc)
        #: The results channel when MQTT is off (its backlog then holds new scans).
        self.primary = primary

    def send(self, message: OutboxMessage) -> None:
        self.ipc.publish_local(message.topic, message.payload)


class LocalUrgentSink(LocalPubSubSink):
    """Urgent results again on local pub/sub, for a worklist that moves such studies up."""

    name = "ipc-local-urgent"
    label = "Greengrass local pub/sub priority topic"
    topic_setting = "local_priority_topic"
    urgent_only = True


class LocalFhirSink(LocalPubSubSink):
    """Each result's FHIR Bundle on local pub/sub (the same file as on the MQTT FHIR topic)."""

    name = "ipc-local-fhir"
    label = "Greengrass local pub/sub FHIR topic"

    def __init__(self, ipc: GreengrassIpc) -> None:
        # Never the results channel: its backlog is capped like any other sink's.
        super().__init__(ipc, primary=False)

    def delivery(self, config: RuntimeConfig, result: ScanResult) -> Delivery | None:
        topic = config.greengrass.local_fhir_topic
        bundle = fhir_document(config, result) if topic else None
        return None if bundle is None else Delivery(self.name, topic, bundle, 1)


class IotCoreSink(_IpcSink):
    """AWS IoT Core through the nucleus (``PublishToIoTCore``, QoS 1), identifiers removed."""

    name = "ipc-iotcore"
    label = "AWS IoT Core"
    primary = False
    topic_setting = "iot_core_topic"

    def body(self, result: ScanResult) -> str:
        """The de-identified result (:func:`cloud_payload`)."""
        return cloud_json(result)

    def send(self, message: OutboxMessage) -> None:
        self.ipc.publish_iot_core(message.topic, message.payload, message.qos)


class IotCoreUrgentSink(IotCoreSink):
    """Urgent results again on AWS IoT Core, de-identified like every result sent there."""

    name = "ipc-iotcore-urgent"
    label = "AWS IoT Core priority topic"
    topic_setting = "iot_core_priority_topic"
    urgent_only = True


def local_from_config(
    config: RuntimeConfig, ipc: object = None, state: BoxState | None = None
) -> list[_IpcSink]:
    """Results, urgent results and FHIR reports on local pub/sub (under the nucleus only).

    With MQTT off, results and urgent results are the results channel (never dropped).
    """
    if not isinstance(ipc, GreengrassIpc):
        return []
    primary = not config.mqtt.enabled
    return [LocalPubSubSink(ipc, primary=primary), LocalUrgentSink(ipc, primary=primary), LocalFhirSink(ipc)]


def iot_core_from_config(
    config: RuntimeConfig, ipc: object = None, state: BoxState | None = None
) -> list[_IpcSink]:
    """Results and urgent results, de-identified, to AWS IoT Core (under the nucleus only)."""
    return [IotCoreSink(ipc), IotCoreUrgentSink(ipc)] if isinstance(ipc, GreengrassIpc) else []
