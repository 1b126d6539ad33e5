"""What the admin page may do: send a quarantined file back, move one aside, C-ECHO a destination.

Retry and discard change the box, so each is journaled (``admin_actions``)
before or as it is done, and neither ever deletes a file: a discarded file
moves to ``quarantine/discarded/`` with its error file, where the admin can
still fetch it. C-ECHO only asks the destination whether it answers.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..config import DicomConfig, DicomNodeConfig
from ..errors import AdminActionRefused as ActionRefused
from ..files import unique_target
from ..journal import Journal
from ..logs import event
from ..outcomes import QUARANTINE_LOCK
from ..pipeline import file_sha256
from ..results import utc_now
from .facts import QuarantinedFile

__all__ = ["ActionRefused", "EchoResult", "Echoes", "discard", "retry"]

log = logging.getLogger(__name__)

#: Discarded files go here, inside the quarantine folder (never deleted from the page).
DISCARDED = "discarded"


def retry(journal: Journal, item: QuarantinedFile, inbox: Path) -> Path:
    """Send a quarantined file back to the inbox, to be processed as if new.

    Under :data:`~edge_runtime.outcomes.QUARANTINE_LOCK` (no worker is moving a file
    in meanwhile, and a second click waits, then finds nothing left to do): the
    journal first (an unchanged file's record queued again, at the path the inbox
    will report), then the file renamed into the inbox under its own name (a hidden
    temporary name first when the inbox is on another disk, so it is never picked up
    half copied), then its error file removed, then the action journaled. A file
    whose content was fixed in quarantine has a new hash: simply a new scan, and the
    old record keeps its verdict.
    """
    with QUARANTINE_LOCK:
        try:
            mode = os.lstat(item.path).st_mode
        except FileNotFoundError:
            gone = f"quarantined scan {item.ref} has no file left in the quarantine folder"
            raise ActionRefused(gone) from None
        if not stat.S_ISREG(mode):
            # A link, a pipe or a device (quarantined unread): hashing it would follow or block on it.
            raise ActionRefused(
                f"quarantined scan {item.ref} is not a regular file (a link, pipe or device): it cannot be "
                "retried; discard it, or remove it on the box"
            )
        if not item.error_file.exists():
            raise ActionRefused(f"quarantined scan {item.ref} was retried or discarded meanwhile")
        inbox.mkdir(parents=True, exist_ok=True)
        # Resolved, as the inbox names what it finds: the journal must know the file by that path, or
        # the inbox would take it for a copy of itself (a relative Inbox.Path, a symlinked data disk).
        target = unique_target(inbox.resolve(), item.path.name)
        changed = item.key != file_sha256(item.path)
        if not changed:
            journal.retry_quarantined(item.key, target)
        try:
            _move_into(item.path, target)
        except OSError as exc:
            raise _not_moved(journal, "retry", item, exc) from None
        with contextlib.suppress(FileNotFoundError):
            item.error_file.unlink()
        how = "as a new scan (its file was replaced in quarantine)" if changed else "to be processed again"
        journal.record_admin_action("retry", item.ref, f"sent back to the inbox {how}")
    event(log, "admin_retry", "%s sent back to the inbox from the admin page", item.ref, file=item.ref)
    return target


def discard(journal: Journal, item: QuarantinedFile, quarantine: Path) -> Path:
    """Move a quarantined file and its error file aside (``quarantine/discarded/``); never delete."""
    with QUARANTINE_LOCK:
        if not item.error_file.is_file():
            raise ActionRefused(f"quarantined scan {item.ref} was retried or discarded meanwhile")
        folder = quarantine / DISCARDED
        folder.mkdir(parents=True, exist_ok=True)
        target = unique_target(folder, item.path.name)
        try:
            if os.path.lexists(item.path):
                os.rename(item.path, target)
            os.rename(item.error_file, target.with_name(target.name + ".error.json"))
        except OSError as exc:
            raise _not_moved(journal, "discard", item, exc) from None
        journal.record_admin_action("discard", item.ref, f"moved aside into {folder}")
    event(log, "admin_discard", "%s discarded from the admin page (moved aside)", item.ref, file=item.ref)
    return target


def _not_moved(journal: Journal, action: str, item: QuarantinedFile, exc: OSError) -> ActionRefused:
    """A move that failed: journaled and logged by its error number, never by its text (it names the file)."""
    reason = errno.errorcode.get(exc.errno or 0, "OSError")
    journal.record_admin_action(f"{action}-failed", item.ref, f"the file could not be moved ({reason})")
    log.error("admin page: %s of %s failed: the file could not be moved (%s)", action, item.ref, reason)
    return ActionRefused(f"quarantined scan {item.ref} could not be moved ({reason}); nothing changed")


def _move_into(path: Path, target: Path) -> None:
    try:
        os.rename(path, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        hidden = target.with_name(f".{target.name}.retry")
        shutil.copy2(path, hidden)
        os.rename(hidden, target)
        path.unlink()


@dataclass(frozen=True)
class EchoResult:
    at_utc: str
    ok: bool
    text: str
    milliseconds: float


class Echoes:
    """C-ECHO to each configured DICOM destination, and the last answer of each."""

    def __init__(self, calling_ae: str = "HEALTHDIAG") -> None:
        self.calling_ae = calling_ae
        self._last: dict[str, EchoResult] = {}
        self._lock = threading.Lock()

    @staticmethod
    def destinations(dicom: DicomConfig) -> dict[str, DicomNodeConfig]:
        """The destinations reports are sent to, by the name the page uses."""
        return {"pacs": dicom.store} if dicom.store.host else {}

    def last(self, name: str) -> EchoResult | None:
        with self._lock:
            return self._last.get(name)

    def echo(self, name: str, node: DicomNodeConfig, calling_ae: str) -> EchoResult:
        """One C-ECHO (Verification SOP class) to ``node``; what it answered, in words."""
        # Imported when first asked: pynetdicom is ~35 MB of memory a box without DICOM never loads.
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=calling_ae)
        ae.add_requested_context(Verification)
        timeout = min(node.timeout_seconds, 10.0)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.connection_timeout = timeout
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # A refused connection: pynetdicom drops its socket unclosed and CPython closes it
                # with a ResourceWarning (as for the PACS sink); the answer below says why.
                warnings.simplefilter("ignore", ResourceWarning)
                assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
            if assoc.is_established:
                status = assoc.send_c_echo()
                assoc.release()
                code = getattr(status, "Status", None)
                ok = code == 0x0000
                text = "answered: success" if ok else f"answered with status 0x{int(code or 0xFFFF):04X}"
            elif assoc.is_rejected:
                ok, text = (
                    False,
                    "association rejected (check our AE title in the destination's allowed list)",
                )
            else:
                ok, text = (
                    False,
                    f"no answer from {node.host}:{node.port} (host down, port closed or blocked)",
                )
        except (OSError, RuntimeError, ValueError) as exc:
            ok, text = False, f"cannot connect: {exc}"
        finally:
            ae.shutdown()
        result = EchoResult(utc_now(), ok, text, round((time.perf_counter() - t0) * 1000, 1))
        with self._lock:
            self._last[name] = result
        log.info("C-ECHO to %s (%s:%s %s): %s", name, node.host, node.port, node.ae_title, text)
        return result
