"""Azure IoT Edge sinks: results to edgeHub outputs, which the deployment's routes carry on.

Like the MQTT topics and the Greengrass channels, each output is an outbox sink
of its own (delivered, retried and capped on its own):

* ``edgehub``: every result, de-identified (:func:`~.cloud.cloud_json`), on
  ``Azure.ResultsOutput``; routed to IoT Hub (``$upstream``) and, optionally, to
  a module on the box;
* ``edgehub-urgent``: urgent results again on ``Azure.UrgentOutput``;
* ``edgehub-fhir``: each result's FHIR Bundle on ``Azure.FhirOutput``, for a
  module on this box only (it names the study by its UID; the generated
  manifest never routes it upstream).

The results output carries the de-identified result, not the full one, because
where an output goes is decided by routes in a deployment manifest, outside
this process: whatever they say, no identifier can leave the hospital through
it. The ``message_id`` (a one-way hash) is both the message's IoT Hub
message-id and in its body, so a consumer joins it with the full result
published locally and drops repeats.

A send returns once edgeHub has acknowledged the message (its PUBACK), after
which the drainer marks it delivered; edgeHub then stores and forwards it
(``storeAndForwardConfiguration``) while IoT Hub is unreachable.
"""

from __future__ import annotations

from ..azure_edge import EdgeHubModule
from ..config import RuntimeConfig
from ..journal import Delivery, OutboxMessage
from ..results import ScanResult
from .base import Acknowledge, BoxState
from .cloud import cloud_json
from .mqtt import fhir_document

__all__ = ["EdgeHubFhirSink", "EdgeHubResultsSink", "EdgeHubUrgentSink", "from_config"]


class EdgeHubResultsSink:
    """Every result, de-identified, on the results output."""

    name = "edgehub"
    label = "Azure IoT Edge output"
    #: The ``Azure`` setting that names the output (empty: this sink sends nothing).
    output_setting = "results_output"
    urgent_only = False

    def __init__(self, module: EdgeHubModule, *, primary: bool = False) -> None:
        self.module = module
        #: The results channel when MQTT is off (its backlog then holds new scans).
        self.primary = primary

    def delivery(self, config: RuntimeConfig, result: ScanResult) -> Delivery | None:
        output = getattr(config.azure, self.output_setting)
        if not output or (self.urgent_only and result.priority != "urgent"):
            return None
        body = self.body(config, result)
        return None if body is None else Delivery(self.name, output, body, 1)

    def body(self, config: RuntimeConfig, result: ScanResult) -> str | None:
        return cloud_json(result)

    def start(self, acknowledge: Acknowledge) -> None:
        # A token no message has only wakes the drainer: edgeHub is back, send what waits.
        self.module.add_connection_listener(lambda: acknowledge(-1))

    def ready(self) -> bool:
        return self.module.connected

    def send(self, message: OutboxMessage) -> None:
        self.module.send_output(message.topic, message.payload, message.message_id)

    def stop(self, timeout_s: float) -> None:
        """The module client is closed by the service, after every sink has stopped."""


class EdgeHubUrgentSink(EdgeHubResultsSink):
    """Urgent results again, for a worklist that moves such studies up."""

    name = "edgehub-urgent"
    label = "Azure IoT Edge urgent output"
    output_setting = "urgent_output"
    urgent_only = True


class EdgeHubFhirSink(EdgeHubResultsSink):
    """Each result's FHIR Bundle (the same document as on the MQTT FHIR topic)."""

    name = "edgehub-fhir"
    label = "Azure IoT Edge FHIR output"
    output_setting = "fhir_output"

    def __init__(self, module: EdgeHubModule) -> None:
        # Never the results channel: its backlog is capped like any other sink's.
        super().__init__(module, primary=False)

    def body(self, config: RuntimeConfig, result: ScanResult) -> str | None:
        return fhir_document(config, result)


def from_config(
    config: RuntimeConfig, host: object = None, state: BoxState | None = None
) -> list[EdgeHubResultsSink]:
    """The three outputs, when Azure IoT Edge started us; with MQTT off the results channel."""
    if not isinstance(host, EdgeHubModule):
        return []
    primary = not config.mqtt.enabled
    return [
        EdgeHubResultsSink(host, primary=primary),
        EdgeHubUrgentSink(host, primary=primary),
        EdgeHubFhirSink(host),
    ]
