"""OutcomeRecorder on its own: a real journal, a real Health, real files in tmp_path.

Quarantine (journal first, then the file and its ``NAME.error.json``), files refused unread
(a FIFO, a link: recorded under their file key, exactly once), scans already done (the file is
disposed of, nothing recorded again) and quarantine name collisions. The ``result()`` ending is
covered through the service (tests/test_service_e2e.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from edge_runtime.config import RuntimeConfig
from edge_runtime.errors import CorruptImage, DecoderFault, NotARegularFile, SymlinkRefused
from edge_runtime.files import file_key
from edge_runtime.health import Health
from edge_runtime.journal import Journal
from edge_runtime.outcomes import OutcomeRecorder
from edge_runtime.privacy import load_or_create_key
from edge_runtime.sources.base import ScanItem
from edge_runtime.sources.inbox import InboxSource

#: A file name that says who the patient is: it must not reach the journal or an error file's text.
NAMED = "DOE-JOHN-19700101.dcm"


@dataclass
class Box:
    config: RuntimeConfig
    journal: Journal
    health: Health
    inbox: InboxSource
    recorder: OutcomeRecorder
    notified: list[None]

    @property
    def quarantine(self) -> Path:
        return self.config.inbox.quarantine_path

    def drop(self, name: str, data: bytes) -> tuple[ScanItem, str]:
        """A complete file in the inbox, and its content hash."""
        path = self.config.inbox.path / name
        path.write_bytes(data)
        return ScanItem(path.stat().st_mtime, path, len(data)), hashlib.sha256(data).hexdigest()

    def quarantined(self) -> list[str]:
        return sorted(p.name for p in self.quarantine.iterdir())

    def error_file(self, name: str) -> dict:
        return json.loads((self.quarantine / f"{name}.error.json").read_text(encoding="utf-8"))


@pytest.fixture()
def box(tmp_path: Path) -> Iterator[Box]:
    config = RuntimeConfig.from_mapping(
        {
            "Inbox": {
                "Path": str(tmp_path / "inbox"),
                "QuarantinePath": str(tmp_path / "quarantine"),
                "ProcessedPath": str(tmp_path / "processed"),
            },
            "Journal": {"Path": str(tmp_path / "state" / "journal.sqlite3")},
        }
    )
    for folder in (config.inbox.path, config.inbox.quarantine_path, config.inbox.processed_path):
        folder.mkdir(parents=True)
    journal = Journal(config.journal.path)
    health = Health(lambda: config, outbox_pending=journal.outbox_pending, queued=lambda: 0, model=dict)
    inbox = InboxSource(config.inbox)
    notified: list[None] = []
    recorder = OutcomeRecorder(
        journal,
        health,
        quarantine_dir=config.inbox.quarantine_path,
        dispose=inbox.dispose,
        notify_sinks=lambda: notified.append(None),
        reference_key=load_or_create_key(config.reference_key_path),
    )
    yield Box(config, journal, health, inbox, recorder, notified)
    journal.close()


def test_quarantine_records_the_verdict_then_moves_the_file_beside_one_error_file(box: Box) -> None:
    item, sha = box.drop(NAMED, b"not an image")
    record = box.journal.admit(sha, item.path, item.size_bytes).record
    error = CorruptImage(f"{NAMED} ends after 12 bytes").to_dict()

    box.recorder.quarantine(item, sha, record.id, record.attempts, error)

    assert not item.path.exists()
    assert box.quarantined() == [NAMED, f"{NAMED}.error.json"]  # no .tmp left behind
    assert (box.quarantine / NAMED).read_bytes() == b"not an image"
    ref = box.recorder.ref(sha, NAMED)
    assert ref.startswith("scan-") and ref.endswith(".dcm") and sha[:16] not in ref  # keyed
    document = box.error_file(NAMED)
    assert document["ref"] == ref and document["sha256"] == sha
    assert document["code"] == "corrupt_image" and document["action"] == CorruptImage.action
    assert document["error"] == f"{ref} ends after 12 bytes"  # the name written as the reference
    assert document["attempts"] == 1 and document["quarantined_utc"] and document["runtime_version"]
    assert "DOE" not in json.dumps(document)
    # The journal holds the same verdict (so a crash before the move is finished from it).
    stored = box.journal.get(sha)
    assert stored is not None and stored.state == "quarantined" and stored.error == document
    assert box.health.counters["quarantined"] == 1
    assert box.health.last_error is not None and box.health.last_error.startswith(f"{ref}: corrupt_image")
    assert "DOE" not in box.health.last_error


def test_a_quarantine_interrupted_before_the_move_is_finished_under_the_same_name(box: Box) -> None:
    item, sha = box.drop(NAMED, b"not an image")
    record = box.journal.admit(sha, item.path, item.size_bytes).record
    box.recorder.quarantine(item, sha, record.id, 1, CorruptImage("truncated").to_dict())
    first = box.error_file(NAMED)
    # As after a crash between writing the error file and the rename: the scan is in the inbox.
    os.rename(box.quarantine / NAMED, item.path)

    admission = box.journal.admit(sha, item.path, item.size_bytes)
    assert admission.action == "finish_quarantine"
    box.recorder.move_to_quarantine(item, admission.record.error or {})

    assert not item.path.exists()
    assert box.quarantined() == [NAMED, f"{NAMED}.error.json"]  # not NAME.1.dcm beside it
    assert box.error_file(NAMED) == first
    assert box.journal.counts()["quarantined"] == 1


def test_quarantine_name_collisions_get_numbered_names_each_with_its_own_error_file(box: Box) -> None:
    contents = [b"first scan", b"second scan", b"third scan"]
    for data in contents:
        item, sha = box.drop("scan.dcm", data)
        record = box.journal.admit(sha, item.path, item.size_bytes).record
        box.recorder.quarantine(item, sha, record.id, 1, CorruptImage("bad").to_dict())

    names = ["scan.dcm", "scan.1.dcm", "scan.2.dcm"]
    assert box.quarantined() == sorted([*names, *(f"{n}.error.json" for n in names)])
    for name, data in zip(names, contents, strict=True):
        assert (box.quarantine / name).read_bytes() == data
        assert box.error_file(name)["sha256"] == hashlib.sha256(data).hexdigest()

    # An error file left without its scan (another input's) still holds its name.
    orphan = {"sha256": "0" * 64, "code": "corrupt_image"}
    (box.quarantine / "other.dcm.error.json").write_text(json.dumps(orphan))
    item, sha = box.drop("other.dcm", b"fourth scan")
    record = box.journal.admit(sha, item.path, item.size_bytes).record
    box.recorder.quarantine(item, sha, record.id, 1, CorruptImage("bad").to_dict())
    assert (box.quarantine / "other.1.dcm").read_bytes() == b"fourth scan"
    assert box.error_file("other.1.dcm")["sha256"] == sha
    assert box.error_file("other.dcm") == orphan
    assert not (box.quarantine / "other.dcm").exists()


def test_an_unprintable_name_is_quarantined_under_a_printable_one(box: Box) -> None:
    item, sha = box.drop("scan\nwith\tcontrol.dcm", b"bytes")
    record = box.journal.admit(sha, item.path, item.size_bytes).record

    box.recorder.quarantine(item, sha, record.id, 1, CorruptImage("bad").to_dict())

    (moved,) = [p for p in box.quarantine.iterdir() if not p.name.endswith(".error.json")]
    assert moved.name.isprintable() and moved.suffix == ".dcm"
    assert moved.read_bytes() == b"bytes"
    assert box.error_file(moved.name)["sha256"] == sha


def test_refuse_unread_quarantines_a_fifo_under_its_file_key_exactly_once(box: Box) -> None:
    fifo = box.config.inbox.path / "pipe.dcm"
    os.mkfifo(fifo)
    item = ScanItem(fifo.lstat().st_mtime, fifo)
    key = file_key(fifo)

    box.recorder.refuse_unread(item, NotARegularFile("pipe.dcm is a FIFO").to_dict())

    assert box.quarantined() == ["pipe.dcm", "pipe.dcm.error.json"]
    assert stat.S_ISFIFO((box.quarantine / "pipe.dcm").lstat().st_mode)
    document = box.error_file("pipe.dcm")
    assert document["file_key"] == key and "sha256" not in document
    assert document["code"] == "not_a_regular_file" and document["ref"] == box.recorder.ref(key, "pipe.dcm")
    record = box.journal.get(key)
    assert record is not None and record.state == "quarantined"

    # Interrupted before the move (the FIFO back in the inbox, same inode and mtime): refused
    # again with another text, it is finished from the journal's record, not recorded twice.
    os.rename(box.quarantine / "pipe.dcm", fifo)
    assert file_key(fifo) == key
    box.recorder.refuse_unread(item, NotARegularFile("something else").to_dict(), attempts=2)

    assert not fifo.exists()
    assert box.quarantined() == ["pipe.dcm", "pipe.dcm.error.json"]
    assert box.error_file("pipe.dcm") == document
    assert box.journal.counts()["quarantined"] == 1


def test_refuse_unread_moves_a_link_and_never_what_it_points_to(box: Box, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "secret.dcm"
    target.parent.mkdir()
    target.write_bytes(b"outside the inbox")
    link = box.config.inbox.path / "link.dcm"
    link.symlink_to(target)

    box.recorder.refuse_unread(ScanItem(0.0, link), SymlinkRefused("link.dcm is a link").to_dict())

    moved = box.quarantine / "link.dcm"
    assert moved.is_symlink() and os.readlink(moved) == str(target)
    assert target.read_bytes() == b"outside the inbox"
    assert not os.path.lexists(link)
    assert box.error_file("link.dcm")["code"] == "symlink_refused"


def test_already_done_disposes_of_the_file_and_records_nothing_new(
    box: Box, caplog: pytest.LogCaptureFixture
) -> None:
    original, sha = box.drop("a.dcm", b"scan content")
    admitted = box.journal.admit(sha, original.path, original.size_bytes).record
    box.inbox.dispose(original)
    # The journal's record of that scan once its result is committed, as admit() returns it then.
    done = replace(admitted, state="done", message_id="m-1")
    assert done.file_name == box.recorder.ref(sha, "a.dcm")  # the journal names it by reference
    counts = box.journal.counts()
    copy, _ = box.drop("b.dcm", b"scan content")  # the same content under another name

    with caplog.at_level(logging.INFO, logger="edge_runtime.outcomes"):
        box.recorder.already_done(copy, sha, done, duplicate=True)

    assert not copy.path.exists()
    assert sorted(p.name for p in box.config.inbox.processed_path.iterdir()) == ["a.dcm", "b.dcm"]
    assert box.quarantined() == []
    assert box.health.counters["duplicates"] == 1
    assert box.health.counters["processed"] == box.health.counters["quarantined"] == 0
    assert box.journal.counts() == counts
    assert box.notified == []  # nothing new for the sinks
    (logged,) = [r for r in caplog.records if getattr(r, "event", None) == "duplicate"]
    assert "duplicate of" in logged.getMessage()
    assert logged.fields["message_id"] == "m-1" and logged.fields["original"] == done.file_name

    # The same file found again (e.g. after a restart): already processed, not a duplicate.
    again, _ = box.drop("a.dcm", b"scan content")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edge_runtime.outcomes"):
        box.recorder.already_done(again, sha, done, duplicate=False)
    assert not again.path.exists()
    assert (box.config.inbox.processed_path / "a.1.dcm").read_bytes() == b"scan content"
    (logged,) = [r for r in caplog.records if getattr(r, "event", None) == "duplicate"]
    assert "already processed as" in logged.getMessage()
    assert box.health.counters["duplicates"] == 2
    assert box.journal.counts() == counts


def test_an_operational_failure_quarantines_only_after_max_attempts(box: Box) -> None:
    item, sha = box.drop("scan.dcm", b"fine content")
    record = box.journal.admit(sha, item.path, item.size_bytes).record
    fault = DecoderFault("the decoder process died on scan.dcm")

    box.recorder.failure(item, sha, record, fault, max_attempts=2)

    assert item.path.exists() and box.quarantined() == []
    stored = box.journal.get(sha)
    assert stored is not None and stored.failures == 1 and stored.state == "processing"
    ref = box.recorder.ref(sha, "scan.dcm")
    assert box.health.last_error is not None and box.health.last_error.startswith(f"{ref}: decoder_fault")

    box.recorder.failure(item, sha, record, fault, max_attempts=2)

    assert not item.path.exists()
    document = box.error_file("scan.dcm")
    assert document["code"] == "processing_failed_repeatedly"
    assert document["error"].startswith(f"{ref} failed 2 times") and "scan.dcm" not in document["error"]
    assert document["action"] == DecoderFault.action
    assert box.journal.get(sha).state == "quarantined"  # type: ignore[union-attr]


def test_a_scan_gone_before_its_move_still_gets_its_verdict_and_error_file(box: Box) -> None:
    """The file vanished before the move (the sender deleted it): the verdict and error file stay."""
    item, sha = box.drop("gone.dcm", b"bytes")
    record = box.journal.admit(sha, item.path, item.size_bytes).record
    item.path.unlink()

    box.recorder.quarantine(item, sha, record.id, 1, CorruptImage("bad").to_dict())

    assert box.quarantined() == ["gone.dcm.error.json"]
    assert box.journal.get(sha).state == "quarantined"  # type: ignore[union-attr]
    assert box.health.counters["quarantined"] == 1
    assert list(box.config.inbox.path.iterdir()) == []
