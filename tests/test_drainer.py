"""The outbox drainer on its own: a real journal's outbox, a small sink that confirms when told.

A row is marked delivered only once the sink confirms it (at once, or later as MQTT's PUBACK);
a row handed over but never confirmed goes out again after a restart; a sink that refuses
messages loses none of them (they wait, in order, and go out once it takes them again); at most
``max_in_flight`` unconfirmed rows are out at a time; other sinks' rows are never touched.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_runtime.errors import PublishError
from edge_runtime.journal import Delivery, Journal, OutboxMessage
from edge_runtime.sinks.base import Acknowledge
from edge_runtime.sinks.drainer import OutboxDrainer


def commit(journal: Journal, n: int, sinks: tuple[str, ...] = ("fake",), start: int = 0) -> list[str]:
    """``n`` committed results, each with an outbox row for every sink in ``sinks``; their message ids."""
    ids = []
    for i in range(start, start + n):
        record = journal.admit(f"{i:064x}", Path(f"/inbox/scan{i}.dcm"), 10).record
        message_id = f"m{i:02d}"
        journal.record_result(
            record.id,
            message_id,
            json.dumps({"message_id": message_id}),
            [Delivery(sink, f"t/{sink}", f'{{"n": {i}}}', 1) for sink in sinks],
        )
        ids.append(message_id)
    return ids


class FakeSink:
    """A sink (edge_runtime.sinks.base.Sink) whose far end confirms when the test says so.

    ``at_once``: ``send`` returns None (confirmed, as a request/response protocol); else a
    token that :meth:`confirm` passes to ``acknowledge`` later (as MQTT's PUBACK). While ``down``,
    ``send`` raises PublishError. Not ``ready`` until started (and while ``is_ready`` is off).
    """

    name = "fake"
    label = "Fake far end"

    def __init__(self, *, at_once: bool = False) -> None:
        self.at_once = at_once
        self.down = False
        self.is_ready = True
        self.sent: list[OutboxMessage] = []
        self.refused = 0
        self.stopped = False
        self._acknowledge: Acknowledge | None = None
        self._lock = threading.Lock()

    def start(self, acknowledge: Acknowledge) -> None:
        self._acknowledge = acknowledge

    def ready(self) -> bool:
        return self._acknowledge is not None and self.is_ready and not self.stopped

    def send(self, message: OutboxMessage) -> int | None:
        with self._lock:
            if self.down:
                self.refused += 1
                raise PublishError("the far end refused the message", action="Bring the far end back.")
            self.sent.append(message)
        return None if self.at_once else 1000 + message.seq

    def confirm(self, message_id: str) -> None:
        """The far end confirms the (last) hand-over of ``message_id``."""
        message = next(m for m in reversed(self.sent) if m.message_id == message_id)
        assert self._acknowledge is not None
        self._acknowledge(1000 + message.seq)

    def sent_ids(self) -> list[str]:
        with self._lock:
            return [m.message_id for m in self.sent]

    def stop(self, timeout_s: float) -> None:
        self.stopped = True


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def pending(journal: Journal, sink: str = "fake") -> list[str]:
    return [m.message_id for m in journal.pending_messages(sink)]


@pytest.fixture()
def journal(tmp_path: Path) -> Iterator[Journal]:
    opened = Journal(tmp_path / "state" / "journal.sqlite3")
    yield opened
    opened.close()


@pytest.fixture()
def drainers() -> Iterator[list[OutboxDrainer]]:
    """Drainers a test starts; each stopped at teardown (a stopped one again is a no-op)."""
    started: list[OutboxDrainer] = []
    yield started
    for drainer in started:
        drainer.stop(timeout_s=0.5)


def start(drainers: list[OutboxDrainer], journal: Journal, sink: FakeSink, **options) -> OutboxDrainer:
    drainer = OutboxDrainer(journal, sink, **options)
    drainer.start()
    drainer.notify()  # rows are waiting (else the first look is after the drainer's 1 s idle wait)
    drainers.append(drainer)
    return drainer


def test_a_row_leaves_the_outbox_only_once_the_sink_confirms_it(journal: Journal, drainers) -> None:
    ids = commit(journal, 3)
    sink = FakeSink()
    delivered: list[tuple[str, float]] = []
    drainer = start(drainers, journal, sink, on_delivered=lambda m, s: delivered.append((m.message_id, s)))

    wait_until(lambda: sink.sent_ids() == ids, what="all three handed over")
    time.sleep(0.2)
    assert pending(journal) == ids  # handed over, not confirmed: still in the outbox
    assert drainer.delivered_count == 0 and delivered == []

    sink.confirm(ids[1])
    wait_until(lambda: pending(journal) == [ids[0], ids[2]], what="the confirmed row marked delivered")
    sink.confirm(ids[0])
    sink.confirm(ids[2])
    wait_until(lambda: pending(journal) == [], what="every row confirmed")

    assert drainer.delivered_count == 3
    assert [m for m, _ in delivered] == [ids[1], ids[0], ids[2]]
    assert all(seconds >= 0 for _, seconds in delivered)
    assert journal.outbox_pending() == 0 and journal.undelivered_message_ids() == set()
    assert sink.sent_ids() == ids  # each handed over once


def test_a_sink_that_confirms_on_send_has_its_rows_delivered_at_once(journal: Journal, drainers) -> None:
    ids = commit(journal, 2)
    sink = FakeSink(at_once=True)
    drainer = start(drainers, journal, sink)

    wait_until(lambda: pending(journal) == [], what="rows delivered")
    assert sink.sent_ids() == ids and drainer.delivered_count == 2

    more = commit(journal, 1, start=2)
    drainer.notify()  # a worker committed a new result for this sink
    wait_until(lambda: sink.sent_ids() == [*ids, *more], timeout_s=2, what="the new row handed over")
    wait_until(lambda: pending(journal) == [], what="the new row delivered")


def test_rows_handed_over_but_never_confirmed_are_sent_again_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "journal.sqlite3"
    journal = Journal(path)
    ids = commit(journal, 3)
    sink = FakeSink()
    drainer = OutboxDrainer(journal, sink)
    drainer.start()
    drainer.notify()
    wait_until(lambda: sink.sent_ids() == ids, what="all handed over")
    sink.confirm(ids[0])
    wait_until(lambda: pending(journal) == ids[1:], what="the first confirmed")
    drainer.stop(timeout_s=0.3)  # the far end never confirms the other two
    assert sink.stopped
    journal.close()

    journal = Journal(path)  # the next start
    try:
        assert pending(journal) == ids[1:]
        again = FakeSink(at_once=True)
        restarted = OutboxDrainer(journal, again)
        restarted.start()
        restarted.notify()
        try:
            wait_until(lambda: pending(journal) == [], what="the unconfirmed rows delivered after restart")
        finally:
            restarted.stop(timeout_s=0.5)
        assert again.sent_ids() == ids[1:]  # the confirmed one is not sent again
        assert [m.payload for m in again.sent] == [m.payload for m in sink.sent[1:]]
    finally:
        journal.close()


def test_a_failing_sink_loses_no_rows_and_sends_them_in_order_once_it_takes_them(
    journal: Journal, drainers
) -> None:
    ids = commit(journal, 3)
    sink = FakeSink(at_once=True)
    sink.down = True
    errors: list[str] = []
    drainer = start(drainers, journal, sink, on_error=errors.append)

    wait_until(lambda: sink.refused >= 2, what="a retry after the first refusal")
    assert pending(journal) == ids and sink.sent == []
    assert drainer.failing is not None and "publish_failed" in drainer.failing
    assert "Fake far end: fake delivery failing" in drainer.failing and "results kept" in drainer.failing
    assert "the far end refused" not in drainer.failing  # the code's fixed text, never the far end's
    assert errors == [drainer.failing]  # told once per run of failures

    sink.down = False  # the far end is back; the next retry gets through
    wait_until(lambda: pending(journal) == [], timeout_s=5, what="every row delivered after the outage")
    assert sink.sent_ids() == ids
    assert drainer.failing is None and drainer.delivered_count == 3


def test_a_refusal_in_the_middle_of_a_batch_keeps_the_refused_row_and_those_after_it(
    journal: Journal, drainers
) -> None:
    ids = commit(journal, 4)
    sink = FakeSink(at_once=True)
    original_send = sink.send

    def refuse_the_third(message: OutboxMessage) -> int | None:
        sink.down = message.message_id == ids[2] and sink.refused == 0
        return original_send(message)

    sink.send = refuse_the_third  # type: ignore[method-assign]
    drainer = start(drainers, journal, sink)

    wait_until(lambda: pending(journal) == [], timeout_s=5, what="every row delivered")
    assert sink.refused == 1
    assert sink.sent_ids() == ids  # the two before the refusal once, then the rest in order
    assert drainer.delivered_count == 4


def test_at_most_max_in_flight_rows_wait_for_confirmation(journal: Journal, drainers) -> None:
    ids = commit(journal, 5)
    sink = FakeSink()
    start(drainers, journal, sink, max_in_flight=2)

    wait_until(lambda: len(sink.sent) == 2, what="two handed over")
    time.sleep(0.3)
    assert sink.sent_ids() == ids[:2]  # no room for a third until one is confirmed

    sink.confirm(ids[0])
    wait_until(lambda: len(sink.sent) == 3, what="a third once one was confirmed")
    assert sink.sent_ids() == ids[:3]
    assert pending(journal) == ids[1:]


def test_nothing_is_handed_to_a_sink_that_is_not_ready_nor_another_sinks_rows(
    journal: Journal, drainers
) -> None:
    ids = commit(journal, 2, sinks=("fake", "mqtt"))
    sink = FakeSink(at_once=True)
    sink.is_ready = False  # not connected yet
    drainer = start(drainers, journal, sink)
    time.sleep(0.3)
    assert sink.sent == [] and pending(journal) == ids

    sink.is_ready = True
    drainer.notify()  # the far end is back (a sink acknowledges -1 for that)
    wait_until(lambda: pending(journal) == [], what="delivered once ready")
    assert [m.topic for m in sink.sent] == ["t/fake", "t/fake"]
    assert pending(journal, "mqtt") == ids  # the other sink's rows wait for their own drainer
