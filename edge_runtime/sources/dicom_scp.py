"""The DICOM network source: a C-STORE SCP (pynetdicom) that modalities and PACS send to.

Most modalities do not write files into folders; they send DICOM over the
network. This source is the receiving end (``Dicom.Enabled``), and it keeps the
rule every source keeps: it hands the pipeline a complete file, so nothing
after it changes.

Per C-STORE request, in the association's own thread:

1. the size is checked against ``Dicom.MaxObjectMb`` (counted as the data set
   arrives, see below) and the free disk space against ``Journal.MinFreeDiskMb``;
   either refuses the object with status ``0xA700`` (out of resources) and
   nothing is kept;
2. the object is written **as received** (preamble, file meta, the data set's
   bytes in the negotiated transfer syntax; compressed pixels stay compressed)
   to ``<spool>/<name>.dcm.part``, fsynced, renamed to ``<name>.dcm``, and the
   folder fsynced;
3. a receipt (file name, content hash, SOP Instance/Class UID, transfer
   syntax, calling AE, peer address, size, time; no patient data) is committed
   to the journal (:class:`~edge_runtime.journal.ReceiptLog`);
4. only then is success (``0x0000``) returned. An acknowledged object is on
   disk and journaled; a crash at any earlier point leaves, at most, a
   ``.part`` file that the next start removes, and the sender, which never got
   success, sends again.

The spool folder is then an inbox: a watcher over it (settle time 0, because
a file appears only by the atomic rename, and a rescan at start, so objects
received but not processed before a stop or crash are taken then) hands each
file on as a :class:`ScanItem` with ``source = "dicom"``, and releases and
disposes of it like the inbox does. Spool names carry no patient data: they
are the content hash and a random tag.

Who may send: the peer must be in ``Dicom.AllowedAddresses`` (addresses or
CIDR networks) when that is set, checked when the TCP connection is accepted,
before a byte is read, so a host that may not send cannot hold anything; the
called AE title must be ours (``Dicom.AeTitle``) and the calling AE title in
``Dicom.AllowedCallingAeTitles`` when that is set, or the association is
refused (A-ASSOCIATE-RJ). Each refusal is a WARNING naming the peer and the
reason, since that is the line the admin looks for when a modality "cannot
send".

What no peer can hold (a hostile network, or a broken modality):

* ``Dicom.MaxAssociations`` bounds concurrent associations (one more is refused
  as transient congestion) and ``Dicom.MaxAssociationsPerPeer`` the connections
  from one address (one more is closed at accept), so one host cannot take
  every slot;
* the association request must arrive whole within ``Dicom.ReadTimeoutSeconds``
  of the connection, and every later PDU within that time of its first byte (a
  deadline, not an inactivity timer: one byte every few seconds does not extend
  it); no PDU may be longer than
  :data:`MAX_PDU_BYTES`; an association with no traffic for
  ``Dicom.IdleTimeoutSeconds`` is aborted;
* an object's data set is counted as it arrives: past ``Dicom.MaxObjectMb`` the
  bytes are dropped as they come (memory stays at about the limit per
  association) and the C-STORE is refused with ``0xA700`` once the sender has
  finished; past :data:`CUT_FACTOR` times the limit the sender is not waited
  for: the association is aborted (a peer streaming without end is cut, not
  just ignored);
* :meth:`DicomScpSource.stop` aborts every open connection (an A-ABORT, then the
  socket is shut) and waits for no peer.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import secrets
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from io import BytesIO
from typing import TYPE_CHECKING, Any, cast

from ..config import DicomConfig, RuntimeConfig
from ..durable import write_durably
from ..errors import ConfigError, EdgeRuntimeError
from ..journal import Receipt, ReceiptLog
from ..logs import event as log_event
from ..privacy import load_or_create_key, scan_ref
from .base import ScanItem
from .inbox import InboxSource

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.association import Association
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.events import Event
    from pynetdicom.transport import ThreadedAssociationServer

__all__ = ["MAX_PDU_BYTES", "REFUSAL_REASONS", "TRANSFER_SYNTAXES", "DicomScpSource", "from_config"]

log = logging.getLogger(__name__)

#: Every transfer syntax the decoders read (decode/dicom.py: pydicom's decoders, dcmtk as a
#: fallback). Accepted as sent: compressed objects are stored compressed, decoded later
#: in the sandbox like any inbox file. Uncompressed first: the order we prefer.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1 (Process 14, Selection Value 1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)

#: Why a connection or an association was refused, as :meth:`DicomScpSource.state` counts them.
REFUSAL_REASONS = (
    "address_not_allowed",
    "peer_limit",
    "connection_limit",
    "calling_ae_title",
    "called_ae_title",
    "association_limit",
    "negotiation",
)

#: C-STORE status codes (PS3.4 B.2.3).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
#: Temporary name of an object being written; the spool watcher ignores it.
PART_SUFFIX = ".part"
#: A-ASSOCIATE-RJ (result, source, diagnostic): permanent, service user, ...
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # calling AE title not recognised
_REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # called AE title not recognised
_PREAMBLE = b"\x00" * 128 + b"DICM"
#: The longest PDU read (its length field is checked before the body is read). We offer
#: pynetdicom's maximum PDU length (16 kB) for P-DATA, and an A-ASSOCIATE-RQ proposing every
#: presentation context allowed (128) with long UIDs stays near 100 kB; a longer PDU would
#: only make us buffer what a peer claims.
MAX_PDU_BYTES = 1024 * 1024
#: A-ABORT PDU (PS3.8 9.3.8): type 07, length 4, source 2 (service provider), reason 0.
_A_ABORT_PDU = bytes.fromhex("07000000000400000200")
#: How long stop() waits for aborted associations' threads (the whole service has ~4 s).
_STOP_WAIT_S = 0.5

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def from_config(config: RuntimeConfig) -> DicomScpSource | None:
    """The receiver when ``Dicom.Enabled``; None otherwise."""
    if not config.dicom.enabled:
        return None
    return DicomScpSource(config)


def parse_networks(entries: Iterable[str]) -> list[Network]:
    """``Dicom.AllowedAddresses`` as networks (a bare address is a /32 or /128).

    Raises:
        ConfigError: an entry is neither an address nor a network.
    """
    networks: list[Network] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError as exc:
            raise ConfigError(
                f"Dicom.AllowedAddresses: {entry!r} is not an IP address or network ({exc}).",
                action="Use addresses like 10.1.2.3 or networks like 10.1.2.0/24.",
            ) from exc
    return networks


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:10.1.2.3 on a dual-stack socket is 10.1.2.3
    return ip


def _address_allowed(address: str, networks: list[Network]) -> bool:
    if not networks:
        return True
    ip = _ip(address)
    return ip is not None and any(ip.version == net.version and ip in net for net in networks)


class _SpoolWatcher(InboxSource):
    """The inbox machinery over the spool folder, handing items on as the ``dicom`` source."""

    name = "dicom"


@dataclass
class _Association:
    """What one association did, for its closing log line."""

    peer: str
    calling_ae: str
    accepted: bool = False
    aborted: bool = False
    stored: int = 0
    refused: int = 0


class _GuardedSocket(socket.socket):
    """An accepted connection whose reads keep a deadline per PDU and whose writes are bounded.

    pynetdicom reads a PDU with blocking ``recv`` calls (the 6-byte header, then the length it
    announces) and checks its own timers only between PDUs, so a peer that sends one byte now
    and then holds the connection as long as it likes. Here the stream is framed as it is read:
    the first byte of a PDU (for the A-ASSOCIATE-RQ: the accept) starts a deadline of
    ``Dicom.ReadTimeoutSeconds`` for the whole PDU, and a header announcing more than
    :data:`MAX_PDU_BYTES` ends the connection before its body is read. Ending it means shutting
    the socket and answering end-of-file, which pynetdicom takes
    as "connection closed" (A-P-ABORT once associated).
    """

    def __init__(self, accepted: socket.socket, peer: str, timeout_s: float) -> None:
        super().__init__(accepted.family, accepted.type, accepted.proto, fileno=accepted.detach())
        self.peer = peer
        self.timeout_s = timeout_s
        self.settimeout(timeout_s)  # also makes the descriptor non-blocking (abort() relies on it)
        self._header = bytearray()
        self._body_left = 0
        # The A-ASSOCIATE-RQ is due this long after accept; each later PDU, after its first byte.
        self._deadline: float | None = time.monotonic() + timeout_s
        self._send_lock = threading.Lock()  # whole PDUs out, one at a time
        self._fd_lock = threading.Lock()  # abort() never writes to a descriptor closed (and reused)
        self._ended = False
        #: Called (in pynetdicom's reader thread) once the connection is ended or the peer closed it.
        self.on_end: Callable[[], None] | None = None

    def recv(self, bufsize: int, flags: int = 0, /) -> bytes:
        if self._ended:
            return b""
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self.timeout_s  # the first byte of a PDU is ready
        remaining = self._deadline - now
        try:
            if remaining <= 0:
                raise TimeoutError
            self.settimeout(remaining)
            data = super().recv(bufsize, flags)
        except TimeoutError:
            log_event(
                log,
                "dicom_connection_dropped",
                "DICOM connection from %s closed: a PDU (or the association request) was not complete "
                "within Dicom.ReadTimeoutSeconds = %g",
                self.peer,
                self.timeout_s,
                level=logging.WARNING,
                peer=self.peer,
                reason="read_timeout",
            )
            return self._end()
        except OSError:
            return self._end()
        if not data:
            return self._end()
        if not self._frame(data):
            return self._end()
        return data

    def _frame(self, data: bytes) -> bool:
        """Follow PDU boundaries in ``data``; False when a header announces too long a PDU."""
        view = memoryview(data)
        while view:
            if self._body_left == 0 and len(self._header) < 6:
                if self._deadline is None:
                    self._deadline = time.monotonic() + self.timeout_s
                take = 6 - len(self._header)
                self._header += view[:take]
                view = view[take:]
                if len(self._header) < 6:
                    break
                _type, _, length = struct.unpack(">BBL", self._header)
                if length > MAX_PDU_BYTES:
                    log_event(
                        log,
                        "dicom_connection_dropped",
                        "DICOM connection from %s closed: it announced a PDU of %d bytes (at most %d "
                        "are read)",
                        self.peer,
                        length,
                        MAX_PDU_BYTES,
                        level=logging.WARNING,
                        peer=self.peer,
                        reason="pdu_too_long",
                    )
                    return False
                self._body_left = length
            else:
                take = min(self._body_left, len(view))
                self._body_left -= take
                view = view[take:]
            if self._body_left == 0 and len(self._header) == 6:
                self._header.clear()
                self._deadline = None  # the PDU is complete
        return True

    @property
    def ended(self) -> bool:
        """The peer closed the connection, or this module ended it (pynetdicom may still wind down)."""
        return self._ended

    def _end(self) -> bytes:
        """Shut the connection (both ways) and tell pynetdicom it is closed: end-of-file."""
        first = not self._ended
        self._ended = True
        _ended_here.peer = self.peer
        with contextlib.suppress(OSError):
            self.shutdown(socket.SHUT_RDWR)
        if first and self.on_end is not None:
            self.on_end()
        return b""

    def send(self, data: Any, flags: int = 0, /) -> int:
        """All of ``data`` within ``Dicom.ReadTimeoutSeconds`` (a peer that stops reading cannot hold us)."""
        with self._send_lock:  # one PDU at a time: abort() never writes into the middle of one
            self.settimeout(self.timeout_s)
            self.sendall(data, flags)
        return memoryview(data).nbytes

    def close(self) -> None:
        with self._fd_lock:
            super().close()

    def abort(self) -> None:
        """A-ABORT the peer if that needs no waiting, then shut the connection; never blocks."""
        if self._send_lock.acquire(timeout=0.1):
            try:
                with self._fd_lock, contextlib.suppress(OSError):
                    os.write(self.fileno(), _A_ABORT_PDU)  # non-blocking descriptor: never waits
            finally:
                self._send_lock.release()
        with contextlib.suppress(OSError):
            self.shutdown(socket.SHUT_RDWR)  # wakes pynetdicom's reader: end-of-file


#: Set in pynetdicom's reader thread when this module ended the connection it reads.
_ended_here = threading.local()


class _QuietWhenEndedHere(logging.Filter):
    """Drop pynetdicom's ERROR about a PDU cut short when we cut it (our WARNING names the peer)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(_ended_here, "peer", None) is None:
            return True
        _ended_here.peer = None
        return not str(record.msg).startswith("The received PDU is shorter than expected")


