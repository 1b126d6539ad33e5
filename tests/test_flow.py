"""The scan's flow on its own (edge_runtime/flow.py), without threads, sources or a broker.

Real parts: the journal (SQLite), the outcome recorder, the report process, the tiny signed
model and files from ../shared/data; the one sink is a list that keeps the outbox rows the
flow commits. Each test reads the journal and the quarantine folder, as an admin would.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import pydicom
import pytest
from helpers import TEST_TRUSTED_KEYS

from edge_runtime.config import RuntimeConfig
from edge_runtime.flow import ScanFlow
from edge_runtime.health import Health
from edge_runtime.journal import Delivery, Journal
from edge_runtime.outcomes import OutcomeRecorder
from edge_runtime.pipeline import ScanAnalyzer
from edge_runtime.reports.processes import ReportProcesses
from edge_runtime.results import ScanResult, load_schema
from edge_runtime.sources import ScanItem

CHEST = "dicom/pydicom_data/RG1_UNCR.dcm"
VALIDATOR = jsonschema.Draft202012Validator(load_schema("result-v1"))


@dataclass
class ListSink:
    """Keeps what the flow hands it: the typed results and their outbox rows."""

    name: str = "list"
    results: list[ScanResult] = field(default_factory=list)

    def delivery(self, config: RuntimeConfig, result: ScanResult) -> Delivery | None:
        self.results.append(result)
        return Delivery(self.name, "results", result.payload, 1)


@dataclass
class Box:
    flow: ScanFlow
    journal: Journal
    sink: ListSink
    health: Health
    config: RuntimeConfig
    disposed: list[Path]


@pytest.fixture()
def box(tmp_path: Path, tiny_bundle: Path) -> Iterator[Box]:
    config = RuntimeConfig.from_mapping(
        {
            "Inbox": {"Path": str(tmp_path / "inbox"), "QuarantinePath": str(tmp_path / "quarantine")},
            "Model": {"BundlePath": str(tiny_bundle), "TrustedKeys": TEST_TRUSTED_KEYS},
            "Mqtt": {"Enabled": False},
            "Journal": {"Path": str(tmp_path / "state" / "journal.sqlite3")},
            "Reports": {"Path": str(tmp_path / "reports"), "UrgentThreshold": 0.0},
        }
    )
    config.inbox.path.mkdir(parents=True)
    config.inbox.quarantine_path.mkdir(parents=True)  # the inbox source makes both when it starts
    analyzer = ScanAnalyzer.from_config(config)
    journal = Journal(config.journal.path)
    health = Health(lambda: config, outbox_pending=journal.outbox_pending, queued=lambda: 0, model=dict)
    disposed: list[Path] = []

    def dispose(item: ScanItem) -> None:
        disposed.append(item.path)
        item.path.unlink()

    recorder = OutcomeRecorder(
        journal,
        health,
        quarantine_dir=config.inbox.quarantine_path,
        dispose=dispose,
        notify_sinks=lambda: None,
        reference_key=analyzer.reference_key,
    )
    reports = ReportProcesses(1)
    sink = ListSink()
    flow = ScanFlow(
        config=lambda: config,
        analyzer=lambda: analyzer,
        journal=journal,
        recorder=recorder,
        health=health,
        reports=reports,
        sinks=lambda: [sink],
    )
    try:
        yield Box(flow, journal, sink, health, config, disposed)
    finally:
        reports.close()
        analyzer.close()
        journal.close()


def _item(path: Path) -> ScanItem:
    stat = path.stat()
    return ScanItem(stat.st_mtime, path, stat.st_size, time.monotonic())


def test_a_scan_is_published_once_with_its_priority_reports_and_one_payload(
    box: Box, shared_data: Path
) -> None:
    scan = shutil.copyfile(shared_data / CHEST, box.config.inbox.path / "chest.dcm")
    box.flow.run(_item(scan))

    (result,) = box.sink.results
    # Reports.UrgentThreshold 0: any positive finding is urgent, a negative one routine.
    assert result.priority == ("urgent" if result.finding.positive else "routine")
    assert result.reports is not None and result.reports.folder == result.message_id
    assert result.reports.sr is not None and result.reports.fhir == "fhir.json"
    assert (box.config.reports_path / result.message_id / "sr.dcm").is_file()
    assert result.timings_ms.reports is not None and result.timings_ms.reports >= 0
    VALIDATOR.validate(json.loads(result.payload))
    # The journal keeps the very text every sink sends: serialised once.
    assert [m.payload for m in box.journal.pending_messages("list")] == [result.payload]
    assert box.journal.result_of(result.input.sha256) == json.loads(result.payload)
    assert box.journal.counts()["done"] == 1
    assert box.disposed == [scan] and not scan.exists()
    assert box.health.counters["received"] == 1 and box.health.counters["processed"] == 1


def test_the_same_content_again_is_not_analysed_or_published_again(box: Box, shared_data: Path) -> None:
    first = shutil.copyfile(shared_data / CHEST, box.config.inbox.path / "a.dcm")
    box.flow.run(_item(first))
    again = shutil.copyfile(shared_data / CHEST, box.config.inbox.path / "b.dcm")
    box.flow.run(_item(again))
    assert len(box.sink.results) == 1
    assert box.health.counters["duplicates"] == 1 and not again.exists()
    assert box.journal.counts()["done"] == 1


def test_another_image_under_the_same_sop_instance_uid_supersedes_the_first(
    box: Box, shared_data: Path, tmp_path: Path
) -> None:
    first = shutil.copyfile(shared_data / CHEST, box.config.inbox.path / "a.dcm")
    box.flow.run(_item(first))
    ds = pydicom.dcmread(shared_data / CHEST)
    ds.PixelData = bytes(b ^ 0x01 for b in ds.PixelData)  # another image, same UIDs
    edited = box.config.inbox.path / "b.dcm"
    ds.save_as(edited, enforce_file_format=True)
    box.flow.run(_item(edited))

    older, newer = box.sink.results
    assert older.supersedes is None
    assert newer.supersedes == older.message_id and newer.message_id != older.message_id
    assert newer.input.sop_instance_uid == older.input.sop_instance_uid


def test_a_file_that_is_no_image_is_quarantined_once_and_nothing_is_published(box: Box) -> None:
    bad = box.config.inbox.path / "notes.dcm"
    bad.write_bytes(b"not a scan at all\n" * 20)
    box.flow.run(_item(bad))

    assert box.sink.results == []
    (error_file,) = box.config.inbox.quarantine_path.glob("*.error.json")
    error = json.loads(error_file.read_text())
    assert error["code"] == "not_an_image" and error["attempts"] == 1
    assert box.journal.counts()["quarantined"] == 1 and box.health.counters["quarantined"] == 1
    assert not bad.exists()


def test_a_file_gone_before_it_is_read_leaves_no_record(box: Box, shared_data: Path) -> None:
    scan = shutil.copyfile(shared_data / CHEST, box.config.inbox.path / "gone.dcm")
    item = _item(scan)
    scan.unlink()
    box.flow.run(item)
    assert box.sink.results == []
    assert box.journal.counts()["done"] == 0 and box.journal.counts()["quarantined"] == 0
    assert box.health.counters["received"] == 0
