"""The runtime under a (fake) Greengrass nucleus, through the real awsiotsdk IPC client.

The configuration comes from GetConfiguration; config-only deployments arrive as
SubscribeToConfigurationUpdate events and are applied live or rejected; results
go to local pub/sub and, de-identified, to IoT Core; the component reports RUNNING.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jsonschema
import pytest
from ggipc import FakeNucleus
from helpers import TEST_PUBLIC_KEY, make_tiny_bundle, tamper_like_the_probe

from edge_runtime.greengrass import GreengrassIpc
from edge_runtime.results import load_schema
from edge_runtime.service import EdgeService

COMPONENT = "com.healthdiag.EdgeInference"
SIIM = "dicom/siim_torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
RESULT_VALIDATOR = jsonschema.Draft202012Validator(load_schema("result-v1"))
STATUS_VALIDATOR = jsonschema.Draft202012Validator(load_schema("status-v1"))


def component_configuration(tmp_path: Path, bundle: Path) -> dict:
    """What the nucleus holds: the recipe's DefaultConfiguration shape, with test paths."""
    return {
        "Inbox": {
            "Path": str(tmp_path / "inbox"),
            "QuarantinePath": str(tmp_path / "q"),
            "ProcessedPath": "",
            "SettleSeconds": 0.2,
            "RescanIntervalSeconds": 0.5,
        },
        "Model": {
            "BundlePath": str(bundle),
            "Backend": "onnxruntime",
            "Threshold": "",
            # A Greengrass configuration carries the key's PEM text: it cannot ship files.
            "TrustedKeys": [TEST_PUBLIC_KEY.read_text()],
            "RequireSignature": True,
        },
        "Mqtt": {"Enabled": False},
        "Journal": {"Path": str(tmp_path / "journal.sqlite3")},
        "Greengrass": {
            "LocalTopic": "healthdiag/edge/results",
            "IotCoreTopic": "healthdiag/edge/cloud/results",
        },
        "Health": {"HeartbeatSeconds": 1, "File": str(tmp_path / "health.json")},
        "accessControl": {"aws.greengrass.ipc.pubsub": {}},
    }


@pytest.fixture()
def nucleus_service(tmp_path: Path, monkeypatch):
    bundle = make_tiny_bundle(tmp_path / "model-0.0.1")
    nucleus = FakeNucleus(
        component_name=COMPONENT, configuration=component_configuration(tmp_path, bundle)
    ).start()
    for key, value in nucleus.env().items():
        monkeypatch.setenv(key, value)
    ipc = GreengrassIpc()
    service = EdgeService(ipc.load_config(), host=ipc)
    service.start()
    yield nucleus, service
    service.stop()
    nucleus.stop()


def drop(src: Path, inbox: Path, name: str) -> None:
    part = inbox / f"{name}.part"
    part.write_bytes(src.read_bytes())
    part.rename(inbox / name)


def local_results(nucleus: FakeNucleus, topic: str = "healthdiag/edge/results") -> list[dict]:
    """What reached local pub/sub on ``topic`` (urgent results and FHIR reports have topics of their own)."""
    calls = nucleus.calls_for("PublishToTopic")
    return [call["publishMessage"]["jsonMessage"]["message"] for call in calls if call["topic"] == topic]


def wait_results(nucleus: FakeNucleus, n: int, timeout: float = 20.0) -> list[dict]:
    nucleus.wait_until(lambda: len(local_results(nucleus)) >= n, timeout=timeout)
    return local_results(nucleus)


def test_reports_running_and_publishes_to_local_pubsub_and_deidentified_to_iot_core(
    shared_data: Path, nucleus_service
):
    nucleus, service = nucleus_service
    nucleus.wait_for_call("UpdateState", lambda r: r["state"] == "RUNNING")
    assert service.config.inbox.path.name == "inbox"  # from GetConfiguration, not defaults
    drop(shared_data / SIIM, service.config.inbox.path, "chest.dcm")
    (result,) = wait_results(nucleus, 1)
    RESULT_VALIDATOR.validate(result)
    assert result["input"]["sop_instance_uid"].startswith("1.2.276")

    def result_calls() -> list[dict]:
        return [
            c
            for c in nucleus.calls_for("PublishToIoTCore")
            if c["topicName"] == "healthdiag/edge/cloud/results"
        ]

    nucleus.wait_until(lambda: len(result_calls()) >= 1)
    (cloud_call,) = result_calls()
    assert cloud_call["qos"] == "1"
    cloud = json.loads(cloud_call["payload"])
    text = json.dumps(cloud)
    assert set(cloud["input"]) <= {
        "kind",
        "decoder",
        "modality",
        "body_part_examined",
        "view_position",
        "rows",
        "columns",
        "bits_stored",
        "photometric_interpretation",
    }
    for key in ("sop_instance_uid", "study_instance_uid", "series_instance_uid", "file_name", "sha256"):
        assert str(result["input"][key]) not in text, f"input {key} leaked to the cloud"
    assert "host" not in cloud["runtime"]
    assert cloud["message_id"] == result["message_id"]
    assert cloud["findings"] == result["findings"]
    assert cloud["input"]["modality"] == "CR"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and service.journal.counts()["outbox_pending"]:
        time.sleep(0.05)
    assert service.journal.counts()["outbox_pending"] == 0


