"""Issue 14, item 5: no patient identifier leaves the process, whatever the names and headers say.

Files whose names and DICOM headers carry a known patient name, ID and birth
date go through the real service and a real Mosquitto; every MQTT payload
(results and the retained status), the health file and every log line (JSON
and text, as the service writes them) are searched for them.
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import pydicom
import pytest
from helpers import SIIM, drop
from helpers import service_config as make_config

from edge_runtime.logs import JsonFormatter, TextFormatter
from edge_runtime.privacy import REDACTOR, load_or_create_key, scan_ref
from edge_runtime.service import EdgeService

IDENTIFIERS = ("DOE", "JOHN", "MRN123456", "19700101", "SMITH", "JANE", "MRN654321", "KNEE")


def _patient_files(shared_data: Path, staging: Path) -> dict[str, Path]:
    """name in the inbox -> prepared file (names and headers full of identifiers)."""
    staging.mkdir()
    ds = pydicom.dcmread(shared_data / SIIM)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "DOE^JOHN", "MRN123456", "19700101"
    ds.BodyPartExamined = "CHEST"
    ds.save_as(staging / "chest.dcm")
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    del ds.BodyPartExamined
    # Free text where a code belongs, as some modalities write it (pydicom would refuse it).
    ds.add(pydicom.DataElement(0x00180015, "CS", "LEFT KNEE of SMITH JANE", validation_mode=0))
    ds.save_as(staging / "knee.dcm")
    jpeg = (shared_data / "cxr/kermany_pneumonia_224/test/NORMAL/IM-0001-0001.jpeg").read_bytes()
    (staging / "truncated.jpeg").write_bytes(jpeg[: len(jpeg) // 2])
    return {
        "DOE_JOHN_MRN123456_19700101.dcm": staging / "chest.dcm",
        "SMITH_JANE_MRN654321_KNEE.dcm": staging / "knee.dcm",
        "SMITH^JANE MRN654321.jpeg": staging / "truncated.jpeg",
    }


@pytest.fixture()
def captured_logs():
    """The service's log lines, formatted as it formats them, names redacted as it does by default."""
    streams = {"json": io.StringIO(), "text": io.StringIO()}
    handlers = [logging.StreamHandler(streams["json"]), logging.StreamHandler(streams["text"])]
    handlers[0].setFormatter(JsonFormatter())
    handlers[1].setFormatter(TextFormatter())
    logger = logging.getLogger("edge_runtime")
    old_level, was_enabled = logger.level, REDACTOR.enabled
    logger.setLevel(logging.DEBUG)
    REDACTOR.enabled = True
    for handler in handlers:
        logger.addHandler(handler)
    yield streams
    for handler in handlers:
        logger.removeHandler(handler)
    logger.setLevel(old_level)
    REDACTOR.enabled = was_enabled


def test_no_identifier_in_any_message_status_health_file_or_log_line(
    shared_data, tiny_bundle, mosquitto, subscriber_factory, tmp_path, captured_logs
):
    config = make_config(tmp_path, mosquitto, tiny_bundle)
    config = config.model_copy(update={"health": config.health.model_copy(update={"heartbeat_seconds": 1.0})})
    files = _patient_files(shared_data, tmp_path / "staging")
    sub = subscriber_factory(f"{config.mqtt.topic_prefix}/#")
    service = EdgeService(config)
    service.start()
    try:
        assert service.mqtt is not None and service.mqtt.wait_connected(10)
        for name, src in files.items():
            drop(src, config.inbox.path, name)
        sub.wait_for(lambda ps: any(p["message_type"] == "result" for p in ps), timeout_s=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and service.journal.counts()["quarantined"] < 2:
            time.sleep(0.1)
        time.sleep(1.5)  # a heartbeat with the counters and the last error
        assert service.journal.counts()["quarantined"] == 2 and service.journal.counts()["done"] == 1
    finally:
        service.stop()
    (result,) = sub.results()
    key = load_or_create_key(config.reference_key_path)
    assert result["input"]["file_name"] == scan_ref(result["input"]["sha256"], "x.dcm", key=key)
    assert result["input"]["body_part_examined"] == "CHEST"
    # Every topic: results, status, the priority topic and the FHIR reports.
    wire = json.dumps([payload for _, payload, _ in sub.messages] + sub.urgent + sub.fhir)
    health = config.health.file.read_text(encoding="utf-8")
    logs = {kind: stream.getvalue() for kind, stream in captured_logs.items()}
    assert "quarantined" in logs["json"] and "inferred" in logs["text"]  # the logs did say what happened
    for where, text in {"MQTT": wire, "health file": health, **logs}.items():
        for identifier in IDENTIFIERS:
            assert identifier not in text, f"{identifier!r} reached the {where}"
    # On the box the admin still finds the files by their original names, each with its error file
    # beside it (NAME.error.json); the record itself names the scan by the reference to grep (issue 23).
    error_files = list(config.inbox.quarantine_path.glob("*.error.json"))
    assert {p.name.removesuffix(".error.json") for p in error_files} == {
        "SMITH_JANE_MRN654321_KNEE.dcm",
        "SMITH^JANE MRN654321.jpeg",
    }
    errors = [json.loads(p.read_text()) for p in error_files]
    for p in error_files:  # (the reason may quote a header value: the admin must see what was wrong)
        assert p.name.removesuffix(".error.json") not in p.read_text(), p.name
    assert all(e["ref"] in logs["json"] for e in errors)


def test_a_site_may_publish_file_names_on_its_lan(
    shared_data, tiny_bundle, mosquitto, subscriber_factory, tmp_path
):
    config = make_config(tmp_path, mosquitto, tiny_bundle)
    config = config.model_copy(
        update={"privacy": config.privacy.model_copy(update={"publish_file_names": True})}
    )
    sub = subscriber_factory(config.mqtt.results_topic)
    service = EdgeService(config)
    service.start()
    try:
        drop(
            shared_data / "cxr/kermany_pneumonia_224/test/NORMAL/IM-0001-0001.jpeg",
            config.inbox.path,
            "ward3-bed7.jpeg",
        )
        (result,) = sub.wait_for(lambda ps: len(ps) >= 1, timeout_s=20)
    finally:
        service.stop()
    assert result["input"]["file_name"] == "ward3-bed7.jpeg"