_QUIET_WHEN_ENDED_HERE = _QuietWhenEndedHere()


def _wake_acceptor(assoc: Association) -> None:
    """The connection ended before an A-ASSOCIATE-RQ: end pynetdicom's wait for one now.

    The acceptor thread waits for the request up to the ACSE timeout even when the connection
    is gone, and pynetdicom counts it against ``MaxAssociations`` meanwhile. Still awaiting the
    request (Sta2) means nothing was ever queued for it, so an empty item ends the wait the way
    its timeout would. Runs in pynetdicom's reader thread, before it processes the close.
    """
    dul = assoc.dul
    # Sta1 too: a peer that closes at once (a port probe, a load balancer's health check) can be
    # read before the connection's own event moved the machine to Sta2; the acceptor then waited
    # the whole ACSE timeout. After a finished association (also Sta1) the item is never read.
    if dul.state_machine.current_state in ("Sta1", "Sta2"):
        dul.to_user_queue.put(cast(Any, None))


@dataclass
class _Connection:
    """One accepted TCP connection, from accept until it is closed."""

    peer: str
    sock: _GuardedSocket
    assoc: Association | None = None

    def is_open(self) -> bool:
        if self.sock.fileno() == -1 or self.sock.ended:
            return False  # closed, or ended by the peer or by us: its slot is free at once
        if self.assoc is None:
            return True  # accepted, its association not started yet
        return self.assoc.is_alive() or self.assoc.dul.is_alive()


