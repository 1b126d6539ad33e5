"""The one outbox drainer: journal outbox -> a sink, with one retry and one stop logic.

Each sink gets its own drainer thread, so a broker outage does not hold up
the Greengrass nucleus and the other way round. A message is marked
delivered only when its sink confirms it (PUBACK, or the nucleus' reply);
after a crash, unconfirmed rows are sent again, so subscribers see every
result at least once and drop repeats by ``message_id``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from ..errors import EdgeRuntimeError, PublishError, public_text
from ..journal import Journal, OutboxMessage
from .base import Sink

__all__ = ["OutboxDrainer"]

log = logging.getLogger(__name__)

#: Back-off after a failed hand-over: first and longest wait.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 30.0


class OutboxDrainer:
    """Hands one sink's outbox rows over, up to ``max_in_flight`` unconfirmed at a time."""

    def __init__(
        self,
        journal: Journal,
        sink: Sink,
        *,
        max_in_flight: int = 100,
        on_delivered: Callable[[OutboxMessage, float], None] | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.journal = journal
        self.sink = sink
        self.max_in_flight = max_in_flight
        #: Optional callback(message, seconds from hand-over to confirmation), e.g. for benchmarks.
        self.on_delivered = on_delivered
        #: Told (once per run of failures) what keeps this sink from delivering, for the status.
        self.on_error = on_error
        self.delivered_count = 0
        #: What keeps this sink from delivering (the status text), None since its last success.
        self.failing: str | None = None
        self._acks: queue.SimpleQueue[int] = queue.SimpleQueue()
        # Only the drain thread touches these:
        self._in_flight: dict[int, tuple[OutboxMessage, float]] = {}  # token -> (message, handed at)
        self._handed_seq = 0  # highest outbox seq handed over (and kept by the sink) in this process
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.sink.name

    @property
    def label(self) -> str:
        """The sink as an admin knows it and its outbox name: ``PACS (dicom-store)``."""
        label = str(getattr(self.sink, "label", "") or "")
        return f"{label} ({self.sink.name})" if label and label != self.sink.name else self.sink.name

    def start(self) -> None:
        self.sink.start(self._acknowledge)
        self._thread = threading.Thread(target=self._loop, name=f"outbox-{self.sink.name}", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """The outbox has something new for this sink."""
        self._wake.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Deliver what can be delivered within ``timeout_s``, then stop the sink.

        What is left stays in the outbox and goes out after the next start.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.sink.ready():
            pending = self.journal.pending_messages(self.sink.name, self._handed_seq, limit=1)
            if not self._in_flight and not pending:
                break
            self._wake.set()
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.sink.stop(max(0.5, deadline - time.monotonic()))

    # -- drain thread ------------------------------------------------------------------
    def _acknowledge(self, token: int) -> None:
        # Called on the sink's thread (paho's, inside its locks): only queue it.
        self._acks.put(token)
        self._wake.set()

    def _loop(self) -> None:
        backoff = RETRY_FIRST_S
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            try:
                self._process_acks()
                if self.sink.ready():
                    self._hand_over()
                backoff = RETRY_FIRST_S
                self.failing = None
            except Exception as exc:
                reason = exc.message if isinstance(exc, PublishError) else f"{type(exc).__name__}: {exc}"
                action = exc.action if isinstance(exc, PublishError) else PublishError.action
                log.warning(
                    "%s delivery failed (%s); retrying in %.1f s. %s", self.sink.name, reason, backoff, action
                )
                if backoff == RETRY_FIRST_S:
                    # The status gets the code, its fixed text and the class of the refusal (e.g. the
                    # nucleus' UnauthorizedError), never a text: a FHIR server's or a PACS's answer
                    # may quote what it was sent.
                    code = exc.code if isinstance(exc, EdgeRuntimeError) else PublishError.code
                    kind = type(exc.__cause__ if isinstance(exc, PublishError) and exc.__cause__ else exc)
                    label = getattr(self.sink, "label", "") or self.sink.name
                    named = f"{label}: " if label != self.sink.name else ""
                    self.failing = (
                        f"{named}{self.sink.name} delivery failing: {code} [{kind.__name__}]: "
                        f"{public_text(code)} (retrying; results kept)"
                    )
                    if self.on_error is not None:
                        self.on_error(self.failing)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, RETRY_MAX_S)
                self._wake.set()
        self._process_acks()

    def _hand_over(self) -> None:
        while not self._stop.is_set() and self.sink.ready():
            room = self.max_in_flight - len(self._in_flight)
            if room <= 0:
                return
            batch = self.journal.pending_messages(self.sink.name, self._handed_seq, limit=room)
            if not batch:
                return
            confirmed: list[tuple[OutboxMessage, float]] = []
            try:
                for message in batch:
                    started = time.perf_counter()
                    token = self.sink.send(message)  # raises: this one is offered again later
                    self._handed_seq = max(self._handed_seq, message.seq)
                    if token is None:
                        confirmed.append((message, time.perf_counter() - started))
                    else:
                        self._in_flight[token] = (message, started)
            finally:
                self._delivered(confirmed)
            self._process_acks()

    def _process_acks(self) -> None:
        confirmed: list[tuple[OutboxMessage, float]] = []
        while True:
            try:
                token = self._acks.get_nowait()
            except queue.Empty:
                break
            entry = self._in_flight.pop(token, None)
            if entry is not None:  # None: a message the sink sent for itself (a status)
                message, handed_at = entry
                confirmed.append((message, time.perf_counter() - handed_at))
        self._delivered(confirmed)

    def _delivered(self, confirmed: list[tuple[OutboxMessage, float]]) -> None:
        if not confirmed:
            return
        # One transaction (one fsync) for every confirmation that arrived meanwhile.
        self.journal.mark_delivered(*(message.seq for message, _ in confirmed))
        for message, latency in confirmed:
            self.delivered_count += 1
            log.info(
                "published %s via %s",
                message.message_id[:16],
                self.sink.name,
                extra={
                    "event": "published",
                    "fields": {
                        "message_id": message.message_id,
                        "sink": self.sink.name,
                        "seq": message.seq,
                        "ack_ms": round(latency * 1000, 2),
                    },
                },
            )
            if self.on_delivered is not None:
                self.on_delivered(message, latency)
