"""The DICOM C-STORE receiver, with dcmtk's storescu/echoscu as the real senders.

The service runs with a real Mosquitto (as in test_service_e2e.py); each
object sent must end as exactly one MQTT result, and nothing refused or
aborted may leave a trace in the spool, the quarantine or the results.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from helpers import (
    AE,
    CHEST_UNCOMPRESSED,
    MAX_OBJECT_MB,
    SENDERS,
    dcmtk,
    free_port,
    make_tiny_bundle,
    spool_files,
    storescu,
    wait_for_port,
)
from helpers import scp_service_config as make_config
from pydicom.uid import generate_uid

from edge_runtime.config import RuntimeConfig
from edge_runtime.journal import ReceiptLog
from edge_runtime.service import EdgeService
from edge_runtime.sources.dicom_scp import DicomScpSource

CHEST_J2K_LOSSLESS = "dicom/pydicom_data/RG1_J2KR.dcm"  # CR chest, JPEG 2000 lossless, 4.3 MB
CHEST_J2K_LOSSY = "dicom/wg04/RG1_J2KI"  # CR chest, JPEG 2000, 0.7 MB
CHEST_JLS_NEAR = "dicom/wg04/RG1_JLSN"  # CR chest, JPEG-LS near-lossless, 2.8 MB
CHEST_LARGE = "dicom/pydicom_data/RG1_UNCR.dcm"  # CR chest, Explicit VR LE, 7.2 MB


def new_instance(src: Path, dst: Path) -> tuple[Path, str]:
    """``src`` under a new SOP Instance UID (pixels untouched, still in its transfer syntax)."""
    ds = pydicom.dcmread(src)
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst, uid


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def results_for(sub, uids: set[str]) -> list[dict]:
    return [r for r in sub.results() if r["input"].get("sop_instance_uid") in uids]


def wait_results(sub, uids: set[str], timeout_s: float = 60.0) -> dict[str, dict]:
    """One result per UID (waits, then allows a moment for a duplicate to show)."""
    sub.wait_for(
        lambda ps: (
            {p["input"].get("sop_instance_uid") for p in ps if p.get("message_type") == "result"} >= uids
        ),
        timeout_s=timeout_s,
    )
    time.sleep(0.5)
    got = results_for(sub, uids)
    assert sorted(r["input"]["sop_instance_uid"] for r in got) == sorted(uids), "a duplicate result"
    return {r["input"]["sop_instance_uid"]: r for r in got}


def wait_spool_empty(config: RuntimeConfig, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while spool_files(config) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert spool_files(config) == []


@pytest.fixture(scope="module")
def scp(tmp_path_factory, mosquitto) -> Iterator[tuple[EdgeService, RuntimeConfig]]:
    """One service with the receiver on for the module (each test checks its own objects)."""
    root = tmp_path_factory.mktemp("scp")
    bundle = make_tiny_bundle(root / "bundle")
    # Every sender here is 127.0.0.1: let one address have every association (default: half).
    config = make_config(root, mosquitto, bundle, free_port(), MaxAssociationsPerPeer=4)
    service = EdgeService(config)
    service.start()
    assert service.mqtt is not None and service.mqtt.wait_connected(10)
    wait_for_port(config.dicom.port)
    yield service, config
    service.stop()


def receipts(config: RuntimeConfig) -> list:
    log = ReceiptLog(config.journal.path)
    try:
        return log.recent(1000)
    finally:
        log.close()


def test_echo_answers(scp):
    _service, config = scp
    echo = subprocess.run(
        [dcmtk("echoscu"), "-aet", SENDERS[0], "-aec", AE, "127.0.0.1", str(config.dicom.port)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert echo.returncode == 0, echo.stderr


def test_uncompressed_jpegls_and_jpeg2000_each_get_one_result(scp, shared_data, subscriber_factory, tmp_path):
    service, config = scp
    sub = subscriber_factory(config.mqtt.results_topic)
    # A JPEG-LS lossless chest CR made with dcmtk from the uncompressed one (a new instance).
    jls = tmp_path / "chest_jls.dcm"
    made = subprocess.run(
        [dcmtk("dcmcjpls"), "+el", "+ua", str(shared_data / CHEST_UNCOMPRESSED), str(jls)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    sends = {  # file -> (storescu options, the transfer syntax that must arrive unchanged)
        shared_data / CHEST_UNCOMPRESSED: ((), "1.2.840.10008.1.2.1"),
        jls: (("-xt",), "1.2.840.10008.1.2.4.80"),
        shared_data / CHEST_JLS_NEAR: (("-xu",), "1.2.840.10008.1.2.4.81"),
        shared_data / CHEST_J2K_LOSSLESS: (("-xv",), "1.2.840.10008.1.2.4.90"),
        shared_data / CHEST_J2K_LOSSY: (("-xw",), "1.2.840.10008.1.2.4.91"),
    }
    uids = {}
    for path, (options, syntax) in sends.items():
        sent = storescu(config.dicom.port, path, options=options)
        assert sent.returncode == 0, sent.stderr
        uids[uid_of(path)] = syntax
    got = wait_results(sub, set(uids))
    for uid, syntax in uids.items():
        # Stored as sent: the pipeline decoded the compressed syntax itself.
        assert got[uid]["input"]["transfer_syntax_uid"] == syntax
        assert got[uid]["input"]["modality"] == "CR"
    # Each acknowledged object has its receipt (no patient data), and left the spool once done.
    mine = {r.sop_instance_uid: r for r in receipts(config) if r.sop_instance_uid in uids}
    assert set(mine) == set(uids)
    for uid, receipt in mine.items():
        assert receipt.calling_ae == SENDERS[0] and receipt.peer_address == "127.0.0.1"
        assert receipt.transfer_syntax_uid == uids[uid]
        assert receipt.sha256 == got[uid]["input"]["sha256"]
        assert uid not in receipt.file_name
    wait_spool_empty(config)
    assert list(config.inbox.quarantine_path.iterdir()) == []
    assert service.last_error is None


def test_concurrent_associations(scp, shared_data, subscriber_factory, tmp_path):
    _service, config = scp
    sub = subscriber_factory(config.mqtt.results_topic)
    files = {}
    for i, aet in enumerate(SENDERS):
        path, uid = new_instance(shared_data / CHEST_UNCOMPRESSED, tmp_path / f"c{i}.dcm")
        files[uid] = (path, aet)
    procs = [
        subprocess.Popen(
            [dcmtk("storescu"), "-aet", aet, "-aec", AE, "127.0.0.1", str(config.dicom.port), str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for path, aet in files.values()
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    wait_results(sub, set(files))
    by_uid = {r.sop_instance_uid: r.calling_ae for r in receipts(config)}
    assert {uid: by_uid[uid] for uid in files} == {uid: aet for uid, (_, aet) in files.items()}
    wait_spool_empty(config)


def test_unknown_calling_ae_is_rejected_and_nothing_stored(
    scp, shared_data, subscriber_factory, tmp_path, caplog
):
    _service, config = scp
    sub = subscriber_factory(config.mqtt.results_topic)
    path, uid = new_instance(shared_data / CHEST_UNCOMPRESSED, tmp_path / "intruder.dcm")
    with caplog.at_level(logging.WARNING, logger="edge_runtime.sources.dicom_scp"):
        sent = storescu(config.dicom.port, path, aet="INTRUDER")
    assert sent.returncode != 0
    assert "Association Rejected" in sent.stderr
    # The admin reads who was refused and why.
    warning = next(r for r in caplog.records if "INTRUDER" in r.getMessage())
    assert warning.levelno == logging.WARNING
    assert "127.0.0.1" in warning.getMessage() and "AllowedCallingAeTitles" in warning.getMessage()
    # Called AE title not ours: refused too.
    port = str(config.dicom.port)
    wrong = subprocess.run(
        [dcmtk("storescu"), "-aet", SENDERS[0], "-aec", "SOMEONE", "127.0.0.1", port, str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert wrong.returncode != 0 and "Association Rejected" in wrong.stderr
    assert spool_files(config) == []
    assert uid not in {r.sop_instance_uid for r in receipts(config)}
    time.sleep(0.5)
    assert results_for(sub, {uid}) == []


def test_object_over_the_size_limit_is_refused_and_not_kept(scp, shared_data, subscriber_factory):
    _service, config = scp
    sub = subscriber_factory(config.mqtt.results_topic)
    big = shared_data / CHEST_LARGE
    assert big.stat().st_size > MAX_OBJECT_MB * 1024 * 1024
    sent = storescu(config.dicom.port, big, options=("-v",))
    assert sent.returncode != 0
    assert "Received Store Response (Refused: OutOfResources)" in sent.stderr, sent.stderr
    assert spool_files(config) == []
    assert uid_of(big) not in {r.sop_instance_uid for r in receipts(config)}
    time.sleep(0.5)
    assert results_for(sub, {uid_of(big)}) == []


def _send_and_abort(port: int, path: Path, after_pdus: int = 8) -> int:
    """A pynetdicom SCU that starts sending ``path`` and aborts the association midway.

    After ``after_pdus`` P-DATA PDUs of the data set have gone out, an A-ABORT PDU is
    written straight onto the socket (between two PDUs, from the sending thread, so
    nothing interleaves) and the connection is shut, as a modality that crashes or is
    switched off mid-send would. Returns how many P-DATA PDUs it tried to send.
    """
    from pynetdicom import AE as SCU
    from pynetdicom import evt
    from pynetdicom.pdu import P_DATA_TF

    ds = pydicom.dcmread(path)
    scu = SCU(ae_title=SENDERS[1])
    scu.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    sent = [0]

    def cut(event) -> None:
        if isinstance(event.pdu, P_DATA_TF):
            sent[0] += 1
            if sent[0] == after_pdus:
                raw = event.assoc.dul.socket.socket
                raw.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-ABORT, service user
                raw.shutdown(2)

    assoc = scu.associate("127.0.0.1", port, ae_title=AE, evt_handlers=[(evt.EVT_PDU_SENT, cut)])
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assert not status, "the C-STORE was answered: it was not aborted midway"
    assoc.abort()
    scu.shutdown()
    return sent[0]


def test_association_aborted_mid_transfer_leaves_nothing(scp, shared_data, subscriber_factory, tmp_path):
    service, config = scp
    sub = subscriber_factory(config.mqtt.results_topic)
    path, uid = new_instance(shared_data / CHEST_UNCOMPRESSED, tmp_path / "aborted.dcm")
    # 1 MB in PDUs of at most 16 kB (our maximum, so over 60 of them): cut after 8.
    assert 8 <= _send_and_abort(config.dicom.port, path) < 20
    time.sleep(0.3)
    assert spool_files(config) == []
    assert uid not in {r.sop_instance_uid for r in receipts(config)}
    # Still healthy: the next object goes through.
    nxt, next_uid = new_instance(shared_data / CHEST_UNCOMPRESSED, tmp_path / "next.dcm")
    sent = storescu(config.dicom.port, nxt)
    assert sent.returncode == 0, sent.stderr
    wait_results(sub, {next_uid})
    assert results_for(sub, {uid}) == []
    assert list(config.inbox.quarantine_path.iterdir()) == []
    assert service.last_error is None


def test_addresses_outside_the_allowed_networks_are_rejected(shared_data, tmp_path, mosquitto, caplog):
    """The receiver alone (no pipeline): only the peer-address policy is under test."""
    from edge_runtime.journal import Journal

    port = free_port()
    for allowed, accepted in ((["10.0.0.0/8", "192.168.1.7"], False), (["127.0.0.0/8"], True)):
        root = tmp_path / ("ok" if accepted else "refused")
        config = make_config(
            root,
            mosquitto,
            tmp_path / "unused-bundle",
            port,
            AllowedCallingAeTitles=[],
            AllowedAddresses=allowed,
        )
        journal = Journal(config.journal.path)
        source = DicomScpSource(config)
        found: list = []
        source.start(found.append)
        try:
            with caplog.at_level(logging.WARNING, logger="edge_runtime.sources.dicom_scp"):
                sent = storescu(port, shared_data / CHEST_UNCOMPRESSED, aet="ANYONE")
            assert (sent.returncode == 0) is accepted, sent.stderr
            if not accepted:
                assert any("AllowedAddresses" in r.getMessage() for r in caplog.records)
                assert spool_files(config) == []
            else:
                deadline = time.monotonic() + 5
                while not found and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert [item.source for item in found] == ["dicom"]
                assert [p.suffix for p in spool_files(config)] == [".dcm"]
        finally:
            source.stop()
            journal.close()


def test_associations_over_the_limit_are_refused_as_transient(shared_data, tmp_path, mosquitto, caplog):
    """Dicom.MaxAssociations = 1: while one association is open, a second is refused (and logged).

    The held association comes from 127.0.0.2, another host: a second one from the same host
    would be closed at accept by Dicom.MaxAssociationsPerPeer (test_dicom_scp_hostile.py).
    """
    from pynetdicom import AE as SCU
    from pynetdicom.sop_class import Verification

    from edge_runtime.journal import Journal

    port = free_port()
    config = make_config(tmp_path, mosquitto, tmp_path / "unused-bundle", port, MaxAssociations=1)
    journal = Journal(config.journal.path)
    source = DicomScpSource(config)
    source.start(lambda item: None)
    scu = SCU(ae_title=SENDERS[0])
    scu.add_requested_context(Verification)
    try:
        held = scu.associate("127.0.0.1", port, ae_title=AE, bind_address=("127.0.0.2", 0))
        assert held.is_established
        with caplog.at_level(logging.WARNING, logger="edge_runtime.sources.dicom_scp"):
            second = storescu(port, shared_data / CHEST_UNCOMPRESSED, aet=SENDERS[1])
        assert second.returncode != 0 and "Association Rejected" in second.stderr
        assert any("MaxAssociations = 1" in r.getMessage() for r in caplog.records)
        held.release()
        assert storescu(port, shared_data / CHEST_UNCOMPRESSED, aet=SENDERS[1]).returncode == 0
    finally:
        scu.shutdown()
        source.stop()
        journal.close()


def test_killed_right_after_acknowledging_still_publishes_once(
    shared_data, mosquitto, subscriber_factory, tmp_path
):
    """SIGKILL the service the moment storescu has its success status: the result still comes, once."""
    bundle = make_tiny_bundle(tmp_path / "bundle")
    prefix = f"proc/{tmp_path.name}"
    port = free_port()
    sub = subscriber_factory(f"{prefix}/#")
    env = dict(
        os.environ,
        EDGE_RUNTIME__MODEL__BUNDLE_PATH=str(bundle),
        EDGE_RUNTIME__MQTT__HOST=mosquitto.host,
        EDGE_RUNTIME__MQTT__PORT=str(mosquitto.port),
        EDGE_RUNTIME__MQTT__TOPIC_PREFIX=prefix,
        EDGE_RUNTIME__MQTT__CLIENT_ID=f"edge-{tmp_path.name}",
        EDGE_RUNTIME__DICOM__ENABLED="true",
        EDGE_RUNTIME__DICOM__PORT=str(port),
        EDGE_RUNTIME__DICOM__BIND_ADDRESS="127.0.0.1",
    )
    spool = tmp_path / "state" / "dicom-spool"

    def start() -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_runtime.cli", "run"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for_port(port, timeout_s=60)
        return proc

    big = shared_data / CHEST_LARGE  # 7 MB: decoding it takes far longer than the kill
    uid = uid_of(big)
    proc = start()
    try:
        sent = storescu(port, big, aet="ANY")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, first_log = proc.communicate(timeout=10)
    assert sent.returncode == 0, sent.stderr
    assert [p.suffix for p in spool.iterdir()] == [".dcm"], "acknowledged, so it must be in the spool"
    assert results_for(sub, {uid}) == []
    proc = start()
    try:
        got = wait_results(sub, {uid}, timeout_s=60)
        time.sleep(1.0)  # a second copy would arrive now
        assert len({r["message_id"] for r in results_for(sub, {uid})}) == 1
        assert got[uid]["input"]["transfer_syntax_uid"] == "1.2.840.10008.1.2.1"
        deadline = time.monotonic() + 10
        while any(spool.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(spool.iterdir()) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    # The receiver's log names the object by its reference, never by who is in it.
    assert "DICOM object scan-" in first_log and " stored " in first_log
    header = pydicom.dcmread(big, stop_before_pixels=True)
    for identifier in (str(header.PatientName), str(header.PatientID)):
        assert identifier not in first_log + stderr
    log = ReceiptLog(tmp_path / "state" / "journal.sqlite3")
    assert [r.sop_instance_uid for r in log.recent()] == [uid]
    log.close()


def test_receiver_settings_wait_for_a_restart_but_the_pacs_node_applies_live():
    """The receiver binds its port and policy when it starts; a live update must not pretend otherwise.

    The PACS node's port and AE title apply to the next send; switching the PACS sink on or off
    (its Host) creates or removes a sink, so that waits for a restart too.
    """
    from edge_runtime.live_config import diff_config

    old = RuntimeConfig.from_mapping({"Dicom": {"Enabled": True, "Store": {"Host": "pacs"}}})
    new = RuntimeConfig.from_mapping(
        {
            "Dicom": {
                "Enabled": True,
                "Port": 11113,
                "AllowedAddresses": ["10.0.0.0/8"],
                "Store": {"Host": "pacs", "Port": 11112, "AeTitle": "ARCHIVE"},
            }
        }
    )
    change = diff_config(old, new)
    assert sorted(change.needs_restart) == ["Dicom.AllowedAddresses", "Dicom.Port"]
    assert change.effective.dicom.port == 11112 and change.effective.dicom.allowed_addresses == ()
    assert (change.effective.dicom.store.port, change.effective.dicom.store.ae_title) == (11112, "ARCHIVE")
    moved = diff_config(old, RuntimeConfig.from_mapping({"Dicom": {"Enabled": True, "Store": {"Host": ""}}}))
    assert moved.needs_restart == ["Dicom.Store.Host"] and moved.effective.dicom.store.host == "pacs"
