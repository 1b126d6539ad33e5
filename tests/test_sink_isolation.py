"""Each sink stands alone (issue 23, item 3): a PACS outage pauses only the PACS.

With the PACS down, MQTT results (urgent ones on the priority topic too) keep flowing within
their usual seconds, new scans are never held, the status names the PACS as behind (not the
MQTT broker), and the PACS's backlog beyond its own limits (rows, report megabytes) is dropped
oldest first with a WARNING; once the PACS is back, what is left goes to it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import pydicom
from helpers import NORMAL_JPEG, PNEUMONIA_JPEG, StoreScp, chest_dicom_from_jpeg, free_port
from helpers import reports_service_config as make_config

from edge_runtime.config import RuntimeConfig
from edge_runtime.journal import Delivery, Journal
from edge_runtime.reports.retention import folder_bytes
from edge_runtime.service import EdgeService
from edge_runtime.sinks import OutboxDrainer, SinkBacklogs
from edge_runtime.sinks.dicom_store import DicomStoreSink
from edge_runtime.sinks.mqtt import MqttSink
from edge_runtime.workers import intake_blocked

#: The real chest CR (PA) the bundled model admits; copies get new UIDs, as new studies would.


def _result(message_id: str) -> tuple[str, str]:
    """(message_id, the stored result text) as Journal.record_result takes them."""
    return message_id, json.dumps({"message_id": message_id})


def _to(*sinks: str) -> list[Delivery]:
    return [Delivery(sink, f"t/{sink}", "{}", 1) for sink in sinks]


def _record(journal: Journal, n: int, sinks: tuple[str, ...], start: int = 0) -> list[str]:
    ids = []
    for i in range(start, start + n):
        record = journal.admit(f"{i:064x}", Path(f"/in/scan{i}.dcm"), 10).record
        journal.record_result(record.id, *_result(f"m{i:02d}"), _to(*sinks))
        ids.append(f"m{i:02d}")
    return ids


# -- the journal's rule ------------------------------------------------------------------


def test_drop_oldest_keeps_a_sinks_newest_rows_and_records_what_it_dropped(tmp_path: Path):
    journal = Journal(tmp_path / "j.sqlite3")
    ids = _record(journal, 5, ("mqtt", "dicom-store"))
    journal.mark_delivered(*(m.seq for m in journal.pending_messages("mqtt")))
    assert journal.outbox_pending({"dicom-store"}) == 5 and journal.outbox_pending({"mqtt"}) == 0
    assert journal.outbox_pending(set()) == 0

    dropped = journal.drop_oldest("dicom-store", keep=2, reason="test cap")

    assert dropped == ids[:3]  # oldest first
    assert [m.message_id for m in journal.pending_messages("dicom-store")] == ids[3:]
    assert journal.undelivered_of("dicom-store") == ids[:2:-1]  # newest first
    assert journal.dropped_count("dicom-store") == 3 and journal.dropped_count("mqtt") == 0
    assert journal.drop_oldest("dicom-store", keep=2, reason="again") == []  # within the cap: no-op
    backlog = journal.backlog_by_sink()
    assert list(backlog) == ["dicom-store"] and backlog["dicom-store"].pending == 2
    assert journal.still_undelivered(ids) == set(ids[3:])
    journal.close()
    # Kept across a restart: the rows are gone from the outbox and listed as dropped.
    journal = Journal(tmp_path / "j.sqlite3")
    assert journal.outbox_pending() == 2 and journal.dropped_count() == 3
    journal.close()


def test_only_the_results_channel_holds_intake_and_other_sinks_are_capped_oldest_first(
    tmp_path: Path, caplog
):
    """The gate counts MQTT rows only; the PACS is held within its row cap and its report budget."""
    reports = tmp_path / "reports"
    config = RuntimeConfig.from_mapping(
        {
            "Journal": {
                "Path": str(tmp_path / "state" / "journal.sqlite3"),
                "MaxOutboxMessages": 3,
                "MaxOutboxMessagesPerSink": 4,
                "MinFreeDiskMb": 0,
            },
            "Reports": {"Path": str(reports), "RetainMbPerSink": 2},
            "Inbox": {"Path": str(tmp_path / "inbox")},
            "Dicom": {"Store": {"Host": "127.0.0.1", "Port": free_port()}},
        }
    )
    journal = Journal(config.journal.path)
    mqtt, pacs = MqttSink(config.mqtt), DicomStoreSink(config)  # built, never started
    drainers = [OutboxDrainer(journal, mqtt), OutboxDrainer(journal, pacs)]
    dropped_counts: list[int] = []
    backlogs = SinkBacklogs(lambda: config, journal, drainers, on_dropped=dropped_counts.append)
    assert backlogs.primary == {"mqtt"} and [d.name for d in backlogs.secondary] == ["dicom-store"]

    # Six results the PACS has not confirmed, MQTT has: intake is not held, the PACS is capped.
    ids = _record(journal, 6, ("mqtt", "dicom-store"))
    journal.mark_delivered(*(m.seq for m in journal.pending_messages("mqtt")))
    for message_id in ids:  # 0.6 MB of reports each: the 2 MB budget holds three
        (reports / message_id).mkdir(parents=True)
        (reports / message_id / "sr.dcm").write_bytes(os.urandom(600 * 1024))
    assert intake_blocked(config, journal, backlogs.primary) is None
    with caplog.at_level(logging.WARNING, logger="edge_runtime.sinks.backlog"):
        assert backlogs.enforce() == 3
    # First the row cap (4: the two oldest go), then the budget (three folders fit: one more goes).
    assert [m.message_id for m in journal.pending_messages("dicom-store")] == ids[3:]
    assert dropped_counts == [2, 1]
    warnings = [r for r in caplog.records if getattr(r, "event", None) == "outbox_dropped"]
    assert [(r.fields["sink"], r.fields["count"]) for r in warnings] == [
        ("dicom-store", 2),
        ("dicom-store", 1),
    ]
    assert "PACS (dicom-store)" in warnings[0].getMessage()
    assert "Journal.MaxOutboxMessagesPerSink = 4" in warnings[0].getMessage()
    assert "Reports.RetainMbPerSink = 2 MB" in warnings[1].getMessage()
    # No other sink needed the dropped results' folders: removed; the kept ones stay.
    assert sorted(p.name for p in reports.iterdir()) == ids[3:]
    assert sum(folder_bytes(reports / m) for m in ids[3:]) <= 2 * 1024 * 1024
    assert backlogs.enforce() == 0  # within both limits now

    # A dropped result whose MQTT row still waits keeps its folder (MQTT may still need it).
    more = _record(journal, 5, ("mqtt", "dicom-store"), start=6)
    for message_id in more:
        (reports / message_id).mkdir()
        (reports / message_id / "sr.dcm").write_bytes(b"x" * 1024)
    assert backlogs.enforce() == 4  # the row cap: 8 waiting, the newest 4 kept
    assert journal.still_undelivered(ids[3:6]) == set()
    assert {p.name for p in reports.iterdir()} == set(more)  # ids[3:6] removed, more[0] kept
    assert [m.message_id for m in journal.pending_messages("dicom-store")] == more[1:]

    # Only now does the results channel hold new scans: its own backlog reached its limit.
    blocked = intake_blocked(config, journal, backlogs.primary)
    assert blocked is not None and "MQTT broker" in blocked and "MaxOutboxMessages = 3" in blocked
    # The PACS is named as behind once its deliveries fail (or its oldest row is a minute old).
    assert backlogs.behind() == []
    drainers[1].failing = "PACS: dicom-store delivery failing: publish_failed"
    (behind,) = backlogs.behind()
    assert behind.startswith("PACS (dicom-store) behind: 4 undelivered, oldest ")
    journal.close()


# -- the service, a PACS that is down, then back ------------------------------------------


def _new_study(src: Path, dst: Path) -> Path:
    """The real chest CR under new Study/Series/SOP Instance UIDs: another patient's study."""
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(dst, enforce_file_format=True)
    return dst


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def test_pacs_outage_pauses_only_the_pacs(
    shared_data, default_bundle, mosquitto, subscriber_factory, tmp_path, caplog, monkeypatch
):
    from edge_runtime.sinks import drainer

    monkeypatch.setattr(drainer, "RETRY_MAX_S", 2.0)  # retry the PACS every 2 s, not 30 s
    pacs_port = free_port()  # nothing listens there yet: the PACS is down
    pacs = StoreScp(tmp_path / "pacs", pacs_port)
    cap = 2
    config = make_config(
        tmp_path,
        mosquitto,
        default_bundle,
        Dicom={"Store": {"Host": "127.0.0.1", "Port": pacs_port, "AeTitle": "PACS", "TimeoutSeconds": 5}},
        Journal={"MaxOutboxMessagesPerSink": cap, "MaxOutboxMessages": 3},
        Health={"HeartbeatSeconds": 1, "File": str(tmp_path / "health.json")},
    )
    # A child's CR under new UIDs each time (the SIIM film is an adult's: outside the intended use).
    child = chest_dicom_from_jpeg(shared_data / NORMAL_JPEG, tmp_path / "child.dcm")
    studies = [_new_study(child, tmp_path / f"study{i}.dcm") for i in range(4)]
    studies.insert(2, chest_dicom_from_jpeg(shared_data / PNEUMONIA_JPEG, tmp_path / "pneumonia.dcm"))
    sop_uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in studies]
    sub = subscriber_factory(f"{config.mqtt.topic_prefix}/#")
    service = EdgeService(config)
    service.start()
    latencies: list[float] = []
    try:
        assert service.mqtt.wait_connected(10)
        with caplog.at_level(logging.WARNING, logger="edge_runtime.sinks.backlog"):
            for i, study in enumerate(studies):
                inbox = config.inbox.path
                inbox.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(study, inbox / f"s{i}.dcm.part")
                dropped_at = time.monotonic()
                (inbox / f"s{i}.dcm.part").rename(inbox / f"s{i}.dcm")
                sub.wait_for(
                    lambda ps, n=i + 1: len([p for p in ps if p.get("message_type") == "result"]) >= n
                )
                latencies.append(time.monotonic() - dropped_at)
                # MQTT (results and the FHIR topic) has this result before the next scan comes.
                _wait(
                    lambda: service.journal.outbox_pending({"mqtt", "mqtt-urgent", "mqtt-fhir"}) == 0,
                    10,
                    "MQTT acks",
                )
            # More scans than MaxOutboxMessages (3) went through: the PACS backlog held no scan.
            assert service.health.blocked_reason is None
            assert list(config.inbox.path.iterdir()) == []
        results = {r["input"]["sop_instance_uid"]: r for r in sub.results()}
        ordered = [results[uid] for uid in sop_uids]
        # Each result within its usual seconds (settle 0.2 s, inference, reports), the PACS down.
        assert max(latencies) < 10.0, latencies
        # The positive one on the priority topic too, at once.
        assert [r["priority"] for r in ordered] == ["routine", "routine", "urgent", "routine", "routine"]
        assert [u["message_id"] for u in sub.wait_for_list("urgent", 1, timeout_s=5)] == [
            ordered[2]["message_id"]
        ]

        # The PACS keeps its newest `cap` results; the older ones were dropped, oldest first,
        # one WARNING per drop batch naming the sink and the count.
        # The cap is applied after each result, in the thread that finished it: wait for the last one.
        _wait(lambda: len(service.journal.pending_messages("dicom-store")) <= cap, 10, "the PACS cap")
        waiting = [m.message_id for m in service.journal.pending_messages("dicom-store")]
        assert waiting == [r["message_id"] for r in ordered[-cap:]]
        # The drop commits before its WARNING is logged (another thread): wait for the last one.
        _wait(
            lambda: (
                sum(getattr(r, "event", None) == "outbox_dropped" for r in caplog.records)
                >= len(ordered) - cap
            ),
            10,
            "drop warnings",
        )
        warnings = [r for r in caplog.records if getattr(r, "event", None) == "outbox_dropped"]
        assert [r.fields["oldest"] for r in warnings] == [r["message_id"] for r in ordered[:-cap]]
        assert all(r.fields["sink"] == "dicom-store" and r.fields["count"] == 1 for r in warnings)
        assert all(r.levelno == logging.WARNING and "PACS (dicom-store)" in r.getMessage() for r in warnings)
        # Their report folders went with them (MQTT had them already); the waiting ones stay.
        for result in ordered[:-cap]:
            assert not (config.reports_path / result["message_id"]).exists()
        for result in ordered[-cap:]:
            assert (config.reports_path / result["message_id"] / "sr.dcm").is_file()

        # The status names the PACS as behind, never the MQTT broker, and counts the drops.
        health = service.health.snapshot()
        assert health["state"] == "degraded", health
        assert health["reason"].startswith(f"PACS (dicom-store) behind: {cap} undelivered, oldest "), health
        assert "MQTT" not in health["reason"].split("(new scans")[0]
        assert health["last_error"].startswith("PACS: dicom-store delivery failing"), health
        assert health["counters"]["outbox_dropped"] == len(studies) - cap
        assert health["mqtt_connected"] is True
        statuses = [m[1] for m in sub.messages if m[1].get("message_type") == "status"]
        assert any("PACS (dicom-store) behind" in (s.get("reason") or "") for s in statuses)

        # The PACS comes back: what it still waits for is delivered; nothing dropped comes back.
        pacs.start()
        expected = {
            r["reports"][k]["sop_instance_uid"] for r in ordered[-cap:] for k in ("sr", "heatmap_dicom")
        }
        _wait(lambda: {str(d.SOPInstanceUID) for d in pacs.stored()} == expected, 30, "SRs at the PACS")
        _wait(lambda: service.journal.outbox_pending() == 0, 10, "an empty outbox")
        _wait(lambda: service.health.snapshot()["state"] == "online", 10, "online again")
        assert len(pacs.stored()) == 2 * cap
    finally:
        service.stop()
        pacs.stop()
    print(f"drop -> MQTT result latencies with the PACS down: {[round(s, 2) for s in latencies]} s")