def test_threshold_update_applies_live_and_invalid_update_is_rejected(
    shared_data: Path, nucleus_service, caplog
):
    nucleus, service = nucleus_service
    inbox = service.config.inbox.path
    jpeg = shared_data / "cxr/kermany_pneumonia_224/test/NORMAL/IM-0001-0001.jpeg"
    drop(jpeg, inbox, "before.jpeg")
    (before,) = wait_results(nucleus, 1)
    assert before["findings"][0]["threshold"] == 0.5
    nucleus.set_configuration(COMPONENT, ["Model", "Threshold"], 0.0)
    nucleus.wait_until(lambda: service.config.model.threshold == 0.0)
    drop(shared_data / "cxr/kermany_pneumonia_224/test/NORMAL/IM-0003-0001.jpeg", inbox, "after.jpeg")
    after = wait_results(nucleus, 2)[1]
    assert after["findings"][0]["threshold"] == 0.0 and after["decision"]["positive"] is True
    # An invalid value is rejected; the running configuration stays. The status says so by code
    # and fixed text; the log names the setting.
    caplog.set_level(logging.ERROR, logger="edge_runtime.service")
    nucleus.set_configuration(COMPONENT, ["Mqtt", "Qos"], 7)
    nucleus.wait_until(lambda: "rejected" in (service.last_error or ""))
    assert service.config.mqtt.qos == 1 and service.config.model.threshold == 0.0
    health = service.health.snapshot()
    assert health["state"] == "degraded" and "config_invalid" in health["reason"]
    assert "Mqtt.Qos" in caplog.text and "Mqtt.Qos" not in health["reason"]


def test_model_hot_swap_rejects_a_bad_bundle_and_takes_a_good_one(
    shared_data: Path, nucleus_service, tmp_path: Path, caplog
):
    # Each refusal: the status' last_error names the code (its fixed text, nothing from the bundle);
    # the log says what the check found.
    caplog.set_level(logging.ERROR, logger="edge_runtime.service")

    def refused(code: str, found: str) -> None:
        nucleus.wait_until(lambda: found in caplog.text)
        assert service.last_error is not None
        assert service.last_error.startswith(f"configuration update rejected: {code}: ")
        assert found not in service.last_error and str(tmp_path) not in service.last_error
        assert "model bundle rejected" in caplog.text
        caplog.clear()

    nucleus, service = nucleus_service
    inbox = service.config.inbox.path
    tampered = make_tiny_bundle(tmp_path / "tampered", version="0.0.2")
    (tampered / "model.onnx").write_bytes((tampered / "model.onnx").read_bytes() + b"\0")
    nucleus.set_configuration(COMPONENT, ["Model", "BundlePath"], str(tampered))
    refused("model_bundle_invalid", "does not match its manifest")
    # Issue 14's probe: a model byte flipped, its hash rewritten, threshold 0 (every scan
    # positive). The hashes agree; the signature does not: refused before anything runs.
    probed = make_tiny_bundle(tmp_path / "probed", version="0.0.4")
    tamper_like_the_probe(probed)
    nucleus.set_configuration(COMPONENT, ["Model", "BundlePath"], str(probed))
    refused("model_bundle_invalid", "altered after signing")
    assert service.analyzer.bundle.version == "0.0.1" and service.analyzer.threshold == 0.5
    # Intact files, but this CPU does not reproduce the bundle's reference answers: refused alike.
    drifted = make_tiny_bundle(tmp_path / "drifted", version="0.0.3", conformance=True, drift=0.3)
    nucleus.set_configuration(COMPONENT, ["Model", "BundlePath"], str(drifted))
    nucleus.wait_until(lambda: "conformance check FAILED" in caplog.text)
    assert "INT8 features" in caplog.text
    refused("model_conformance_failed", "conformance check FAILED")
    drop(shared_data / "cxr/kermany_pneumonia_224/test/NORMAL/IM-0005-0001.jpeg", inbox, "during.jpeg")
    assert wait_results(nucleus, 1)[0]["model"]["version"] == "0.0.1"  # old model kept
    good = make_tiny_bundle(tmp_path / "good", version="0.0.2")
    nucleus.set_configuration(COMPONENT, ["Model", "BundlePath"], str(good))
    nucleus.wait_until(lambda: service.analyzer.bundle.version == "0.0.2")
    drop(shared_data / "cxr/kermany_pneumonia_224/test/NORMAL/IM-0006-0001.jpeg", inbox, "swapped.jpeg")
    assert wait_results(nucleus, 2)[1]["model"]["version"] == "0.0.2"
    assert service.last_error is None