@dataclass
class _Connections:
    """Who is connected, checked at accept (before any PDU is read)."""

    networks: list[Network]
    per_peer: int
    total: int
    timeout_s: float
    _open: dict[int, _Connection] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    #: Connections closed at accept since start, by reason (for :meth:`DicomScpSource.state`).
    refused: dict[str, int] = field(default_factory=dict)

    def admit(self, sock: _GuardedSocket) -> bool:
        """Allow-list, then the per-peer and total connection limits; a refusal is logged once."""
        peer = sock.peer
        refusal: tuple[str, str] | None = None
        if not _address_allowed(peer, self.networks):
            refusal = (
                "address_not_allowed",
                "its address is not in Dicom.AllowedAddresses; if it is a sender of this site, add its "
                "address (or network) there",
            )
        else:
            with self._lock:
                self._open = {k: c for k, c in self._open.items() if c.is_open()}
                from_peer = sum(1 for c in self._open.values() if c.peer == peer)
                if from_peer >= self.per_peer:
                    refusal = (
                        "peer_limit",
                        f"it already has {from_peer} open (Dicom.MaxAssociationsPerPeer = {self.per_peer}); "
                        "it may retry once one is closed",
                    )
                elif len(self._open) >= self.total:
                    refusal = (
                        "connection_limit",
                        f"{len(self._open)} connections are open (twice Dicom.MaxAssociations); it may "
                        "retry once one is closed",
                    )
                else:
                    self._open[id(sock)] = _Connection(peer, sock)
        if refusal is None:
            return True
        reason, words = refusal
        with self._lock:
            self.refused[reason] = self.refused.get(reason, 0) + 1
        log_event(
            log,
            "dicom_connection_refused",
            "DICOM connection from %s refused: %s.",
            peer,
            words,
            level=logging.WARNING,
            peer=peer,
            reason=reason,
        )
        return False

    def refused_counts(self) -> dict[str, int]:
        """Connections closed at accept since start, by reason (a copy)."""
        with self._lock:
            return dict(self.refused)

    def started(self, sock: _GuardedSocket, assoc: Association) -> None:
        with self._lock:
            connection = self._open.get(id(sock))
            if connection is not None and connection.sock is sock:
                connection.assoc = assoc

    def abort_all(self) -> int:
        """A-ABORT and shut every open connection (stop()); how many there were."""
        with self._lock:
            connections = [c for c in self._open.values() if c.is_open()]
        for connection in connections:
            connection.sock.abort()
        return len(connections)

    def wait_closed(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for the connections' threads to end; how many have not."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                self._open = {k: c for k, c in self._open.items() if c.is_open()}
                left = len(self._open)
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.02)


