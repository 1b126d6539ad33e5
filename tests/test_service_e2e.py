"""End to end with real parts: inbox folder -> service -> real Mosquitto -> real subscriber."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema
import pytest
from helpers import SIIM, drop, published_name
from helpers import service_config as make_config

from edge_runtime.config import RuntimeConfig
from edge_runtime.results import load_schema
from edge_runtime.service import EdgeService

RESULT_VALIDATOR = jsonschema.Draft202012Validator(load_schema("result-v1"))
STATUS_VALIDATOR = jsonschema.Draft202012Validator(load_schema("status-v1"))


def by_file(results: list[dict]) -> dict[str, dict]:
    return {r["input"]["file_name"]: r for r in results}


@pytest.fixture()
def running(tmp_path, mosquitto, subscriber_factory):
    """Start a service for a config; stops it at teardown."""
    services: list[EdgeService] = []

    def start(bundle: Path, decode: dict | None = None, **inbox) -> tuple[EdgeService, RuntimeConfig]:
        config = make_config(tmp_path, mosquitto, bundle, decode, **inbox)
        service = EdgeService(config)
        service.start()
        assert service.mqtt.wait_connected(10)
        services.append(service)
        return service, config

    yield start
    for service in services:
        service.stop()


def test_real_scans_get_one_valid_result_each(
    shared_data, default_bundle, running, subscriber_factory, tmp_path
):
    files = {
        "normal.jpeg": shared_data / "cxr/kermany_pneumonia_224/test/NORMAL/IM-0001-0001.jpeg",
        "pneumonia.jpeg": shared_data / "cxr/kermany_pneumonia_224/test/PNEUMONIA/person1_virus_6.jpeg",
        "siim.dcm": shared_data / SIIM,
        "RG1_UNCR.dcm": shared_data / "dicom/pydicom_data/RG1_UNCR.dcm",
        "nih.png": shared_data / "cxr/nih_chestxray14_1024_subset/images/00000075_000.png",
    }
    _service, config = running(default_bundle)
    sub = subscriber_factory(f"{config.mqtt.topic_prefix}/#")
    for name, src in files.items():
        drop(src, config.inbox.path, name)
    sub.wait_for(lambda ps: len([p for p in ps if p["message_type"] == "result"]) >= len(files), timeout_s=60)
    time.sleep(0.5)  # a duplicate would arrive now
    results = sub.results()
    # The names the sender gave never leave the process; each scan goes by a content reference.
    assert sorted(r["input"]["file_name"] for r in results) == sorted(
        published_name(src, name, config=config) for name, src in files.items()
    )
    for result in results:
        RESULT_VALIDATOR.validate(result)
        assert result["not_for_diagnostic_use"] is True
        assert result["model"]["name"] == "pneumonia-cxr"
    got = {name: by_file(results)[published_name(src, name, config=config)] for name, src in files.items()}
    # Each message carries the model's own decision: the same probabilities and decision
    # as the one-shot path (the bundled model run directly on the same file).
    from edge_runtime.pipeline import ScanAnalyzer

    direct = ScanAnalyzer.from_bundle_path(default_bundle)
    for name, src in files.items():
        expected = direct.analyze(src).result().message()
        assert got[name]["probabilities"] == expected["probabilities"], name
        assert got[name]["decision"] == expected["decision"], name
        finding = got[name]["findings"][0]
        if got[name]["intended_use"]["within"]:
            assert finding["positive"] == (finding["probability"] >= finding["threshold"])
        else:  # the adults' films: outside the model's intended use, no call
            assert finding["positive"] is None and got[name]["decision"] is None
    direct.close()
    assert got["siim.dcm"]["input"]["sop_instance_uid"].startswith("1.2.276.0.7230010")
    assert got["RG1_UNCR.dcm"]["input"]["modality"] == "CR"
    # Inbox emptied only after each outcome was recorded; nothing quarantined.
    assert list(config.inbox.path.iterdir()) == []
    assert list(config.inbox.quarantine_path.iterdir()) == []
    status = [m for m in sub.messages if m[1]["message_type"] == "status"]
    assert status and status[-1][1]["state"] == "online" and status[-1][2] in (True, False)
    for _, payload, _ in status:
        STATUS_VALIDATOR.validate(payload)


def test_file_written_slowly_is_read_only_when_complete(
    shared_data, tiny_bundle, running, subscriber_factory, tmp_path
):
    _service, config = running(tiny_bundle, SettleSeconds=1.0)
    sub = subscriber_factory(config.mqtt.results_topic)
    src = (shared_data / "dicom/pydicom_data/RG1_UNCR.dcm").read_bytes()
    target = config.inbox.path / "slow.dcm"
    config.inbox.path.mkdir(parents=True, exist_ok=True)
    chunks = [src[i : i + len(src) // 8 + 1] for i in range(0, len(src), len(src) // 8 + 1)]
    with open(target, "wb") as fh:
        for chunk in chunks:  # 8 chunks, 0.4 s apart: pauses shorter than SettleSeconds
            fh.write(chunk)
            fh.flush()
            time.sleep(0.4)
    assert sub.results() == [], "a result arrived before the file was complete"
    sub.wait_for(lambda ps: len(ps) >= 1, timeout_s=20)
    time.sleep(0.5)
    results = sub.results()
    assert len(results) == 1
    assert results[0]["input"]["sha256"] == __import__("hashlib").sha256(src).hexdigest()
    assert list(config.inbox.quarantine_path.iterdir()) == []


def test_part_file_written_slowly_then_renamed_is_read_once(
    shared_data, tiny_bundle, running, subscriber_factory
):
    _service, config = running(tiny_bundle, SettleSeconds=5.0)
    sub = subscriber_factory(config.mqtt.results_topic)
    src = (shared_data / "dicom/pydicom_data/RG1_UNCR.dcm").read_bytes()
    config.inbox.path.mkdir(parents=True, exist_ok=True)
    part = config.inbox.path / "study.dcm.part"
    with open(part, "wb") as fh:  # slower than the rescan interval, far past it in total
        for i in range(0, len(src), len(src) // 6 + 1):
            fh.write(src[i : i + len(src) // 6 + 1])
            fh.flush()
            time.sleep(0.5)
    assert sub.results() == []
    t_rename = time.monotonic()
    part.rename(config.inbox.path / "study.dcm")
    sub.wait_for(lambda ps: len(ps) >= 1, timeout_s=20)
    # Taken at once on rename, without waiting out the 5 s settle time.
    assert time.monotonic() - t_rename < 4.0
    time.sleep(0.5)
    assert [r["input"]["file_name"] for r in sub.results()] == [
        published_name(shared_data / "dicom/pydicom_data/RG1_UNCR.dcm", "study.dcm", config=config)
    ]
    assert list(config.inbox.quarantine_path.iterdir()) == []


def test_bad_inputs_are_quarantined_and_good_ones_keep_flowing(
    shared_data, tiny_bundle, running, subscriber_factory, tmp_path
):
    service, config = running(tiny_bundle)
    sub = subscriber_factory(config.mqtt.results_topic)
    staging = tmp_path / "staging"
    staging.mkdir()
    rg1 = (shared_data / "dicom/pydicom_data/RG1_UNCR.dcm").read_bytes()
    (staging / "truncated.dcm").write_bytes(rg1[: len(rg1) // 3])
    (staging / "notes.dcm").write_text("Patient called, please resend the study.\n")
    (staging / "empty.dcm").write_bytes(b"")
    (staging / "hip.dcm").write_bytes((shared_data / "dicom/wg04/RG2_RLE").read_bytes())
    bad = ["truncated.dcm", "notes.dcm", "empty.dcm", "hip.dcm"]
    good = {
        "good1.jpeg": shared_data / "cxr/kermany_pneumonia_224/test/NORMAL/IM-0003-0001.jpeg",
        "good2.dcm": shared_data / SIIM,
    }
    for name in bad:
        drop(staging / name, config.inbox.path)
    for name, src in good.items():
        drop(src, config.inbox.path, name)
    sub.wait_for(lambda ps: len(ps) >= 2, timeout_s=30)
    deadline = time.monotonic() + 15
    quarantine = config.inbox.quarantine_path
    # Each error file is written just before its scan is moved out of the inbox: wait for both.
    while time.monotonic() < deadline and (
        len(list(quarantine.glob("*.error.json"))) < 4 or any(config.inbox.path.iterdir())
    ):
        time.sleep(0.1)
    assert sorted(r["input"]["file_name"] for r in sub.results()) == sorted(
        published_name(src, name, config=config) for name, src in good.items()
    )
    for name in bad:
        error_file = config.inbox.quarantine_path / f"{name}.error.json"
        assert (config.inbox.quarantine_path / name).is_file(), f"{name} not moved to quarantine"
        error = json.loads(error_file.read_text())
        # Issue 23: the record names the scan by its reference, never by the file's name.
        assert "file" not in error and name not in error_file.read_text() and error["ref"]
        assert error["error"] and error["action"], error
    errors = {n: json.loads((config.inbox.quarantine_path / f"{n}.error.json").read_text()) for n in bad}
    assert errors["truncated.dcm"]["code"] == "corrupt_image"
    assert "truncated" in errors["truncated.dcm"]["error"]
    assert errors["notes.dcm"]["code"] == "not_an_image"
    assert errors["empty.dcm"]["code"] == "corrupt_image"
    assert "empty" in errors["empty.dcm"]["error"]
    assert errors["hip.dcm"]["code"] == "outside_intended_use"
    assert "HIP" in errors["hip.dcm"]["error"]
    assert service.journal.counts()["quarantined"] == 4
    assert list(config.inbox.path.iterdir()) == []


def test_restart_with_queued_files_gives_exactly_one_result_each(
    shared_data, tiny_bundle, mosquitto, subscriber_factory, tmp_path
):
    config = make_config(tmp_path, mosquitto, tiny_bundle)
    sub = subscriber_factory(config.mqtt.results_topic)
    sources = sorted((shared_data / "cxr/kermany_pneumonia_224/test/PNEUMONIA").glob("*.jpeg"))[:30]
    # Files are already waiting when the service first starts (as after a power cut).
    for src in sources:
        drop(src, config.inbox.path)
    service = EdgeService(config)
    service.start()
    sub.wait_for(lambda ps: len(ps) >= 3, timeout_s=30)
    service.stop()  # with most files still queued in the inbox
    first_run = len(sub.results())
    assert first_run < len(sources), "test needs files left over at the stop"
    assert any(config.inbox.path.iterdir())
    service = EdgeService(config)
    service.start()
    try:
        sub.wait_for(lambda ps: len({p["message_id"] for p in ps}) >= len(sources), timeout_s=60)
        time.sleep(1.0)
    finally:
        service.stop()
    names = [r["input"]["file_name"] for r in sub.results()]
    assert sorted(set(names)) == sorted(published_name(s, config=config) for s in sources)
    assert len(names) == len(sources), f"repeats: {len(names) - len(set(names))}"
    assert list(config.inbox.path.iterdir()) == []


def test_patient_names_in_file_names_never_leave_the_process(
    shared_data, tiny_bundle, running, subscriber_factory, tmp_path
):
    # Modalities and PACS exports name files after patients. Neither the result nor the retained
    # status (its last_error names the quarantined file's problem) may carry them.
    _service, config = running(tiny_bundle)
    sub = subscriber_factory(f"{config.mqtt.topic_prefix}/#")
    (tmp_path / "note.dcm").write_text("Body Part: LEFT KNEE of SMITH JANE\n")
    drop(tmp_path / "note.dcm", config.inbox.path, "SMITH_JANE_MRN456.dcm")
    drop(shared_data / SIIM, config.inbox.path, "DOE_JOHN_MRN123.dcm")
    sub.wait_for(lambda ps: any(p["message_type"] == "result" for p in ps), timeout_s=30)
    error_file = config.inbox.quarantine_path / "SMITH_JANE_MRN456.dcm.error.json"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not error_file.exists():
        time.sleep(0.1)
    assert error_file.exists()  # the admin on the box still sees the original name
    sub.wait_for(lambda ps: any("last_error" in p for p in ps if p["message_type"] == "status"), timeout_s=30)
    (result,) = sub.results()
    assert result["input"]["file_name"] == published_name(
        shared_data / SIIM, "DOE_JOHN_MRN123.dcm", config=config
    )
    text = json.dumps([payload for _, payload, _ in sub.messages])
    for identifier in ("DOE", "JOHN", "MRN123", "SMITH", "JANE", "MRN456", "KNEE"):
        assert identifier not in text, f"{identifier} reached MQTT"


def test_same_content_twice_is_processed_once(shared_data, tiny_bundle, running, subscriber_factory):
    service, config = running(tiny_bundle)
    sub = subscriber_factory(config.mqtt.results_topic)
    src = shared_data / "cxr/kermany_pneumonia_224/test/NORMAL/IM-0005-0001.jpeg"
    drop(src, config.inbox.path, "first.jpeg")
    sub.wait_for(lambda ps: len(ps) >= 1, timeout_s=20)
    drop(src, config.inbox.path, "again.jpeg")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(config.inbox.path.iterdir()):
        time.sleep(0.1)
    time.sleep(0.5)
    assert [r["input"]["file_name"] for r in sub.results()] == [
        published_name(src, "first.jpeg", config=config)
    ]
    assert service.counters["duplicates"] == 1


def test_results_survive_a_broker_that_is_down_at_start(
    shared_data, tiny_bundle, tmp_path, mosquitto, subscriber_factory
):
    """Scans are processed while the broker is unreachable and delivered once it is back."""
    from helpers import Broker

    broker = Broker(tmp_path)
    config = make_config(tmp_path, broker, tiny_bundle)  # nothing listens on that port yet
    service = EdgeService(config)
    service.start()
    try:
        drop(
            shared_data / "cxr/kermany_pneumonia_224/test/NORMAL/IM-0006-0001.jpeg",
            config.inbox.path,
            "offline.jpeg",
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and service.journal.counts()["done"] < 1:
            time.sleep(0.1)
        # The result waits for the broker (the tiny model calls it positive: urgent, so a second
        # row waits for the priority topic).
        assert len(service.journal.pending_messages("mqtt")) == 1
        broker.start()
        from helpers import Subscriber

        sub = Subscriber(broker, config.mqtt.results_topic)
        try:
            sub.wait_for(lambda ps: len(ps) >= 1, timeout_s=45)
            assert sub.results()[0]["input"]["file_name"] == published_name(
                shared_data / "cxr/kermany_pneumonia_224/test/NORMAL/IM-0006-0001.jpeg",
                "offline.jpeg",
                config=config,
            )
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and service.journal.counts()["outbox_pending"]:
                time.sleep(0.1)
            assert service.journal.counts()["outbox_pending"] == 0
        finally:
            sub.close()
    finally:
        service.stop()
        broker.stop()


def test_same_sop_instance_in_two_transfer_syntaxes_is_published_once(
    shared_data, tiny_bundle, running, subscriber_factory, tmp_path
):
    """The SIIM image as sent (JPEG baseline), then re-sent uncompressed: same SOP Instance UID."""
    import pydicom

    service, config = running(tiny_bundle)
    sub = subscriber_factory(config.mqtt.results_topic)
    ds = pydicom.dcmread(shared_data / SIIM)
    ds.decompress(generate_instance_uid=False)
    ds.save_as(tmp_path / "uncompressed.dcm")
    drop(shared_data / SIIM, config.inbox.path, "as_jpeg.dcm")
    sub.wait_for(lambda ps: len(ps) >= 1, timeout_s=20)
    drop(tmp_path / "uncompressed.dcm", config.inbox.path, "as_le.dcm")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and service.counters["duplicates"] < 1:
        time.sleep(0.1)
    time.sleep(0.5)
    assert [r["input"]["file_name"] for r in sub.results()] == [
        published_name(shared_data / SIIM, "as_jpeg.dcm", config=config)
    ]
    assert service.counters["duplicates"] == 1


def test_a_hanging_decoder_is_stopped_and_the_file_quarantined(
    shared_data, tiny_bundle, running, subscriber_factory, tmp_path
):
    from edge_runtime import decode as decode_stage

    saved = decode_stage.registered_decoders()
    decode_stage.register_decoder("hang", "plugins.misbehaving:HangingDecoder", first=True)
    try:
        _service, config = running(tiny_bundle, decode={"TimeoutSeconds": 1.0}, SettleSeconds=0.2)
        sub = subscriber_factory(config.mqtt.results_topic)
        (tmp_path / "stuck.bin").write_bytes(b"HANG\n" + bytes(64))
        drop(tmp_path / "stuck.bin", config.inbox.path)
        drop(shared_data / SIIM, config.inbox.path, "after.dcm")
        sub.wait_for(lambda ps: len(ps) >= 1, timeout_s=30)
        error_file = config.inbox.quarantine_path / "stuck.bin.error.json"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not error_file.exists():
            time.sleep(0.1)
        assert json.loads(error_file.read_text())["code"] == "decode_timeout"
        assert [r["input"]["file_name"] for r in sub.results()] == [
            published_name(shared_data / SIIM, "after.dcm", config=config)
        ]
    finally:
        decode_stage.use_registry(saved)


def test_low_disk_keeps_new_scans_waiting_in_the_inbox(
    shared_data, tiny_bundle, tmp_path, mosquitto, subscriber_factory
):
    config = make_config(tmp_path, mosquitto, tiny_bundle)
    config = config.model_copy(
        update={"journal": config.journal.model_copy(update={"min_free_disk_mb": 10**9})}
    )  # a petabyte: never available
    service = EdgeService(config)
    service.start()
    try:
        assert service.mqtt is not None and service.mqtt.wait_connected(10)  # degraded for this reason only
        drop(
            shared_data / "cxr/kermany_pneumonia_224/test/NORMAL/IM-0007-0001.jpeg",
            config.inbox.path,
            "waiting.jpeg",
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and service.health.snapshot()["state"] != "degraded":
            time.sleep(0.1)
        health = service.health.snapshot()
        assert health["state"] == "degraded" and "MinFreeDiskMb" in health["reason"]
        time.sleep(1.0)
        assert (config.inbox.path / "waiting.jpeg").is_file()  # never deleted, never taken
        assert service.counters["received"] == 0
    finally:
        service.stop()


def test_full_outbox_leaves_new_scans_in_the_inbox_until_the_broker_is_back(
    shared_data, tiny_bundle, tmp_path, mosquitto
):
    from helpers import Broker, Subscriber

    broker = Broker(tmp_path)  # not started yet: results pile up in the outbox
    config = make_config(tmp_path, broker, tiny_bundle)
    config = config.model_copy(
        update={"journal": config.journal.model_copy(update={"max_outbox_messages": 2})}
    )
    service = EdgeService(config)
    service.start()
    sources = sorted((shared_data / "cxr/kermany_pneumonia_224/test/NORMAL").glob("*.jpeg"))[:5]
    try:
        for src in sources:
            drop(src, config.inbox.path)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and service.journal.counts()["done"] < 2:
            time.sleep(0.1)
        time.sleep(1.5)
        done = service.journal.counts()["done"]
        assert 2 <= done <= 2 + config.workers  # the limit is checked per worker
        assert len(list(config.inbox.path.iterdir())) == len(sources) - done
        assert "MaxOutboxMessages" in service.health.snapshot()["reason"]
        broker.start()
        sub = Subscriber(broker, config.mqtt.results_topic)
        try:
            sub.wait_for(lambda ps: len({p["message_id"] for p in ps}) >= 5, timeout_s=60)
        finally:
            sub.close()
        # The last scan's file goes once its result is committed, which may trail its delivery
        # to another subscriber by a moment on a busy machine.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(config.inbox.path.iterdir()):
            time.sleep(0.1)
        assert list(config.inbox.path.iterdir()) == []
    finally:
        service.stop()
        broker.stop()


def test_operational_failures_are_retried_then_quarantined(
    shared_data, tiny_bundle, running, subscriber_factory
):
    """A backend fault is not the file's fault: retried, and quarantined only after MaxAttempts."""
    from edge_runtime.errors import BackendError

    service, config = running(tiny_bundle)
    sub = subscriber_factory(config.mqtt.results_topic)
    calls = {"n": 0}
    # The pipeline runs the engine once per scan through infer_outputs (scores and heat-map).
    real_infer = service.analyzer.backend.infer_outputs

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] <= 1:
            raise BackendError("simulated engine fault")
        return real_infer(batch)

    service.analyzer.backend.infer_outputs = flaky
    drop(
        shared_data / "cxr/kermany_pneumonia_224/test/NORMAL/IM-0010-0001.jpeg",
        config.inbox.path,
        "retry.jpeg",
    )
    sub.wait_for(lambda ps: len(ps) >= 1, timeout_s=20)  # second attempt succeeds
    assert calls["n"] == 2

    def broken(batch):
        raise BackendError("engine down")

    service.analyzer.backend.infer_outputs = broken
    drop(
        shared_data / "cxr/kermany_pneumonia_224/test/NORMAL/IM-0011-0001.jpeg",
        config.inbox.path,
        "doomed.jpeg",
    )
    error_file = config.inbox.quarantine_path / "doomed.jpeg.error.json"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not error_file.exists():
        time.sleep(0.1)
    error = json.loads(error_file.read_text())
    assert error["code"] == "processing_failed_repeatedly"
    assert "engine down" in error["error"] and error["attempts"] == 3


