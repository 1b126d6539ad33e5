"""The DICOM receiver against a hostile network (issue #23 item 1): no peer can hold it.

Real sockets throughout. 127.0.0.2 (and .3, .4) stand for other hosts: the client
socket is bound to that address before it connects, so the receiver sees it as the
peer. dcmtk's storescu from 127.0.0.1 is the site's modality, which must still get
through while the others misbehave. Timeouts are set small so each test stays short.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from helpers import (
    AE,
    CHEST_UNCOMPRESSED,
    SENDERS,
    free_port,
    make_tiny_bundle,
    spool_files,
    storescu,
    wait_for_port,
)
from helpers import scp_service_config as make_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from edge_runtime.config import RuntimeConfig
from edge_runtime.errors import ConfigError
from edge_runtime.journal import Journal
from edge_runtime.sources.dicom_scp import DicomScpSource

LOGGER = "edge_runtime.sources.dicom_scp"
#: make_config wants a broker; the receiver alone never connects to it.
NO_BROKER = SimpleNamespace(host="127.0.0.1", port=1)
#: The first 6 bytes of an A-ASSOCIATE-RQ PDU: type 01, length 205 (the rest never comes whole).
ASSOCIATE_RQ_START = b"\x01\x00\x00\x00\x00\xcd"
#: A P-DATA-TF PDU header announcing 100 bytes.
P_DATA_START = b"\x04\x00\x00\x00\x00\x64"


@contextmanager
def receiver(tmp_path: Path, **dicom) -> Iterator[tuple[DicomScpSource, RuntimeConfig]]:
    """The receiver alone (no pipeline) in this process, as test_dicom_scp.py starts it."""
    settings = {"ReadTimeoutSeconds": 2, "IdleTimeoutSeconds": 3, **dicom}
    config = make_config(tmp_path, NO_BROKER, tmp_path / "unused-bundle", free_port(), **settings)
    journal = Journal(config.journal.path)
    source = DicomScpSource(config)
    source.start(lambda item: None)
    try:
        yield source, config
    finally:
        source.stop()
        journal.close()


_opened: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_client_sockets() -> Iterator[None]:
    yield
    while _opened:
        _opened.pop().close()


def connect_from(host: str, port: int) -> socket.socket:
    """A TCP connection to the receiver whose source address is ``host`` (another "host")."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    _opened.append(sock)  # closed after the test
    sock.bind((host, 0))
    sock.connect(("127.0.0.1", port))
    return sock


