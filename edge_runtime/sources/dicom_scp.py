"""The DICOM network source: a C-STORE SCP (pynetdicom) that modalities and PACS send to.

Most modalities do not write files into folders; they send DICOM over the
network. This source is the receiving end (``Dicom.Enabled``), and it keeps the
rule every source keeps: it hands the pipeline a complete file, so nothing
after it changes.

Per C-STORE request, in the association's own thread:

1. the size is checked against ``Dicom.MaxObjectMb`` and the free disk space
   against ``Journal.MinFreeDiskMb``; either refuses the object with status
   ``0xA700`` (out of resources) and nothing is kept;
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

Who may send: the called AE title must be ours (``Dicom.AeTitle``), the
calling AE title in ``Dicom.AllowedCallingAeTitles`` and the peer in
``Dicom.AllowedAddresses`` (addresses or CIDR networks) when those are set;
anything else is refused at association (A-ASSOCIATE-RJ) with a WARNING naming
the peer and the reason, since that is the line the admin looks for when a
modality "cannot send". ``Dicom.MaxAssociations`` bounds concurrent
associations (one more is refused as transient congestion).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import secrets
import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Any, cast

from ..config import DicomConfig, RuntimeConfig
from ..durable import write_durably
from ..errors import ConfigError, EdgeRuntimeError
from ..journal import Receipt, ReceiptLog
from ..privacy import load_or_create_key, scan_ref
from .base import ScanItem
from .inbox import InboxSource

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.events import Event
    from pynetdicom.transport import ThreadedAssociationServer

__all__ = ["TRANSFER_SYNTAXES", "DicomScpSource", "from_config"]

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

#: C-STORE status codes (PS3.4 B.2.3).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
#: Temporary name of an object being written; the spool watcher ignores it.
PART_SUFFIX = ".part"
#: A-ASSOCIATE-RJ (result, source, diagnostic): permanent, service user, ...
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # calling AE title not recognised
_REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # called AE title not recognised
_REJECT_NO_REASON = (0x01, 0x01, 0x01)  # (a peer address has no code of its own)
_PREAMBLE = b"\x00" * 128 + b"DICM"

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


def _address_allowed(address: str, networks: list[Network]) -> bool:
    if not networks:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:10.1.2.3 on a dual-stack socket is 10.1.2.3
    return any(ip.version == net.version and ip in net for net in networks)


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
        self._lock = threading.Lock()  # the association records
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
        """Stop listening (open associations are aborted), then the watcher.

        Objects already acknowledged stay in the spool for the next start.
        """
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None
            self._server = None
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
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_associations = self.config.max_associations
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
        ]
        address = (self.config.bind_address, self.config.port)
        try:
            self._server = ae.start_server(address, block=False, evt_handlers=handlers)
        except OSError as exc:
            raise ConfigError(
                f"The DICOM receiver cannot listen on {address[0]}:{address[1]}: {exc.strerror or exc}.",
                action="Choose a free Dicom.Port (ports below 1024 need privileges) or stop the "
                "program using it, then restart.",
            ) from exc
        self._ae = ae
        log.info(
            "DICOM receiver %s listening on %s:%d (calling AE titles: %s; addresses: %s; up to %d "
            "associations, objects up to %d MB) into %s",
            self.config.ae_title,
            self.config.bind_address,
            self.port,
            ", ".join(sorted(self._calling_titles)) or "any",
            ", ".join(str(n) for n in self._networks) or "any",
            self.config.max_associations,
            self.config.max_object_mb,
            self.spool,
        )

    # -- association policy and logging --------------------------------------------------
    @staticmethod
    def _peer(event: Event) -> str:
        requestor = event.assoc.requestor
        return f"{requestor.address}:{requestor.port}"

    def _on_requested(self, event: Event) -> None:
        """Accept or refuse an A-ASSOCIATE-RQ by calling AE, called AE and peer address."""
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        calling = str(getattr(primitive, "calling_ae_title", "") or "").strip()
        called = str(getattr(primitive, "called_ae_title", "") or "").strip()
        peer = self._peer(event)
        with self._lock:
            self._associations[id(assoc)] = _Association(peer, calling)
        refusal: tuple[str, str, tuple[int, int, int]] | None = None
        if not _address_allowed(assoc.requestor.address, self._networks):
            refusal = (
                "its address is not in Dicom.AllowedAddresses",
                "if it is a sender of this site, add its address (or network) there",
                _REJECT_NO_REASON,
            )
        elif self._calling_titles and calling not in self._calling_titles:
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
        else:
            reason = f"refused during negotiation (A-ASSOCIATE-RJ {getattr(primitive, 'diagnostic', '?')})"
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

    def _count(self, event: Event, *, stored: bool) -> None:
        with self._lock:
            record = self._associations.get(id(event.assoc))
            if record is not None:
                if stored:
                    record.stored += 1
                else:
                    record.refused += 1

    @staticmethod
    def _on_echo(event: Event) -> int:
        return SUCCESS

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
        limit = self.config.max_object_mb * 1024 * 1024
        try:
            if body.nbytes > limit:
                log.warning(
                    "DICOM object from %s (calling AE %r) refused: %.1f MB, over Dicom.MaxObjectMb = %d",
                    peer,
                    calling,
                    body.nbytes / 1e6,
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
