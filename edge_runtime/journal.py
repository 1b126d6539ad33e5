"""The SQLite journal that runs beside the pipeline.

It is what makes the service restartable without losing or repeating work:

* ``inputs``: one row per distinct input (keyed by content sha256) with its
  state (``queued`` -> ``processing`` -> ``done`` | ``quarantined``),
  attempts, result and error.
* ``outbox``: every result message, one row per sink (``mqtt``, Greengrass
  ``ipc-local``, ``ipc-iotcore``), committed *in the same transaction* that
  marks its input done, and marked delivered only when the broker has
  acknowledged it (PUBACK). Undelivered messages are re-sent after a
  reconnect or a restart, in order.

An inbox file is removed only after its outcome is committed here, so a
crash at any point either leaves the file in the inbox (and it is picked up
again) or leaves a committed outcome (and the leftover file is cleaned up).
WAL mode keeps readers and the single writer from blocking each other; every
write is one short transaction with ``synchronous=FULL`` so a committed
outcome survives a power cut.

**Identity.** Each journal has an id (a UUID), stored twice: in its ``meta``
table and in an id file beside it (``journal.sqlite3`` -> ``journal.id``).
The id file is the box's memory that a journal existed. Without it, a journal
truncated to 0 bytes, deleted, swapped for another box's, or damaged would be
recreated empty at the next start and the results it still had to deliver
would be lost without a word (issue 14). At open:

* no journal, no id file: first start; both are created (logged);
* journal without id file: upgraded from a version without ids, or a crash
  between creating the two; the journal is adopted (logged);
* id file, but the journal is missing, empty, carries another id, or fails
  ``PRAGMA quick_check``: :class:`JournalIntegrityError`, start refused, unless
  the admin asked to start over (``start_new``, ``edge-runtime run
  --new-journal``): the old files are then moved aside, never deleted.

:func:`check_journal` and :func:`backup_journal` back ``edge-runtime journal
check`` / ``backup``; both are safe while the service runs (WAL readers do not
block the writer).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import JournalError, JournalIntegrityError
from .results import utc_now

__all__ = [
    "Admission",
    "Delivery",
    "InputRecord",
    "Journal",
    "JournalReport",
    "OutboxMessage",
    "backup_journal",
    "check_journal",
    "id_path_for",
]

log = logging.getLogger(__name__)

_SCHEMA = """
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
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_SCHEMA_VERSION = "1"
_ID_KEY = "journal_id"
_SQLITE_HEADER = b"SQLite format 3\x00"


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
class Admission:
    """What :meth:`Journal.admit` decided for a file found in the inbox.

    ``action`` is ``process`` (new or unfinished work, now marked processing),
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
class Delivery:
    """Where one result goes: a sink, its topic, the (sink-specific) payload and QoS."""

    sink: str
    topic: str
    payload: str
    qos: int = 1


# -- identity and integrity ------------------------------------------------------------
def id_path_for(path: str | Path) -> Path:
    """The id file of a journal: ``journal.sqlite3`` -> ``journal.id``, in the same folder.

    Named after the journal, not fixed, so several journals in one folder (tests,
    benchmarks) each have their own.
    """
    path = Path(path)
    return path.with_name(path.name + ".id") if path.suffix == ".id" else path.with_suffix(".id")


def _restore_action(path: Path) -> str:
    return (
        f"Stop the service. Restore {path.name} from your latest backup (made with 'edge-runtime "
        f"journal backup') to {path} and start again; or start over with 'edge-runtime run "
        "--new-journal', which moves the old files aside (nothing is deleted): results not yet "
        "delivered in them are then NOT sent, and scans whose inbox files were already removed "
        "are not analysed again."
    )


def _refuse(path: Path, what: str) -> JournalIntegrityError:
    return JournalIntegrityError(
        f"The service will not start: {what} Starting with an empty journal would silently drop the results "
        "it still had to deliver.",
        action=_restore_action(path),
    )


def _translate(exc: BaseException, path: Path, doing: str) -> JournalError:
    """Turn a sqlite3/OS error into a JournalError whose advice matches its cause.

    Only a full disk gets the free-space advice: a corrupt file told to "check free
    disk space" sends the admin the wrong way (issue 14).
    """
    if isinstance(exc, JournalError):
        return exc
    name = str(getattr(exc, "sqlite_errorname", "") or "")
    err = getattr(exc, "errno", None)
    folder = path.parent
    action: str | None = None
    if name.startswith("SQLITE_FULL") or err == errno.ENOSPC:
        action = (
            f"The disk holding {folder} is full. Free space on it, then try again (results already "
            "committed to the journal are kept)."
        )
    elif name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return JournalIntegrityError(
            f"The journal {path} is damaged: SQLite reports '{exc}' ({doing.lower()}).",
            action=_restore_action(path),
        )
    elif name.startswith(("SQLITE_READONLY", "SQLITE_PERM", "SQLITE_CANTOPEN", "SQLITE_AUTH")) or err in (
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
    ):
        action = (
            f"Check that the service's user can read and write {folder} and the journal files in it "
            f"({path.name}, {path.name}-wal, {path.name}-shm, {id_path_for(path).name}), and that "
            "the file system is mounted read-write."
        )
    elif name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        action = (
            f"Another process keeps {path} locked. Make sure only one edge-runtime service uses this "
            "Journal.Path, then try again."
        )
    elif name.startswith("SQLITE_IOERR") or err == errno.EIO:
        action = (
            "The disk reported an input/output error. Check the system log (journalctl -k, dmesg) "
            "for a failing disk, then run 'edge-runtime journal check'."
        )
    return JournalError(f"{doing} {path} failed: {exc}", action=action)


def _fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` survive a power cut."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_id_file(id_path: Path, journal_id: str) -> None:
    tmp = id_path.with_name(id_path.name + ".tmp")
    with open(tmp, "w", encoding="ascii") as f:
        f.write(journal_id + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, id_path)
    _fsync_dir(id_path.parent)


def _read_id_file(path: Path, id_path: Path) -> str | None:
    try:
        text = id_path.read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _translate(exc, path, "Reading the journal id file") from exc
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise JournalIntegrityError(
            f"The service will not start: the journal id file {id_path} is damaged (it should hold "
            "one UUID).",
            action=f"Restore {id_path.name} from your backup, or delete it: the journal {path} is then "
            "adopted as this box's journal at the next start (check first with 'edge-runtime journal "
            "check' that it is the right one).",
        ) from None


def _connect(path: Path, *, create: bool) -> sqlite3.Connection:
    # mode=rw never creates the file: a vanished journal must not be replaced silently.
    uri = f"{path.resolve().as_uri()}?mode={'rwc' if create else 'rw'}"
    return sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None, timeout=30)


@dataclass
class _Found:
    """An existing journal that passed the integrity checks (connection still open)."""

    db: sqlite3.Connection
    file_id: str | None  # from the id file; None: no id file (adopt)
    db_id: str | None  # from the meta table


def _inspect(path: Path, *, full: bool = False) -> _Found | None:
    """Check an existing journal against its id file without changing either.

    Returns None when there is neither (a first start); raises
    JournalIntegrityError naming the file and what was found when the journal is
    missing, empty, not a database, damaged, not a journal, or another journal.
    ``full`` runs ``integrity_check`` (every index too) instead of ``quick_check``.
    """
    id_path = id_path_for(path)
    file_id = _read_id_file(path, id_path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        if file_id is None:
            return None
        raise _refuse(
            path,
            f"the journal {path} is missing, but {id_path.name} beside it shows that journal "
            f"{file_id} was created there.",
        ) from None
    except OSError as exc:
        raise _translate(exc, path, "Reading the journal") from exc
    if size == 0:
        raise _refuse(path, f"the journal {path} is empty (0 bytes); it was truncated or replaced.")
    try:
        with open(path, "rb") as f:
            header = f.read(len(_SQLITE_HEADER))
    except OSError as exc:
        raise _translate(exc, path, "Reading the journal") from exc
    if header != _SQLITE_HEADER:
        raise _refuse(
            path,
            f"the journal {path} ({size} bytes) is not a SQLite database (it does not start with "
            "the SQLite header): it was overwritten or damaged.",
        )
    try:
        db = _connect(path, create=False)
    except sqlite3.Error as exc:
        raise _translate(exc, path, "Opening the journal") from exc
    try:
        problems = [
            str(row[0]) for row in db.execute(f"PRAGMA {'integrity_check' if full else 'quick_check'}")
        ]
        if problems != ["ok"]:
            raise _refuse(
                path,
                f"the journal {path} is damaged: SQLite's {'integrity' if full else 'quick'} check "
                f"found {len(problems)} problem(s), first: {'; '.join(problems[:3])}.",
            )
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"inputs", "outbox"} <= tables:
            raise _refuse(
                path,
                f"{path} is a SQLite database but not an edge-runtime journal (it has no inputs and "
                "outbox tables): Journal.Path points at the wrong file, or it was replaced.",
            )
        row = (
            db.execute("SELECT value FROM meta WHERE key=?", (_ID_KEY,)).fetchone()
            if "meta" in tables
            else None
        )
        db_id = str(row[0]) if row else None
        if file_id is not None and db_id != file_id:
            found = f"journal {db_id}" if db_id else "a journal without an id (from before ids)"
            raise JournalIntegrityError(
                f"The service will not start: {path} is {found}, but {id_path.name} beside it says this "
                f"box's journal is {file_id}: the file was replaced by another box's journal or an older "
                "copy. "
                "Starting with it would silently drop the results the right one still had to deliver.",
                action=_restore_action(path)
                + f" If you restored this file on purpose, delete {id_path.name} and start again: the "
                "journal is then adopted.",
            )
    except sqlite3.Error as exc:
        db.close()
        if str(getattr(exc, "sqlite_errorname", "")).startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
            raise _refuse(
                path, f"the journal {path} ({size} bytes) is damaged: SQLite reports '{exc}'."
            ) from exc
        raise _translate(exc, path, "Checking the journal") from exc
    except JournalError:
        db.close()
        raise
    return _Found(db, file_id, db_id)


def _pending_in(path: Path) -> int | None:
    """Undelivered outbox rows of a journal, read-only; None when it cannot be read."""
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            (n,) = db.execute("SELECT COUNT(*) FROM outbox WHERE delivered_utc IS NULL").fetchone()
        finally:
            db.close()
        return int(n)
    except (sqlite3.Error, OSError):
        return None


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def _move_aside(path: Path) -> list[tuple[Path, Path]]:
    """Rename the journal, its -wal/-shm and its id file to ``NAME.old-<UTC stamp>``.

    The stamp goes before the suffix and the -wal/-shm files keep their pairing
    (``journal.old-…sqlite3`` + ``journal.old-…sqlite3-wal``), so the moved set can
    still be opened, inspected or restored. Nothing is deleted. The id file moves
    last: a crash half-way leaves it behind and the next start is refused again.
    """
    stamp = _stamp()
    aside = path.with_name(f"{path.stem}.old-{stamp}{path.suffix}")
    n = 1
    while aside.exists() or id_path_for(aside).exists():
        n += 1
        aside = path.with_name(f"{path.stem}.old-{stamp}-{n}{path.suffix}")
    moves = [(path, aside)]
    moves += [(Path(f"{path}{tail}"), Path(f"{aside}{tail}")) for tail in ("-wal", "-shm")]
    moves.append((id_path_for(path), id_path_for(aside)))
    moved = []
    for src, dst in moves:
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise _translate(exc, path, "Moving the old journal aside") from exc
        moved.append((src, dst))
    _fsync_dir(path.parent)
    return moved


class Journal:
    """Thread-safe access to the journal database (one connection, one lock)."""

    def __init__(self, path: str | Path, *, durable: bool = True, start_new: bool = False) -> None:
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

        Raises:
            JournalIntegrityError: missing, empty, replaced or damaged journal.
            JournalError: the journal cannot be opened (disk full, permissions, lock).
        """
        # Absolute, so every message names the file an admin can find.
        self.path = Path(path).absolute()
        self.id_path = id_path_for(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _translate(exc, self.path, "Creating the journal folder") from exc
        try:
            found = _inspect(self.path)
        except JournalIntegrityError as exc:
            if not start_new:
                raise
            moved = _move_aside(self.path)
            old = next((dst for src, dst in moved if src == self.path), None)
            pending = None if old is None else _pending_in(old)
            log.warning(
                "starting over with a new journal at %s, as asked (--new-journal); the old one was "
                "refused: %s Its files were moved aside, not deleted: %s. Results not yet delivered "
                "in the old journal (%s) are NOT sent.",
                self.path,
                exc.message.removeprefix("The service will not start: "),
                ", ".join(dst.name for _, dst in moved) or "none",
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
                self._db = _connect(self.path, create=True)
                self._configure(durable)
                self.journal_id = str(uuid.uuid4())
                self._db.execute(
                    "INSERT INTO meta(key, value) VALUES (?, ?), ('created_utc', ?)",
                    (_ID_KEY, self.journal_id, utc_now()),
                )
                _write_id_file(self.id_path, self.journal_id)
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
                        "INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (_ID_KEY, self.journal_id)
                    )
                    _write_id_file(self.id_path, self.journal_id)
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
            raise _translate(exc, self.path, "Opening the journal") from exc
        self._lock = threading.Lock()

    def _configure(self, durable: bool) -> None:
        """Connection settings and schema (idempotent: also brings older journals up to date)."""
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'OFF'}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._db.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
            (_SCHEMA_VERSION,),
        )

    # -- plumbing ----------------------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
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
                raise _translate(exc, self.path, "Writing to the journal") from exc

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise _translate(exc, self.path, "Reading the journal") from exc

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
        with self._lock:
            self._db.close()

    # -- inputs ------------------------------------------------------------------------
    def admit(self, sha256: str, path: Path, size_bytes: int) -> Admission:
        """Record a complete file found in the inbox and say what to do with it.

        For ``process`` the input is marked ``processing`` and its attempt counter
        incremented in the same transaction (one fsync per scan saved); the record
        returned carries the new attempt number.
        """
        now = utc_now()
        with self._tx() as db:
            row = db.execute(
                f"SELECT {self._COLUMNS} FROM inputs WHERE sha256 = ?",  # noqa: S608 - a constant column list
                (sha256,),
            ).fetchone()
            if row is None:
                cur = db.execute(
                    "INSERT INTO inputs(sha256, file_name, path, size_bytes, state, attempts, "
                    "received_utc, updated_utc) VALUES (?, ?, ?, ?, 'processing', 1, ?, ?)",
                    (sha256, path.name, str(path), size_bytes, now, now),
                )
                record = InputRecord(
                    cur.lastrowid or 0, sha256, path.name, str(path), "processing", 1, None, None
                )
                return Admission("process", record, duplicate=False)
            record = self._record(row)
            duplicate = record.path != str(path)
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
        self, input_id: int, result: dict[str, Any], deliveries: Sequence[Delivery]
    ) -> list[OutboxMessage]:
        """Commit a result and its outbox messages (one per sink) in one transaction.

        Returns the new outbox messages; empty when the message id was already
        recorded (the same SOP instance sent again), so nothing is published twice.
        """
        stored = json.dumps(result, separators=(",", ":"), sort_keys=True)
        now = utc_now()
        created = []
        with self._tx() as db:
            db.execute(
                "UPDATE inputs SET state='done', message_id=?, result_json=?, error_json=NULL, "
                "updated_utc=? WHERE id=?",
                (result["message_id"], stored, now, input_id),
            )
            for d in deliveries:
                cur = db.execute(
                    "INSERT OR IGNORE INTO outbox(message_id, sink, topic, payload, qos, "
                    "created_utc) VALUES (?, ?, ?, ?, ?, ?)",
                    (result["message_id"], d.sink, d.topic, d.payload, d.qos, now),
                )
                if cur.rowcount:
                    created.append(
                        OutboxMessage(
                            cur.lastrowid or 0, result["message_id"], d.topic, d.payload, d.qos, d.sink
                        )
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

    def outbox_pending(self) -> int:
        """Undelivered outbox rows, all sinks (the partial index makes this O(pending))."""
        (pending,) = self._query("SELECT COUNT(*) FROM outbox WHERE delivered_utc IS NULL")[0]
        return int(pending)

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
        with self._tx() as db:
            db.executemany(
                "UPDATE outbox SET delivered_utc=? WHERE seq=? AND delivered_utc IS NULL",
                [(now, seq) for seq in seqs],
            )


# -- admin commands ----------------------------------------------------------------------
@dataclass(frozen=True)
class JournalReport:
    """What ``edge-runtime journal check`` (and ``backup``) found in a healthy journal."""

    path: Path
    journal_id: str | None
    #: False: no id file yet; the service adopts the journal at its next start.
    id_file: bool
    size_bytes: int
    counts: dict[str, int]
    #: Undelivered outbox rows per sink (``mqtt``, ``ipc-local``, ``ipc-iotcore``).
    pending_by_sink: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "journal_id": self.journal_id,
            "id_file": self.id_file,
            "size_bytes": self.size_bytes,
            "counts": self.counts,
            "pending_by_sink": self.pending_by_sink,
        }


