"""The SQLite journal that runs beside the pipeline.

Why one module over 500 lines: every writer of the one SQLite file (inputs, outbox,
the DICOM receiver's receipts) shares its schema, its lock and its group sync.

It is what makes the service restartable without losing or repeating work:

* ``inputs``: one row per distinct input (keyed by content sha256) with its
  state (``queued`` -> ``processing`` -> ``done`` | ``quarantined``),
  attempts, result and error. **No file name:** senders name files after
  patients, and the journal travels (``journal backup``), so ``file_name``
  holds the scan's keyed reference (``scan-<16 hex>.<ext>``, as results name
  it) and ``path`` a keyed token of its inbox path (:func:`~edge_runtime.privacy.path_token`),
  enough to recognise the file again while it exists. Journals written before
  this are rewritten at the service's start (:meth:`Journal.use_reference_key`),
  with SQLite's ``secure_delete`` so the old names do not linger in free pages.
* ``outbox``: every result message, one row per sink (``mqtt``, ``mqtt-urgent``,
  ``mqtt-fhir``, Greengrass ``ipc-local``, ``ipc-iotcore``, ``dicom-store``,
  ``fhir-http``), committed *in the same transaction* that marks its input
  done, and marked delivered only when the sink confirms it (PUBACK, a reply).
  Undelivered messages are re-sent after a reconnect or a restart, in order.
  Each sink stands alone: only the results channel's backlog holds new scans
  (``Journal.MaxOutboxMessages``); another sink that falls behind beyond its
  own limits has its oldest undelivered rows dropped (:meth:`Journal.drop_oldest`),
  each moved to ``outbox_dropped`` in the same transaction, so what a sink
  never got stays on record.
* ``receipts``: one row per object the DICOM receiver acknowledged (file name,
  content hash, SOP Instance UID, calling AE, peer, size, time; no patient
  data), committed before the sender is told success
  (:class:`ReceiptLog`, the receiver's own connection).

An inbox file is removed only after its outcome is committed here, so a
crash at any point either leaves the file in the inbox (and it is picked up
again) or leaves a committed outcome (and the leftover file is cleaned up).
WAL mode keeps readers and the single writer from blocking each other; every
write is one short transaction. **Group sync:** transactions commit with
``synchronous=NORMAL`` (their pages are written to the WAL, which survives a
crash of the process), and a transaction that must survive a power cut
(a result with its outbox rows, a quarantine verdict, a requeue) then waits in
:meth:`Journal._sync` for an ``fsync`` of the WAL file, *outside* the lock:
one fsync covers every commit written before it, so workers finishing at the
same time share it and nobody waits behind another's disk flush. That is
exactly what ``synchronous=FULL`` does (fsync the WAL after the commit), only
shared; the file is removed from the inbox only after it returns. Two writes
skip the wait and become durable with the next fsync: ``admit`` (marking a
scan ``processing``: lost only to a power cut, which also leaves the scan in
the inbox to be admitted again) and ``mark_delivered`` (lost only to a power
cut: the result is sent again, which the at-least-once contract allows).

**Identity.** Each journal has an id (a UUID), stored twice: in its ``meta``
table and in an id file beside it (``journal.sqlite3`` -> ``journal.id``).
The id file is the box's memory that a journal existed. Without it, a journal
truncated to 0 bytes, deleted, swapped for another box's, or damaged would be
recreated empty at the next start and the results it still had to deliver
would be lost without a word (issue 14). At open:

* no journal, no id file, no anchor: first start; all three are created (logged);
* no journal, no id file, but an anchor: the journal's folder was deleted or
  replaced (``rm -rf state``): refused like a missing journal. The anchor
  (:func:`~edge_runtime.journal_integrity.anchor_path_for`, ``state.journal.id``
  beside the ``state`` folder) is the memory that survives the folder: the rule
  is "a journal existed here if its id file *or* its anchor says so". A genuine
  first start has neither; an anchor that cannot be written (the folder's
  parent is read-only) is logged as a WARNING and the id file alone is the
  memory, as before;
* journal without id file: upgraded from a version without ids, or a crash
  between creating the two; the journal is adopted (logged);
* id file, but the journal is missing, empty, carries another id, or fails
  ``PRAGMA quick_check``: :class:`JournalIntegrityError`, start refused, unless
  the admin asked to start over (``start_new``, ``edge-runtime run
  --new-journal``): the old files are then moved aside, never deleted.

**While it runs.** One service per journal: :class:`~edge_runtime.journal_integrity.InstanceLock`
(``flock`` on the journal's folder and ``journal.lock``, naming the holder's PID) is taken before the
journal is opened. The open SQLite connection would go on writing into a
journal file that was deleted or replaced under it (nobody could open those
commits again), so before every write that lets a scan leave its source, and
at every heartbeat, :meth:`Journal.verify_on_disk` checks that the journal and
its id file at their paths are still the files opened at start (same device and
inode). When not, the journal is *lost*: such writes raise
:class:`~edge_runtime.errors.JournalLost` (the scan stays at its source), the
service is told once (``on_lost``) and pauses intake, and
:meth:`Journal.save_rescue_copy` writes what the connection still holds to
``journal.rescued-<UTC time>.sqlite3``. Marking results delivered is still
allowed (it only makes that copy more accurate).

:func:`check_journal` and :func:`backup_journal` back ``edge-runtime journal
check`` / ``backup``; both are safe while the service runs (WAL readers do not
block the writer).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import JournalError, JournalIntegrityError, JournalLost
from .files import display_name
from .journal_integrity import (
    ID_KEY,
    InstanceLock,
    JournalReport,
    anchor_path_for,
    backup_journal,
    check_journal,
    connect,
    id_path_for,
    inspect_journal,
    move_aside,
    pending_in,
    rescue_path_for,
    translate_error,
    write_anchor,
    write_id_file,
)
from .privacy import path_token, scan_ref, scrub_name
from .results import utc_now

__all__ = [
    "AdminAction",
    "Admission",
    "Delivery",
    "InputRecord",
    "InstanceLock",
    "Journal",
    "JournalReport",
    "LatestResult",
    "OutboxMessage",
    "Receipt",
    "ReceiptLog",
    "ScanRow",
    "SinkBacklog",
    "backup_journal",
    "check_journal",
    "id_path_for",
    "place_in_history",
    "superseding_id",
]

log = logging.getLogger(__name__)

_RECEIPTS_SCHEMA = """
-- One row per object the DICOM receiver acknowledged (written before it said success).
-- Who sent what, when: no patient data (the UIDs name the image, not the person).
CREATE TABLE IF NOT EXISTS receipts (
    id                  INTEGER PRIMARY KEY,
    file_name           TEXT NOT NULL,
    sha256              TEXT NOT NULL,
    sop_instance_uid    TEXT NOT NULL,
    sop_class_uid       TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    calling_ae          TEXT NOT NULL,
    peer_address        TEXT NOT NULL,
    size_bytes          INTEGER NOT NULL,
    received_utc        TEXT NOT NULL
);
"""
_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS inputs (
    id            INTEGER PRIMARY KEY,
    sha256        TEXT NOT NULL UNIQUE,
    file_name     TEXT NOT NULL,
    path          TEXT NOT NULL,
    size_bytes    INTEGER NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('queued','processing','done','quarantined')),
    attempts      INTEGER NOT NULL DEFAULT 0,  -- times processing started
    failures      INTEGER NOT NULL DEFAULT 0,  -- starts that ended in an operational error
    message_id    TEXT,
    result_json   TEXT,
    error_json    TEXT,
    received_utc  TEXT NOT NULL,
    updated_utc   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS inputs_state ON inputs(state);
-- The admin page: the latest scans, and one scan by its reference.
CREATE INDEX IF NOT EXISTS inputs_updated ON inputs(updated_utc, id);
CREATE INDEX IF NOT EXISTS inputs_file_name ON inputs(file_name);
CREATE TABLE IF NOT EXISTS outbox (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id    TEXT NOT NULL,
    sink          TEXT NOT NULL,
    topic         TEXT NOT NULL,
    payload       TEXT NOT NULL,
    qos           INTEGER NOT NULL,
    created_utc   TEXT NOT NULL,
    delivered_utc TEXT,
    UNIQUE (message_id, sink)
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox(sink, delivered_utc, seq);
-- Only undelivered rows: keeps the depth check before every scan cheap as history grows.
CREATE INDEX IF NOT EXISTS outbox_undelivered ON outbox(seq) WHERE delivered_utc IS NULL;
-- Results by SOP Instance UID: a different image under a UID already seen supersedes it.
CREATE INDEX IF NOT EXISTS inputs_sop_instance
    ON inputs(json_extract(result_json, '$.input.sop_instance_uid')) WHERE result_json IS NOT NULL;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- What an admin did from the admin page (quarantine retry and discard): who asked is not known,
-- what was done to which scan (by reference) and when is.
CREATE TABLE IF NOT EXISTS admin_actions (
    id            INTEGER PRIMARY KEY,
    at_utc        TEXT NOT NULL,
    action        TEXT NOT NULL,
    ref           TEXT NOT NULL,
    detail        TEXT NOT NULL
);
-- Rows a sink fell too far behind on, dropped oldest first (its row cap or its reports' disk
-- budget): what that sink never got, kept for an admin who wants to send it by hand.
CREATE TABLE IF NOT EXISTS outbox_dropped (
    seq           INTEGER PRIMARY KEY,
    message_id    TEXT NOT NULL,
    sink          TEXT NOT NULL,
    created_utc   TEXT NOT NULL,
    dropped_utc   TEXT NOT NULL,
    reason        TEXT NOT NULL
);
"""
    + _RECEIPTS_SCHEMA
)
_SCHEMA_VERSION = "1"


