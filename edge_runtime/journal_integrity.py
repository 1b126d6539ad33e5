"""The journal's identity and integrity, and the admin's check and backup commands.

Split from :mod:`edge_runtime.journal` (which records scans and results) because
this part answers another question: is the file on disk the journal this box
wrote? See the *Identity* section of :mod:`edge_runtime.journal`'s docstring.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sqlite3
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .durable import fsync_dir
from .errors import JournalError, JournalIntegrityError, JournalInUse

__all__ = [
    "ID_KEY",
    "InstanceLock",
    "JournalReport",
    "anchor_path_for",
    "backup_journal",
    "check_journal",
    "connect",
    "id_path_for",
    "inspect_journal",
    "lock_path_for",
    "move_aside",
    "pending_in",
    "rescue_path_for",
    "translate_error",
    "write_anchor",
    "write_id_file",
]

log = logging.getLogger("edge_runtime.journal")

ID_KEY = "journal_id"
_SQLITE_HEADER = b"SQLite format 3\x00"


# -- identity and integrity ------------------------------------------------------------
def id_path_for(path: str | Path) -> Path:
    """The id file of a journal: ``journal.sqlite3`` -> ``journal.id``, in the same folder.

    Named after the journal, not fixed, so several journals in one folder (tests,
    benchmarks) each have their own.
    """
    path = Path(path)
    return path.with_name(path.name + ".id") if path.suffix == ".id" else path.with_suffix(".id")


def lock_path_for(path: str | Path) -> Path:
    """The instance lock of a journal: ``journal.sqlite3`` -> ``journal.lock``, in the same folder."""
    return id_path_for(path).with_suffix(".lock")


def anchor_path_for(path: str | Path) -> Path | None:
    """The journal's anchor: proof, outside its folder, that the journal once existed.

    ``state/journal.sqlite3`` -> ``state.journal.id`` beside the ``state`` folder. It
    holds the same id as ``journal.id``. The id file alone cannot tell a deleted
    state folder (``rm -rf state``) from a first start, because it is deleted with
    the folder; the anchor is not. Keyed on the folder's and the journal's names, so
    pointing Journal.Path at a new folder or file is a first start there. None when
    the journal's folder is the file system root (there is no outside).
    """
    path = Path(path).absolute()
    folder = path.parent
    if folder.parent == folder:
        return None
    return folder.parent / f"{folder.name}.{id_path_for(path).name}"


def write_anchor(path: Path, journal_id: str) -> bool:
    """Write the anchor of ``path`` (best effort: False when its folder is not writable)."""
    anchor = anchor_path_for(path)
    if anchor is None:
        return False
    try:
        if _read_anchor(anchor) == journal_id:
            return True
        tmp = anchor.with_name(anchor.name + ".tmp")
        tmp.write_text(f"{journal_id}\n{path}\n", encoding="utf-8")
        os.replace(tmp, anchor)
    except OSError:
        return False
    _fsync_dir(anchor.parent)
    return True


def _read_anchor(anchor: Path | None) -> str | None:
    """The journal id an anchor records; None when there is none (or it is unreadable)."""
    if anchor is None:
        return None
    try:
        first = anchor.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0].strip()
        return str(uuid.UUID(first))
    except (OSError, ValueError):
        return None


def rescue_path_for(path: Path) -> Path:
    """Where the service saves its open copy of a journal deleted under it (named after the time)."""
    return path.with_name(f"{path.stem}.rescued-{_stamp()}{path.suffix}")


def _rescued_copies(path: Path) -> list[Path]:
    try:
        return sorted(path.parent.glob(f"{path.stem}.rescued-*{path.suffix}"))
    except OSError:
        return []


def _restore_action(path: Path) -> str:
    rescued = _rescued_copies(path)
    if rescued:
        newest = rescued[-1]
        return (
            f"Stop the service. The service that ran with it saved a copy when the journal disappeared: "
            f"{newest}. Restore it with 'mv {newest} {path}' (or restore your latest backup made with "
            "'edge-runtime journal backup') and start again; or start over with 'edge-runtime run "
            "--new-journal' (nothing is deleted, but results not yet delivered are then NOT sent)."
        )
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


def translate_error(exc: BaseException, path: Path, doing: str) -> JournalError:
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
    """:func:`~edge_runtime.durable.fsync_dir`, best effort: the file itself is already fsynced."""
    with contextlib.suppress(OSError):
        fsync_dir(folder)


def write_id_file(id_path: Path, journal_id: str) -> None:
    tmp = id_path.with_name(id_path.name + ".tmp")
    with open(tmp, "w", encoding="ascii") as f:
        f.write(journal_id + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, id_path)
    _fsync_dir(id_path.parent)


class InstanceLock:
    """One service per journal: exclusive ``flock`` locks on the journal's folder and ``journal.lock``.

    Two services on one journal would each take the other's scans and results and,
    sharing ``Mqtt.ClientId``, knock each other off the broker. The locks are the
    kernel's: they go with the process (a ``kill -9`` or a crash frees them; a stale
    file does not block). ``journal.lock`` holds the holder's PID so the refusal can
    name it; the lock that counts is the one on the folder, which deleting
    ``journal.lock`` under a running service cannot take away (a second service would
    otherwise lock a new file of that name and run beside the first). Where the PID
    file is gone, the holder is found in ``/proc/locks``. Not inherited by child
    processes (the decoders start from a forkserver, which gets no descriptors of ours).
    """

    def __init__(self, journal_path: str | Path) -> None:
        """Take the locks (creating the journal's folder if needed).

        Raises:
            JournalInUse: another process holds them; the message names its PID.
            JournalError: the lock file cannot be created (permissions, read-only disk).
        """
        journal = Path(journal_path).absolute()
        self.path = lock_path_for(journal)
        flags = getattr(os, "O_CLOEXEC", 0)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            folder = os.open(self.path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | flags)
        except OSError as exc:
            raise translate_error(exc, journal, "Opening the journal's folder") from exc
        fd = -1
        try:
            held = _try_flock(folder)
            if held:
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | flags, 0o644)
                except OSError as exc:
                    raise translate_error(exc, journal, "Creating the journal lock file") from exc
                held = _try_flock(fd)
            if not held:
                holder = _holder(self.path) or _flock_holder(folder)
                who = f"PID {holder}" if holder else "its PID unknown"
                check = f"Nothing to do if that one should run (check: ps -p {holder}). " if holder else ""
                raise JournalInUse(
                    f"Another edge-runtime service ({who}) is already running with the journal "
                    f"{journal}: it holds {self.path} and its folder. A second one would share its "
                    "scans, its results and its MQTT client id (the two would knock each other off "
                    "the broker), so this one does not start.",
                    action=check
                    + "To restart, stop that one first (systemctl stop, the Greengrass component, or "
                    + (f"kill {holder}" if holder else "kill its PID")
                    + "); to run a second service on this box, give it its own Journal.Path and "
                    "Mqtt.ClientId.",
                )
        except BaseException:
            if fd >= 0:
                os.close(fd)
            os.close(folder)
            raise
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        except OSError:
            pass  # the locks are held; only the PID in the refusal of a second start is missing
        self._fds: tuple[int, ...] = (folder, fd)

    def release(self) -> None:
        """Give the locks up (closing the descriptors frees them). Idempotent."""
        fds, self._fds = self._fds, ()
        for fd in fds:
            os.close(fd)


def _try_flock(fd: int) -> bool:
    """An exclusive, non-blocking ``flock``: False when another process holds one."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _holder(path: Path) -> int | None:
    """The PID ``journal.lock`` names, if it is there."""
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def _flock_holder(fd: int) -> int | None:
    """The PID holding a ``flock`` on ``fd``'s file, from ``/proc/locks`` (Linux); None if not found."""
    try:
        st = os.fstat(fd)
        wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            for line in locks:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 23667 fe:00:260072 0 EOF" (a "->" marks a waiter)
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    return None


def _read_id_file(path: Path, id_path: Path) -> str | None:
    try:
        text = id_path.read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise translate_error(exc, path, "Reading the journal id file") from exc
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


def connect(path: Path, *, create: bool) -> sqlite3.Connection:
    # mode=rw never creates the file: a vanished journal must not be replaced silently.
    uri = f"{path.resolve().as_uri()}?mode={'rwc' if create else 'rw'}"
    return sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None, timeout=30)