#: An object this many times ``Dicom.MaxObjectMb`` is not waited for: its association is aborted.
#: Slightly over the limit is refused politely (0xA700 when the object ends, the association goes
#: on); far over, the sender is most likely broken or hostile, and reading on only costs time.
CUT_FACTOR = 2


class _CappedDataSet(BytesIO):
    """A C-STORE data set as it arrives, kept only up to ``Dicom.MaxObjectMb``.

    Past the limit what was kept is released and the rest is counted, not kept, so an object of
    any size costs at most about the limit in memory; the C-STORE handler refuses it. Past
    :data:`CUT_FACTOR` times the limit ``on_cut`` is called once (the receiver aborts the
    association there).
    """

    def __init__(self, limit: int, on_cut: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self.limit = limit
        self.received = 0  # every byte of the data set, kept or not
        self.on_cut = on_cut
        self.cut = False

    @property
    def over(self) -> bool:
        return self.received > self.limit

    def write(self, data: Any, /) -> int:
        size = memoryview(data).nbytes
        self.received += size
        if self.received <= self.limit:
            return super().write(data)
        if super().tell():
            self.seek(0)
            self.truncate()  # gives the memory back
        if not self.cut and self.received > CUT_FACTOR * self.limit:
            self.cut = True
            if self.on_cut is not None:
                self.on_cut(self.received)
        return size


def _make_server_classes() -> tuple[type[ThreadedAssociationServer], type[Any]]:
    """pynetdicom's server and request handler, guarded (imported lazily, as pynetdicom is)."""
    from socketserver import TCPServer

    from pynetdicom import evt
    from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

    class GuardedServer(ThreadedAssociationServer):
        daemon_threads = True
        block_on_close = False

        def __init__(self, *args: Any, connections: _Connections, **kwargs: Any) -> None:
            self.connections = connections
            super().__init__(*args, **kwargs)

        def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
            accepted, address = super().get_request()
            return _GuardedSocket(accepted, str(address[0]), self.connections.timeout_s), address

        def verify_request(self, request: Any, client_address: Any) -> bool:
            return self.connections.admit(cast(_GuardedSocket, request))

        def shutdown(self) -> None:
            # pynetdicom's shutdown() also expects to be in its AE's list of servers (start_server
            # puts it there); this server is started by DicomScpSource, which stops it here.
            TCPServer.shutdown(self)
            self.server_close()

    class GuardedHandler(RequestHandler):
        def handle(self) -> None:
            # RequestHandler.handle(), with the connection recorded and pynetdicom's reader thread
            # a daemon (a stop must never wait for a peer).
            assoc = self._create_association()
            assoc.dul.daemon = True
            sock = cast(_GuardedSocket, self.request)
            sock.on_end = lambda: _wake_acceptor(assoc)
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            cast(GuardedServer, self.server).connections.started(sock, assoc)

    return GuardedServer, GuardedHandler


class DicomScpSource:
    """A C-STORE SCP whose acknowledged objects become scans, via a watched spool folder."""

    name = "dicom"

    def __init__(self, config: RuntimeConfig) -> None:
        self.config: DicomConfig = config.dicom
        self._journal_path = config.journal.path
        self._key_path = config.reference_key_path
        self._min_free_mb = config.journal.min_free_disk_mb
        self.spool = config.dicom.spool_path.absolute()
        self._networks = parse_networks(self.config.allowed_addresses)
        self._calling_titles = {t.strip() for t in self.config.allowed_calling_ae_titles}
        inbox = config.inbox.path.absolute()
        if self.spool.is_relative_to(inbox) or inbox.is_relative_to(self.spool):
            raise ConfigError(
                f"Dicom.SpoolPath {self.spool} and Inbox.Path {inbox} overlap: each file would be "
                "taken by both sources.",
                action="Give Dicom.SpoolPath a folder of its own, outside the inbox.",
            )
        suffixes = tuple(dict.fromkeys((*config.inbox.ignore_suffixes, PART_SUFFIX)))
        spool_inbox = config.inbox.model_copy(
            update={"path": self.spool, "settle_seconds": 0.0, "ignore_suffixes": suffixes}
        )
        self._watcher = _SpoolWatcher(spool_inbox)
        self._ae: AE | None = None
        self._server: ThreadedAssociationServer | None = None
        self._receipts: ReceiptLog | None = None
        self._key: bytes | None = None
        self._associations: dict[int, _Association] = {}
        self._lock = threading.Lock()  # the association records and the counters below
        #: Since start, for :meth:`state`: associations refused by reason, objects stored / refused.
        self._associations_refused: dict[str, int] = {}
        self._objects_received = 0
        self._objects_refused = 0
        self._max_object_bytes = self.config.max_object_mb * 1024 * 1024
        self._connections = _Connections(
            networks=self._networks,
            per_peer=self.config.associations_per_peer,
            total=2 * self.config.max_associations,
            timeout_s=self.config.read_timeout_seconds,
        )
        self._receipts_lock = threading.Lock()  # the receipt log against stop()

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, on_ready: Callable[[ScanItem], None]) -> None:
        """Clear unacknowledged leftovers, start the spool watcher, then listen.

        Raises:
            ConfigError: the port cannot be bound (in use, or a privileged port).
            JournalError: the journal cannot be opened for receipts.
        """
        self.spool.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        self._receipts = ReceiptLog(self._journal_path)
        self._key = load_or_create_key(self._key_path)
        self._watcher.start(on_ready)
        try:
            self._start_server()
        except BaseException:
            self._watcher.stop()
            self._receipts.close()
            raise

    def stop(self) -> None:
        """Stop listening, abort open associations (waiting for no peer), then stop the watcher.

        Each open connection gets an A-ABORT (unless we are mid-PDU to it) and is shut at once,
        so a peer that trickles or stalls cannot delay a stop. Objects already acknowledged stay
        in the spool for the next start; one being received is not acknowledged, and its sender
        sends it again.
        """
        if self._server is not None:
            self._server.shutdown()  # no new connections
            aborted = self._connections.abort_all()
            left = self._connections.wait_closed(_STOP_WAIT_S)
            if aborted:
                log.info(
                    "DICOM receiver %s aborted %d open connection(s)%s",
                    self.config.ae_title,
                    aborted,
                    f" ({left} still closing)" if left else "",
                )
            self._server = None
            self._ae = None
        self._watcher.stop()
        if self._receipts is not None:
            with self._receipts_lock:
                self._receipts.close()
                self._receipts = None
        log.info("DICOM receiver %s stopped", self.config.ae_title)

    def release(self, item: ScanItem) -> None:
        self._watcher.release(item)

    def dispose(self, item: ScanItem) -> None:
        self._watcher.dispose(item)

    def state(self) -> dict[str, Any]:
        """The receiver as the status and the health file show it (read-only; no peer named).

        ``refused`` counts, since start and by reason, the connections closed at accept
        (``address_not_allowed``, ``peer_limit``, ``connection_limit``) and the associations
        refused (``calling_ae_title``, ``called_ae_title``, ``association_limit``,
        ``negotiation``); ``objects_received`` the objects stored and acknowledged,
        ``objects_refused`` the C-STOREs answered with a failure status.
        """
        refused = self._connections.refused_counts()
        with self._lock:
            for reason, count in self._associations_refused.items():
                refused[reason] = refused.get(reason, 0) + count
            open_now = sum(1 for record in self._associations.values() if record.accepted)
            received, objects_refused = self._objects_received, self._objects_refused
        return {
            "ae_title": self.config.ae_title,
            "port": self.port,
            "listening": self._server is not None,
            "associations_open": open_now,
            "refused": dict.fromkeys(REFUSAL_REASONS, 0) | refused,
            "objects_received": received,
            "objects_refused": objects_refused,
        }

    @property
    def port(self) -> int:
        """The port actually bound (``Dicom.Port``; useful when it is 0 in tests)."""
        if self._server is None:
            return self.config.port
        return int(self._server.server_address[1])

    def _remove_leftovers(self) -> None:
        """``.part`` files are objects never acknowledged (we stopped mid-write): the sender resends."""
        removed = 0
        for part in self.spool.glob(f"*{PART_SUFFIX}"):
            try:
                part.unlink()
                removed += 1
            except FileNotFoundError:
                pass
        if removed:
            log.info(
                "removed %d incomplete DICOM object(s) from %s: never acknowledged, so their senders "
                "send them again",
                removed,
                self.spool,
            )

    def _start_server(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        # pynetdicom's INFO lines repeat ours without the policy context; its DEBUG lines
        # dump PDUs. Its warnings and errors still reach the service log.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("pynetdicom.dul").addFilter(_QUIET_WHEN_ENDED_HERE)  # once: a set
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_associations = self.config.max_associations
        # Waiting for the A-ASSOCIATE-RQ (and pynetdicom's ARTIM timer) is bounded like a PDU;
        # its idle timer aborts an association with no traffic. Neither fires while a PDU is being
        # read: _GuardedSocket bounds that.
        ae.acse_timeout = self.config.read_timeout_seconds
        ae.network_timeout = self.config.idle_timeout_seconds
        # Calling/called AE titles and addresses are checked in _on_requested, which logs why.
        ae.require_calling_aet = []
        ae.require_called_aet = False
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, list(TRANSFER_SYNTAXES))
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_PDU_RECV, self._on_pdu_received),
        ]
        address = (self.config.bind_address, self.config.port)
        server_class, handler_class = _make_server_classes()
        try:
            # ae.start_server(block=False), with the guarded server and handler.
            server = ae.make_server(
                address,
                evt_handlers=handlers,
                server_class=server_class,
                request_handler=handler_class,
                connections=self._connections,
            )
        except OSError as exc:
            raise ConfigError(
                f"The DICOM receiver cannot listen on {address[0]}:{address[1]}: {exc.strerror or exc}.",
                action="Choose a free Dicom.Port (ports below 1024 need privileges) or stop the "
                "program using it, then restart.",
            ) from exc
        threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},  # how long stop() may wait for the accept loop
            name=f"DicomScp@{server.server_address[1]}",
            daemon=True,
        ).start()
        self._server = server
        self._ae = ae
        log.info(
            "DICOM receiver %s listening on %s:%d (calling AE titles: %s; addresses: %s; up to %d "
            "associations, %d per peer; objects up to %d MB) into %s",
            self.config.ae_title,
            self.config.bind_address,
            self.port,
            ", ".join(sorted(self._calling_titles)) or "any",
            ", ".join(str(n) for n in self._networks) or "any",
            self.config.max_associations,
            self.config.associations_per_peer,
            self.config.max_object_mb,
            self.spool,
        )

    # -- association policy and logging --------------------------------------------------
    @staticmethod
    def _peer(event: Event) -> str:
        requestor = event.assoc.requestor
        return f"{requestor.address}:{requestor.port}"

    def _on_requested(self, event: Event) -> None:
        """Accept or refuse an A-ASSOCIATE-RQ by AE titles (the peer's address was checked at accept)."""
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        calling = str(getattr(primitive, "calling_ae_title", "") or "").strip()
        called = str(getattr(primitive, "called_ae_title", "") or "").strip()
        peer = self._peer(event)
        with self._lock:
            self._associations[id(assoc)] = _Association(peer, calling)
        refusal: tuple[str, str, tuple[int, int, int]] | None = None
        if self._calling_titles and calling not in self._calling_titles:
            refusal = (
                "its calling AE title is not in Dicom.AllowedCallingAeTitles",
                "if it is a sender of this site, add that title there",
                _REJECT_CALLING_AE,
            )
        elif called != self.config.ae_title.strip():
            refusal = (
                f"it called AE title {called!r}, not ours ({self.config.ae_title!r}, Dicom.AeTitle)",
                "configure the sender with our AE title",
                _REJECT_CALLED_AE,
            )
        if refusal is None:
            return
        reason, action, rsd = refusal
        self._count_refused("calling_ae_title" if rsd == _REJECT_CALLING_AE else "called_ae_title")
        log.warning(
            "DICOM association from %s (calling AE %r) rejected: %s; %s.", peer, calling, reason, action
        )
        assoc.acse.send_reject(*rsd)
        # As pynetdicom does for its own refusals: wait until the A-ASSOCIATE-RJ is out and the
        # peer has closed (or the ARTIM timer expired) before the connection is shut.
        assoc.kill()

    def _on_accepted(self, event: Event) -> None:
        with self._lock:
            record = self._associations.get(id(event.assoc))
            if record is not None:
                record.accepted = True
        if record is not None:
            log.info("DICOM association from %s (calling AE %r) accepted", record.peer, record.calling_ae)

    def _on_rejected(self, event: Event) -> None:
        """pynetdicom's own refusals (after ours): too many associations at once."""
        with self._lock:
            record = self._associations.get(id(event.assoc))
        primitive = event.assoc.acceptor.primitive
        if getattr(primitive, "result_source", None) == 0x03:
            reason = f"Dicom.MaxAssociations = {self.config.max_associations} are already open (transient)"
            self._count_refused("association_limit")
        else:
            reason = f"refused during negotiation (A-ASSOCIATE-RJ {getattr(primitive, 'diagnostic', '?')})"
            self._count_refused("negotiation")
        log.warning(
            "DICOM association from %s (calling AE %r) rejected: %s",
            record.peer if record else self._peer(event),
            record.calling_ae if record else "?",
            reason,
        )

    def _on_aborted(self, event: Event) -> None:
        with self._lock:
            record = self._associations.get(id(event.assoc))
            if record is not None:
                record.aborted = True

    def _on_closed(self, event: Event) -> None:
        with self._lock:
            record = self._associations.pop(id(event.assoc), None)
        if record is None or not record.accepted:
            return
        log.info(
            "DICOM association from %s (calling AE %r) %s: %d object(s) stored, %d refused",
            record.peer,
            record.calling_ae,
            "aborted" if record.aborted else "closed",
            record.stored,
            record.refused,
        )

    def _count_refused(self, reason: str) -> None:
        with self._lock:
            self._associations_refused[reason] = self._associations_refused.get(reason, 0) + 1

    def _count(self, event: Event, *, stored: bool) -> None:
        with self._lock:
            if stored:
                self._objects_received += 1
            else:
                self._objects_refused += 1
            record = self._associations.get(id(event.assoc))
            if record is not None:
                if stored:
                    record.stored += 1
                else:
                    record.refused += 1

    @staticmethod
    def _on_echo(event: Event) -> int:
        return SUCCESS

    def _on_pdu_received(self, event: Event) -> None:
        """Count a data set as it arrives, so ``Dicom.MaxObjectMb`` bounds memory, not just what is kept.

        Runs in pynetdicom's reader thread just before the P-DATA is added to the DIMSE message
        being assembled (the same thread adds it). That message's data set becomes a
        :class:`_CappedDataSet` from its second P-DATA PDU on (before that it holds one PDU).
        """
        from pynetdicom.pdu import P_DATA_TF

        if not isinstance(event.pdu, P_DATA_TF):
            return
        message = event.assoc.dimse.message
        if message is None or type(message.data_set) is not BytesIO:
            return
        assoc = event.assoc
        peer = self._peer(event)
        calling = str(assoc.requestor.ae_title).strip()
        sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)

        def cut(received: int) -> None:
            log_event(
                log,
                "dicom_connection_dropped",
                "DICOM association from %s (calling AE %r) aborted: its object passed %.0f MB, "
                "%d times Dicom.MaxObjectMb = %d (nothing past the limit was kept)",
                peer,
                calling,
                received / 1e6,
                CUT_FACTOR,
                self.config.max_object_mb,
                level=logging.WARNING,
                peer=peer,
                reason="object_too_large",
            )
            if isinstance(sock, _GuardedSocket):
                sock.abort()  # A-ABORT, then shut: the reader's next recv ends the association
            else:  # pragma: no cover - every accepted socket is guarded
                assoc.abort()

        capped = _CappedDataSet(self._max_object_bytes, on_cut=cut)
        capped.write(message.data_set.getbuffer())
        message.data_set = capped

    # -- C-STORE -----------------------------------------------------------------------
    def _on_store(self, event: Event) -> int:
        """Store, fsync, rename, journal; only then success. Never raises (a status instead)."""
        try:
            status = self._store(event)
        except Exception as exc:  # a bug must not become pynetdicom's generic 0xC211
            log.exception("DICOM object from %s could not be stored: %s", self._peer(event), exc)
            status = OUT_OF_RESOURCES
        self._count(event, stored=status == SUCCESS)
        return status

    def _store(self, event: Event) -> int:
        request = cast("C_STORE", event.request)
        data = request.DataSet
        if not isinstance(data, BytesIO):
            raise TypeError("pynetdicom delivered the data set other than in memory")
        body = data.getbuffer()
        peer = self._peer(event)
        calling = str(event.assoc.requestor.ae_title).strip()
        size = data.received if isinstance(data, _CappedDataSet) else body.nbytes
        try:
            if size > self._max_object_bytes:
                log.warning(
                    "DICOM object from %s (calling AE %r) refused: %.1f MB, over Dicom.MaxObjectMb = %d "
                    "(what came past the limit was not kept)",
                    peer,
                    calling,
                    size / 1e6,
                    self.config.max_object_mb,
                )
                return OUT_OF_RESOURCES
            free_mb = shutil.disk_usage(self.spool).free / (1024 * 1024)
            if free_mb - body.nbytes / (1024 * 1024) < self._min_free_mb:
                log.error(
                    "DICOM object from %s refused: only %.0f MB free for %s (Journal.MinFreeDiskMb = %d); "
                    "free disk space, the sender will retry",
                    peer,
                    free_mb,
                    self.spool,
                    self._min_free_mb,
                )
                return OUT_OF_RESOURCES
            from pynetdicom.dsutils import encode_file_meta

            meta = _PREAMBLE + encode_file_meta(event.file_meta)
            return self._write(event, meta, body, peer, calling)
        finally:
            body.release()

    def _write(self, event: Event, meta: bytes, body: memoryview, peer: str, calling: str) -> int:
        sha = hashlib.sha256(meta)
        sha.update(body)
        sha256 = sha.hexdigest()
        name = f"{sha256[:24]}-{secrets.token_hex(4)}.dcm"
        final = self.spool / name
        part = final.with_name(name + PART_SUFFIX)
        try:
            write_durably(part, final, meta, body)
        except OSError as exc:
            part.unlink(missing_ok=True)
            log.error("DICOM object from %s could not be written to %s: %s", peer, self.spool, exc)
            return OUT_OF_RESOURCES
        request = cast("C_STORE", event.request)
        receipt = Receipt(
            file_name=name,
            sha256=sha256,
            sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
            sop_class_uid=str(request.AffectedSOPClassUID or ""),
            transfer_syntax_uid=str(event.context.transfer_syntax),
            calling_ae=calling,
            peer_address=str(event.assoc.requestor.address),
            size_bytes=len(meta) + body.nbytes,
        )
        try:
            with self._receipts_lock:
                if self._receipts is None:
                    raise _Stopping
                self._receipts.record(receipt)
        except (EdgeRuntimeError, _Stopping) as exc:
            # Not journaled, so not acknowledged: take the file back (if the watcher already
            # took it, its result is published once; the sender's retry is a duplicate).
            final.unlink(missing_ok=True)
            why = exc.message if isinstance(exc, EdgeRuntimeError) else "the receiver is stopping"
            log.error("DICOM object from %s refused: its receipt was not journaled: %s", peer, why)
            return OUT_OF_RESOURCES
        ref = scan_ref(sha256, name, key=self._key)
        log.info(
            "DICOM object %s stored (%d bytes, %s) from %s (calling AE %r)",
            ref,
            receipt.size_bytes,
            event.context.transfer_syntax.name,
            peer,
            calling,
        )
        return SUCCESS


class _Stopping(Exception):
    """The receiver was stopped while an object was being stored."""
