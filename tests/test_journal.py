"""The SQLite journal (a real file, WAL mode) decides what happens to each inbox file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from edge_runtime.journal import Delivery, Journal


def _result(message_id: str) -> dict:
    return {"message_id": message_id, "payload": "x"}


def _to(*sinks: str) -> list[Delivery]:
    return [Delivery(sink, f"t/{sink}", "{}", 1) for sink in sinks]


def test_lifecycle_and_outbox(tmp_path: Path):
    journal = Journal(tmp_path / "j.sqlite3")
    mode = sqlite3.connect(tmp_path / "j.sqlite3").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    a = journal.admit("a" * 64, tmp_path / "a.dcm", 10)
    assert a.action == "process" and not a.duplicate
    assert a.record.state == "processing" and a.record.attempts == 1
    created = journal.record_result(a.record.id, _result("m1"), _to("mqtt", "ipc-local"))
    assert [(m.seq, m.sink) for m in created] == [(1, "mqtt"), (2, "ipc-local")]
    message = created[0]
    assert journal.counts()["done"] == 1 and journal.counts()["outbox_pending"] == 2
    # The same content again, under another name: nothing to process.
    again = journal.admit("a" * 64, tmp_path / "copy.dcm", 10)
    assert again.action == "finish_done" and again.duplicate
    # A different file whose result has the same message id (same SOP Instance UID).
    b = journal.admit("b" * 64, tmp_path / "b.dcm", 10)
    assert journal.record_result(b.record.id, _result("m1"), _to("mqtt", "ipc-local")) == []
    assert [m.message_id for m in journal.pending_messages("mqtt")] == ["m1"]
    journal.mark_delivered(message.seq)
    assert journal.pending_messages("mqtt") == []
    assert [m.sink for m in journal.pending_messages("ipc-local")] == ["ipc-local"]
    assert journal.counts()["outbox_pending"] == 1
    journal.close()


def test_restart_requeues_interrupted_work(tmp_path: Path):
    journal = Journal(tmp_path / "j.sqlite3")
    journal.admit("c" * 64, tmp_path / "c.png", 5)  # now processing
    journal.close()  # "crash" while processing
    journal = Journal(tmp_path / "j.sqlite3")
    assert journal.requeue_unfinished() == 1
    admission = journal.admit("c" * 64, tmp_path / "c.png", 5)
    assert admission.action == "process"
    assert admission.record.attempts == 2
    journal.record_quarantine(admission.record.id, {"code": "corrupt_image"})
    later = journal.admit("c" * 64, tmp_path / "c.png", 5)
    assert later.action == "finish_quarantine" and later.record.error == {"code": "corrupt_image"}
    journal.close()