def _report(path: Path, db: sqlite3.Connection, journal_id: str | None, id_file: bool) -> JournalReport:
    counts = {state: 0 for state in ("queued", "processing", "done", "quarantined")}
    for state, n in db.execute("SELECT state, COUNT(*) FROM inputs GROUP BY state"):
        counts[str(state)] = int(n)
    pending = {
        str(sink): int(n)
        for sink, n in db.execute(
            "SELECT sink, COUNT(*) FROM outbox WHERE delivered_utc IS NULL GROUP BY sink ORDER BY sink"
        )
    }
    counts["outbox_pending"] = sum(pending.values())
    return JournalReport(path, journal_id, id_file, path.stat().st_size, counts, pending)


def check_journal(path: str | Path) -> JournalReport:
    """Full integrity check, id match and counts, without creating or changing anything.

    Safe while the service runs: it only reads (in WAL mode readers never block the
    writer). A journal without an id file is reported, not adopted: adopting is the
    service's job at start.

    Raises:
        JournalIntegrityError: what the service would refuse at start, and why.
        JournalError: there is no journal at all, or it cannot be read.
    """
    path = Path(path).absolute()
    found = _inspect(path, full=True)
    if found is None:
        raise JournalError(
            f"There is no journal at {path} (and no {id_path_for(path).name}): the service has not "
            "started with this Journal.Path, so there is nothing to check.",
            action="Check Journal.Path ('edge-runtime config check' shows the effective value), "
            "and pass the same --config or EDGE_RUNTIME__ settings as the service.",
        )
    try:
        return _report(path, found.db, found.file_id or found.db_id, found.file_id is not None)
    except (sqlite3.Error, OSError) as exc:
        raise _translate(exc, path, "Checking the journal") from exc
    finally:
        found.db.close()


