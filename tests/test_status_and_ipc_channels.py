"""Issue 23's leftovers: the DICOM receiver in status and health, urgent and FHIR over IPC, fixed error texts.

Real parts throughout: the service with its C-STORE receiver and a real Mosquitto,
dcmtk's ``storescu`` as the sender and a socket bound to 127.0.0.2 as a host that
may not send; the fake nucleus that speaks the real event-stream protocol to the
real awsiotsdk client; a real TLS server whose certificate the client must refuse.
"""

from __future__ import annotations

import datetime
import gc
import json
import logging
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from ggipc import FakeNucleus
from helpers import (
    TEST_PUBLIC_KEY,
    TEST_TRUSTED_KEYS,
    Broker,
    Subscriber,
    dcmtk,
    free_port,
    make_tiny_bundle,
    wait_for_port,
)

from edge_runtime.config import RuntimeConfig
from edge_runtime.errors import MQTT_TLS_VERIFY_FAILED, public_text
from edge_runtime.greengrass import GreengrassIpc
from edge_runtime.health import Health
from edge_runtime.results import build_status, load_schema
from edge_runtime.service import EdgeService
from edge_runtime.sinks.mqtt import MqttSink
from edge_runtime.sources.dicom_scp import REFUSAL_REASONS

STATUS_VALIDATOR = jsonschema.Draft202012Validator(load_schema("status-v1"))
RESULT_VALIDATOR = jsonschema.Draft202012Validator(load_schema("result-v1"))
COMPONENT = "com.healthdiag.EdgeInference"
AE = "HEALTHDIAG"
SENDER = "MODALITY1"
LOOPBACK = "127.0.0.1"
CHEST = "dicom/derived/siim_cxr_explicit_le.dcm"  # CR chest, Explicit VR LE, 1 MB
SIIM = "dicom/siim_torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


def _wait(predicate, timeout_s: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"{what} not met within {timeout_s} s")


# -- 1. The DICOM receiver in the status message and the health file ---------------------------


@pytest.fixture()
def receiver(tmp_path: Path, mosquitto: Broker) -> Iterator[tuple[EdgeService, RuntimeConfig]]:
    bundle = make_tiny_bundle(tmp_path / "bundle")
    config = RuntimeConfig.from_mapping(
        {
            "Inbox": {"Path": str(tmp_path / "inbox"), "QuarantinePath": str(tmp_path / "quarantine")},
            "Dicom": {
                "Enabled": True,
                "AeTitle": AE,
                "BindAddress": "127.0.0.1",
                "Port": free_port(),
                "AllowedCallingAeTitles": [SENDER],
                "AllowedAddresses": ["127.0.0.1"],  # 127.0.0.2 stands for a host that may not send
                "SpoolPath": str(tmp_path / "spool"),
            },
            "Model": {"BundlePath": str(bundle), "TrustedKeys": TEST_TRUSTED_KEYS},
            "Mqtt": {
                "Host": mosquitto.host,
                "Port": mosquitto.port,
                "ClientId": f"edge-{tmp_path.name}",
                "TopicPrefix": f"test/{tmp_path.name}",
            },
            "Journal": {"Path": str(tmp_path / "state" / "journal.sqlite3")},
            "Health": {"HeartbeatSeconds": 1, "File": str(tmp_path / "state" / "health.json")},
            "Workers": 1,
        }
    )
    service = EdgeService(config)
    service.start()
    try:
        assert service.mqtt is not None and service.mqtt.wait_connected(10)
        wait_for_port(config.dicom.port)
        yield service, config
    finally:
        service.stop()


