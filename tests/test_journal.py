"""The SQLite journal (a real file, WAL mode) decides what happens to each inbox file."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import uuid
from pathlib import Path

import pytest

from edge_runtime.errors import JournalError, JournalIntegrityError
from edge_runtime.journal import Delivery, Journal, backup_journal, check_journal, id_path_for


def _result(message_id: str) -> tuple[str, str]:
    """(message_id, the stored result text) as Journal.record_result takes them."""
    return message_id, json.dumps({"message_id": message_id, "payload": "x"})


def _to(*sinks: str) -> list[Delivery]:
    return [Delivery(sink, f"t/{sink}", "{}", 1) for sink in sinks]


def test_lifecycle_and_outbox(tmp_path: Path):
    journal = Journal(tmp_path / "j.sqlite3")
    mode = sqlite3.connect(tmp_path / "j.sqlite3").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    a = journal.admit("a" * 64, tmp_path / "a.dcm", 10)
    assert a.action == "process" and not a.duplicate
    assert a.record.state == "processing" and a.record.attempts == 1
    created = journal.record_result(a.record.id, *_result("m1"), _to("mqtt", "ipc-local"))
    assert [(m.seq, m.sink) for m in created] == [(1, "mqtt"), (2, "ipc-local")]
    message = created[0]
    assert journal.counts()["done"] == 1 and journal.counts()["outbox_pending"] == 2
    # The same content again, under another name: nothing to process.
    again = journal.admit("a" * 64, tmp_path / "copy.dcm", 10)
    assert again.action == "finish_done" and again.duplicate
    # A different file whose result has the same message id (same SOP Instance UID).
    b = journal.admit("b" * 64, tmp_path / "b.dcm", 10)
    assert journal.record_result(b.record.id, *_result("m1"), _to("mqtt", "ipc-local")) == []
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


# -- identity and integrity (issue 14, item 3) -------------------------------------------
# A journal with undelivered results that is emptied, deleted, swapped or damaged must stop
# the start with a message that names the file, says what was found and what to do: never
# a silent fresh journal with "0 results awaiting delivery".


def _with_pending(path: Path, n: int = 5) -> str:
    """A closed journal holding ``n`` results the broker never acknowledged; returns its id."""
    journal = Journal(path, durable=n <= 5)  # no fsync per row for the bigger ones: faster
    for i in range(n):
        record = journal.admit(f"{i:064x}", path.parent / f"scan{i}.dcm", 10).record
        journal.record_result(record.id, *_result(f"m{i}"), _to("mqtt"))
    assert journal.counts()["outbox_pending"] == n
    journal.close()
    return journal.journal_id


def _meta_id(path: Path) -> str | None:
    db = sqlite3.connect(path)
    row = db.execute("SELECT value FROM meta WHERE key='journal_id'").fetchone()
    db.close()
    return row[0] if row else None


def _assert_restore_advice(exc: JournalError, path: Path) -> None:
    """The advice is the true one for a lost journal: restore or start over, not disk space."""
    assert isinstance(exc, JournalIntegrityError) and exc.code == "journal_integrity"
    assert str(path) in exc.message
    assert "journal backup" in exc.action and "--new-journal" in exc.action
    assert "NOT sent" in exc.action
    assert "disk space" not in exc.action.lower() and "is full" not in exc.action


def test_first_start_writes_the_id_beside_and_inside_and_logs_it(tmp_path: Path, caplog):
    path = tmp_path / "state" / "journal.sqlite3"
    with caplog.at_level(logging.INFO, logger="edge_runtime.journal"):
        journal = Journal(path)
    journal.close()
    assert id_path_for(path) == tmp_path / "state" / "journal.id"
    assert uuid.UUID((tmp_path / "state" / "journal.id").read_text().strip())
    assert _meta_id(path) == journal.journal_id == (tmp_path / "state" / "journal.id").read_text().strip()
    assert f"new journal {path} created (id {journal.journal_id}" in caplog.text
    # Reopened: the same journal, nothing new logged as created.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edge_runtime.journal"):
        again = Journal(path)
    assert again.journal_id == journal.journal_id and "created" not in caplog.text
    again.close()


def test_truncated_to_zero_bytes_is_refused_and_left_as_found(tmp_path: Path):
    path = tmp_path / "journal.sqlite3"
    journal_id = _with_pending(path)
    path.write_bytes(b"")  # the probe: `truncate -s 0 state/journal.sqlite3`
    with pytest.raises(JournalIntegrityError) as caught:
        Journal(path)
    _assert_restore_advice(caught.value, path)
    assert "is empty (0 bytes)" in caught.value.message
    assert "silently drop the results" in caught.value.message
    # Nothing was recreated: the next start is refused just the same.
    assert path.stat().st_size == 0 and id_path_for(path).read_text().strip() == journal_id
    with pytest.raises(JournalIntegrityError):
        Journal(path)


def test_deleted_journal_is_refused_and_not_recreated(tmp_path: Path):
    path = tmp_path / "journal.sqlite3"
    journal_id = _with_pending(path)
    path.unlink()
    with pytest.raises(JournalIntegrityError) as caught:
        Journal(path)
    _assert_restore_advice(caught.value, path)
    assert "is missing" in caught.value.message and journal_id in caught.value.message
    assert not path.exists()


@pytest.mark.parametrize("other", ["another box's", "from before ids"])
def test_replaced_journal_is_refused_naming_both_ids(tmp_path: Path, other: str):
    path = tmp_path / "journal.sqlite3"
    journal_id = _with_pending(path)
    elsewhere = tmp_path / "elsewhere" / "journal.sqlite3"
    other_id = _with_pending(elsewhere, 1)
    if other == "from before ids":
        db = sqlite3.connect(elsewhere)
        db.execute("DELETE FROM meta WHERE key='journal_id'")
        db.commit()
        db.close()
    shutil.copy(elsewhere, path)
    with pytest.raises(JournalIntegrityError) as caught:
        Journal(path)
    _assert_restore_advice(caught.value, path)
    message = caught.value.message
    assert journal_id in message and "replaced" in message
    assert (other_id in message) if other == "another box's" else ("without an id" in message)
    # Restoring an older copy on purpose is possible: the advice says how.
    assert "delete journal.id" in caught.value.action


def _garbage(good: bytes) -> dict[str, bytes]:
    return {
        "random bytes": os.urandom(16384),
        "SQLite header, then garbage": b"SQLite format 3\x00" + os.urandom(16384),
        "cut in half": good[: len(good) // 2],
    }


@pytest.mark.parametrize("kind", ["random bytes", "SQLite header, then garbage", "cut in half"])
def test_damaged_journal_is_refused_with_true_advice(tmp_path: Path, kind: str):
    path = tmp_path / "journal.sqlite3"
    _with_pending(path, 200)
    damaged = _garbage(path.read_bytes())[kind]
    path.write_bytes(damaged)
    with pytest.raises(JournalIntegrityError) as caught:
        Journal(path)
    _assert_restore_advice(caught.value, path)
    assert "not a SQLite database" in caught.value.message or "damaged" in caught.value.message
    assert path.read_bytes() == damaged  # looked at, never "repaired" or replaced
    with pytest.raises(JournalIntegrityError):
        check_journal(path)


def test_damaged_id_file_is_refused(tmp_path: Path):
    path = tmp_path / "journal.sqlite3"
    _with_pending(path)
    id_path_for(path).write_text("not an id\n")
    with pytest.raises(JournalIntegrityError) as caught:
        Journal(path)
    assert "journal.id" in caught.value.message and "damaged" in caught.value.message
    assert "disk space" not in caught.value.action


def test_disk_full_is_the_only_error_that_advises_free_space(tmp_path: Path):
    journal = Journal(tmp_path / "journal.sqlite3")
    journal._db.execute("PRAGMA max_page_count=12")  # SQLite's own SQLITE_FULL, not a mock
    with pytest.raises(JournalError) as caught:
        for i in range(1000):
            record = journal.admit(f"{i:064x}", tmp_path / f"{i}.dcm", 10).record
            journal.record_result(record.id, *_result(f"m{i}" + "x" * 500), _to("mqtt"))
    assert not isinstance(caught.value, JournalIntegrityError)
    assert "full" in caught.value.message and "is full. Free space" in caught.value.action
    journal.close()


def test_new_journal_moves_the_refused_one_aside_and_warns(tmp_path: Path, caplog):
    path = tmp_path / "journal.sqlite3"
    old_id = _with_pending(path)
    old_bytes = path.read_bytes()
    path.write_bytes(old_bytes[:4096] + os.urandom(4096) + old_bytes[8192:])  # damaged
    damaged = path.read_bytes()
    with caplog.at_level(logging.INFO, logger="edge_runtime.journal"):
        journal = Journal(path, start_new=True)
    assert journal.journal_id != old_id and journal.counts()["outbox_pending"] == 0
    journal.close()
    aside = sorted(tmp_path.glob("journal.old-*"))
    names = [p.name for p in aside]
    assert any(n.endswith(".sqlite3") for n in names) and any(n.endswith(".id") for n in names)
    moved = next(p for p in aside if p.name.endswith(".sqlite3"))
    assert moved.read_bytes() == damaged  # moved, not deleted or rewritten
    assert id_path_for(moved).read_text().strip() == old_id
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    text = warning.getMessage()
    assert "--new-journal" in text and moved.name in text and "are NOT sent" in text
    assert id_path_for(path).read_text().strip() == journal.journal_id


def test_new_journal_counts_what_the_old_one_still_had_to_deliver(tmp_path: Path, caplog):
    path = tmp_path / "journal.sqlite3"
    journal_id = _with_pending(path, 5)
    id_path_for(path).write_text(str(uuid.uuid4()))  # the journal no longer matches: refused
    with caplog.at_level(logging.WARNING, logger="edge_runtime.journal"):
        Journal(path, start_new=True).close()
    assert "Results not yet delivered in the old journal (5) are NOT sent" in caplog.text
    moved = next(tmp_path.glob("journal.old-*.sqlite3"))
    assert _meta_id(moved) == journal_id


def test_new_journal_keeps_a_healthy_journal(tmp_path: Path, caplog):
    """A flag left in a unit file must not throw results away at every restart."""
    path = tmp_path / "journal.sqlite3"
    journal_id = _with_pending(path)
    with caplog.at_level(logging.WARNING, logger="edge_runtime.journal"):
        journal = Journal(path, start_new=True)
    assert journal.journal_id == journal_id and journal.counts()["outbox_pending"] == 5
    journal.close()
    assert "--new-journal ignored" in caplog.text
    assert not list(tmp_path.glob("journal.old-*"))


def test_upgrade_adopts_a_journal_without_id(tmp_path: Path, caplog):
    """A journal written by the previous version (no id anywhere) is adopted, not refused."""
    path = tmp_path / "journal.sqlite3"
    _with_pending(path)
    db = sqlite3.connect(path)
    db.execute("DELETE FROM meta WHERE key IN ('journal_id', 'created_utc')")
    db.commit()
    db.close()
    id_path_for(path).unlink()
    with caplog.at_level(logging.INFO, logger="edge_runtime.journal"):
        journal = Journal(path)
    assert journal.counts()["outbox_pending"] == 5  # the undelivered results are still there
    journal.close()
    written = id_path_for(path).read_text().strip()
    assert written == journal.journal_id == _meta_id(path)
    assert "adopted it as this box's journal" in caplog.text
    # Adopted once: from now on a swap is caught.
    Journal(path).close()
    assert id_path_for(path).read_text().strip() == written


def test_check_reports_counts_and_changes_nothing(tmp_path: Path):
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    for i, sinks in enumerate([("mqtt", "ipc-local"), ("mqtt",)]):
        record = journal.admit(f"{i:064x}", tmp_path / f"{i}.dcm", 10).record
        journal.record_result(record.id, *_result(f"m{i}"), _to(*sinks))
    bad = journal.admit("f" * 64, tmp_path / "bad.dcm", 10).record
    journal.record_quarantine(bad.id, {"code": "corrupt_image"})
    report = check_journal(path)  # while the journal is open, as with a running service
    journal.close()
    assert report.journal_id == journal.journal_id and report.id_file
    assert report.counts["done"] == 2 and report.counts["quarantined"] == 1
    assert report.counts["outbox_pending"] == 3
    assert report.pending_by_sink == {"ipc-local": 1, "mqtt": 2}
    # No journal at all: an error, and check does not create one.
    missing = tmp_path / "none" / "journal.sqlite3"
    with pytest.raises(JournalError, match="There is no journal"):
        check_journal(missing)
    assert not missing.exists() and not id_path_for(missing).exists()


def test_backup_while_a_writer_runs_is_consistent_and_restores_in_place(tmp_path: Path):
    path = tmp_path / "state" / "journal.sqlite3"
    writer = Journal(path)
    journal_id = writer.journal_id
    stop = threading.Event()
    written = []

    def write() -> None:
        i = 0
        while not stop.is_set():
            record = writer.admit(f"{i:064x}", tmp_path / f"{i}.dcm", 10).record
            writer.record_result(record.id, *_result(f"m{i}"), _to("mqtt"))
            written.append(i)
            i += 1

    thread = threading.Thread(target=write)
    thread.start()
    try:
        while len(written) < 20:
            threading.Event().wait(0.01)
        (tmp_path / "backups").mkdir()
        report = backup_journal(path, tmp_path / "backups")  # a folder: named after the time
        at_backup = len(written)
        while len(written) < at_backup + 20:  # the writer was never blocked
            threading.Event().wait(0.01)
    finally:
        stop.set()
        thread.join()
    dest = report.path
    assert dest.parent == tmp_path / "backups" and dest.suffix == ".sqlite3"
    assert not list((tmp_path / "backups").glob("*.part"))
    assert report.journal_id == journal_id and _meta_id(dest) == journal_id
    # One consistent snapshot: every result in it has its outbox row, and its rows are
    # exactly the source's first rows.
    copy = sqlite3.connect(dest)
    done = copy.execute("SELECT COUNT(*) FROM inputs WHERE state='done'").fetchone()[0]
    backed_up = copy.execute("SELECT seq, message_id, payload FROM outbox ORDER BY seq").fetchall()
    copy.close()
    assert 20 <= done == len(backed_up) == report.counts["outbox_pending"] < len(written)
    source = writer.pending_messages("mqtt", limit=len(backed_up))
    assert backed_up == [(m.seq, m.message_id, m.payload) for m in source]
    writer.close()

    # The journal is lost; the backup is copied over it and the service starts with it.
    path.write_bytes(b"")
    with pytest.raises(JournalIntegrityError):
        Journal(path)
    shutil.copy(dest, path)
    restored = Journal(path)
    assert restored.journal_id == journal_id
    pending = restored.pending_messages("mqtt", limit=10**6)
    assert [(m.seq, m.message_id, m.payload) for m in pending] == backed_up
    restored.close()
    # A backup never overwrites an existing file.
    with pytest.raises(JournalError, match="already exists"):
        backup_journal(path, dest)


def test_group_sync_fsyncs_the_wal_before_a_result_returns(tmp_path: Path, monkeypatch):
    """A result (and a quarantine) is on disk when record_* returns: the WAL was fsynced after its
    commit. admit and mark_delivered do not wait; the next durable commit's fsync covers them."""
    import edge_runtime.journal as journal_module

    journal = Journal(tmp_path / "j.sqlite3")
    wal = os.path.realpath(tmp_path / "j.sqlite3-wal")
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(journal_module.os, "fsync", fsync)
    admission = journal.admit("a" * 64, tmp_path / "in" / "a.jpeg", 1)
    assert synced == []  # not waited for
    created = journal.record_result(admission.record.id, *_result("m1"), _to("mqtt"))
    assert synced == [wal]
    journal.mark_delivered(*(m.seq for m in created))
    assert synced == [wal]
    other = journal.admit("b" * 64, tmp_path / "in" / "b.jpeg", 1)
    journal.record_quarantine(other.record.id, {"code": "x"})
    assert synced == [wal, wal]
    # Concurrent durable commits share fsyncs: never more fsyncs than commits, every one covered.
    synced.clear()
    ids = [journal.admit(f"{i:064x}", tmp_path / "in" / f"{i}.jpeg", 1).record.id for i in range(40)]
    threads = [
        threading.Thread(target=journal.record_result, args=(ids[i], *_result(f"c{i}"), _to("mqtt")))
        for i in range(40)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 <= len(synced) <= 40 and set(synced) == {wal}
    assert journal._synced == journal._commits
    journal.close()
    reopened = Journal(tmp_path / "j.sqlite3")
    assert reopened.counts()["done"] == 41 and reopened.outbox_pending() == 40
    reopened.close()
