"""Sinks: where committed results go, each drained from the outbox by one drainer.

A sink is one module with a factory ``(config, host, state) -> Sink | None`` (None:
not used in this configuration; a list when one connection serves several
outbox sinks, like the MQTT topics) and one line in :data:`SINKS`. ``host`` is what
started the service (:mod:`..hosts`: the Greengrass nucleus, Azure IoT Edge) or
None; a host's own sinks check that it is theirs. The outbox
row for every sink is written in the result's own transaction, so a sink
that is down (broker outage, nucleus restart) only delays its results.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import RuntimeConfig
from ..plugins import load_plugin
from .backlog import SinkBacklogs
from .base import Acknowledge, BoxState, Sink
from .drainer import OutboxDrainer

if TYPE_CHECKING:
    from ..hosts import Host

__all__ = ["SINKS", "Acknowledge", "BoxState", "OutboxDrainer", "Sink", "SinkBacklogs", "create_sinks"]

#: name -> "module:factory"; each sink's ``name`` is its outbox column (mqtt: also mqtt-urgent, mqtt-fhir;
#: ipc-local: also ipc-local-urgent, ipc-local-fhir; ipc-iotcore: also ipc-iotcore-urgent;
#: edgehub: also edgehub-urgent, edgehub-fhir).
SINKS: dict[str, str] = {
    "mqtt": "edge_runtime.sinks.mqtt:from_config",
    "ipc-local": "edge_runtime.sinks.greengrass:local_from_config",
    "ipc-iotcore": "edge_runtime.sinks.greengrass:iot_core_from_config",
    "edgehub": "edge_runtime.sinks.edgehub:from_config",
    "dicom-store": "edge_runtime.sinks.dicom_store:from_config",
    "fhir-http": "edge_runtime.sinks.fhir_http:from_config",
}


def create_sinks(config: RuntimeConfig, host: Host | None, state: BoxState | None = None) -> list[Sink]:
    """The sinks this configuration uses, in registry order, each complete when built."""
    sinks: list[Sink] = []
    for target in SINKS.values():
        made = load_plugin(target)(config, host, state or BoxState())
        if isinstance(made, list):
            sinks.extend(made)
        elif made is not None:
            sinks.append(made)
    return sinks