def test_status_and_health_file_show_the_dicom_receiver(shared_data: Path, receiver, mosquitto):
    from pynetdicom import AE as ScuAE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    service, config = receiver
    watcher = Subscriber(mosquitto, config.mqtt.status_topic)  # as a hospital system subscribes
    try:
        first = service.health.snapshot()["dicom"]
        assert first == {
            "ae_title": AE,
            "port": config.dicom.port,
            "listening": True,
            "associations_open": 0,
            "refused": dict.fromkeys(REFUSAL_REASONS, 0),
            "objects_received": 0,
            "objects_refused": 0,
        }
        # One object from an allowed sender.
        chest = shared_data / CHEST
        sent = subprocess.run(
            [dcmtk("storescu"), "-aet", SENDER, "-aec", AE, "127.0.0.1", str(config.dicom.port), str(chest)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert sent.returncode == 0, sent.stderr
        # A host not in Dicom.AllowedAddresses: closed at accept, before a byte is read.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as refused:
            refused.bind(("127.0.0.2", 0))
            refused.connect(("127.0.0.1", config.dicom.port))
            refused.settimeout(5)
            assert refused.recv(1) == b""
        # storescu's connection lingers a moment after its release (pynetdicom's threads end): with
        # MaxAssociationsPerPeer = 2 a quick next one could be refused as peer_limit, not for its AE.
        receiver = service.sources["dicom"]
        assert receiver._connections.wait_closed(10) == 0
        # A calling AE title not in Dicom.AllowedCallingAeTitles: A-ASSOCIATE-RJ.
        stranger = ScuAE(ae_title="STRANGER")
        stranger.add_requested_context(Verification)
        assert not stranger.associate("127.0.0.1", config.dicom.port, ae_title=AE).is_established
        assert receiver._connections.wait_closed(10) == 0
        # An association held open shows as open, then as closed once released.
        scu = ScuAE(ae_title=SENDER)
        scu.add_requested_context(Verification)
        held = scu.associate("127.0.0.1", config.dicom.port, ae_title=AE)
        assert held.is_established
        try:
            _wait(lambda: service.health.snapshot()["dicom"]["associations_open"] == 1, what="one open")
        finally:
            held.release()
        _wait(lambda: service.health.snapshot()["dicom"]["associations_open"] == 0, what="none open")

        def settled(dicom: dict | None) -> bool:
            return bool(
                dicom
                and dicom["objects_received"] == 1
                and dicom["refused"]["address_not_allowed"] == 1
                and dicom["refused"]["calling_ae_title"] == 1
                and dicom["associations_open"] == 0
            )

        # The retained MQTT status (every heartbeat), valid against the schema.
        seen = watcher.wait_for(lambda ps: any(settled(p.get("dicom")) for p in ps), timeout_s=15)
        status = next(p for p in reversed(seen) if settled(p.get("dicom")))
        STATUS_VALIDATOR.validate(status)
        assert status["dicom"]["listening"] is True and status["dicom"]["port"] == config.dicom.port
        assert status["dicom"]["ae_title"] == AE and status["dicom"]["objects_refused"] == 0
        assert sum(status["dicom"]["refused"].values()) == 2
        assert "127.0.0.2" not in json.dumps(status) and "STRANGER" not in json.dumps(status)

        # The health file: the same snapshot.
        def health_file() -> dict | None:
            health = json.loads(config.health.file.read_text())
            return health if settled(health.get("dicom")) else None

        health = _wait(health_file, what="health file with counters")
        assert health["dicom"] == status["dicom"]
    finally:
        watcher.close()
    service.stop()
    # A stopped receiver says so in the offline health file.
    offline = json.loads(config.health.file.read_text())
    assert offline["state"] == "offline" and offline["dicom"]["listening"] is False


# -- 2. Urgent results and FHIR reports over Greengrass IPC; fixed texts for rejected updates ---


@pytest.fixture()
def nucleus_service(tmp_path: Path, monkeypatch) -> Iterator[tuple[FakeNucleus, EdgeService]]:
    bundle = make_tiny_bundle(tmp_path / "model-0.0.1")
    configuration = {
        "Inbox": {
            "Path": str(tmp_path / "inbox"),
            "QuarantinePath": str(tmp_path / "q"),
            "SettleSeconds": 0.2,
            "RescanIntervalSeconds": 0.5,
        },
        "Model": {
            "BundlePath": str(bundle),
            "Threshold": 0.0,  # every scan positive, and so urgent (UrgentThreshold: the threshold)
            "TrustedKeys": [TEST_PUBLIC_KEY.read_text()],
        },
        "Mqtt": {"Enabled": False},
        "Journal": {"Path": str(tmp_path / "journal.sqlite3")},
        "Greengrass": {
            "LocalTopic": "healthdiag/edge/results",
            "IotCoreTopic": "healthdiag/edge/cloud/results",
            "IotCorePriorityTopic": "healthdiag/edge/cloud/urgent",
        },
        "Health": {"HeartbeatSeconds": 1, "File": str(tmp_path / "health.json")},
        "accessControl": {"aws.greengrass.ipc.pubsub": {}},
    }
    nucleus = FakeNucleus(component_name=COMPONENT, configuration=configuration).start()
    for key, value in nucleus.env().items():
        monkeypatch.setenv(key, value)
    ipc = GreengrassIpc()
    service = EdgeService(ipc.load_config(), host=ipc)
    service.start()
    try:
        yield nucleus, service
    finally:
        service.stop()
        nucleus.stop()


def _local(nucleus: FakeNucleus, topic: str) -> list[dict]:
    return [
        call["publishMessage"]["jsonMessage"]["message"]
        for call in nucleus.calls_for("PublishToTopic")
        if call["topic"] == topic
    ]


def _iot_core(nucleus: FakeNucleus, topic: str) -> list[dict]:
    calls = nucleus.calls_for("PublishToIoTCore")
    return [json.loads(c["payload"]) for c in calls if c["topicName"] == topic]


def test_urgent_results_and_fhir_reports_go_over_ipc(shared_data: Path, nucleus_service):
    nucleus, service = nucleus_service
    inbox = service.config.inbox.path
    (inbox / "chest.dcm.part").write_bytes((shared_data / SIIM).read_bytes())
    (inbox / "chest.dcm.part").rename(inbox / "chest.dcm")
    (result,) = _wait(lambda: _local(nucleus, "healthdiag/edge/results"), 60, "the result on local pub/sub")
    RESULT_VALIDATOR.validate(result)
    assert result["priority"] == "urgent"
    # Urgent: the same result again on the local priority topic (Greengrass.LocalPriorityTopic).
    (urgent,) = _wait(lambda: _local(nucleus, "healthdiag/edge/results/urgent"), what="local urgent")
    assert urgent == result
    # FHIR: the Bundle written beside the SR, as is (Greengrass.LocalFhirTopic).
    (fhir,) = _wait(lambda: _local(nucleus, "healthdiag/edge/fhir"), what="local FHIR")
    reports = result["reports"]
    on_disk = service.config.reports_path / reports["folder"] / reports["fhir"]
    assert fhir == json.loads(on_disk.read_text(encoding="utf-8"))
    assert fhir["resourceType"] == "Bundle" and fhir["type"] == "transaction"
    # IoT Core: the urgent result again, de-identified like every result sent there; no FHIR.
    (cloud_urgent,) = _wait(lambda: _iot_core(nucleus, "healthdiag/edge/cloud/urgent"), what="cloud urgent")
    (cloud,) = _wait(lambda: _iot_core(nucleus, "healthdiag/edge/cloud/results"), what="IoT Core result")
    assert cloud_urgent == cloud and cloud_urgent["message_id"] == result["message_id"]
    sent_to_cloud = b"\n".join(c["payload"] for c in nucleus.calls_for("PublishToIoTCore")).decode()
    for key in ("sop_instance_uid", "study_instance_uid", "series_instance_uid", "file_name", "sha256"):
        assert str(result["input"][key]) not in sent_to_cloud, f"{key} reached AWS IoT Core"
    assert "Bundle" not in sent_to_cloud
    # Every row delivered, each channel once.
    _wait(lambda: service.journal.counts()["outbox_pending"] == 0, what="outbox drained")
    assert {d.name for d in service.drainers} >= {"ipc-local-urgent", "ipc-local-fhir", "ipc-iotcore-urgent"}
    assert {"ipc-local", "ipc-local-urgent"} <= service.backlogs.primary  # MQTT off: the results channel


def test_a_rejected_update_is_published_as_its_code_and_fixed_text(nucleus_service, tmp_path: Path, caplog):
    nucleus, service = nucleus_service
    caplog.set_level(logging.ERROR, logger="edge_runtime.service")
    # An invalid value: the setting, its value and pydantic's words stay in the log.
    nucleus.set_configuration(COMPONENT, ["Mqtt", "Qos"], 7)
    _wait(lambda: service.last_error, what="the rejection")
    fixed = f"configuration update rejected: config_invalid: {public_text('config_invalid')}"
    assert service.last_error == f"{fixed} (details in the service log)"
    assert "Mqtt.Qos" in caplog.text and "Mqtt.Qos" not in service.last_error
    health = service.health.snapshot()
    assert health["state"] == "degraded" and health["reason"] == service.last_error
    # The retained IoT Core health report carries the same fixed text, not the exception's.
    topic = f"healthdiag/edge/status/{nucleus.thing_name}"
    report = _wait(
        lambda: next((r for r in reversed(_iot_core(nucleus, topic)) if r.get("reason")), None),
        what="the health report",
    )
    STATUS_VALIDATOR.validate(report)
    assert report["reason"] == service.last_error and "Qos" not in json.dumps(report)
    on_disk = json.loads(service.config.health.file.read_text())
    assert "Qos" not in json.dumps(on_disk)
    # A model bundle that does not match its manifest: its code, and the details in the log only.
    tampered = make_tiny_bundle(tmp_path / "tampered", version="0.0.2")
    (tampered / "model.onnx").write_bytes((tampered / "model.onnx").read_bytes() + b"\0")
    nucleus.set_configuration(COMPONENT, ["Mqtt", "Qos"], 1)  # valid again (the running value)
    caplog.clear()
    nucleus.set_configuration(COMPONENT, ["Model", "BundlePath"], str(tampered))
    _wait(lambda: "model_bundle_invalid" in (service.last_error or ""), what="the bundle rejection")
    assert service.last_error == (
        "configuration update rejected: model_bundle_invalid: "
        f"{public_text('model_bundle_invalid')} (details in the service log)"
    )
    assert "does not match its manifest" in caplog.text
    assert str(tmp_path) not in json.dumps(service.health.snapshot())


# -- 3. An MQTT TLS failure: code and fixed text on the wire, OpenSSL's words in the log ---------


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM), made with ``cryptography``."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / f"{name}.crt", folder / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


class _TlsServer:
    """Accepts TCP connections and does a TLS handshake with its (untrusted) certificate."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(cert), str(key))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(2)
            try:
                with self.context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass  # the client refused our certificate, as it should
            finally:
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


# paho-mqtt 2.2 leaves the SSLSocket of a failed handshake to the garbage collector (see
# test_mqtt_security.py); gc.collect() below keeps that report inside this test.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <ssl.SSLSocket:pytest.PytestUnraisableExceptionWarning"
)
def test_a_tls_failure_reaches_status_health_and_cloud_as_code_and_fixed_text(
    tmp_path: Path, monkeypatch, caplog
):
    broker_cert, broker_key = _self_signed(tmp_path, "broker")
    other_ca, _ = _self_signed(tmp_path, "other-ca")  # did not sign the broker's certificate
    server = _TlsServer(broker_cert, broker_key)
    nucleus = FakeNucleus(component_name=COMPONENT, configuration={"accessControl": {}}).start()
    for key, value in nucleus.env().items():
        monkeypatch.setenv(key, value)
    config = RuntimeConfig.from_mapping(
        {
            "Mqtt": {
                "Host": "127.0.0.1",
                "Port": server.port,
                "ClientId": f"tls-{tmp_path.name}",
                "Tls": {"Enabled": True, "CaFile": str(other_ca)},
            },
            "Health": {"HeartbeatSeconds": 1, "File": str(tmp_path / "health.json")},
        }
    )
    sink = MqttSink(config.mqtt)
    ipc = GreengrassIpc()
    try:
        with caplog.at_level(logging.ERROR, logger="edge_runtime.sinks.mqtt"):
            sink.start()
            assert not sink.wait_connected(1)
        assert sink.problem_code == MQTT_TLS_VERIFY_FAILED
        health = Health(
            lambda: config,
            outbox_pending=lambda: 0,
            queued=lambda: 0,
            model=lambda: {"name": "pneumonia-cxr", "version": "0.0.1"},
            mqtt=sink,
            ipc=ipc,
        )
        snapshot = health.snapshot()
        fixed = f"MQTT: {MQTT_TLS_VERIFY_FAILED}: {public_text(MQTT_TLS_VERIFY_FAILED)}"
        assert snapshot["state"] == "degraded"
        assert snapshot["reason"].startswith(fixed) and snapshot["last_error"].startswith(fixed)
        # The status message (what the retained topic carries once connected), the health file and
        # the IoT Core health report: the code and its fixed text, never OpenSSL's words.
        status = build_status(
            snapshot["state"],
            config.mqtt.client_id,
            reason=snapshot["reason"],
            counters=snapshot["counters"],
            last_error=snapshot["last_error"],
        )
        STATUS_VALIDATOR.validate(status)
        health.write_file(snapshot)
        health.report_to_cloud(snapshot)
        (report,) = _wait(
            lambda: _iot_core(nucleus, f"healthdiag/edge/status/{nucleus.thing_name}"), what="health report"
        )
        STATUS_VALIDATOR.validate(report)
        assert report["reason"] == snapshot["reason"]
        wire = json.dumps([status, report, json.loads(config.health.file.read_text())])
        assert "certificate verify failed" not in wire and "self-signed" not in wire
        assert str(other_ca) not in wire and "127.0.0.1" not in wire
        # The log has what happened, in OpenSSL's words, for the admin.
        assert "TLS verification of the MQTT broker 127.0.0.1" in caplog.text
        assert "certificate" in caplog.text
    finally:
        sink.stop(timeout_s=1)
        ipc.close()
        nucleus.stop()
        server.close()
        gc.collect()