@dataclass
class _Found:
    """An existing journal that passed the integrity checks (connection still open)."""

    db: sqlite3.Connection
    file_id: str | None  # from the id file; None: no id file (adopt)
    db_id: str | None  # from the meta table


def inspect_journal(path: Path, *, full: bool = False) -> _Found | None:
    """Check an existing journal against its id file without changing either.

    Returns None when there is neither and no anchor (:func:`anchor_path_for`)
    says a journal was ever created there (a first start); raises
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
            anchor = anchor_path_for(path)
            anchor_id = _read_anchor(anchor)
            if anchor_id is None:
                return None  # a first start: nothing says a journal ever was here
            where = "is gone" if not path.parent.exists() else "holds neither"
            raise _refuse(
                path,
                f"the journal {path} and its {id_path.name} are missing (the folder {path.parent} "
                f"{where}), but {anchor} shows that journal {anchor_id} was created there: the "
                "folder was deleted, emptied or replaced.",
            ) from None
        raise _refuse(
            path,
            f"the journal {path} is missing, but {id_path.name} beside it shows that journal "
            f"{file_id} was created there.",
        ) from None
    except OSError as exc:
        raise translate_error(exc, path, "Reading the journal") from exc
    if size == 0:
        raise _refuse(path, f"the journal {path} is empty (0 bytes); it was truncated or replaced.")
    try:
        with open(path, "rb") as f:
            header = f.read(len(_SQLITE_HEADER))
    except OSError as exc:
        raise translate_error(exc, path, "Reading the journal") from exc
    if header != _SQLITE_HEADER:
        raise _refuse(
            path,
            f"the journal {path} ({size} bytes) is not a SQLite database (it does not start with "
            "the SQLite header): it was overwritten or damaged.",
        )
    try:
        db = connect(path, create=False)
    except sqlite3.Error as exc:
        raise translate_error(exc, path, "Opening the journal") from exc
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
            db.execute("SELECT value FROM meta WHERE key=?", (ID_KEY,)).fetchone()
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
        raise translate_error(exc, path, "Checking the journal") from exc
    except JournalError:
        db.close()
        raise
    return _Found(db, file_id, db_id)


def pending_in(path: Path) -> int | None:
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


def move_aside(path: Path) -> list[tuple[Path, Path]]:
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
            raise translate_error(exc, path, "Moving the old journal aside") from exc
        moved.append((src, dst))
    _fsync_dir(path.parent)
    return moved


# -- admin commands ----------------------------------------------------------------------
@dataclass(frozen=True)
class JournalReport:
    """What ``edge-runtime journal check`` (and ``backup``) found in a healthy journal."""

    path: Path
    journal_id: str | None
    #: False: no id file beside it (a backup copy; or the service adopts the journal at its
    #: next start).
    id_file: bool
    #: The database's size with everything committed, WAL included (page count x page size):
    #: about what a backup of it takes. The main file alone can be far smaller while recent
    #: commits still sit in ``NAME-wal``.
    size_bytes: int
    counts: dict[str, int]
    #: Undelivered outbox rows per sink (``mqtt``, ``ipc-local``, ``ipc-iotcore``).
    pending_by_sink: dict[str, int]
    #: On disk: the main file, and the ``-wal`` file beside it (0: none; SQLite copies it
    #: into the main file at checkpoints).
    file_bytes: int = 0
    wal_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "journal_id": self.journal_id,
            "id_file": self.id_file,
            "size_bytes": self.size_bytes,
            "file_bytes": self.file_bytes,
            "wal_bytes": self.wal_bytes,
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
    (page_count,) = db.execute("PRAGMA page_count").fetchone()
    (page_size,) = db.execute("PRAGMA page_size").fetchone()
    try:
        wal_bytes = Path(f"{path}-wal").stat().st_size
    except FileNotFoundError:
        wal_bytes = 0
    return JournalReport(
        path,
        journal_id,
        id_file,
        int(page_count) * int(page_size),
        counts,
        pending,
        file_bytes=path.stat().st_size,
        wal_bytes=wal_bytes,
    )


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
    found = inspect_journal(path, full=True)
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
        raise translate_error(exc, path, "Checking the journal") from exc
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
    # "DEST/" names a folder even before it exists (pathlib drops the trailing slash).
    as_folder = str(dest).endswith(("/", os.sep))
    path, dest = Path(path).absolute(), Path(dest).absolute()
    if as_folder or dest.is_dir():
        dest = dest / f"{path.stem}-{_stamp()}{path.suffix}"
    if dest.exists():
        raise JournalError(
            f"The backup file {dest} already exists; nothing was overwritten.",
            action="Choose a new file name (or a folder: the backup is then named after the time).",
        )
    found = inspect_journal(path)
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
        raise translate_error(exc, dest, "Writing the backup") from exc
    finally:
        found.db.close()
    # The copy has no id file beside it: restored in place, it matches the box's journal.id.
    return replace(report, path=dest, id_file=False)