@dataclass(frozen=True)
class InputRecord:
    id: int
    sha256: str
    file_name: str
    path: str
    state: str
    attempts: int
    message_id: str | None
    error: dict[str, Any] | None
    failures: int = 0


@dataclass(frozen=True)
class LatestResult:
    """The result subscribers hold for a SOP Instance UID: the newest one committed."""

    input_id: int
    message_id: str
    #: The ``message_id`` it superseded, or None.
    supersedes: str | None


def superseding_id(own_id: str, earlier_id: str) -> str:
    """The ``message_id`` of a result that supersedes ``earlier_id``.

    ``own_id`` is the id the scan has on its own (:func:`~edge_runtime.results.message_id`).
    Folding in the id it replaces keeps every publication of a SOP Instance UID
    distinct (A, then B, then A again are three messages: subscribers de-duplicate
    by id and must not drop the third) and deterministic (a re-send or a restart
    computes the same id from the same history).
    """
    return hashlib.sha256(f"{own_id}|supersedes|{earlier_id}".encode()).hexdigest()


def place_in_history(own_id: str, latest: LatestResult | None) -> tuple[str, str | None]:
    """``(message_id, supersedes)`` for a new result of a SOP Instance UID whose newest result is ``latest``.

    The rule: subscribers must hold the latest content of every SOP Instance UID.

    * nothing yet for the UID: the scan's own id, superseding nothing;
    * ``latest`` is this very image (its own id, or its own id superseding what
      ``latest`` superseded): a repeat (e.g. another transfer syntax); the ids of
      ``latest`` are returned, so the journal records it and publishes nothing;
    * a different image: published as superseding ``latest``, whether it is new
      or an image seen before (A, then B, then A again: the third supersedes B).
    """
    if latest is None:
        return own_id, None
    if latest.message_id == own_id or (
        latest.supersedes is not None and latest.message_id == superseding_id(own_id, latest.supersedes)
    ):
        return latest.message_id, latest.supersedes
    return superseding_id(own_id, latest.message_id), latest.message_id


