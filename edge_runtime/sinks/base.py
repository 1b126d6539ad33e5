"""What a sink is: where committed results go, drained from the journal's outbox."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import RuntimeConfig
from ..journal import Delivery, OutboxMessage
from ..results import ScanResult

__all__ = ["Acknowledge", "BoxState", "Sink"]

#: Called by a sink (from any thread) with the token ``send`` returned, once the far end
#: confirmed it. A token no message has (-1) only wakes the drainer: the far end is back.
Acknowledge = Callable[[int], None]


def _nothing_pending(names: Collection[str]) -> int:
    return 0


@dataclass(frozen=True)
class BoxState:
    """What a sink may read about the box it runs on; every sink factory is given one.

    Readings, not values: the model can be switched while the service runs, and the
    outbox changes with every result. A sink gets them when it is built, so nothing is
    set on it afterwards.
    """

    #: The running model as status messages name it (name, version, backend, conformance).
    model: Callable[[], dict[str, Any]] = field(default=dict)
    #: How many outbox rows wait for the named sinks.
    pending: Callable[[Collection[str]], int] = field(default=_nothing_pending)


class Sink(Protocol):
    """One destination for results (an MQTT broker, the Greengrass nucleus, ...).

    The outbox row is written in the same transaction as the result, so a
    sink never loses one: :class:`~edge_runtime.sinks.drainer.OutboxDrainer`
    hands rows to :meth:`send` while :meth:`ready`, and marks a row delivered
    only once the sink says the far end has it.
    """

    #: The outbox's sink column: stable, because undelivered rows outlive a restart.
    name: str

    # Two optional class attributes (read with getattr, so a plugin without them still loads):
    #
    # ``label``: what an admin calls the far end ("PACS"), for the status ("PACS (dicom-store)
    # behind: ..."); default: ``name``.
    # ``primary``: True for the results channel (MQTT results and urgent topics; Greengrass local
    # pub/sub when MQTT is off). Only a primary sink's backlog holds new scans
    # (Journal.MaxOutboxMessages); any other sink stands alone: its backlog beyond
    # Journal.MaxOutboxMessagesPerSink or Reports.RetainMbPerSink is dropped oldest first
    # (:mod:`edge_runtime.sinks.backlog`). Default: False.

    def delivery(self, config: RuntimeConfig, result: ScanResult) -> Delivery | None:
        """The outbox row for one result (topic, payload, QoS); None: not for this sink.

        ``config`` is the running configuration (topics may change live);
        ``result.payload`` is the result as compact JSON, which most sinks send as is.
        """

    def start(self, acknowledge: Acknowledge) -> None:
        """Connect (in the background: results wait in the outbox while the far end is down)."""

    def ready(self) -> bool:
        """Whether :meth:`send` may be called now (connected)."""

    def send(self, message: OutboxMessage) -> int | None:
        """Hand one message over.

        Returns None when the far end has confirmed it already (a request/response
        protocol), or a token that the sink passes to ``acknowledge`` once it
        confirms (MQTT's PUBACK). Raises :class:`~edge_runtime.errors.PublishError`
        when the message was not taken; it is offered again after a back-off.
        """

    def stop(self, timeout_s: float) -> None:
        """Say goodbye (e.g. an offline status) and disconnect."""