class Trickler(threading.Thread):
    """Sends ``first``, then one byte every ``every_s`` for as long as the connection lasts."""

    def __init__(self, sock: socket.socket, first: bytes = ASSOCIATE_RQ_START, every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.sock, self.first, self.every_s = sock, first, every_s
        self.bytes_sent = 0
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            self.sock.sendall(self.first)
            while not self.halt.wait(self.every_s):
                self.sock.sendall(b"\x00")
                self.bytes_sent += 1
        except OSError:
            pass


def closed_within(sock: socket.socket, timeout_s: float) -> float | None:
    """Seconds until the receiver closed ``sock`` (end-of-file or reset), None if still open then."""
    start = time.monotonic()
    deadline = start + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(4096):  # what the receiver sent before closing (an A-ABORT) is read past
                return time.monotonic() - start
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
        except TimeoutError:
            return None
    return None


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


def test_a_foreign_host_is_refused_at_accept_and_holds_no_slot(shared_data, tmp_path, caplog):
    """The reported attack: 4 connections from a host not allowed, trickling an A-ASSOCIATE-RQ.

    Before: they held all Dicom.MaxAssociations slots for as long as they trickled, and nothing
    named them. Now each is closed at accept, before a byte is read, with one WARNING naming
    the address; the modality sends meanwhile.
    """
    with (
        caplog.at_level(logging.WARNING, logger=LOGGER),
        receiver(tmp_path, AllowedAddresses=["127.0.0.1"]) as (source, _config),
    ):
        attackers = [Trickler(connect_from("127.0.0.2", source.port)) for _ in range(4)]
        for attacker in attackers:
            attacker.start()
        for attacker in attackers:
            assert closed_within(attacker.sock, 2.0) is not None, "a refused host's connection stayed open"
        sent = storescu(source.port, shared_data / CHEST_UNCOMPRESSED)
        assert sent.returncode == 0, sent.stderr
        for attacker in attackers:
            attacker.halt.set()
    refused = events(caplog, "dicom_connection_refused")
    assert len(refused) == 4, "one line per refused connection"
    for record in refused:
        assert record.levelno == logging.WARNING
        assert record.fields == {"peer": "127.0.0.2", "reason": "address_not_allowed"}
        assert "127.0.0.2" in record.getMessage() and "Dicom.AllowedAddresses" in record.getMessage()


def test_a_pdu_must_arrive_whole_within_the_read_timeout_however_it_trickles(shared_data, tmp_path, caplog):
    """An allowed host trickling requests holds a slot for ReadTimeoutSeconds at most, not for ever.

    Both slots (MaxAssociations = 2) are taken by connections sending one byte every 0.5 s;
    a byte arriving does not extend the 2 s deadline. A connection that sends nothing is
    closed as soon (pynetdicom's ARTIM timer, set to the same limit), and one announcing a
    4 GB PDU at once, before its body is read.
    """
    with (
        caplog.at_level(logging.WARNING, logger=LOGGER),
        receiver(
            tmp_path,
            AllowedAddresses=["127.0.0.0/8"],
            MaxAssociations=2,
            MaxAssociationsPerPeer=2,
            ReadTimeoutSeconds=2,
        ) as (source, _config),
    ):
        tricklers = [Trickler(connect_from("127.0.0.2", source.port)) for _ in range(2)]
        started = time.monotonic()
        for trickler in tricklers:
            trickler.start()
        silent = connect_from("127.0.0.3", source.port)
        huge = connect_from("127.0.0.4", source.port)
        huge.sendall(b"\x01\x00\xff\xff\xff\xf0")
        assert (took := closed_within(huge, 1.0)) is not None and took < 1.0
        for trickler in tricklers:
            assert closed_within(trickler.sock, 5.0) is not None, "a trickler outlived the deadline"
            assert 1.5 < time.monotonic() - started < 4.0
            assert trickler.bytes_sent >= 2  # it was still sending when it was cut
        assert closed_within(silent, 3.0) is not None
        sent = storescu(source.port, shared_data / CHEST_UNCOMPRESSED)
        assert sent.returncode == 0, sent.stderr
    dropped = events(caplog, "dicom_connection_dropped")
    reasons = sorted((r.fields["peer"], r.fields["reason"]) for r in dropped)
    assert reasons == [
        ("127.0.0.2", "read_timeout"),
        ("127.0.0.2", "read_timeout"),
        ("127.0.0.4", "pdu_too_long"),
    ]


def _associate_from(host: str, port: int):
    """A pynetdicom SCU association (Verification) from ``host``."""
    from pynetdicom import AE as SCU
    from pynetdicom.sop_class import Verification

    scu = SCU(ae_title=SENDERS[0])
    scu.add_requested_context(Verification)
    assoc = scu.associate("127.0.0.1", port, ae_title=AE, bind_address=(host, 0))
    assert assoc.is_established
    return scu, assoc


def _wait_ended(assoc, timeout_s: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if not assoc.is_established:
            return time.monotonic() - start
        time.sleep(0.02)
    return None


def test_an_association_is_cut_mid_pdu_and_when_idle(tmp_path):
    """Once associated: a trickled P-DATA is cut at ReadTimeoutSeconds; no traffic, at IdleTimeoutSeconds."""
    with receiver(
        tmp_path, AllowedAddresses=["127.0.0.0/8"], ReadTimeoutSeconds=1.5, IdleTimeoutSeconds=2.5
    ) as (source, _config):
        trickling_scu, trickling = _associate_from("127.0.0.2", source.port)
        idle_scu, idle = _associate_from("127.0.0.3", source.port)
        # The SCUs' own sockets: once the receiver cuts them, pynetdicom may drop them unclosed.
        raw = [trickling.dul.socket.socket, idle.dul.socket.socket]
        trickler = Trickler(raw[0], first=P_DATA_START, every_s=0.3)
        try:
            started = time.monotonic()
            trickler.start()
            cut = _wait_ended(trickling, 5.0)
            assert cut is not None and 1.0 < cut < 3.5, cut
            assert trickler.bytes_sent >= 3
            ended = _wait_ended(idle, 6.0)
            assert ended is not None, "an idle association outlived Dicom.IdleTimeoutSeconds"
            assert time.monotonic() - started > 2.0
            assert idle.is_aborted
        finally:
            trickler.halt.set()
            trickling_scu.shutdown()
            idle_scu.shutdown()
            trickler.join(timeout=2)
            for sock in raw:
                if sock is not None:
                    sock.close()


def test_one_host_cannot_take_every_slot(shared_data, tmp_path, caplog):
    """MaxAssociations = 4, so 2 per peer by default: a third connection from one host is closed at accept."""
    assert RuntimeConfig().dicom.associations_per_peer == 2
    with (
        caplog.at_level(logging.WARNING, logger=LOGGER),
        receiver(tmp_path, AllowedAddresses=["127.0.0.0/8"], ReadTimeoutSeconds=10) as (source, _config),
    ):
        held = [connect_from("127.0.0.2", source.port) for _ in range(2)]
        third = connect_from("127.0.0.2", source.port)
        assert closed_within(third, 1.0) is not None
        for sock in held:
            assert closed_within(sock, 0.3) is None, "a connection within the per-peer limit was closed"
        # Another host still gets through (the two held ones are short of MaxAssociations).
        sent = storescu(source.port, shared_data / CHEST_UNCOMPRESSED)
        assert sent.returncode == 0, sent.stderr
        # A closed connection frees its place at once (not after the ACSE timeout).
        for sock in held:
            sock.close()
        time.sleep(0.3)
        again = [connect_from("127.0.0.2", source.port) for _ in range(2)]
        for sock in again:
            assert closed_within(sock, 0.3) is None
            sock.close()
    refused = events(caplog, "dicom_connection_refused")
    assert [r.fields for r in refused] == [{"peer": "127.0.0.2", "reason": "peer_limit"}]
    assert "Dicom.MaxAssociationsPerPeer = 2" in refused[0].getMessage()


def test_a_port_probe_frees_its_slot_at_once(shared_data, tmp_path):
    """A connection opened and closed without a byte (a port probe, a load balancer's health check)
    held its slot for the whole ACSE timeout (30 s): two probes, and the site's modality, limited to
    2 connections per address, was refused as peer_limit. Found by a status test that probed the
    port before sending."""
    with receiver(tmp_path, ReadTimeoutSeconds=30, IdleTimeoutSeconds=30) as (source, _config):
        for _ in range(3):  # a health checker's probes, a moment apart
            with socket.create_connection(("127.0.0.1", source.port), timeout=2):
                pass  # connect, close
            time.sleep(0.3)
            assert source._connections.wait_closed(0) == 0, "a closed probe still counts as open"
        sent = storescu(source.port, shared_data / CHEST_UNCOMPRESSED)
        assert sent.returncode == 0, sent.stderr
        assert source.state()["refused"]["peer_limit"] == 0


def test_per_peer_limit_is_validated():
    assert RuntimeConfig.from_mapping({"Dicom": {"MaxAssociations": 1}}).dicom.associations_per_peer == 1
    assert RuntimeConfig.from_mapping({"Dicom": {"MaxAssociations": 9}}).dicom.associations_per_peer == 4
    with pytest.raises(ConfigError, match="MaxAssociationsPerPeer"):
        RuntimeConfig.from_mapping({"Dicom": {"MaxAssociations": 2, "MaxAssociationsPerPeer": 3}})


def test_stop_aborts_open_associations_without_waiting_for_peers(tmp_path):
    """Trickling and idle peers (long timeouts) cannot delay a stop: each is aborted at once."""
    with receiver(
        tmp_path, AllowedAddresses=["127.0.0.0/8"], ReadTimeoutSeconds=60, IdleTimeoutSeconds=120
    ) as (source, _config):
        tricklers = [Trickler(connect_from("127.0.0.2", source.port)) for _ in range(2)]
        for trickler in tricklers:
            trickler.start()
        scu, assoc = _associate_from("127.0.0.3", source.port)
        try:
            time.sleep(0.6)  # the tricklers are mid-PDU
            started = time.monotonic()
            source.stop()
            assert time.monotonic() - started < 2.0  # accept loop (0.2 s) + threads (0.5 s at most)
            for trickler in tricklers:
                assert closed_within(trickler.sock, 1.0) is not None
            assert _wait_ended(assoc, 2.0) is not None
            assert assoc.is_aborted  # an A-ABORT, not just a dropped connection
        finally:
            scu.shutdown()
    # pynetdicom's reader threads are daemons: the process can exit whatever a peer does.
    readers = [t for t in threading.enumerate() if type(t).__name__ == "DULServiceProvider"]
    assert all(t.daemon for t in readers if t.is_alive() and "Requestor" not in t.name)


def test_sigterm_stops_the_service_while_a_peer_trickles(mosquitto, tmp_path):
    """The service under SIGTERM (as Greengrass stops it) exits in time with a peer mid-PDU."""
    bundle = make_tiny_bundle(tmp_path / "bundle")
    port = free_port()
    env = dict(
        os.environ,
        EDGE_RUNTIME__MODEL__BUNDLE_PATH=str(bundle),
        EDGE_RUNTIME__MQTT__HOST=mosquitto.host,
        EDGE_RUNTIME__MQTT__PORT=str(mosquitto.port),
        EDGE_RUNTIME__MQTT__TOPIC_PREFIX=f"proc/{tmp_path.name}",
        EDGE_RUNTIME__MQTT__CLIENT_ID=f"edge-{tmp_path.name}",
        EDGE_RUNTIME__DICOM__ENABLED="true",
        EDGE_RUNTIME__DICOM__PORT=str(port),
        EDGE_RUNTIME__DICOM__BIND_ADDRESS="127.0.0.1",
        EDGE_RUNTIME__DICOM__READ_TIMEOUT_SECONDS="60",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_runtime.cli", "run"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(port, timeout_s=30)
        tricklers = [Trickler(connect_from("127.0.0.2", port)) for _ in range(2)]
        for trickler in tricklers:
            trickler.start()
        time.sleep(0.6)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
    assert took < 6.0, f"SIGTERM took {took:.1f} s with a peer trickling"
    print(f"SIGTERM to exit with 2 peers trickling: {took:.1f} s")
    for trickler in tricklers:
        assert closed_within(trickler.sock, 1.0) is not None


# -- an object far over Dicom.MaxObjectMb -------------------------------------------------------
RECEIVER_PROCESS = """
import json, logging, sys
from edge_runtime.config import RuntimeConfig
from edge_runtime.journal import Journal
from edge_runtime.sources.dicom_scp import DicomScpSource

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
config = RuntimeConfig.from_mapping(json.loads(sys.argv[1]))
journal = Journal(config.journal.path)
source = DicomScpSource(config)
source.start(lambda item: None)
print(source.port, flush=True)
sys.stdin.read()  # until the test closes it
source.stop()
journal.close()
"""


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the most memory the process has held resident, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def make_big_dicom(path: Path, pixel_mb: int) -> Path:
    """A secondary-capture-like CR object with ``pixel_mb`` MB of (zero) 16-bit pixels."""
    side = int((pixel_mb * 1024 * 1024 / 2) ** 0.5)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CR"
    ds.PatientName, ds.PatientID = "Hostile^Test", "HOSTILE-1"
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.zeros((side, side), dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_an_object_over_the_limit_is_refused_and_one_far_over_is_cut_without_being_held(tmp_path):
    """Dicom.MaxObjectMb = 16: 24 MB is refused (0xA700); 200 MB is cut (A-ABORT) once past 32 MB.

    Before, the whole object was in memory before its size was checked (an 800 MB object took
    the service from 197 MB to 982 MB resident); then, a peer streaming without end was counted
    but never cut. The receiver runs in its own process so that its peak (VmHWM) is its own.
    """
    over = make_big_dicom(tmp_path / "over.dcm", 24)
    big = make_big_dicom(tmp_path / "big.dcm", 200)
    assert big.stat().st_size > 200 * 1024 * 1024
    config = make_config(tmp_path, NO_BROKER, tmp_path / "unused-bundle", free_port(), MaxObjectMb=16)
    proc = subprocess.Popen(
        [sys.executable, "-c", RECEIVER_PROCESS, json.dumps(config.to_pascal_dict(), default=str)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(proc.stdout.readline())
        # Warm up (pynetdicom's lazy imports, first association) before taking the baseline.
        assert storescu(port, make_big_dicom(tmp_path / "small.dcm", 1)).returncode == 0
        before = peak_rss_mb(proc.pid)
        refused = storescu(port, over, options=("-v",))
        started = time.monotonic()
        cut = storescu(port, big, options=("-v",))
        took = time.monotonic() - started
        after = peak_rss_mb(proc.pid)
    finally:
        _, stderr = proc.communicate(input="", timeout=30)  # closing stdin stops the receiver
    # Slightly over: the sender finishes, hears OutOfResources, and the association ends normally.
    assert refused.returncode != 0
    assert "Received Store Response (Refused: OutOfResources)" in refused.stderr, refused.stderr
    assert "Releasing Association" in refused.stderr, refused.stderr
    # Far over: no store response at all; the association is aborted under the sender.
    assert cut.returncode != 0
    assert "Received Store Response" not in cut.stderr, cut.stderr
    assert "aborted: its object passed" in stderr and "2 times Dicom.MaxObjectMb = 16" in stderr, stderr
    passed_mb = float(stderr.split("its object passed ")[1].split(" MB")[0])
    assert 32 < passed_mb < 100, f"cut only after {passed_mb} MB of a 200 MB object"
    assert "over Dicom.MaxObjectMb = 16" in stderr  # the 24 MB one
    assert after - before < 48, f"peak memory grew {after - before:.0f} MB for objects refused at 16 MB"
    kept = spool_files(config)
    assert [p.suffix for p in kept] == [".dcm"], "only the small warm-up object may be kept"
    assert kept[0].stat().st_size < 2 * 1024 * 1024
    header = pydicom.dcmread(big, stop_before_pixels=True)
    assert str(header.PatientName) not in stderr
    print(f"200 MB cut after {passed_mb:.0f} MB in {took:.1f} s; peak RSS {before:.0f} -> {after:.0f} MB")