@dataclass(frozen=True)
class Admission:
    """What :meth:`Journal.admit` decided for a file found in the inbox.

    ``action`` is ``process`` (new or unfinished work, now marked processing;
    also a scan whose result was since superseded by another image under its
    SOP Instance UID: it is the latest content again and is published again),
    ``finish_done`` (its
    result is already committed: only the inbox file is left to clean up) or
    ``finish_quarantine`` (already judged bad: move it to quarantine).
    ``duplicate`` is true when the earlier record came from a different file.
    """

    action: str
    record: InputRecord
    duplicate: bool


@dataclass(frozen=True)
class OutboxMessage:
    seq: int
    message_id: str
    topic: str
    payload: str
    qos: int
    sink: str = "mqtt"


@dataclass(frozen=True)
class SinkBacklog:
    """One sink's undelivered outbox rows: how many, and when the oldest was committed."""

    pending: int
    oldest_utc: str


@dataclass(frozen=True)
class ScanRow:
    """One input as the admin page lists it: its reference, state, and result or error."""

    ref: str
    sha256: str
    state: str
    received_utc: str
    updated_utc: str
    message_id: str | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None


@dataclass(frozen=True)
class AdminAction:
    at_utc: str
    action: str
    ref: str
    detail: str


@dataclass(frozen=True)
class Delivery:
    """Where one result goes: a sink, its topic, the (sink-specific) payload and QoS."""

    sink: str
    topic: str
    payload: str
    qos: int = 1


def _scrubbed_error(error_json: str | None, name: str, ref: str) -> str | None:
    """An error record of an earlier version without the file's name (``file`` key, texts)."""
    if not error_json:
        return error_json
    try:
        error = json.loads(error_json)
    except ValueError:
        return None
    if not isinstance(error, dict):
        return None
    error.pop("file", None)
    error.setdefault("ref", ref)
    for key, value in error.items():
        if isinstance(value, str):
            error[key] = scrub_name(value, name, ref)
    return json.dumps(error, sort_keys=True)