def test_health_report_is_retained_in_iot_core_per_thing_and_sent_on_change(nucleus_service, tmp_path: Path):
    """What the release pipeline's canary check reads: model version, conformance, counters.

    Sent when what it says changes and every Greengrass.StatusEverySeconds (600 s by default),
    not every heartbeat (1 s here): each report is a metered IoT Core message.
    """
    nucleus, service = nucleus_service
    topic = "healthdiag/edge/status/edge-device-1"  # <StatusTopic>/<AWS_IOT_THING_NAME>

    def reports() -> list[dict]:
        return [c for c in nucleus.calls_for("PublishToIoTCore") if c["topicName"] == topic]

    nucleus.wait_until(lambda: len(reports()) >= 1)
    call = reports()[-1]
    assert call["retain"] is True and call["qos"] == "1"
    report = json.loads(call["payload"])
    STATUS_VALIDATOR.validate(report)
    assert report["client_id"] == "edge-device-1" and report["state"] == "online"
    assert report["model"]["version"] == service.analyzer.bundle.version
    assert {"received", "processed", "quarantined"} <= set(report["counters"])
    text = json.dumps(report)
    assert str(tmp_path) not in text and "inbox" not in text  # no paths, no file names
    time.sleep(3.5)  # three heartbeats, nothing changed: no new report
    assert len(reports()) == 1
    # A quarantined scan changes what the report says: sent at the next heartbeat.
    (tmp_path / "inbox" / "broken.png").write_bytes(b"not a png at all")
    nucleus.wait_until(lambda: len(reports()) >= 2)
    changed = json.loads(reports()[-1]["payload"])
    assert changed["counters"]["quarantined"] == report["counters"]["quarantined"] + 1


def test_access_denied_by_the_nucleus_is_named_and_the_result_kept(
    shared_data: Path, nucleus_service, tmp_path: Path
):
    """An UnauthorizedError used to be retried silently for ever; now the status says what to fix."""
    nucleus, service = nucleus_service
    nucleus.inject_error(
        "PublishToIoTCore", "UnauthorizedError", "not authorized to publish to this topic", times=5
    )  # five: the heartbeat's health report (also PublishToIoTCore) may take some
    drop(
        shared_data / "cxr/kermany_pneumonia_224/test/NORMAL/IM-0001-0001.jpeg",
        service.config.inbox.path,
        "a.jpeg",
    )
    nucleus.wait_until(lambda: "ipc-iotcore delivery failing" in (service.last_error or ""), timeout=20)
    assert "UnauthorizedError" in service.last_error
    assert "retrying; results kept" in service.last_error
    # Retried with back-off; once the policy allows it, the result goes out, exactly once.
    nucleus.wait_until(lambda: len(nucleus.calls_for("PublishToIoTCore")) >= 3, timeout=20)
    nucleus.wait_until(lambda: service.journal.counts()["outbox_pending"] == 0, timeout=20)
    # The result was refused at least once, then sent again, and its outbox row is delivered.
    results = [c for c in nucleus.calls_for("PublishToIoTCore") if "results" in c["topicName"]]
    assert len(results) >= 2


def test_no_patient_identifier_reaches_the_nucleus(shared_data: Path, nucleus_service, tmp_path: Path):
    """Local pub/sub, IoT Core results and the retained IoT Core health report, searched for them."""
    import pydicom

    nucleus, service = nucleus_service
    ds = pydicom.dcmread(shared_data / SIIM)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "DOE^JOHN", "MRN123456", "19700101"
    ds.save_as(tmp_path / "patient.dcm")
    drop(tmp_path / "patient.dcm", service.config.inbox.path, "DOE_JOHN_MRN123456_19700101.dcm")
    wait_results(nucleus, 1)
    nucleus.wait_until(lambda: len(nucleus.calls_for("PublishToIoTCore")) >= 2, timeout=20)
    sent = json.dumps(
        [call for op in ("PublishToTopic", "PublishToIoTCore") for call in nucleus.calls_for(op)], default=str
    )
    for identifier in ("DOE", "JOHN", "MRN123456", "19700101"):
        assert identifier not in sent, f"{identifier} reached the Greengrass nucleus"