def test_a_different_image_under_a_known_sop_instance_uid_supersedes_the_first(
    shared_data, tiny_bundle, running, subscriber_factory, tmp_path
):
    """Issue 14, item 1: the second image was inferred, then never published (same message_id)."""
    import numpy as np
    import pydicom

    service, config = running(tiny_bundle)
    sub = subscriber_factory(config.mqtt.results_topic)
    ds = pydicom.dcmread(shared_data / SIIM)
    ds.decompress(generate_instance_uid=False)
    ds.save_as(tmp_path / "first.dcm")
    pixels = ds.pixel_array
    ds.PixelData = (np.iinfo(pixels.dtype).max - pixels).astype(pixels.dtype).tobytes()  # another image
    ds.save_as(tmp_path / "second.dcm")
    drop(tmp_path / "first.dcm", config.inbox.path, "first.dcm")
    (first,) = sub.wait_for(lambda ps: len(ps) >= 1, timeout_s=20)
    drop(tmp_path / "second.dcm", config.inbox.path, "second.dcm")
    results = sub.wait_for(lambda ps: len(ps) >= 2, timeout_s=20)
    second = results[1]
    assert second["input"]["sop_instance_uid"] == first["input"]["sop_instance_uid"]
    assert second["message_id"] != first["message_id"]
    assert second["supersedes"] == first["message_id"] and "supersedes" not in first
    jsonschema.Draft202012Validator(load_schema("result-v1")).validate(second)
    assert service.counters["duplicates"] == 0 and service.counters["processed"] == 2