def backup_journal(path: str | Path, dest: str | Path) -> JournalReport:
    """Copy the journal to ``dest`` with SQLite's online backup API; report the copy.

    Safe while the service runs: the copy is one consistent snapshot (a single
    backup step inside one read transaction; WAL lets the writer go on). The copy
    carries the journal's id in its meta table, so it can be restored in place
    (its id matches ``journal.id``). It is written as ``DEST.part``, checked
    (``integrity_check``, id), fsynced and only then renamed to ``DEST``: a
    half-written file never looks like a backup. ``dest`` may be a folder
    (``<stem>-<UTC stamp><suffix>`` inside it); an existing file is never
    overwritten.
    """
    path, dest = Path(path).absolute(), Path(dest).absolute()
    if dest.is_dir():
        dest = dest / f"{path.stem}-{_stamp()}{path.suffix}"
    if dest.exists():
        raise JournalError(
            f"The backup file {dest} already exists; nothing was overwritten.",
            action="Choose a new file name (or a folder: the backup is then named after the time).",
        )
    found = _inspect(path)
    if found is None:
        raise JournalError(
            f"There is no journal at {path}: the service has not started with this Journal.Path, "
            "so there is nothing to back up.",
            action="Check Journal.Path ('edge-runtime config check' shows the effective value).",
        )
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        part.unlink(missing_ok=True)  # a leftover of an interrupted backup, never a backup itself
        copy = sqlite3.connect(part, isolation_level=None)
        try:
            found.db.backup(copy)
            # A self-contained file (no -wal beside it) that can be copied anywhere.
            copy.execute("PRAGMA journal_mode=DELETE")
            problems = [str(row[0]) for row in copy.execute("PRAGMA integrity_check")]
            if problems != ["ok"]:
                raise JournalError(
                    f"The backup {part} failed SQLite's integrity check ({'; '.join(problems[:3])}); "
                    f"it was not renamed to {dest.name}.",
                    action="Check the backup disk (system log), then run the backup again.",
                )
            report = _report(part, copy, found.file_id or found.db_id, found.file_id is not None)
        finally:
            copy.close()
        with open(part, "rb") as f:
            os.fsync(f.fileno())
        os.replace(part, dest)
        _fsync_dir(dest.parent)
    except (sqlite3.Error, OSError) as exc:
        raise _translate(exc, dest, "Writing the backup") from exc
    finally:
        found.db.close()
    # The copy has no id file beside it: restored in place, it matches the box's journal.id.
    return replace(report, path=dest, id_file=False)
