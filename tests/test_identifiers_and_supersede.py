"""Issue 23: no patient identifier leaves the process; the latest image of a SOP UID wins.

Real parts throughout: the service in this process, a real Mosquitto, the tiny
ONNX bundle, real DICOM files from the shared corpus, a real SQLite journal
(its bytes searched, and a ``journal backup`` copy of it).

* A file named like a patient (``DOE_JOHN_19510304.dcm``), a broken one named
  like a patient, and a DICOM whose SOP Instance UID carries a planted name:
  neither name appears in a log line (JSON and text, as the service formats
  them), an MQTT message, the health file, the journal file and its WAL, a
  backup of it, ``journal check``'s report, or a quarantine error file.
* A, then B, then A again under one SOP Instance UID: subscribers receive three
  results, the third superseding the second; A in another transfer syntax
  after that is a repeat of what they hold, published no more.
* A file swapped between its hash and its decode is never decoded under the
  first content's identity. A real race would be flaky, so the seam is
  deterministic: the worker's ``read_scan`` is wrapped to swap the file right
  after the real one hashed it (by rename, and by rewriting it in place).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import SIIM, drop
from helpers import service_config as make_config
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from edge_runtime import flow
from edge_runtime.journal import backup_journal, check_journal
from edge_runtime.logs import JsonFormatter, TextFormatter
from edge_runtime.privacy import REDACTOR
from edge_runtime.service import EdgeService

PATIENT_FILE = "DOE_JOHN_19510304.dcm"
BROKEN_PATIENT_FILE = "DOE_JOHN_19510304_CT2.dcm"
#: What must not appear anywhere (the parts of the names; "DOE_JOHN" is not hex, nor are they).
NAME_PARTS = ("DOE_JOHN", "19510304")
PLANTED_UID = "1.2.826.0.1.ROE^RICHARD.19420101"
UID_PARTS = ("ROE^RICHARD", "RICHARD", "19420101")


@pytest.fixture()
def running(tmp_path, mosquitto):
    """Start the real service for the tiny bundle (as test_service_e2e's fixture); stops it at teardown."""
    services: list[EdgeService] = []

    def start(bundle: Path):
        config = make_config(tmp_path, mosquitto, bundle)
        service = EdgeService(config)
        service.start()
        assert service.mqtt is not None and service.mqtt.wait_connected(10)
        services.append(service)
        return service, config

    yield start
    for service in services:
        service.stop()


@pytest.fixture()
def captured_logs() -> Iterator[dict[str, io.StringIO]]:
    """Every log record of the runtime, formatted as the service formats it, names redacted (the default)."""
    streams = {"json": io.StringIO(), "text": io.StringIO()}
    handlers = [logging.StreamHandler(streams["json"]), logging.StreamHandler(streams["text"])]
    handlers[0].setFormatter(JsonFormatter())
    handlers[1].setFormatter(TextFormatter())
    root, watchdog = logging.getLogger(), logging.getLogger("watchdog")
    old_level, old_watchdog, was_enabled = root.level, watchdog.level, REDACTOR.enabled
    root.setLevel(logging.DEBUG)
    # As configure_logging sets them: our names redacted (unless Privacy.LogFileNames), and
    # watchdog's per-event DEBUG lines (which quote every path it sees) left out.
    REDACTOR.enabled = True
    watchdog.setLevel(logging.WARNING)
    for handler in handlers:
        root.addHandler(handler)
    yield streams
    for handler in handlers:
        root.removeHandler(handler)
    root.setLevel(old_level)
    watchdog.setLevel(old_watchdog)
    REDACTOR.enabled = was_enabled


def _wait(predicate, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def _siim(shared_data: Path) -> pydicom.Dataset:
    ds = pydicom.dcmread(shared_data / SIIM)
    ds.decompress(generate_instance_uid=False)
    return ds


def _inverted(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The same header with another image (same size on disk)."""
    other = ds.copy()
    pixels = ds.pixel_array
    other.PixelData = (np.iinfo(pixels.dtype).max - pixels).astype(pixels.dtype).tobytes()
    return other


def _save(ds: pydicom.Dataset, path: Path, syntax=ExplicitVRLittleEndian) -> Path:
    ds.file_meta.TransferSyntaxUID = syntax
    settings = pydicom.config.settings
    old = settings.reading_validation_mode, settings.writing_validation_mode
    # A hostile UID is written as it is (pydicom would warn, or refuse it).
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        ds.save_as(path, enforce_file_format=True)
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = old
    return path


def test_patient_named_files_and_planted_uids_leave_no_trace(
    shared_data, tiny_bundle, running, subscriber_factory, tmp_path, captured_logs
):
    service, config = running(tiny_bundle)
    sub = subscriber_factory(f"{config.mqtt.topic_prefix}/#")
    staging = tmp_path / "staging"
    staging.mkdir()
    good = _save(_siim(shared_data), staging / "good.dcm")
    data = good.read_bytes()
    (staging / "broken.dcm").write_bytes(data[: len(data) // 3])
    planted = _siim(shared_data)
    # A hostile sender's SOP Instance UID (pydicom would refuse it; the raw element is written).
    planted.add(pydicom.DataElement(0x00080018, "UI", PLANTED_UID, validation_mode=0))
    planted.file_meta.add(pydicom.DataElement(0x00020003, "UI", PLANTED_UID, validation_mode=0))
    _save(planted, staging / "planted.dcm")

    drop(good, config.inbox.path, PATIENT_FILE)
    drop(staging / "broken.dcm", config.inbox.path, BROKEN_PATIENT_FILE)
    drop(staging / "planted.dcm", config.inbox.path, "uid.dcm")
    sub.wait_for(lambda ps: any(p.get("message_type") == "result" for p in ps), timeout_s=30)
    _wait(lambda: service.journal.counts()["quarantined"] == 2, what="two quarantines")
    _wait(lambda: not any(config.inbox.path.iterdir()), what="an empty inbox")
    time.sleep(0.5)  # the last log lines and the status after the quarantines
    (result,) = sub.results()

    # The product still says what happened, by reference.
    logs = {kind: stream.getvalue() for kind, stream in captured_logs.items()}
    assert result["input"]["file_name"].startswith("scan-")
    assert result["input"]["file_name"] in logs["json"] and "quarantined" in logs["json"]
    codes = {json.loads(p.read_text())["code"] for p in config.inbox.quarantine_path.glob("*.error.json")}
    assert codes == {"corrupt_image", "invalid_dicom_uid"}

    journal = config.journal.path
    backup = backup_journal(journal, tmp_path / "backups/").path
    report = json.dumps(check_journal(journal).to_dict())
    places: dict[str, bytes] = {
        "MQTT": json.dumps([payload for _, payload, _ in sub.messages] + sub.urgent + sub.fhir).encode(),
        "JSON log": logs["json"].encode(),
        "text log": logs["text"].encode(),
        "journal": journal.read_bytes(),
        "journal WAL": Path(f"{journal}-wal").read_bytes() if Path(f"{journal}-wal").exists() else b"",
        "journal backup": backup.read_bytes(),
        "journal check": report.encode(),
    }
    for error_file in config.inbox.quarantine_path.glob("*.error.json"):
        places[f"quarantine {error_file.name}"] = error_file.read_bytes()
    for where, blob in places.items():
        for part in NAME_PARTS:
            assert part.encode() not in blob, f"{part!r} (file name) reached the {where}"
    for where in ("MQTT", "JSON log", "text log"):
        for part in UID_PARTS:
            assert part.encode() not in places[where], f"{part!r} (planted in a UID) reached the {where}"
    # The quarantined files keep their names on the box, their error files beside them.
    assert (config.inbox.quarantine_path / BROKEN_PATIENT_FILE).is_file()
    assert (config.inbox.quarantine_path / f"{BROKEN_PATIENT_FILE}.error.json").is_file()


def test_a_then_b_then_a_again_publishes_a_again_superseding_b(
    shared_data, tiny_bundle, running, subscriber_factory, tmp_path, captured_logs
):
    service, config = running(tiny_bundle)
    sub = subscriber_factory(config.mqtt.results_topic)
    ds = _siim(shared_data)
    a = _save(ds, tmp_path / "a.dcm")
    b = _save(_inverted(ds), tmp_path / "b.dcm")
    a_implicit = _save(_siim(shared_data), tmp_path / "a-implicit.dcm", ImplicitVRLittleEndian)
    assert a_implicit.read_bytes() != a.read_bytes()

    drop(a, config.inbox.path, "a.dcm")
    sub.wait_for(lambda ps: len(ps) >= 1, timeout_s=30)
    drop(b, config.inbox.path, "b.dcm")
    sub.wait_for(lambda ps: len(ps) >= 2, timeout_s=30)
    drop(a, config.inbox.path, "a-again.dcm")  # the very bytes of the first
    first, second, third = sub.wait_for(lambda ps: len(ps) >= 3, timeout_s=30)

    uid = first["input"]["sop_instance_uid"]
    assert second["input"]["sop_instance_uid"] == third["input"]["sop_instance_uid"] == uid
    assert "supersedes" not in first
    assert second["supersedes"] == first["message_id"]
    assert third["supersedes"] == second["message_id"]  # subscribers now hold A again
    assert third["input"]["sha256"] == first["input"]["sha256"]
    assert third["probabilities"] == first["probabilities"]
    assert len({first["message_id"], second["message_id"], third["message_id"]}) == 3

    # A in another transfer syntax now repeats what subscribers hold: recorded, not published.
    drop(a_implicit, config.inbox.path, "a-implicit.dcm")
    _wait(lambda: service.counters["processed"] >= 4, what="the fourth scan processed")
    time.sleep(1.0)
    assert len(sub.results()) == 3
    assert service.counters["duplicates"] == 1
    text = captured_logs["json"].getvalue()
    events = [json.loads(line).get("event") for line in text.splitlines()]
    assert events.count("supersedes") == 2 and events.count("duplicate") == 1


def test_two_images_of_one_uid_at_once_are_published_one_superseding_the_other(
    shared_data, tiny_bundle, running, subscriber_factory, tmp_path, monkeypatch
):
    """Both workers on A and B of one SOP Instance UID: each used to read "nothing yet" and publish
    as the first, so subscribers held whichever came last without knowing it replaced the other."""
    from edge_runtime.reports.processes import ReportProcesses

    write = ReportProcesses.write
    inside = []

    def slow_write(self, *args, **kwargs):
        inside.append(time.monotonic())
        time.sleep(1.0)  # both workers are between deciding and committing (reports are built there)
        return write(self, *args, **kwargs)

    monkeypatch.setattr(ReportProcesses, "write", slow_write)
    _service, config = running(tiny_bundle)
    sub = subscriber_factory(config.mqtt.results_topic)
    ds = _siim(shared_data)
    a = _save(ds, tmp_path / "a.dcm")
    b = _save(_inverted(ds), tmp_path / "b.dcm")
    drop(a, config.inbox.path, "a.dcm")
    drop(b, config.inbox.path, "b.dcm")
    first, second = sub.wait_for(lambda ps: len(ps) >= 2, timeout_s=60)
    assert first["input"]["sop_instance_uid"] == second["input"]["sop_instance_uid"]
    assert "supersedes" not in first
    assert second.get("supersedes") == first["message_id"]
    assert {first["input"]["sha256"], second["input"]["sha256"]} == {
        hashlib.sha256(a.read_bytes()).hexdigest(),
        hashlib.sha256(b.read_bytes()).hexdigest(),
    }
    # The second waited for the first's commit: its reports began a full second later.
    assert len(inside) == 2 and inside[1] - inside[0] >= 0.9


@pytest.mark.parametrize("how", ["rename", "in_place"])
def test_a_file_swapped_between_hash_and_decode_is_not_decoded_as_the_first(
    shared_data, tiny_bundle, running, subscriber_factory, tmp_path, monkeypatch, how
):
    """The deterministic seam: the worker's read_scan swaps the file right after hashing it."""
    service, config = running(tiny_bundle)
    sub = subscriber_factory(config.mqtt.results_topic)
    ds = _siim(shared_data)
    first = _save(ds, tmp_path / "first.dcm")
    second = _save(_inverted(ds), tmp_path / "second.dcm")
    assert first.stat().st_size == second.stat().st_size  # only the hash can tell them apart
    hashes = {hashlib.sha256(p.read_bytes()).hexdigest(): p.name for p in (first, second)}
    real_read_scan = flow.read_scan
    swapped: list[str] = []

    def read_then_swap(path, inbox_config):
        scan = real_read_scan(path, inbox_config)
        if not swapped:
            swapped.append(scan.sha256)
            if how == "rename":
                staged = path.with_name(".swap")
                staged.write_bytes(second.read_bytes())
                os.replace(staged, path)
            else:
                with open(path, "r+b") as fh:  # the same inode, rewritten
                    fh.write(second.read_bytes())
        return scan

    monkeypatch.setattr(flow, "read_scan", read_then_swap)
    drop(first, config.inbox.path, "scan.dcm")
    (result,) = sub.wait_for(lambda ps: len(ps) >= 1, timeout_s=30)
    _wait(lambda: not any(config.inbox.path.iterdir()), what="an empty inbox")
    time.sleep(0.5)

    assert hashes[swapped[0]] == "first.dcm"  # what was hashed first...
    # ...was never published: the content decoded and published is the second one, under its own hash.
    assert hashes[result["input"]["sha256"]] == "second.dcm"
    assert len(sub.results()) == 1
    assert service.journal.result_of(swapped[0]) is None


def test_a_name_in_flight_is_redacted_only_as_a_whole_name_never_inside_another_reference() -> None:
    """A file called ``a.dcm`` in flight must not rewrite another scan's ``scan-…a.dcm`` reference.

    (Before, the redactor replaced substrings: any reference ending in a short name in flight
    was logged as that name's reference, which garbled the log by chance, 1 time in 16.)
    """
    from edge_runtime.privacy import NameRedactor

    redactor = NameRedactor()
    redactor.enabled = True
    redactor.register("a.dcm", "scan-1111111111111111.dcm")
    redactor.register("DOE^JOHN.dcm", "scan-2222222222222222.dcm")
    text = 'read /inbox/a.dcm, "a.dcm" and DOE^JOHN.dcm.part; published scan-3f9a0c1d2e4b5a6a.dcm'
    assert redactor.scrub(text) == (
        'read /inbox/scan-1111111111111111.dcm, "scan-1111111111111111.dcm" and '
        "scan-2222222222222222.dcm.part; published scan-3f9a0c1d2e4b5a6a.dcm"
    )
    redactor.forget("a.dcm")
    redactor.forget("DOE^JOHN.dcm")
    assert redactor.scrub(text) == text