class Journal:
    """Thread-safe access to the journal database (one connection, one lock)."""

    def __init__(
        self,
        path: str | Path,
        *,
        durable: bool = True,
        start_new: bool = False,
        lock: InstanceLock | None = None,
    ) -> None:
        """Open the journal, after checking it is the one this box wrote (or create it).

        Args:
            path: SQLite file; its id file is :func:`id_path_for` (``journal.id``).
            durable: ``synchronous=FULL`` (fsync on every commit). False is only for
                benchmarks: a power cut could lose the last commits.
            start_new: the admin's explicit "start over" (``edge-runtime run
                --new-journal``): a journal that would be refused is moved aside
                (never deleted) and a new one created, with a WARNING that its
                undelivered results are not sent. A healthy journal is kept (and
                the flag reported as ignored), so a flag left in a unit file can
                never throw results away at every restart.
            lock: the instance lock, when the caller took it earlier (``edge-runtime
                run`` takes it before its start-up checks); else it is taken here.
                Either way the journal owns it from here and :meth:`close` frees it.

        Raises:
            JournalInUse: another service holds the journal's lock (its PID is named).
            JournalIntegrityError: missing, empty, replaced or damaged journal.
            JournalError: the journal cannot be opened (disk full, permissions, lock).
        """
        # Absolute, so every message names the file an admin can find.
        self.path = Path(path).absolute()
        self.id_path = id_path_for(self.path)
        self._instance_lock = lock or InstanceLock(self.path)
        try:
            self._open(durable, start_new)
        except BaseException:
            self._instance_lock.release()
            raise
        #: The box's scan-reference key (:meth:`use_reference_key`); None: unkeyed references.
        self.reference_key: bytes | None = None
        #: Why the journal on disk is no longer the one open here (sticky), or None.
        self.lost: str | None = None
        #: Called once (on the thread that noticed) when the journal is found lost.
        self.on_lost: Callable[[str], None] | None = None
        self._lost_lock = threading.Lock()
        self._identity = self._on_disk()
        if not write_anchor(self.path, self.journal_id):
            log.warning(
                "cannot write %s (is %s writable for this user?): if the folder %s is ever deleted, "
                "the next start cannot tell that from a first start and would begin an empty journal",
                anchor_path_for(self.path),
                self.path.parent.parent,
                self.path.parent,
            )

    def _open(self, durable: bool, start_new: bool) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise translate_error(exc, self.path, "Creating the journal folder") from exc
        try:
            found = inspect_journal(self.path)
        except JournalIntegrityError as exc:
            if not start_new:
                raise
            moved = move_aside(self.path)
            old = next((dst for src, dst in moved if src == self.path), None)
            pending = None if old is None else pending_in(old)
            if moved:
                kept = "Its files were moved aside, not deleted: " + ", ".join(dst.name for _, dst in moved)
            else:
                kept = "None of its files was left to move aside"
            log.warning(
                "starting over with a new journal at %s, as asked (--new-journal); the old one was "
                "refused: %s %s. Results not yet delivered in the old journal (%s) are NOT sent.",
                self.path,
                exc.message.removeprefix("The service will not start: "),
                kept,
                "an unknown number: it cannot be read" if pending is None else pending,
            )
            found = None
        else:
            if start_new and found is not None:
                log.warning(
                    "--new-journal ignored: the journal %s (id %s) is healthy, so it was kept and "
                    "nothing was moved aside. Remove --new-journal from the command line.",
                    self.path,
                    found.file_id or found.db_id,
                )
        try:
            if found is None:
                self._db = connect(self.path, create=True)
                self._configure(durable)
                self.journal_id = str(uuid.uuid4())
                self._db.execute(
                    "INSERT INTO meta(key, value) VALUES (?, ?), ('created_utc', ?)",
                    (ID_KEY, self.journal_id, utc_now()),
                )
                write_id_file(self.id_path, self.journal_id)
                log.info(
                    "new journal %s created (id %s, recorded in %s)",
                    self.path,
                    self.journal_id,
                    self.id_path.name,
                )
            else:
                self._db = found.db
                self._configure(durable)
                if found.file_id is None:
                    self.journal_id = found.db_id or str(uuid.uuid4())
                    self._db.execute(
                        "INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (ID_KEY, self.journal_id)
                    )
                    write_id_file(self.id_path, self.journal_id)
                    log.info(
                        "journal %s had no id file (first start after an upgrade, or an interrupted "
                        "first start): adopted it as this box's journal, id %s, now recorded in %s",
                        self.path,
                        self.journal_id,
                        self.id_path.name,
                    )
                else:
                    self.journal_id = found.file_id
        except (sqlite3.Error, OSError) as exc:
            raise translate_error(exc, self.path, "Opening the journal") from exc
        if durable:
            # From here on durability comes from Journal._sync: one shared fsync of the WAL.
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._lock = threading.Lock()
        self._durable = durable
        self._wal_path = self.path.with_name(self.path.name + "-wal")
        #: Commits made (under ``_lock``) and commits known durable (under ``_sync_lock``).
        self._commits = 0
        self._synced = 0
        self._sync_lock = threading.Lock()

    def _configure(self, durable: bool) -> None:
        """Connection settings and schema (idempotent: also brings older journals up to date)."""
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL while the journal is set up (schema, id); NORMAL once it runs (see _tx, _sync).
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'OFF'}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._db.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
            (_SCHEMA_VERSION,),
        )

    # -- still the journal on disk? ----------------------------------------------------
    def _on_disk(self) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        """(device, inode) of the journal file and of its id file at their paths; None: missing."""

        def ident(path: Path) -> tuple[int, int] | None:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return None
            except OSError:
                # Unreadable now (permissions, a dying disk): not proof that it was replaced.
                return (-1, -1)
            return (st.st_dev, st.st_ino)

        return ident(self.path), ident(self.id_path)

    def _identity_problem(self) -> str | None:
        journal, id_file = self._on_disk()
        was_journal, was_id = self._identity
        if journal is None or id_file is None:
            if not self.path.parent.exists():
                return f"its folder {self.path.parent} was deleted while the service ran"
            missing = self.path if journal is None else self.id_path
            return f"{missing} was deleted while the service ran"
        if (-1, -1) in (journal, id_file):
            return None
        if journal != was_journal:
            return f"{self.path} was replaced by another file while the service ran"
        if id_file != was_id:
            return f"{self.id_path} was replaced by another file while the service ran"
        return None

    def verify_on_disk(self) -> str | None:
        """Why the journal at :attr:`path` is no longer the one open here; None while it is.

        A deleted or replaced journal (or id file) is not refused by SQLite: the open
        connection goes on writing into the old file, which nobody can open again.
        Two ``stat`` calls (microseconds); called before each guarded write and at
        every heartbeat. Once lost, always lost (until a restart): the first call
        that notices calls :attr:`on_lost`.
        """
        if self.lost is not None:
            return self.lost
        problem = self._identity_problem()
        if problem is None:
            return None
        with self._lost_lock:
            first = self.lost is None
            if first:
                self.lost = problem
        if first and self.on_lost is not None:
            self.on_lost(problem)
        return self.lost

    def _refuse_if_lost(self) -> None:
        problem = self.verify_on_disk()
        if problem is not None:
            raise JournalLost(
                f"The journal {self.path} is lost: {problem}. Nothing more is recorded in it, so no "
                "scan leaves the inbox or the DICOM spool until the service is restarted.",
                action="Stop the service, then restore the journal as the ERROR line the service "
                f"logged when it noticed says: move the copy it saved (NAME.rescued-<UTC time> beside "
                f"{self.path.name}) or your latest backup to {self.path}, and start again.",
            )

    def save_rescue_copy(self, dest: Path | None = None) -> Path | None:
        """Copy what the open connection still holds to ``dest`` (``NAME.rescued-<UTC time>.sqlite3``).

        For a journal deleted under the running service: the copy has every
        commit (its id inside), so moving it to :attr:`path` restores the journal
        as it was (the id file is rewritten from it at the next start). Written
        as ``….part``, integrity-checked, fsynced, renamed. None when it cannot be
        written (the message says why in the log).
        """
        dest = dest or rescue_path_for(self.path)
        part = dest.with_name(dest.name + ".part")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            copy = sqlite3.connect(part, isolation_level=None)
            try:
                with self._lock:
                    self._db.backup(copy)
                copy.execute("PRAGMA journal_mode=DELETE")
                problems = [str(row[0]) for row in copy.execute("PRAGMA integrity_check")]
            finally:
                copy.close()
            if problems != ["ok"]:
                raise JournalError(f"the copy failed SQLite's integrity check: {'; '.join(problems[:3])}")
            with open(part, "rb") as f:
                os.fsync(f.fileno())
            os.replace(part, dest)
        except (sqlite3.Error, OSError, JournalError) as exc:
            log.error("could not save a copy of the lost journal %s to %s: %s", self.path, dest, exc)
            return None
        return dest

    # -- plumbing ----------------------------------------------------------------------
    @contextmanager
    def _tx(self, *, durable: bool = True, guard: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; ``durable``: on disk (fsynced) when the block returns.

        ``durable=False`` commits are crash-safe (the WAL is written) and become
        power-cut safe with the next durable commit's fsync. ``guard``: refused
        (:class:`~edge_runtime.errors.JournalLost`) once the journal on disk is no
        longer this one (:meth:`verify_on_disk`).
        """
        if guard:
            self._refuse_if_lost()
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    # After some errors (SQLITE_FULL, I/O errors) SQLite has already rolled
                    # back: a second ROLLBACK would fail and hide the real cause.
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise translate_error(exc, self.path, "Writing to the journal") from exc
            self._commits += 1
            commit = self._commits
        if durable:
            self._sync(commit)

    def _sync(self, commit: int) -> None:
        """Return once commit number ``commit`` (and every one before it) is on disk.

        What ``synchronous=FULL`` does after each commit (fsync the WAL file), done outside
        the journal's lock and shared: a thread that finds its commit already covered by
        another thread's fsync returns at once. The WAL header is synced by SQLite itself
        when the WAL is reused after a checkpoint (``synchronous=NORMAL``), and a checkpoint
        fsyncs the WAL before copying it, so the WAL file is the one place to flush.
        """
        if not self._durable:
            return
        with self._sync_lock:
            if self._synced >= commit:
                return
            # Every commit counted so far has written its WAL frames (COMMIT returned).
            covered = self._commits
            try:
                try:
                    fd = os.open(self._wal_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except FileNotFoundError:
                    # No WAL (checkpointed and removed): the pages are in the database file.
                    fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise translate_error(exc, self.path, "Writing to the journal") from exc
            self._synced = max(self._synced, covered)

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise translate_error(exc, self.path, "Reading the journal") from exc

    @staticmethod
    def _record(row: tuple[Any, ...]) -> InputRecord:
        return InputRecord(
            id=row[0],
            sha256=row[1],
            file_name=row[2],
            path=row[3],
            state=row[4],
            attempts=row[5],
            message_id=row[6],
            error=json.loads(row[7]) if row[7] else None,
            failures=row[8],
        )

    _COLUMNS = "id, sha256, file_name, path, state, attempts, message_id, error_json, failures"

    def close(self) -> None:
        """Close the connection and free the instance lock."""
        try:
            with self._lock:
                self._db.close()
        finally:
            self._instance_lock.release()

    # -- file names --------------------------------------------------------------------
    def use_reference_key(self, key: bytes | None) -> int:
        """Name scans by references under ``key`` from now on; rewrite rows that hold names.

        Rows written by versions that stored file names and paths get the
        reference and the path token instead (their error records lose the
        name too), in one transaction with ``secure_delete`` on and a checkpoint
        after it, so the names are overwritten in the file rather than left in
        its free pages. Returns how many rows were rewritten.
        """
        self.reference_key = key
        rows = self._query(
            "SELECT id, sha256, file_name, path, error_json FROM inputs "
            "WHERE path NOT LIKE 'hmac:%' AND path NOT LIKE 'sha256:%'"
        )
        if not rows:
            return 0
        updates = []
        for row_id, sha256, name, where, error_json in rows:
            ref = scan_ref(sha256, name, key=key)
            error = _scrubbed_error(error_json, name, ref)
            updates.append((ref, path_token(where, key=key), error, row_id))
        with self._lock:
            self._db.execute("PRAGMA secure_delete=ON")
        try:
            with self._tx() as db:
                db.executemany("UPDATE inputs SET file_name=?, path=?, error_json=? WHERE id=?", updates)
        finally:
            with self._lock:
                try:
                    self._db.execute("PRAGMA secure_delete=OFF")
                    # Copy the rewritten pages over the old ones in the main file now.
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error as exc:
                    log.warning("journal %s: checkpoint after rewriting names failed: %s", self.path, exc)
        log.info(
            "journal %s: %d rows written by an earlier version named their files; they now hold "
            "the scans' references instead",
            self.path,
            len(updates),
        )
        return len(updates)

    def _same_path(self, stored: str, path: Path) -> bool:
        """Whether ``stored`` (a path token, or a path in rows not yet rewritten) is ``path``."""
        where = str(path)
        return stored in (path_token(where, key=self.reference_key), path_token(where, key=None)) or (
            stored == display_name(where)  # a row of an earlier version, not rewritten yet
        )

    # -- inputs ------------------------------------------------------------------------
    def admit(self, sha256: str, path: Path, size_bytes: int) -> Admission:
        """Record a complete file found in the inbox and say what to do with it.

        For ``process`` the input is marked ``processing`` and its attempt counter
        incremented in the same transaction (one fsync per scan saved); the record
        returned carries the new attempt number. A ``done`` input whose result is
        no longer the newest for its SOP Instance UID (another image came under the
        UID since) is processed again (attempts counted afresh): subscribers must
        end up holding the latest content, and this file is it.

        The journal keeps the scan's reference and a token of ``path``, never the
        file's name (:meth:`use_reference_key`).
        """
        name = scan_ref(sha256, path.name, key=self.reference_key)
        where = path_token(str(path), key=self.reference_key)
        now = utc_now()
        # Not waited for on disk: a power cut loses at most this 'processing' mark (and an
        # attempt count), and the scan is still in the inbox to be admitted again.
        with self._tx(durable=False) as db:
            row = db.execute(
                f"SELECT {self._COLUMNS} FROM inputs WHERE sha256 = ?",  # noqa: S608 - a constant column list
                (sha256,),
            ).fetchone()
            if row is None:
                cur = db.execute(
                    "INSERT INTO inputs(sha256, file_name, path, size_bytes, state, attempts, "
                    "received_utc, updated_utc) VALUES (?, ?, ?, ?, 'processing', 1, ?, ?)",
                    (sha256, name, where, size_bytes, now, now),
                )
                record = InputRecord(cur.lastrowid or 0, sha256, name, where, "processing", 1, None, None)
                return Admission("process", record, duplicate=False)
            record = self._record(row)
            duplicate = not self._same_path(record.path, path)
            if record.state == "done" and self._superseded(db, record):
                db.execute(
                    "UPDATE inputs SET state='processing', attempts=1, failures=0, file_name=?, path=?, "
                    "updated_utc=? WHERE id=?",
                    (name, where, now, record.id),
                )
                again = replace(
                    record, file_name=name, path=where, state="processing", attempts=1, failures=0
                )
                return Admission("process", again, duplicate=False)
            if record.state == "done":
                return Admission("finish_done", record, duplicate)
            if record.state == "quarantined":
                return Admission("finish_quarantine", record, duplicate)
            if duplicate:
                # The same content is already queued under another name: that copy wins.
                return Admission("finish_done", record, duplicate=True)
            db.execute(
                "UPDATE inputs SET state='processing', attempts=attempts+1, updated_utc=? WHERE id=?",
                (now, record.id),
            )
            attempts = record.attempts + 1
            return Admission(
                "process", replace(record, state="processing", attempts=attempts), duplicate=False
            )

    def record_result(
        self, input_id: int, message_id: str, stored: str, deliveries: Sequence[Delivery]
    ) -> list[OutboxMessage]:
        """Commit a result (``stored``: its message as JSON) and its outbox messages in one transaction.

        Returns the new outbox messages; empty when the message id was already
        recorded (the same SOP instance sent again), so nothing is published twice.
        """
        now = utc_now()
        created = []
        with self._tx() as db:
            db.execute(
                "UPDATE inputs SET state='done', message_id=?, result_json=?, error_json=NULL, "
                "updated_utc=? WHERE id=?",
                (message_id, stored, now, input_id),
            )
            for d in deliveries:
                cur = db.execute(
                    "INSERT OR IGNORE INTO outbox(message_id, sink, topic, payload, qos, "
                    "created_utc) VALUES (?, ?, ?, ?, ?, ?)",
                    (message_id, d.sink, d.topic, d.payload, d.qos, now),
                )
                if cur.rowcount:
                    created.append(
                        OutboxMessage(cur.lastrowid or 0, message_id, d.topic, d.payload, d.qos, d.sink)
                    )
        return created

    def record_failure(self, input_id: int) -> int:
        """An attempt ended in an operational error (not the file's fault); returns the count."""
        with self._tx() as db:
            db.execute(
                "UPDATE inputs SET failures=failures+1, updated_utc=? WHERE id=?", (utc_now(), input_id)
            )
            (failures,) = db.execute("SELECT failures FROM inputs WHERE id=?", (input_id,)).fetchone()
        return int(failures)

    def record_quarantine(self, input_id: int, error: dict[str, Any]) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE inputs SET state='quarantined', error_json=?, updated_utc=? WHERE id=?",
                (json.dumps(error, sort_keys=True), utc_now(), input_id),
            )

    def requeue_unfinished(self) -> int:
        """After a restart: work that was 'processing' when we stopped is queued again."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE inputs SET state='queued', updated_utc=? WHERE state='processing'",
                (utc_now(),),
            )
            return cur.rowcount

    def get(self, sha256: str) -> InputRecord | None:
        rows = self._query(
            f"SELECT {self._COLUMNS} FROM inputs WHERE sha256=?",  # noqa: S608 - a constant column list
            (sha256,),
        )
        return self._record(rows[0]) if rows else None

    _LATEST = (
        "SELECT id, message_id, json_extract(result_json, '$.supersedes') FROM inputs "
        "WHERE result_json IS NOT NULL AND state='done' AND id != ? "
        "AND json_extract(result_json, '$.input.sop_instance_uid') = ? "
        "ORDER BY updated_utc DESC, id DESC LIMIT 1"
    )

    def latest_result_of_instance(self, sop_instance_uid: str, exclude_input: int = 0) -> LatestResult | None:
        """The newest committed result for a SOP Instance UID (what subscribers hold), or None.

        ``exclude_input``: an input whose own earlier result does not count (it is
        being processed again). :func:`place_in_history` turns the answer into the
        new result's ``message_id`` and ``supersedes``.
        """
        rows = self._query(self._LATEST, (exclude_input, sop_instance_uid))
        if not rows:
            return None
        row_id, message_id, supersedes = rows[0]
        return LatestResult(int(row_id), str(message_id), str(supersedes) if supersedes else None)

    def _superseded(self, db: sqlite3.Connection, record: InputRecord) -> bool:
        """Whether a done input's result is no longer the newest for its SOP Instance UID."""
        (uid,) = db.execute(
            "SELECT json_extract(result_json, '$.input.sop_instance_uid') FROM inputs WHERE id=?",
            (record.id,),
        ).fetchone()
        if not uid or record.message_id is None:
            return False
        newest = db.execute(self._LATEST, (record.id, uid)).fetchone()
        if newest is None:
            return False
        (mine_utc,) = db.execute("SELECT updated_utc FROM inputs WHERE id=?", (record.id,)).fetchone()
        newer = db.execute(
            "SELECT updated_utc > ? OR (updated_utc = ? AND id > ?) FROM inputs WHERE id=?",
            (mine_utc, mine_utc, record.id, newest[0]),
        ).fetchone()[0]
        return bool(newer) and str(newest[1]) != record.message_id

    def result_of(self, sha256: str) -> dict[str, Any] | None:
        rows = self._query("SELECT result_json FROM inputs WHERE sha256=?", (sha256,))
        return json.loads(rows[0][0]) if rows and rows[0][0] else None

    def counts(self) -> dict[str, int]:
        """Inputs by state plus outbox depth (for status and health)."""
        counts = {state: 0 for state in ("queued", "processing", "done", "quarantined")}
        for state, n in self._query("SELECT state, COUNT(*) FROM inputs GROUP BY state"):
            counts[state] = n
        counts["outbox_pending"] = self.outbox_pending()
        return counts

    def undelivered_message_ids(self) -> set[str]:
        """Results with a row some sink has not confirmed yet (their report files are still needed)."""
        rows = self._query("SELECT DISTINCT message_id FROM outbox WHERE delivered_utc IS NULL")
        return {str(row[0]) for row in rows}

    def results_awaiting_delivery(self) -> int:
        """Results with an undelivered row for at least one sink (a result has a row per sink)."""
        (pending,) = self._query("SELECT COUNT(DISTINCT message_id) FROM outbox WHERE delivered_utc IS NULL")[
            0
        ]
        return int(pending)

    def outbox_pending(self, sinks: Collection[str] | None = None) -> int:
        """Undelivered outbox rows of ``sinks`` (None: all sinks); O(pending) by the partial index."""
        if sinks is None:
            (pending,) = self._query("SELECT COUNT(*) FROM outbox WHERE delivered_utc IS NULL")[0]
            return int(pending)
        names = sorted(sinks)
        if not names:
            return 0
        marks = ",".join("?" * len(names))
        sql = "SELECT COUNT(*) FROM outbox WHERE delivered_utc IS NULL AND sink IN "
        (pending,) = self._query(f"{sql}({marks})", tuple(names))[0]
        return int(pending)

    def backlog_by_sink(self) -> dict[str, SinkBacklog]:
        """Each sink with undelivered rows: how many, and the oldest one's commit time (for status)."""
        rows = self._query(
            "SELECT sink, COUNT(*), MIN(created_utc) FROM outbox WHERE delivered_utc IS NULL GROUP BY sink"
        )
        return {str(sink): SinkBacklog(int(n), str(oldest)) for sink, n, oldest in rows}

    def undelivered_of(self, sink: str) -> list[str]:
        """The message ids ``sink`` has not confirmed, newest first."""
        rows = self._query(
            "SELECT message_id FROM outbox WHERE sink = ? AND delivered_utc IS NULL ORDER BY seq DESC",
            (sink,),
        )
        return [str(row[0]) for row in rows]

    def still_undelivered(self, message_ids: Collection[str]) -> set[str]:
        """Those of ``message_ids`` that some sink has not confirmed yet (their files are needed)."""
        found: set[str] = set()
        ids = sorted(message_ids)
        for start in range(0, len(ids), 500):  # within SQLite's limit on parameters
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            sql = "SELECT DISTINCT message_id FROM outbox WHERE delivered_utc IS NULL AND message_id IN "
            rows = self._query(f"{sql}({marks})", tuple(chunk))
            found.update(str(row[0]) for row in rows)
        return found

    def drop_oldest(self, sink: str, keep: int, reason: str) -> list[str]:
        """Drop all but the newest ``keep`` undelivered rows of ``sink``; returns their message ids.

        Oldest first. Each dropped row moves to ``outbox_dropped`` (with ``reason``) in one
        transaction, waited for on disk: the caller may then remove report files that only
        this row needed, and a power cut must not bring the row back without its files.
        A drainer that holds a dropped row already may still deliver it; its mark is then a
        no-op. Only for sinks other than the results channel (never the MQTT results).
        """
        now = utc_now()
        with self._tx() as db:
            rows = db.execute(
                "SELECT seq, message_id, created_utc FROM outbox WHERE sink = ? AND delivered_utc IS NULL "
                "ORDER BY seq DESC LIMIT -1 OFFSET ?",
                (sink, max(0, keep)),
            ).fetchall()
            if not rows:
                return []
            rows.reverse()
            db.executemany(
                "INSERT OR REPLACE INTO outbox_dropped(seq, message_id, sink, created_utc, "
                "dropped_utc, reason) VALUES (?, ?, ?, ?, ?, ?)",
                [(seq, message_id, sink, created, now, reason) for seq, message_id, created in rows],
            )
            db.executemany("DELETE FROM outbox WHERE seq = ?", [(seq,) for seq, _, _ in rows])
        return [str(message_id) for _, message_id, _ in rows]

    def dropped_count(self, sink: str | None = None) -> int:
        """Rows dropped so far (all time), of ``sink`` or of every sink."""
        if sink is None:
            (n,) = self._query("SELECT COUNT(*) FROM outbox_dropped")[0]
        else:
            (n,) = self._query("SELECT COUNT(*) FROM outbox_dropped WHERE sink = ?", (sink,))[0]
        return int(n)

    # -- the admin page ----------------------------------------------------------------
    _SCAN_COLUMNS = "file_name, sha256, state, received_utc, updated_utc, message_id, result_json, error_json"

    @staticmethod
    def _scan_row(row: tuple[Any, ...]) -> ScanRow:
        return ScanRow(
            ref=str(row[0]),
            sha256=str(row[1]),
            state=str(row[2]),
            received_utc=str(row[3]),
            updated_utc=str(row[4]),
            message_id=row[5],
            result=json.loads(row[6]) if row[6] else None,
            error=json.loads(row[7]) if row[7] else None,
        )

    def recent_scans(self, limit: int = 50) -> list[ScanRow]:
        """The inputs changed most recently, newest first (each named by its reference)."""
        rows = self._query(
            f"SELECT {self._SCAN_COLUMNS} FROM inputs ORDER BY updated_utc DESC, id DESC LIMIT ?",  # noqa: S608
            (limit,),
        )
        return [self._scan_row(row) for row in rows]

    def scan_by_ref(self, ref: str) -> ScanRow | None:
        """The input a reference names (the newest one, should two share a reference)."""
        rows = self._query(
            f"SELECT {self._SCAN_COLUMNS} FROM inputs WHERE file_name = ? ORDER BY id DESC LIMIT 1",  # noqa: S608
            (ref,),
        )
        return self._scan_row(rows[0]) if rows else None

    def deliveries(self, message_ids: Collection[str]) -> dict[str, dict[str, str | None]]:
        """For each message id: each sink's row and when it was confirmed (None: not yet).

        A row a sink fell too far behind on (dropped) reads ``dropped``.
        """
        found: dict[str, dict[str, str | None]] = {}
        ids = sorted(message_ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for message_id, sink, delivered in self._query(
                f"SELECT message_id, sink, delivered_utc FROM outbox WHERE message_id IN ({marks})",  # noqa: S608
                tuple(chunk),
            ):
                found.setdefault(str(message_id), {})[str(sink)] = delivered
            for message_id, sink in self._query(
                f"SELECT message_id, sink FROM outbox_dropped WHERE message_id IN ({marks})",  # noqa: S608
                tuple(chunk),
            ):
                found.setdefault(str(message_id), {})[str(sink)] = "dropped"
        return found

    def retry_quarantined(self, sha256: str, path: Path) -> bool:
        """An admin sends a quarantined input back: it is queued again as if new, at ``path``.

        ``path`` is where the file will be in the inbox, as the inbox names it (resolved),
        so that :meth:`admit` finds this very record there. Returns False when ``sha256``
        has no quarantined record (never had, or has a result): nothing changes. A record
        still queued by an earlier retry that did not finish (a crash before the move) is
        queued again. The caller moves the file only after this committed, so a crash in
        between leaves a queued record and the file still in quarantine, retried again
        from the page, never a file processed without its record.
        """
        where = path_token(str(path), key=self.reference_key)
        with self._tx() as db:
            cur = db.execute(
                "UPDATE inputs SET state='queued', attempts=0, failures=0, error_json=NULL, path=?, "
                "updated_utc=? WHERE sha256=? AND state IN ('quarantined', 'queued')",
                (where, utc_now(), sha256),
            )
        return bool(cur.rowcount)

    def record_admin_action(self, action: str, ref: str, detail: str) -> None:
        """Journal what an admin did (e.g. a discard: the file moved aside, its record kept)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO admin_actions(at_utc, action, ref, detail) VALUES (?, ?, ?, ?)",
                (utc_now(), action, ref, detail),
            )

    def admin_actions(self, limit: int = 50) -> list[AdminAction]:
        """What admins did from the page, newest first."""
        rows = self._query(
            "SELECT at_utc, action, ref, detail FROM admin_actions ORDER BY id DESC LIMIT ?", (limit,)
        )
        return [AdminAction(*map(str, row)) for row in rows]

    # -- outbox ------------------------------------------------------------------------
    def pending_messages(
        self, sink: str = "mqtt", after_seq: int = 0, limit: int = 100
    ) -> list[OutboxMessage]:
        rows = self._query(
            "SELECT seq, message_id, topic, payload, qos, sink FROM outbox "
            "WHERE sink = ? AND delivered_utc IS NULL AND seq > ? ORDER BY seq LIMIT ?",
            (sink, after_seq, limit),
        )
        return [OutboxMessage(*row) for row in rows]

    def mark_delivered(self, *seqs: int) -> None:
        """Mark messages acknowledged; several at once share one fsync."""
        if not seqs:
            return
        now = utc_now()
        # Not waited for on disk: a power cut can only lose the mark, and the message is then
        # sent again (at least once; subscribers drop repeats by message_id). Allowed on a lost
        # journal too: it only keeps the rescued copy from sending the message again.
        with self._tx(durable=False, guard=False) as db:
            db.executemany(
                "UPDATE outbox SET delivered_utc=? WHERE seq=? AND delivered_utc IS NULL",
                [(now, seq) for seq in seqs],
            )


@dataclass(frozen=True)
class Receipt:
    """An object the DICOM receiver stored in its spool folder and acknowledged."""

    file_name: str
    sha256: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    calling_ae: str
    peer_address: str
    size_bytes: int
    received_utc: str = ""


class ReceiptLog:
    """The DICOM receiver's own connection to the journal, for its ``receipts`` table.

    A second connection rather than the service's :class:`Journal` object, so a
    source needs only the journal's path (sources are built from the
    configuration alone). WAL lets its one-row commits interleave with the
    workers' transactions (each waits for the other's write lock, up to the
    connection timeout); ``synchronous=FULL`` because a receipt is written
    before the sender is told the object is safe. The journal must already
    exist (the service opens and checks it first): a missing one is an error,
    never silently created.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).absolute()
        self._lock = threading.Lock()
        try:
            self._db = connect(self.path, create=False)
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_RECEIPTS_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise translate_error(exc, self.path, "Opening the journal for DICOM receipts") from exc

    def record(self, receipt: Receipt) -> Receipt:
        """Commit one receipt (fsynced); returns it with its time."""
        stored = replace(receipt, received_utc=receipt.received_utc or utc_now())
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO receipts(file_name, sha256, sop_instance_uid, sop_class_uid, "
                    "transfer_syntax_uid, calling_ae, peer_address, size_bytes, received_utc) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        stored.file_name,
                        stored.sha256,
                        stored.sop_instance_uid,
                        stored.sop_class_uid,
                        stored.transfer_syntax_uid,
                        stored.calling_ae,
                        stored.peer_address,
                        stored.size_bytes,
                        stored.received_utc,
                    ),
                )
            except sqlite3.Error as exc:
                raise translate_error(exc, self.path, "Recording a DICOM receipt") from exc
        return stored

    def recent(self, limit: int = 100) -> list[Receipt]:
        """The newest receipts, newest first (for status and tests)."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT file_name, sha256, sop_instance_uid, sop_class_uid, transfer_syntax_uid, "
                    "calling_ae, peer_address, size_bytes, received_utc FROM receipts "
                    "ORDER BY id DESC LIMIT ?",
                    (limit,),
                ).fetchall()
            except sqlite3.Error as exc:
                raise translate_error(exc, self.path, "Reading DICOM receipts") from exc
        return [Receipt(*row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
